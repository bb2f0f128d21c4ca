"""Sampling a zoo unconditional model (image or audio mel): DDIM (or the saved scheduler), then the VAE.

    x_{t-1} = scheduler.step(eps(x_t, t), t, x_t),   output = (VAE.decode(x_0 / scaling_factor) + 1) / 2

The denoising loop is the project's one sampling loop (:func:`ldpruner.runtime.sampling.sample_latents`).

The latent shape is the UNet's (in_channels, sample_size), where sample_size is an int (square) or (height, width).
Each sample's starting noise comes from its own seed, so a sample does not depend on what else is in the batch.
The autoencoder sits in ``vae/`` or, for folders that stock diffusers loads as an ``LDMPipeline``, in ``vqvae/``
(an AutoencoderKL there too: the pipeline only calls ``decode`` and reads ``config.scaling_factor``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ldpruner.base.errors import ConfigError, ModelLoadError

from ._sampling import positive_int, scheduler_class, seeded_noise, seeds_for

if TYPE_CHECKING:
    import torch

__all__ = ["UNCONDITIONAL_TASKS", "UnconditionalModel", "latent_shape", "load_unconditional"]

UNCONDITIONAL_TASKS = ("unconditional-image", "unconditional-audio")
AUTOENCODER_FOLDERS = ("vae", "vqvae")


def latent_shape(unet_config: Any) -> tuple[int, int, int]:
    """(channels, height, width) of one latent, from a UNet config whose sample_size is an int or (h, w)."""
    size = unet_config.sample_size
    if isinstance(size, int) and not isinstance(size, bool):
        height = width = size
    elif isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(s, int) for s in size):
        height, width = size
    else:
        raise ModelLoadError(f"the UNet's sample_size must be an int or (height, width); got {size!r}")
    return int(unet_config.in_channels), int(height), int(width)


@dataclasses.dataclass
class UnconditionalModel:
    """The parts of an unconditional zoo model (UNet2DModel + AutoencoderKL), loaded once and sampled many times."""

    unet: Any  # diffusers UNet2DModel
    vae: Any  # diffusers AutoencoderKL
    scheduler: Any  # a diffusers scheduler (DDIMScheduler for the zoo models)
    folder: Path

    def sample_latents(
        self,
        num: int,
        *,
        steps: int = 25,
        seed: int | Sequence[int] = 0,
        unet: Any | None = None,
    ) -> torch.Tensor:
        """(num, C, h, w) float32 denoised latents, already divided by the VAE's scaling factor."""
        import torch

        from ldpruner.runtime.sampling import sample_latents

        num, steps = positive_int("num", num), positive_int("steps", steps)
        seeds = seeds_for(seed, num)
        denoiser = self.unet if unet is None else unet
        noise = seeded_noise(latent_shape(self.unet.config), seeds)
        with torch.no_grad():
            latents = sample_latents(lambda sample, timestep: denoiser(sample, timestep).sample, self.scheduler,
                                     noise=noise, steps=steps)
        return latents / self.vae.config.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE-decode unscaled latents to (N, C, H, W) float32 in [0, 1]."""
        import torch

        with torch.no_grad():
            images = self.vae.decode(latents).sample
        return ((images.float() + 1) / 2).clamp(0, 1)

    def sample(
        self,
        num: int,
        *,
        steps: int = 25,
        seed: int | Sequence[int] = 0,
        unet: Any | None = None,
    ) -> torch.Tensor:
        """(num, C, H, W) float32 samples in [0, 1].

        ``seed``: an int gives sample i the seed ``seed + i``; a sequence gives one seed per sample. ``unet``
        replaces the model's own UNet for this call (a pruned copy, say); it must take the same inputs.
        """
        return self.decode(self.sample_latents(num, steps=steps, seed=seed, unet=unet))


def load_unconditional(name_or_folder: str | os.PathLike, *, task: str | None = None) -> UnconditionalModel:
    """Load a zoo unconditional model by registry name, or from a folder laid out like one.

    ``task`` ("unconditional-image" or "unconditional-audio") checks a registry name's task; None accepts both.
    """
    import diffusers

    from . import get_entry, list_models, model_dir

    if task is not None and task not in UNCONDITIONAL_TASKS:
        raise ConfigError(f"task must be one of {UNCONDITIONAL_TASKS} or None; got {task!r}")
    wanted = (task,) if task is not None else UNCONDITIONAL_TASKS
    if isinstance(name_or_folder, str) and name_or_folder in {e.name for e in list_models()}:
        entry = get_entry(name_or_folder)
        if entry.task not in wanted:
            raise ModelLoadError(f"zoo model {entry.name!r} is {entry.task}, not {' or '.join(wanted)}")
        folder = model_dir(entry.name)
    else:
        folder = Path(name_or_folder)
        if not folder.is_dir():
            known = ", ".join(e.name for t in wanted for e in list_models(task=t))
            raise ModelLoadError(
                f"{os.fspath(name_or_folder)!r} is neither a zoo {' or '.join(wanted)} model (known: {known}) "
                f"nor a folder"
            )
    for part in ("unet/config.json", "scheduler/scheduler_config.json"):
        if not (folder / part).is_file():
            raise ModelLoadError(f"{str(folder)!r} is not a zoo unconditional folder: {part} is missing")
    vae_dirs = [folder / name for name in AUTOENCODER_FOLDERS if (folder / name / "config.json").is_file()]
    if not vae_dirs:
        raise ModelLoadError(
            f"{str(folder)!r} is not a zoo unconditional folder: neither vae/config.json nor vqvae/config.json exists"
        )
    try:
        unet = diffusers.UNet2DModel.from_pretrained(folder / "unet", use_safetensors=True, local_files_only=True)
        vae = diffusers.AutoencoderKL.from_pretrained(vae_dirs[0], use_safetensors=True, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot load the UNet or VAE of {str(folder)!r}: {type(exc).__name__}: {exc}") from exc
    channels = latent_shape(unet.config)[0]
    if channels != vae.config.latent_channels or unet.config.out_channels != channels:
        raise ModelLoadError(
            f"{str(folder)!r}: the UNet maps {channels} -> {unet.config.out_channels} channels but the VAE's "
            f"latents have {vae.config.latent_channels}"
        )
    scheduler = scheduler_class(folder / "scheduler" / "scheduler_config.json").from_pretrained(
        folder / "scheduler", local_files_only=True
    )
    return UnconditionalModel(unet=unet.eval(), vae=vae.eval(), scheduler=scheduler, folder=folder)
