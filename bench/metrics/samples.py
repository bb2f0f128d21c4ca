"""Sample files written beside the metrics: image grids (PNG) and audio clips (WAV, 16-bit PCM).

Both are written atomically (a temporary file beside the target, renamed onto it), so a report folder never holds
a half-written sample.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldpruner.base.io import atomic_path

from ._images import to_unit_range
from .errors import MetricInputError

__all__ = ["image_grid", "save_image_grid", "save_wav"]


def image_grid(
    images: torch.Tensor, nrow: int = 8, *, value_range: tuple[float, float] = (0.0, 1.0), padding: int = 2,
    scale: int = 1, background: int = 255,
) -> np.ndarray:
    """(rows·(H·scale+padding)+padding, nrow·(W·scale+padding)+padding[, 3]) uint8 grid of images (N, 1|3, H, W)
    in ``value_range``, row-major with ``nrow`` images per row, each upscaled ``scale``× (nearest)."""
    x = to_unit_range(images, value_range)
    if x.shape[1] not in (1, 3):
        raise MetricInputError(f"images must have 1 or 3 channels; got shape {tuple(x.shape)}")
    for name, value, low in (("nrow", nrow, 1), ("scale", scale, 1), ("padding", padding, 0)):
        if not isinstance(value, int) or value < low:
            raise MetricInputError(f"{name} must be an int ≥ {low}; got {value!r}")
    n, c, h, w = x.shape
    pixels = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    pixels = pixels.repeat(scale, axis=1).repeat(scale, axis=2)
    h, w = h * scale, w * scale
    columns = min(nrow, n)
    rows = -(-n // columns)
    grid = np.full((rows * (h + padding) + padding, columns * (w + padding) + padding, c), background, np.uint8)
    for i in range(n):
        r, col = divmod(i, columns)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top:top + h, left:left + w] = pixels[i]
    return grid[..., 0] if c == 1 else grid


def save_image_grid(
    images: torch.Tensor, path: str | os.PathLike, nrow: int = 8, *, value_range: tuple[float, float] = (0.0, 1.0),
    padding: int = 2, scale: int = 1,
) -> Path:
    """Write ``image_grid(images, nrow, ...)`` as a PNG at ``path``; images (N, 1|3, H, W) in ``value_range``
    ((0, 1) by default; pass (-1, 1) for raw diffusion outputs). Returns the path."""
    from PIL import Image

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise MetricInputError(f"path must end in .png; got {str(path)!r}")
    grid = image_grid(images, nrow, value_range=value_range, padding=padding, scale=scale)
    with atomic_path(path, suffix=path.suffix) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")
    return path


def save_wav(samples: Any, sr: int, path: str | os.PathLike) -> Path:
    """Write audio as 16-bit PCM WAV: ``samples`` float in [-1, 1], shape (T,) mono or (C, T); ``sr`` in Hz.

    Values beyond ±1 are clipped (decoded audio overshoots a little); NaN/inf, a non-positive rate or an empty clip
    raise. Returns the path.
    """
    from scipy.io import wavfile

    if hasattr(samples, "detach"):
        samples = samples.detach().cpu().numpy()
    audio = np.asarray(samples, dtype=np.float64)
    if audio.ndim not in (1, 2) or audio.size == 0:
        raise MetricInputError(f"samples must be a non-empty (T,) or (channels, T) array; got shape {audio.shape}")
    if not np.isfinite(audio).all():
        raise MetricInputError("samples contain NaN or infinite values")
    if not isinstance(sr, int | np.integer) or sr <= 0:
        raise MetricInputError(f"sr must be a positive int (Hz); got {sr!r}")
    path = Path(path)
    if path.suffix.lower() != ".wav":
        raise MetricInputError(f"path must end in .wav; got {str(path)!r}")
    pcm = np.round(np.clip(audio, -1.0, 1.0) * 32767).astype(np.int16)
    with atomic_path(path, suffix=path.suffix) as tmp:
        wavfile.write(tmp, int(sr), pcm.T if pcm.ndim == 2 else pcm)
    return path
