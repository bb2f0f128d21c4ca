"""Resolve MODEL arguments: a local diffusers pipeline folder, a UNet folder, or ``random:<family>``."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from torch import nn

from ldpruner.errors import ModelLoadError
from ldpruner.io import read_json

__all__ = ["LoadedModel", "load_model", "UNET_CLASSES"]

UNET_CLASSES = ("UNet2DConditionModel", "UNet2DModel")
RANDOM_PREFIX = "random:"
ZOO_PREFIX = "zoo:"


@dataclasses.dataclass
class LoadedModel:
    unet: nn.Module
    scheduler: Any | None  # a diffusers scheduler from the pipeline folder, or None
    source: str  # what the user passed, for reports
    unet_dir: Path | None  # folder holding the UNet's config.json (None for in-memory / random models)
    pipeline_dir: Path | None
    random_weights: bool = False
    text_encoder_config: Path | None = None  # zoo text-to-image models: the frozen text encoder they were trained with
    default_prompts: tuple[str, ...] | None = None  # the model's own calibration prompts (prompts.txt beside it)

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "class": type(self.unet).__name__,
            "unet_dir": str(self.unet_dir) if self.unet_dir else None,
            "pipeline_dir": str(self.pipeline_dir) if self.pipeline_dir else None,
            "scheduler": type(self.scheduler).__name__ if self.scheduler is not None else None,
            "random_weights": self.random_weights,
            "text_encoder": str(self.text_encoder_config) if self.text_encoder_config else None,
        }


def load_model(model: str | os.PathLike | nn.Module | LoadedModel) -> LoadedModel:
    """Load a UNet (and the pipeline's scheduler when there is one) from what the user named."""
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, nn.Module):
        return LoadedModel(unet=model, scheduler=None, source=f"<{type(model).__name__} object>",
                           unet_dir=None, pipeline_dir=None)
    spec = os.fspath(model)
    if spec.startswith(RANDOM_PREFIX):
        return _random_model(spec)
    if spec.startswith(ZOO_PREFIX):
        return _zoo_model(spec)
    path = Path(spec)
    if not path.exists():
        raise ModelLoadError(
            f"model path {spec!r} does not exist; pass a local diffusers pipeline folder (with model_index.json), "
            f"a UNet folder (with config.json), or {RANDOM_PREFIX}<family> for a published config with random weights"
        )
    if not path.is_dir():
        raise ModelLoadError(f"model path {spec!r} is a file; pass the folder that holds config.json or model_index.json")
    if (path / "model_index.json").is_file():
        unet_dir = path / "unet"
        if not (unet_dir / "config.json").is_file():
            raise ModelLoadError(f"pipeline folder {spec!r} has no unet/config.json; ldpruner prunes the pipeline's UNet")
        unet = _load_unet(unet_dir)
        return LoadedModel(unet=unet, scheduler=_load_scheduler(path), source=spec, unet_dir=unet_dir,
                           pipeline_dir=path)
    if (path / "config.json").is_file():
        return LoadedModel(unet=_load_unet(path), scheduler=None, source=spec, unet_dir=path, pipeline_dir=None)
    raise ModelLoadError(
        f"{spec!r} is neither a diffusers pipeline folder (model_index.json) nor a UNet folder (config.json)"
    )


def _load_unet(folder: Path) -> nn.Module:
    import diffusers

    config = read_json(folder / "config.json", what="UNet config", error=ModelLoadError)
    class_name = config.get("_class_name")
    if class_name not in UNET_CLASSES:
        raise ModelLoadError(
            f"{str(folder)!r} holds a {class_name or 'model without _class_name'}, not a UNet; "
            f"ldpruner prunes {' or '.join(UNET_CLASSES)} (for a pipeline, pass the pipeline folder)"
        )
    weights = sorted(p.name for p in folder.glob("*.safetensors"))
    if not weights:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = f" (found {pickles}: convert them to safetensors; ldpruner never loads pickles)" if pickles else ""
        raise ModelLoadError(f"no .safetensors weights in {str(folder)!r}{hint}")
    cls = getattr(diffusers, class_name)
    try:
        unet = cls.from_pretrained(folder, use_safetensors=True, local_files_only=True)
    except Exception as exc:  # diffusers raises many kinds for a corrupt file; one typed error for the user
        raise ModelLoadError(f"cannot load {class_name} weights from {str(folder)!r}: {type(exc).__name__}: {exc}") from exc
    return unet.eval()


def _load_scheduler(pipeline_dir: Path) -> Any | None:
    import diffusers

    folder = pipeline_dir / "scheduler"
    config_path = folder / "scheduler_config.json"
    if not config_path.is_file():
        return None
    class_name = read_json(config_path, what="scheduler config", error=ModelLoadError).get("_class_name")
    cls = getattr(diffusers, str(class_name), None)
    if cls is None:
        raise ModelLoadError(f"unknown scheduler class {class_name!r} in {str(config_path)!r}")
    return cls.from_pretrained(folder, local_files_only=True)


def _zoo_model(spec: str) -> LoadedModel:
    from ldpruner import zoo

    folder = zoo.model_dir(spec[len(ZOO_PREFIX):])
    loaded = load_model(folder)
    loaded.source = spec
    text_encoder = folder / "text_encoder.json"
    loaded.text_encoder_config = text_encoder if text_encoder.is_file() else None
    prompts = folder / "prompts.txt"
    if prompts.is_file():
        loaded.default_prompts = tuple(p.strip() for p in prompts.read_text().splitlines() if p.strip())
    return loaded


def _random_model(spec: str) -> LoadedModel:
    from ldpruner.sources import families

    name = spec[len(RANDOM_PREFIX):]
    if name not in families.FAMILIES:
        raise ModelLoadError(f"unknown family {name!r} in {spec!r}; known: {sorted(families.FAMILIES)}")
    unet = families.build_unet(name, reduced=False, seed=0)
    return LoadedModel(unet=unet.eval(), scheduler=None, source=spec, unet_dir=None, pipeline_dir=None,
                       random_weights=True)
