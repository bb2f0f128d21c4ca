"""How a diffusers UNet is called with the flat tensor inputs of a traced graph (:mod:`ldpruner.base.unet_inputs`):
the forward the tracer traces, and the eager call a trace is compared with and example shapes are read from, one
mapping for both so they cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ldpruner.base.unet_inputs import diffusers_kwargs

__all__ = ["call_diffusers_unet", "flat_call"]


def flat_call(model_class: type) -> Callable[..., Any]:
    """Flat-signature adapter around a diffusers UNet's forward (tensors only, tensor out)."""
    from diffusers import UNet2DModel

    def call(self, sample, timestep, **flat):
        if issubclass(model_class, UNet2DModel):
            kwargs = {"class_labels": flat["class_labels"]} if flat.get("class_labels") is not None else {}
        else:
            kwargs = diffusers_kwargs(flat)
        return model_class.forward(self, sample, timestep, return_dict=False, **kwargs)[0]

    return call


def call_diffusers_unet(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Call a diffusers UNet eagerly with the flat tensor inputs a traced graph takes (the reference a trace is
    compared with): the same mapping the tracer uses."""
    with torch.no_grad():
        return flat_call(type(model))(model, **inputs)
