"""Which module classes are operators, per granularity, and what kind each one is."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from ldpruner.base.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

__all__ = ["Granularity", "parse_granularity", "leaf_operator_types", "operator_kind", "is_operator"]


class Granularity(str, enum.Enum):
    """``block``: ResnetBlock2D, Transformer2DModel, block attention. ``sublayer``: transformer blocks are opened
    so that self-attention, cross-attention and feed-forward (each with its own residual) are operators."""

    BLOCK = "block"
    SUBLAYER = "sublayer"


def parse_granularity(value: str | Granularity) -> Granularity:
    try:
        return Granularity(value)
    except ValueError:
        raise ConfigError(
            f"granularity={value!r} is not one of {[g.value for g in Granularity]}"
        ) from None


def _diffusers_classes() -> dict[str, type]:
    from diffusers.models.attention import FeedForward
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    return {
        "ResnetBlock2D": ResnetBlock2D,
        "Transformer2DModel": Transformer2DModel,
        "Attention": Attention,
        "FeedForward": FeedForward,
        "Downsample2D": Downsample2D,
        "Upsample2D": Upsample2D,
    }


def leaf_operator_types(granularity: Granularity) -> tuple[type, ...]:
    """Module classes the tracer keeps whole. Timestep embeddings are leaves too (not operators) to keep
    the graph readable."""
    from diffusers.models.downsampling import KDownsample2D
    from diffusers.models.embeddings import TimestepEmbedding, Timesteps
    from diffusers.models.upsampling import KUpsample2D

    c = _diffusers_classes()
    # K-diffusion resamplers build their kernel by item assignment, which a trace cannot record: kept whole
    common = (c["ResnetBlock2D"], c["Attention"], c["Downsample2D"], c["Upsample2D"], Timesteps, TimestepEmbedding,
              KDownsample2D, KUpsample2D)
    if granularity is Granularity.BLOCK:
        return common + (c["Transformer2DModel"],)
    return common + (c["FeedForward"],)


def is_operator(module: nn.Module, granularity: Granularity, extra_types: tuple[type, ...] = ()) -> bool:
    """Operators are the units LD-Pruner scores; other leaves (convs, norms, embeddings) are structure."""
    c = _diffusers_classes()
    types = [c["ResnetBlock2D"], c["Attention"], c["Downsample2D"], c["Upsample2D"]]
    types.append(c["Transformer2DModel"] if granularity is Granularity.BLOCK else c["FeedForward"])
    return isinstance(module, tuple(types) + tuple(extra_types))


def operator_kind(module: nn.Module) -> str:
    """A short human name for the operator's role."""
    name = type(module).__name__
    if name == "ResnetBlock2D":
        if getattr(module, "up", False):
            return "resnet-up"
        if getattr(module, "down", False):
            return "resnet-down"
        return "resnet"
    if name == "Transformer2DModel":
        return "transformer"
    if name == "Attention":
        if getattr(module, "residual_connection", False):
            return "attention"
        return "cross-attention" if getattr(module, "is_cross_attention", False) else "self-attention"
    if name == "FeedForward":
        return "feed-forward"
    if name == "Downsample2D":
        return "downsample"
    if name == "Upsample2D":
        return "upsample"
    return name
