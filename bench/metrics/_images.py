"""Validation and range conversion of image batches shared by the feature extractors, the classifier and the grids."""

from __future__ import annotations

import torch

from .errors import MetricInputError

__all__ = ["check_value_range", "to_unit_range"]

# Decoded samples overshoot their nominal range a little and are clamped; a batch that overshoots by more than this
# share of the range is in some other range (e.g. [-1, 1] passed as [0, 1], or 0..255) and is rejected.
_OVERSHOOT = 0.25


def check_value_range(value_range: tuple[float, float]) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value_range)
    except (TypeError, ValueError):
        raise MetricInputError(
            f"value_range must be a pair (low, high) such as (0, 1) or (-1, 1); got {value_range!r}"
        ) from None
    if not high > low:
        raise MetricInputError(f"value_range must have high > low; got {value_range!r}")
    return low, high


def to_unit_range(images: torch.Tensor, value_range: tuple[float, float], *, argument: str = "images") -> torch.Tensor:
    """(N, C, H, W) floats in ``value_range`` → float32 in [0, 1], clamped; raises when data is not in that range."""
    if not isinstance(images, torch.Tensor):
        raise MetricInputError(f"{argument} must be a torch.Tensor of shape (N, C, H, W); got {type(images).__name__}")
    if images.ndim != 4:
        raise MetricInputError(f"{argument} must have shape (N, C, H, W); got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise MetricInputError(f"{argument} is empty (shape {tuple(images.shape)})")
    if not images.is_floating_point():
        raise MetricInputError(
            f"{argument} must be floating point in value_range; got dtype {images.dtype} (convert uint8 with "
            f"images.float() / 255 and value_range=(0, 1))"
        )
    low, high = check_value_range(value_range)
    x = images.detach().float()
    if not torch.isfinite(x).all():
        raise MetricInputError(f"{argument} contains NaN or infinite values")
    slack = _OVERSHOOT * (high - low)
    lo_seen, hi_seen = float(x.min()), float(x.max())
    if lo_seen < low - slack or hi_seen > high + slack:
        raise MetricInputError(
            f"{argument} spans [{lo_seen:.3g}, {hi_seen:.3g}], outside value_range=({low:g}, {high:g}) by more than "
            f"{_OVERSHOOT:.0%} of the range; pass the range the images are in (e.g. value_range=(-1, 1))"
        )
    return ((x - low) / (high - low)).clamp_(0.0, 1.0)
