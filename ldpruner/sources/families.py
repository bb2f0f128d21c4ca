"""Published UNet configurations, written out in code, and seeded models built from them.

No model hub is reachable, so the ``config.json`` of each published UNet is kept here as a dict (same keys and
values as the file on the hub, ``_class_name`` included). :func:`build_unet` instantiates the diffusers class
with seeded random weights: the architecture is the published one, the weights are not. :func:`reduced` shrinks
a config for tests while keeping its topology (levels, block types, projections, per-level heads, added
embeddings), so every code path a published model takes is exercised in seconds.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from ldpruner.base.errors import ConfigError

__all__ = ["FAMILIES", "build_unet", "family_config", "family_names", "reduced", "spatial_multiple"]

_SD_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_SD_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")

# runwayml/stable-diffusion-v1-5, unet/config.json. attention_head_dim=8 is, in diffusers' naming, the number of
# heads (8 at every level, head dims 40/80/160).
_SD15: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": list(_SD_DOWN),
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": list(_SD_UP),
}

# stabilityai/stable-diffusion-2-1, unet/config.json: heads 5/10/20/20 (head dim 64 everywhere), OpenCLIP-H
# context (1024), linear proj_in/proj_out, attention upcast to fp32, 96x96 latents (768 px).
_SD21: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": list(_SD_DOWN),
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "sample_size": 96,
    "up_block_types": list(_SD_UP),
    "upcast_attention": True,
    "use_linear_projection": True,
}

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json: three levels (no attention in the outer one),
# 1/2/10 transformer blocks per level, two text encoders (2048 context), pooled text + size/crop conditioning
# added to the time embedding ("text_time": 1280 pooled dims + 6 time ids x 256 = 2816).
_SDXL: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}

# CompVis/ldm-celebahq-256, unet/config.json: an unconditional pixel-to-latent LDM UNet (VQ latents 64x64x3).
# For UNet2DModel attention_head_dim is a real head dim: 32, so 7/14/21/28 heads.
_CELEBAHQ: dict[str, Any] = {
    "_class_name": "UNet2DModel",
    "act_fn": "silu",
    "attention_head_dim": 32,
    "block_out_channels": [224, 448, 672, 896],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 64,
    "time_embedding_type": "positional",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}

# teticio/audio-diffusion-256, unet/config.json: a DDPM on 256x256 single-channel mel spectrograms, with the
# six-level layout of diffusers' train_unconditional example (attention only at the 16x16 level and the middle).
# Written from memory: attention_head_dim (8, the UNet2DModel default when it was trained) and
# downsample_padding (1) are the most plausible values, not checked against the hub file.
_AUDIO: dict[str, Any] = {
    "_class_name": "UNet2DModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [128, 128, 256, 256, 512, 512],
    "center_input_sample": False,
    "down_block_types": [
        "DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 1,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 1,
    "sample_size": [256, 256],
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"],
}

# ldpruner's own demo model (not published): SD-shaped at 2.5 M parameters. Three levels, cross-attention in the
# outer two, the inner two equally wide (like SD's 1280/1280), head dim 16 at every level (like SD 2), linear
# projections, conditioned on all-MiniLM-L6-v2 token embeddings (384 dims), 16x16 latents.
_SD_TINY: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": [2, 4, 4],
    "block_out_channels": [32, 64, 64],
    "cross_attention_dim": 384,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 8,
    "out_channels": 4,
    "sample_size": 16,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "use_linear_projection": True,
}


# runwayml/stable-diffusion-inpainting, unet/config.json: SD 1.5 with 9 input channels (the latent, the mask and the
# masked image's latent, concatenated by StableDiffusionInpaintPipeline).
_SD15_INPAINTING: dict[str, Any] = {**_SD15, "in_channels": 9}

# SimianLuo/LCM_Dreamshaper_v7, unet/config.json: SD 1.5 distilled for few-step sampling, with a 256-dim
# guidance-scale embedding (time_cond_proj_dim; LatentConsistencyModelPipeline passes it as timestep_cond).
_LCM_SD15: dict[str, Any] = {**_SD15, "time_cond_proj_dim": 256}


def _frozen(config: dict[str, Any]) -> Mapping[str, Any]:
    """Read-only all the way down: lists become tuples (``family_config`` turns them back into lists)."""
    return MappingProxyType({k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})


def _thawed(config: Mapping[str, Any]) -> dict[str, Any]:
    """A mutable deep copy, sequences as lists like in the published config.json files."""
    return {k: list(v) if isinstance(v, (list, tuple)) else copy.deepcopy(v) for k, v in config.items()}


FAMILIES: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    "sd15": _frozen(_SD15),
    "sd21": _frozen(_SD21),
    "sdxl": _frozen(_SDXL),
    "ldm-celebahq-256": _frozen(_CELEBAHQ),
    "audio-diffusion-256": _frozen(_AUDIO),
    "sd-tiny": _frozen(_SD_TINY),
    "sd15-inpainting": _frozen(_SD15_INPAINTING),
    "lcm-sd15": _frozen(_LCM_SD15),
})


def family_names() -> tuple[str, ...]:
    return tuple(FAMILIES)


def family_config(name: str, *, reduced: bool = False) -> dict[str, Any]:
    """A fresh, mutable copy of a family's config (shrunk with :func:`reduced` defaults when ``reduced``)."""
    if name not in FAMILIES:
        raise ConfigError(f"model family {name!r} is unknown; known families: {sorted(FAMILIES)}")
    config = _thawed(FAMILIES[name])
    return _reduced(config) if reduced else config


def _levels(config: Mapping[str, Any]) -> int:
    return len(config["block_out_channels"])


def _per_level(value: Any, levels: int) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * levels


def _num_upsamplers(config: Mapping[str, Any]) -> int:
    return _levels(config) - 1


def reduced(config: Mapping[str, Any], *, width: int = 16, heads: int = 2, max_transformer_depth: int = 3,
            norm_groups: int = 4, sample_multiple: int = 2) -> dict[str, Any]:
    """Shrink a UNet config for tests, keeping its topology.

    Kept: number of levels, block types, layers per block, linear/conv projection, attention upcast, added
    embeddings (SDXL's text_time), time embedding type, whether heads are per level and how they vary.
    Shrunk: ``block_out_channels`` keep their ratios with ``width`` channels at the first level; the first
    level gets ``heads`` heads and the other levels scale like the published config (SD 1.5's constant head
    count stays constant, SD 2's constant head dim stays constant); transformer depth is capped at
    ``max_transformer_depth`` (SDXL's 1/2/10 → 1/2/3); cross-attention, pooled-text and time-id dims shrink
    in proportion (to multiples of 8); ``norm_num_groups`` becomes ``norm_groups``, which must divide every
    width; ``sample_size`` becomes ``sample_multiple`` times the UNet's spatial multiple (2 ** number of
    upsamplers, the smallest latent the UNet accepts). Raises :class:`ConfigError` when sizes do not fit.
    """
    config = _thawed(config)
    if width <= 0 or heads <= 0 or width % heads or width % norm_groups:
        raise ConfigError(
            f"reduced(width={width}, heads={heads}, norm_groups={norm_groups}): width must be a positive "
            "multiple of heads and of norm_groups"
        )
    levels = _levels(config)
    channels = [int(c) for c in config["block_out_channels"]]
    base = channels[0]
    new_channels = []
    for c in channels:
        if (c * width) % base:
            raise ConfigError(
                f"block_out_channels={channels} are not integer multiples of the first level's "
                f"{base}; reduced() keeps their ratios and needs them to be"
            )
        new_channels.append(c * width // base)
    if any(c % norm_groups for c in new_channels):
        raise ConfigError(f"reduced widths {new_channels} are not all multiples of norm_groups={norm_groups}")
    config["block_out_channels"] = new_channels
    config["norm_num_groups"] = norm_groups
    scale = width / base

    cls = config.get("_class_name", "UNet2DConditionModel")
    if cls == "UNet2DConditionModel":
        # diffusers reads attention_head_dim as the number of heads when num_attention_heads is unset.
        key = "num_attention_heads" if config.get("num_attention_heads") is not None else "attention_head_dim"
        old_heads = _per_level(config.get(key, 8), levels)
        new_heads = [max(1, round(h * heads / old_heads[0])) for h in old_heads]
        for h, c in zip(new_heads, new_channels):
            if c % h:
                raise ConfigError(f"reduced heads {new_heads} do not divide widths {new_channels}")
        config[key] = new_heads if isinstance(config.get(key), (list, tuple)) else new_heads[0]
        cross = config.get("cross_attention_dim")
        if isinstance(cross, list):
            config["cross_attention_dim"] = [_round8(d * scale) for d in cross]
        elif cross is not None:
            config["cross_attention_dim"] = _round8(cross * scale)
        if config.get("transformer_layers_per_block") is not None:
            depth = config["transformer_layers_per_block"]
            capped = [min(int(d), max_transformer_depth) for d in _per_level(depth, levels)]
            config["transformer_layers_per_block"] = capped if isinstance(depth, (list, tuple)) else capped[0]
        if config.get("addition_embed_type") == "text_time":
            time_dim = _round8(config["addition_time_embed_dim"] * scale)
            pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
            config["addition_time_embed_dim"] = time_dim
            config["projection_class_embeddings_input_dim"] = _round8(pooled * scale) + 6 * time_dim
        elif config.get("addition_embed_type") is not None:
            raise ConfigError(
                f"reduced() does not know how to shrink addition_embed_type={config['addition_embed_type']!r}; "
                "supported: None, 'text_time'"
            )
    elif cls == "UNet2DModel":
        head_dim = config.get("attention_head_dim")
        if head_dim is not None:  # a real head dim here: keep the first level at `heads` heads
            config["attention_head_dim"] = width // heads
    else:
        raise ConfigError(f"reduced() supports UNet2DConditionModel and UNet2DModel configs, not {cls!r}")

    size = sample_multiple * spatial_multiple(config)
    config["sample_size"] = [size, size] if isinstance(config.get("sample_size"), (list, tuple)) else size
    return config


def _round8(x: float) -> int:
    return max(8, round(x / 8) * 8)


# build_unet and family_config take a keyword named ``reduced``, which hides the function inside them
_reduced = reduced


def build_unet(name_or_config: str | Mapping[str, Any], *, reduced: bool = False, seed: int = 0,
               dtype: torch.dtype = torch.float32, device: str | torch.device | None = None) -> nn.Module:
    """Instantiate a family's diffusers UNet (or one from a config dict) with seeded random weights, in eval mode.

    The global torch RNG is left as it was: the weights come from a forked generator seeded with ``seed``.
    ``device="meta"`` builds the architecture without allocating weights (parameter counts, operator tables).
    """
    import diffusers

    if isinstance(name_or_config, str):
        config = family_config(name_or_config, reduced=reduced)
    else:
        config = _thawed(name_or_config)
        if reduced:
            config = _reduced(config)
    cls_name = config.get("_class_name")
    if cls_name not in ("UNet2DConditionModel", "UNet2DModel"):
        raise ConfigError(
            f"config _class_name={cls_name!r} is not a supported UNet; use 'UNet2DConditionModel' or 'UNet2DModel'"
        )
    cls = getattr(diffusers, cls_name)
    with torch.random.fork_rng(devices=[]), torch.device(device or "cpu"):
        torch.manual_seed(seed)
        model = cls.from_config(config)
    if dtype != torch.float32:  # diffusers warns on any .to(dtype), even a no-op one
        model = model.to(dtype=dtype)
    return model.eval()


def spatial_multiple(config: Mapping[str, Any]) -> int:
    """Latent height and width must be multiples of this (2 ** number of upsamplers) for the UNet to run."""
    return 2 ** _num_upsamplers(config)
