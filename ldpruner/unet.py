"""The PyTorch drop-in: a pruned (and distilled) student that a diffusers pipeline takes as ``pipe.unet``.

:class:`StudentUNet` wraps the student's fx graph in a module that behaves like the dense diffusers UNet it was
pruned from: the same forward signature (``sample, timestep, encoder_hidden_states, class_labels, timestep_cond,
added_cond_kwargs, return_dict`` …, a scalar timestep broadcast over the batch), ``config`` (also as attributes,
``unet.in_channels``), ``dtype``, ``device``, ``.to(device, dtype)``, ``save_pretrained`` / ``from_pretrained``
(the student folder: safetensors, never a pickle), and ``torch.compile``. Submodules the pipelines look at
(SDXL reads ``unet.add_embedding.linear_1.in_features``) are the graph's own. Loaded with ``controlnet=True`` (or
:meth:`StudentUNet.with_controlnet`) it takes ControlNet's residuals as well, with ``adapter=True`` T2I-Adapter's
features (zeros when a call gives none).

    from ldpruner.unet import StudentUNet
    pipe.unet = StudentUNet.from_pretrained("run/distill/student").to(pipe.device, pipe.unet.dtype)
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ldpruner.base.errors import ArtifactError
from ldpruner.base.unet_inputs import TEXT_INPUT
from ldpruner.runtime.dropin import UNetDropIn

__all__ = ["StudentUNet"]


class StudentUNet(UNetDropIn):
    """A pruned UNet (a :class:`~ldpruner.passes.remove.PrunedUNet`: ``api.prune``'s result, a loaded student) as a
    drop-in for the dense diffusers UNet."""

    def __init__(self, pruned: Any):
        super().__init__()
        if pruned.config is None:
            raise ArtifactError(f"the student of a {pruned.traced.model_class} carries no diffusers config, which a "
                                "pipeline reads; prune a diffusers UNet (its config travels with the student)")
        from diffusers.configuration_utils import FrozenDict

        self.graph = pruned.gm  # registered: .to(), parameters(), state_dict() and torch.compile see the weights
        object.__setattr__(self, "_pruned", pruned)
        self._internal_dict = FrozenDict(dict(pruned.config))
        self.input_names = tuple(pruned.input_names)

    # --- loading and saving ------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike[str], *, subfolder: str | None = None,
                        torch_dtype: torch.dtype | None = None, device: Any = None,
                        controlnet: bool = False, adapter: bool = False) -> StudentUNet:
        """Load a ``student/`` folder (``ldpruner prune`` / ``distill`` / :meth:`save_pretrained`); ``torch_dtype``
        and ``device`` as diffusers' ``from_pretrained`` take them; ``controlnet``: take ControlNet's residuals
        (``down_block_additional_residuals``, ``mid_block_additional_residual``); ``adapter``: take T2I-Adapter's
        features (``down_intrablock_additional_residuals``)."""
        from ldpruner.passes.student import load_student

        path = Path(folder) / subfolder if subfolder else Path(folder)
        unet = cls(load_student(path, controlnet=controlnet, adapter=adapter))
        if torch_dtype is not None or device is not None:
            unet = unet.to(device=device, dtype=torch_dtype)
        return unet

    def save_pretrained(self, folder: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the student folder (weights in their current dtype; the folder is complete or absent)."""
        from ldpruner.passes.student import save_student

        return save_student(self._pruned, folder, overwrite=overwrite)

    def with_controlnet(self) -> StudentUNet:
        """This student traced again with ControlNet's residuals as inputs (same weights, a new module; this one is
        unchanged): ``StableDiffusionControlNetPipeline`` can drive it. Every residual lands on the skip tensor it
        lands on in the dense UNet: removals substitute operators and never delete a skip."""
        from ldpruner.passes.student import with_residual_inputs

        return StudentUNet(with_residual_inputs(self._pruned, controlnet=True))

    def with_adapter(self) -> StudentUNet:
        """This student traced again with T2I-Adapter's features as inputs (``down_intrablock_additional_residuals``;
        same weights, a new module): ``StableDiffusionAdapterPipeline`` can drive it."""
        from ldpruner.passes.student import with_residual_inputs

        return StudentUNet(with_residual_inputs(self._pruned, adapter=True))

    @property
    def pruned(self) -> Any:
        """The :class:`~ldpruner.passes.remove.PrunedUNet` behind this module (plan, trace, rewrite summary)."""
        return self._pruned

    # --- what pipelines read -----------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return next(self.graph.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.graph.parameters()).device

    def _attribute(self, name: str) -> Any:
        # the graph's own submodules, as pipelines look them up (unet.add_embedding, unet.conv_in)
        graph = self.__dict__.get("_modules", {}).get("graph")
        if graph is not None and not name.startswith("_") and hasattr(graph, name):
            return getattr(graph, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    # --- the call (UNetDropIn.forward checks it) --------------------------------------------------------------
    _caller = "StudentUNet"

    @property
    def _what(self) -> str:
        return "the traced graph"

    def _input_names(self) -> Sequence[str]:
        return self.input_names

    def _example_shapes(self) -> Mapping[str, Sequence[int]]:
        return {name: tuple(t.shape) for name, t in self._pruned.traced.example_inputs.items()}

    def _declared_shapes(self) -> Mapping[str, Sequence[int | None]]:
        # the trace holds for any batch and text length, and for other latent sizes when it has a spatial multiple
        # (the image-like inputs, a control hint and ControlNet's residuals, follow the latent's size)
        traced = self._pruned.traced
        free_spatial = traced.spatial_multiple is not None
        shapes = {}
        for name, example in traced.example_inputs.items():
            dims: list[int | None] = [None, *example.shape[1:]]
            if name == TEXT_INPUT and len(dims) == 3:
                dims[1] = None
            if free_spatial and example.dim() == 4:
                dims[2:] = [None, None]
            shapes[name] = dims
        return shapes

    def _spatial_multiple(self) -> int | None:
        return self._pruned.traced.spatial_multiple

    def _run(self, inputs: dict[str, torch.Tensor], sample: torch.Tensor) -> torch.Tensor:
        return self.graph(*[inputs[name] for name in self.input_names])

    def extra_repr(self) -> str:
        plan = self._pruned.plan
        return (f"{self.config.get('_class_name')}, inputs={list(self.input_names)}, "
                f"{len(plan.removals)} operators removed, {sum(p.numel() for p in self.graph.parameters()):,} params")
