"""Pieces every zoo sampler shares: per-image seeds and the saved scheduler's class."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ldpruner.errors import ConfigError, ModelLoadError

__all__ = ["scheduler_class", "seeds_for"]


def seeds_for(seed: int | Sequence[int], n: int) -> list[int]:
    """One seed per image: an int gives image i ``seed + i``; a sequence must hold ``n`` ints."""
    if isinstance(seed, bool):
        raise ConfigError(f"seed must be an int or one int per image (one per prompt); got {seed!r}")
    if isinstance(seed, int):
        return [seed + i for i in range(n)]
    seeds = list(seed)
    if len(seeds) != n or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"seed must be an int or {n} ints, one per image (one per prompt for text-to-image); got {seed!r}")
    return seeds


def scheduler_class(config_path: Path) -> type:
    """The diffusers scheduler class that ``scheduler_config.json`` names; ``ModelLoadError`` when it is none."""
    import json

    import diffusers

    class_name = json.loads(config_path.read_text()).get("_class_name")
    cls = getattr(diffusers, str(class_name), None)
    if cls is None or not hasattr(cls, "set_timesteps"):
        raise ModelLoadError(f"{str(config_path)!r} names {class_name!r}, which is not a diffusers scheduler")
    return cls
