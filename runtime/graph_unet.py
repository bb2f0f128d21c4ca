"""A traced or pruned UNet graph behind the two calls the project makes with a UNet.

The graph is a torch.fx GraphModule whose placeholders are the UNet's flat tensor inputs
(:data:`ldpruner.base.unet_inputs.FLAT_INPUTS`, in the order the tracer recorded) and whose output is the prediction
tensor. :class:`GraphUNet` calls it

* the way diffusers calls a UNet — ``unet(sample, timestep, encoder_hidden_states=..., added_cond_kwargs=...,
  class_labels=..., timestep_cond=...)`` returning an object with ``.sample`` (or a 1-tuple with
  ``return_dict=False``); a scalar timestep is broadcast over the batch, as diffusers does;
* the way the sampling loop (:func:`ldpruner.runtime.sampling.sample_latents`) calls one — ``unet.flat(**inputs)``
  with the flat tensors by name, returning the tensor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ldpruner.base.errors import UnsupportedInputError
from ldpruner.base.unet_inputs import flat_inputs

__all__ = ["GraphUNet", "GraphUNetOutput"]


@dataclasses.dataclass
class GraphUNetOutput:
    """What a diffusers UNet returns: the prediction as ``.sample``."""

    sample: torch.Tensor


class GraphUNet:
    """``gm`` (flat tensor inputs named ``input_names``, one tensor out) as a UNet; ``calls`` counts its runs."""

    def __init__(self, gm: torch.nn.Module, input_names: Sequence[str]):
        self.gm = gm
        self.input_names = tuple(input_names)
        self.calls = 0

    @classmethod
    def of(cls, model: Any) -> GraphUNet:
        """From anything that carries a graph and its input names: a ``TracedUNet`` or a ``PrunedUNet``."""
        return cls(model.gm, model.input_names)

    def flat(self, **inputs: torch.Tensor) -> torch.Tensor:
        """Run the graph on the flat inputs by name; every input the graph takes must be given, no other."""
        missing = [n for n in self.input_names if inputs.get(n) is None]
        extra = sorted(n for n, v in inputs.items() if v is not None and n not in self.input_names)
        if missing or extra:
            raise UnsupportedInputError(
                f"the UNet graph takes {list(self.input_names)}; "
                + "; ".join(([f"missing {missing}"] if missing else []) + ([f"not taken {extra}"] if extra else [])))
        self.calls += 1
        return self.gm(*[inputs[n] for n in self.input_names])

    def __call__(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor | None = None,
        *,
        class_labels: torch.Tensor | None = None,
        timestep_cond: torch.Tensor | None = None,
        added_cond_kwargs: Mapping[str, torch.Tensor] | None = None,
        return_dict: bool = True,
    ) -> GraphUNetOutput | tuple[torch.Tensor]:
        flat = flat_inputs(encoder_hidden_states=encoder_hidden_states, class_labels=class_labels,
                           timestep_cond=timestep_cond, added_cond_kwargs=added_cond_kwargs, caller="GraphUNet")
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(sample.shape[0])
        out = self.flat(sample=sample, timestep=t, **flat)
        return GraphUNetOutput(out) if return_dict else (out,)
