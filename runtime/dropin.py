"""What the two drop-ins for a diffusers pipeline's UNet share: diffusers' forward signature, the check of a call
against the inputs of the graph behind it (every problem reported at once), ControlNet's residuals (zeros when a
call gives none) and the output class. :class:`~ldpruner.runtime.unet.ORTUNet` runs the inputs in onnxruntime,
:class:`~ldpruner.unet.StudentUNet` in PyTorch; each says how in :meth:`UNetDropIn._run`."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ldpruner.base.errors import UnsupportedInputError
from ldpruner.base.unet_inputs import (
    ADDED_COND_KEYS,
    INTRA_RESIDUAL,
    MID_RESIDUAL,
    TEXT_INPUT,
    adapter_inputs,
    flat_inputs,
    residual_inputs,
    residual_names,
)

__all__ = ["UNetDropIn"]


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _shape_text(dims: Sequence[int | None]) -> str:
    return "[" + ", ".join("any" if d is None else str(d) for d in dims) + "]"


def _is_residual(name: str) -> bool:
    return name == MID_RESIDUAL or bool(residual_names([name]) or residual_names([name], INTRA_RESIDUAL))


class UNetDropIn(torch.nn.Module):
    """A module called like a diffusers UNet whose work a subclass does in :meth:`_run` on the flat inputs."""

    _caller = "UNet"  # the name errors start with

    @property
    def _what(self) -> str:
        """What runs the inputs, as errors name it."""
        return "the graph"

    # --- what a subclass says ----------------------------------------------------------------------------------
    def _input_names(self) -> Sequence[str]:
        raise NotImplementedError

    def _example_shapes(self) -> Mapping[str, Sequence[int]] | None:
        """The traced/exported shapes of the inputs (zero residuals are scaled from them); None: unknown."""
        raise NotImplementedError

    def _timestep_dtype(self) -> torch.dtype | None:
        """The dtype the graph takes the timestep in (None: as given)."""
        return None

    def _declared_shapes(self) -> Mapping[str, Sequence[int | None]]:
        """The shape each input must have: an int where a dimension is fixed, None where it is free (the batch, the
        text length, a latent size the trace is valid for)."""
        raise NotImplementedError

    def _spatial_multiple(self) -> int | None:
        """The latent height/width must be a multiple of this (None: the sizes :meth:`_declared_shapes` fixes)."""
        raise NotImplementedError

    def _check_shapes(self, inputs: Mapping[str, torch.Tensor], sample: torch.Tensor) -> None:
        """Refuse, in one line naming the input and the dimension, a call the graph cannot run: a latent size off
        the UNet's multiple (the dense diffusers UNet interpolates such sizes; its trace does not), a fixed
        dimension of another size, a batch that differs from the sample's."""
        declared, multiple = self._declared_shapes(), self._spatial_multiple()
        problems = []
        height, width = sample.shape[-2:]
        if multiple is not None and (height % multiple or width % multiple):
            problems.append(
                f"the latent is {height}x{width}, but {self._what} takes latent sizes that are multiples of "
                f"{multiple} (the UNet has {_count(multiple.bit_length() - 1, 'upsampler')}; the dense diffusers UNet "
                f"interpolates other sizes, its trace does not): pass a height and width whose latent is a multiple "
                f"of {multiple} (the image size is the latent's times pipe.vae_scale_factor: multiples of "
                f"{8 * multiple} pixels for Stable Diffusion)")
        for name, value in inputs.items():
            dims = declared.get(name)
            if dims is None:
                continue
            shape = list(value.shape)
            if name != "timestep" and shape[:1] != [sample.shape[0]]:
                problems.append(f"{name} has batch {shape[0] if shape else 'none'} (shape {shape}), the sample "
                                f"{sample.shape[0]}: give every input the sample's batch")
                continue
            if len(shape) != len(dims):
                problems.append(f"{name} has shape {shape}, but {self._what} takes {len(dims)} dimensions "
                                f"({_shape_text(dims)})")
                continue
            wrong = [i for i, (got, want) in enumerate(zip(shape, dims)) if want is not None and got != want]
            if not wrong:
                continue
            i = wrong[0]
            if name == TEXT_INPUT and i == 1:
                problems.append(
                    f"{name} has {shape[1]} tokens, but {self._what} takes exactly {dims[1]} (it was exported with "
                    "a fixed text length): export it again with this ldpruner, whose exports take any number of "
                    "tokens")
            elif name == "sample" and i >= 2:
                problems.append(f"the latent is {height}x{width}, but {self._what} takes {dims[2]}x{dims[3]} only "
                                "(its trace is valid for that size only): pass the height and width it was traced at")
            else:
                problems.append(f"{name} has shape {shape}: dimension {i} is {shape[i]}, but {self._what} takes "
                                f"{_shape_text(dims)}; pass the {name} of the model it was made from")
        if problems:
            raise UnsupportedInputError(f"{self._caller}: " + "; ".join(problems))

    def _timestep(self, timestep: Any, sample: torch.Tensor) -> torch.Tensor:
        """int/float/0-d/(1,)/(batch,) → a (batch,) tensor, in :meth:`_timestep_dtype` when it names one."""
        batch = sample.shape[0]
        if isinstance(timestep, torch.Tensor):
            t = timestep.detach().to(sample.device)
        elif isinstance(timestep, (int, float, np.integer, np.floating)) and not isinstance(timestep, bool):
            t = torch.tensor(float(timestep) if isinstance(timestep, (float, np.floating)) else int(timestep),
                             device=sample.device)
        else:
            raise UnsupportedInputError(f"timestep must be a number or a tensor, got {type(timestep).__name__}")
        if t.dim() == 0 or (t.dim() == 1 and t.shape[0] == 1):
            t = t.reshape(1).expand(batch)
        elif t.dim() != 1 or t.shape[0] != batch:
            raise UnsupportedInputError(
                f"timestep must be a scalar, a 0-d tensor or a (batch,) tensor with batch={batch}, "
                f"got shape {list(t.shape)}"
            )
        target = self._timestep_dtype()
        if target is not None and not target.is_floating_point and t.is_floating_point() \
                and not torch.equal(t, t.round()):
            raise UnsupportedInputError(
                f"{self._what} takes an integer timestep but got fractional values {t.tolist()}; "
                "re-export with timestep_dtype='float32' (the default) for schedulers with fractional timesteps"
            )
        if t.is_floating_point() and not all(math.isfinite(v) for v in t.tolist()):
            raise UnsupportedInputError(f"timestep has non-finite values {t.tolist()}")
        return (t.to(target) if target is not None else t).contiguous()

    def _run(self, inputs: dict[str, torch.Tensor], sample: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _class_name(self) -> str | None:
        config = self.__dict__.get("_internal_dict")
        return config.get("_class_name") if config is not None else None

    def _attribute(self, name: str) -> Any:
        """An attribute a pipeline reads that is neither a module nor a config entry (raise AttributeError)."""
        raise AttributeError(name)

    # --- what pipelines read ----------------------------------------------------------------------------------
    @property
    def config(self) -> Any:
        """The dense UNet's diffusers config (a FrozenDict in ``_internal_dict``, as diffusers models keep it)."""
        return self._internal_dict

    def __getattr__(self, name: str) -> Any:
        # nn.Module keeps submodules in _modules; then diffusers-style config attributes (unet.in_channels), on which
        # pipelines rely, then what the subclass offers
        try:
            return super().__getattr__(name)
        except AttributeError:
            config = self.__dict__.get("_internal_dict")
            if config is not None and name in config:
                return config[name]
            return self._attribute(name)

    # --- the call ---------------------------------------------------------------------------------------------
    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: Mapping[str, Any] | None = None,
        added_cond_kwargs: Mapping[str, torch.Tensor] | None = None,
        down_block_additional_residuals: Sequence[torch.Tensor] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        down_intrablock_additional_residuals: Sequence[torch.Tensor] | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> Any:
        names = tuple(self._input_names())
        unsupported = {"attention_mask": attention_mask, "encoder_attention_mask": encoder_attention_mask, **kwargs}
        problems = [f"{k} ({self._what} has no input for it; pass None)" for k, v in unsupported.items()
                    if v is not None]
        if cross_attention_kwargs and "gligen" in cross_attention_kwargs:
            problems.append(f"cross_attention_kwargs['gligen'] (GLIGEN's grounding: {self._what} was traced without "
                            "it, and its gated attention is not in the graph; run GLIGEN with the dense UNet)")
        elif cross_attention_kwargs:  # None or {} are both "no extra attention arguments"
            problems.append(f"cross_attention_kwargs {sorted(cross_attention_kwargs)} (attention processors and LoRA "
                            f"scales are part of {self._what}; pass None)")
        if not isinstance(sample, torch.Tensor) or sample.dim() != 4:
            problems.append(f"sample must be a 4-D NCHW tensor, got {getattr(sample, 'shape', type(sample).__name__)}")
        unknown = sorted(set(added_cond_kwargs or {}) - set(ADDED_COND_KEYS))
        if unknown:
            problems.append(f"added_cond_kwargs keys {unknown} (graph inputs are {list(ADDED_COND_KEYS)})")
        given = flat_inputs(encoder_hidden_states=encoder_hidden_states, class_labels=class_labels,
                            timestep_cond=timestep_cond, caller=self._caller,
                            added_cond_kwargs={k: v for k, v in (added_cond_kwargs or {}).items() if k not in unknown})
        for name, value in given.items():
            if value is not None and name not in names:
                problems.append(f"{name} was given but {self._what} takes no such input")
            elif value is None and name in names:
                problems.append(f"{name} is required by {self._what} but was not given")
        residuals: dict[str, torch.Tensor] = {}
        for group in (lambda: residual_inputs(down_block_additional_residuals, mid_block_additional_residual, names,
                                              self._caller),
                      lambda: adapter_inputs(down_intrablock_additional_residuals, names, self._caller)):
            try:
                residuals.update(group())
            except UnsupportedInputError as exc:  # reported with the other problems
                problems.append(str(exc).removeprefix(f"{self._caller}: "))
        if problems:
            raise UnsupportedInputError(f"{self._caller}: " + "; ".join(problems))

        inputs = {"sample": sample, "timestep": self._timestep(timestep, sample)}
        inputs.update({n: v for n, v in given.items() if v is not None})
        inputs.update(residuals)
        self._check_shapes(inputs, sample)
        missing = [n for n in names if _is_residual(n) and n not in inputs]
        if missing:  # no ControlNet / adapter this call: its residuals are zero
            inputs.update(self._zero_residuals(sample, missing))
        out = self._run(inputs, sample)
        if not return_dict:
            return (out,)
        if self._class_name() == "UNet2DModel":
            from diffusers.models.unets.unet_2d import UNet2DOutput

            return UNet2DOutput(sample=out)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=out)

    def _zero_residuals(self, sample: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Zeros for every residual input, scaled from the example shapes to ``sample``'s batch and size."""
        shapes = self._example_shapes()
        if not shapes:
            raise UnsupportedInputError(f"{self._caller}: {self._what} takes ControlNet residuals and records no "
                                        "example shapes to make zero ones from; pass down_block_additional_residuals "
                                        "and mid_block_additional_residual")
        h0, w0 = list(shapes["sample"])[-2:]
        out = {}
        for name in names:
            if _is_residual(name):
                c, h, w = list(shapes[name])[1:]
                out[name] = sample.new_zeros(sample.shape[0], c, h * sample.shape[-2] // h0,
                                             w * sample.shape[-1] // w0)
        return out
