"""A dataset folder for distillation on real data, encoded once through the model's own VAE.

Layout (the Hugging Face ``imagefolder`` convention): image files (png, jpg, jpeg, webp, bmp) anywhere under the
folder, captions either in ``metadata.jsonl`` (one ``{"file_name": "a/b.png", "text": "a caption"}`` per line) or in
a ``<image stem>.txt`` beside each image. Images are resized to the latent size times the VAE's downsampling,
converted to the VAE's channel count and scaled to [-1, 1]; latents are the posterior mode times
``scaling_factor``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ldpruner.base.errors import ConfigError, ModelLoadError
from ldpruner.base.io import read_json

__all__ = ["IMAGE_SUFFIXES", "encode_dataset", "folder_captions", "image_files", "read_image_folder", "vae_folder"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _captions(folder: Path, files: list[Path]) -> list[str] | None:
    metadata = folder / "metadata.jsonl"
    if metadata.is_file():
        by_name: dict[str, str] = {}
        for number, line in enumerate(metadata.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                by_name[str(row["file_name"])] = str(row["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ConfigError(f"{str(metadata)!r} line {number} is not {{\"file_name\": ..., \"text\": ...}}: "
                                  f"{exc}") from exc
        missing = [f.relative_to(folder).as_posix() for f in files if f.relative_to(folder).as_posix() not in by_name]
        if missing:
            raise ConfigError(f"{str(metadata)!r} has no caption for {len(missing)} images (e.g. {missing[:3]})")
        return [by_name[f.relative_to(folder).as_posix()] for f in files]
    sidecars = [f.with_suffix(".txt") for f in files]
    present = [s.is_file() for s in sidecars]
    if not any(present):
        return None
    if not all(present):
        missing = [str(f.relative_to(folder)) for f, p in zip(files, present) if not p]
        raise ConfigError(f"{len(missing)} images in {str(folder)!r} have no <name>.txt caption (e.g. {missing[:3]})")
    return [s.read_text().strip() for s in sidecars]


def image_files(folder: Path) -> list[Path]:
    """The image files under a dataset folder, sorted; a ConfigError when the folder is missing or holds none."""
    if not folder.is_dir():
        raise ConfigError(f"data folder {str(folder)!r} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ConfigError(f"data folder {str(folder)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def folder_captions(folder: Path) -> list[str] | None:
    """The captions of a dataset folder's images, as the encoding reads them (None when it has none), without
    reading an image: what a stage checks before its first UNet call."""
    return _captions(folder, image_files(folder))


def read_image_folder(folder: Path, *, size: tuple[int, int], channels: int) -> tuple[torch.Tensor, list[str] | None]:
    """(N, channels, H, W) images in [-1, 1] at ``size`` and their captions (None when the folder has none)."""
    from PIL import Image

    files = image_files(folder)
    if channels not in (1, 3):
        raise ConfigError(f"the VAE takes {channels} channels; image folders give 1 (grey) or 3 (RGB)")
    mode = "L" if channels == 1 else "RGB"
    images = []
    for path in files:
        try:
            with Image.open(path) as img:
                img = img.convert("RGBA").convert(mode) if img.mode in ("P", "LA") else img.convert(mode)
                img = img.resize((size[1], size[0]), Image.Resampling.BICUBIC)
                array = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
        except OSError as exc:
            raise ConfigError(f"cannot read image {str(path)!r}: {exc}") from exc
        images.append(array.reshape(size[0], size[1], channels).permute(2, 0, 1))
    pixels = torch.stack(images).float() / 127.5 - 1
    return pixels, _captions(folder, files)


def vae_folder(pipeline_dir: Path | None, source: str) -> Path:
    """The autoencoder folder (vae/ or vqvae/) of a pipeline folder that encodes a dataset; a ModelLoadError naming
    ``source`` when there is none."""
    for name in ("vae", "vqvae"):
        folder = pipeline_dir / name if pipeline_dir is not None else None
        if folder is not None and (folder / "config.json").is_file():
            return folder
    raise ModelLoadError(f"{source} has no vae/ (or vqvae/) folder to encode a dataset with: distilling on data "
                         "needs the model's pipeline folder; without one, distill data-free (no data)")


def _load_vae(pipeline_dir: Path | None, source: str) -> Any:
    import diffusers

    folder = vae_folder(pipeline_dir, source)
    class_name = read_json(folder / "config.json", what="autoencoder config",
                           error=ModelLoadError).get("_class_name", "AutoencoderKL")
    cls = getattr(diffusers, str(class_name), None)
    if cls is None or not hasattr(cls, "encode"):
        raise ModelLoadError(f"{str(folder)!r} names {class_name!r}, which is not a diffusers autoencoder")
    return cls.from_pretrained(folder, use_safetensors=True, local_files_only=True).eval()


def encode_dataset(loaded: Any, folder: Path, *, latent_size: tuple[int, int], batch_size: int = 32,
                   progress: bool = False, device: Any = None) -> tuple[torch.Tensor, list[str] | None]:
    """The folder's images as scaled latents (N, C, h, w) of ``latent_size`` (float32, on the CPU), and their
    captions. The VAE encodes on ``device`` (None: the CPU)."""
    vae = _load_vae(loaded.pipeline_dir, loaded.source)
    if device is not None:
        vae.to(device)
    where = next(vae.parameters()).device
    if where.type == "cuda":  # beside the teacher on the GPU: a 512² encoder activation is ~130 MB per image
        batch_size = min(batch_size, 4)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    size = (latent_size[0] * factor, latent_size[1] * factor)
    pixels, captions = read_image_folder(folder, size=size, channels=vae.config.in_channels)
    scaling = float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)
    from tqdm.auto import tqdm

    latents = []
    with torch.no_grad():
        for begin in tqdm(range(0, pixels.shape[0], batch_size), desc="encoding dataset", disable=not progress,
                          leave=False):
            encoded = vae.encode(pixels[begin:begin + batch_size].to(where))
            dist = getattr(encoded, "latent_dist", None)
            latents.append(((dist.mode() if dist is not None else encoded.latents) * scaling).float().cpu())
    return torch.cat(latents), captions
