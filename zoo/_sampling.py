"""Pieces every zoo sampler shares: argument checks, per-image seeds and noise, the saved scheduler's class."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ldpruner.base.errors import ConfigError, ModelLoadError
from ldpruner.base.io import read_json

if TYPE_CHECKING:
    import torch

__all__ = ["positive_int", "scheduler_class", "seeded_noise", "seeds_for"]


def positive_int(name: str, value: Any) -> int:
    """``value`` when it is an int >= 1 (not a bool); ``ConfigError`` naming the argument ``name`` otherwise."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name} must be a positive int; got {value!r}")
    return value


def seeds_for(seed: int | Sequence[int], n: int) -> list[int]:
    """One seed per image: an int gives image i ``seed + i``; a sequence must hold ``n`` ints."""
    if isinstance(seed, bool):
        raise ConfigError(f"seed must be an int or one int per image (one per prompt); got {seed!r}")
    if isinstance(seed, int):
        return [seed + i for i in range(n)]
    seeds = list(seed)
    if len(seeds) != n or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"seed must be an int or {n} ints, one per image (one per prompt for text-to-image); "
                          f"got {seed!r}")
    return seeds


def seeded_noise(shape: tuple[int, ...], seeds: Sequence[int]) -> torch.Tensor:
    """(len(seeds), *shape) standard normal starting noise, image i's from its own CPU generator seeded ``seeds[i]``,
    so an image does not depend on the rest of the batch."""
    import torch

    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


def scheduler_class(config_path: Path) -> type:
    """The diffusers scheduler class that ``scheduler_config.json`` names; ``ModelLoadError`` when it is none."""
    import diffusers

    class_name = read_json(config_path, what="scheduler config", error=ModelLoadError).get("_class_name")
    cls = getattr(diffusers, str(class_name), None)
    if cls is None or not hasattr(cls, "set_timesteps"):
        raise ModelLoadError(f"{str(config_path)!r} names {class_name!r}, which is not a diffusers scheduler")
    return cls
