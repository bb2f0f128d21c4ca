"""BuildConfig: every knob of ``ldpruner build``, frozen and validated; TOML in, dict out.

The field names are the CLI flags (``--num-samples`` ↔ ``num_samples``) and the keywords of :func:`ldpruner.api.build`,
so a TOML file, a command line and a Python call say the same thing the same way.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["BuildConfig", "load_config", "DEFAULT_MODEL"]

# what `ldpruner build` prunes when given no MODEL: the embedded text-to-image model
DEFAULT_MODEL = "zoo:mnist-t2i"


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    # where to write and what to prune
    out: str
    model: str = DEFAULT_MODEL
    overwrite: bool = False
    # trace
    granularity: str = "block"
    height: int | None = None  # latent height for tracing and analysis (default: the UNet's sample_size)
    width: int | None = None
    # analysis (LD score)
    num_samples: int = 8
    steps: int = 10
    seed: int = 0
    guidance_scale: float = 7.5
    prompts: str | None = None  # a text file, one prompt per line (default: the built-in prompt set)
    # selection
    budget: float = 0.3
    metric: str = "params"
    order: str = "score"
    # distillation (0: export the pruned student as it is)
    distill_steps: int = 200
    # export
    exporter: str = "legacy"
    opset: int | None = None  # None: the exporter's default (17 legacy, 18 dynamo)
    optimize: bool = False
    fp16: bool = False
    verify: bool = True

    def __post_init__(self) -> None:
        errors: list[str] = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            expected = _TYPES[f.name]
            if value is None and f.default is None:
                continue
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, f.name, float(value))
                continue
            if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                errors.append(f"{f.name}={value!r} must be {expected.__name__}")
        for name in ("num_samples", "steps"):
            if isinstance(getattr(self, name), int) and getattr(self, name) < 1:
                errors.append(f"{name}={getattr(self, name)} must be >= 1")
        if isinstance(self.distill_steps, int) and self.distill_steps < 0:
            errors.append(f"distill_steps={self.distill_steps} must be >= 0 (0 skips distillation)")
        for name in ("height", "width"):
            value = getattr(self, name)
            if isinstance(value, int) and value < 1:
                errors.append(f"{name}={value} must be a positive latent size")
        if errors:
            raise ConfigError("invalid build config: " + "; ".join(errors))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BuildConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
        missing = [n for n in ("out",) if n not in data]
        if missing:
            raise ConfigError(f"build needs {' and '.join(missing)} (a flag, a keyword or a config-file key)")
        return cls(**data)


_TYPES: dict[str, type] = {
    "model": str, "out": str, "overwrite": bool, "granularity": str, "height": int, "width": int,
    "num_samples": int, "steps": int, "seed": int, "guidance_scale": float, "prompts": str,
    "budget": float, "metric": str, "order": str, "distill_steps": int, "exporter": str, "opset": int, "optimize": bool,
    "fp16": bool, "verify": bool,
}


def load_config(path: str | Path, **overrides: Any) -> BuildConfig:
    """Read a TOML build config; keyword overrides (e.g. from the command line) win."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from exc
    data.update({k: v for k, v in overrides.items() if v is not None})
    return BuildConfig.from_dict(data)
