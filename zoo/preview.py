"""A quick look at a pruned zoo model: samples of the dense UNet and of its pruned (and distilled) students on the
same seeds and prompts, one row per variant, in one PNG. ``ldpruner build zoo:<name>`` writes it as
``samples.png``; the numbers that say whether quality held are the benchmarks' (``ldpruner bench``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ldpruner.base.errors import ConfigError
from ldpruner.base.io import atomic_path

from ._sampling import positive_int

__all__ = ["preview_grid"]


def preview_grid(
    name: str,
    variants: Mapping[str, Any],
    path: str | os.PathLike,
    *,
    samples: int = 10,
    steps: int = 25,
    seed: int = 0,
    scale: int = 2,
) -> dict[str, Any]:
    """Sample zoo model ``name`` once per variant (label → a UNet called the diffusers way, e.g. a
    :class:`~ldpruner.runtime.graph_unet.GraphUNet`, or None for the model's own dense UNet) on
    the same seeds, and write one row per variant, in the given order, to ``path`` (PNG, written atomically).

    Text-to-image models sample their own prompt set (``prompts.txt``: one image per prompt, guidance 5) and
    ``samples`` is ignored; unconditional models draw ``samples`` images (mel spectrograms for audio, shown as
    images). Returns what was drawn: rows, seeds, prompts, steps."""
    from . import get_entry

    entry = get_entry(name)
    positive_int("steps", steps)
    positive_int("samples", samples)
    if not variants:
        raise ConfigError("variants must name at least one UNet (None = the dense model)")
    if entry.task == "text-to-image":
        from .text_to_image import image_grid, load_text_to_image

        model = load_text_to_image(name)
        prompts_file = model.folder / "prompts.txt"
        prompts = [p.strip() for p in prompts_file.read_text().splitlines() if p.strip()]
        draw = lambda unet: model.sample(prompts, steps=steps, guidance_scale=5.0, seed=seed, unet=unet)  # noqa: E731
        columns = len(prompts)
    else:
        from .text_to_image import image_grid
        from .unconditional import load_unconditional

        model = load_unconditional(name, task=entry.task)
        prompts = None
        draw = lambda unet: model.sample(samples, steps=steps, seed=seed, unet=unet)  # noqa: E731
        columns = samples
    import torch

    images = torch.cat([draw(unet) for unet in variants.values()])
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        image_grid(images, columns=columns, scale=scale).save(tmp, format="PNG")
    return {"path": str(path), "rows": list(variants), "columns": columns, "seeds": [seed + i for i in range(columns)],
            "prompts": prompts, "steps": steps, "task": entry.task}
