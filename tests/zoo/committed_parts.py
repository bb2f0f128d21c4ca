"""The parts of a committed zoo model as stock diffusers loads them (safetensors only, offline), for its tests.

Imported by the test modules beside it (``from committed_parts import ...``, as ``tests/conftest.py``'s makers are):
a ``tests/zoo/conftest.py`` would replace the module named ``conftest`` that other test folders import from.
"""

from __future__ import annotations

from typing import Any

from ldpruner import zoo


def load_unet_and_vae(name: str, vae_folder: str = "vae") -> tuple[Any, Any]:
    """(UNet2DModel, AutoencoderKL) of zoo model ``name``, the autoencoder from ``vae_folder`` (``vqvae`` for an
    LDMPipeline folder)."""
    from diffusers import AutoencoderKL, UNet2DModel

    folder = zoo.model_dir(name)
    unet = UNet2DModel.from_pretrained(folder / "unet", use_safetensors=True, local_files_only=True)
    vae = AutoencoderKL.from_pretrained(folder / vae_folder, use_safetensors=True, local_files_only=True)
    return unet, vae
