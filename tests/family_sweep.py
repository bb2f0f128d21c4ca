"""The UNet families of diffusers' own pipelines, tiny and seeded (configs as in diffusers' pipeline tests, shrunk to
16x16 latents): the sweep tests/sources/test_diffusers_families.py builds each end to end and
tests/api/test_family_pipelines.py runs each in its stock pipeline. Imported as ``from family_sweep import ...``,
like ``conftest``'s makers."""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import torch

_SIMPLE_CROSS = dict(down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
                     mid_block_type="UNetMidBlock2DSimpleCrossAttn",
                     up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
                     block_out_channels=(32, 64), layers_per_block=1, sample_size=16)
_SD = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=16, down_block_types=(
    "DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)
_UNET2D = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=16, down_block_types=(
    "DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)

# family -> (UNet class, config, scheduler class, scheduler config, the diffusers pipelines it stands for)
FAMILIES: dict[str, tuple[str, dict, str, dict, str]] = {
    "sd-inpainting": ("UNet2DConditionModel", dict(_SD, in_channels=9, out_channels=4, cross_attention_dim=32),
                      "PNDMScheduler", dict(skip_prk_steps=True), "StableDiffusionInpaintPipeline"),
    "sd-x4-upscaler": ("UNet2DConditionModel", dict(
        _SD, in_channels=7, out_channels=4, cross_attention_dim=32, use_linear_projection=True,
        only_cross_attention=(True, False), num_class_embeds=100), "DDPMScheduler", {},
        "StableDiffusionUpscalePipeline"),
    "lcm": ("UNet2DConditionModel", dict(_SD, in_channels=4, out_channels=4, cross_attention_dim=32,
                                         time_cond_proj_dim=32), "LCMScheduler", {},
            "LatentConsistencyModelPipeline, StableDiffusionPipeline with an LCM UNet"),
    "audioldm": ("UNet2DConditionModel", dict(
        _SD, in_channels=4, out_channels=4, block_out_channels=(16, 32), cross_attention_dim=(16, 32),
        class_embed_type="simple_projection", projection_class_embeddings_input_dim=8, class_embeddings_concat=True),
                 "DDIMScheduler", {}, "AudioLDMPipeline"),
    "deepfloyd-if": ("UNet2DConditionModel", dict(
        _SIMPLE_CROSS, in_channels=3, out_channels=6, cross_attention_dim=32, encoder_hid_dim=32,
        attention_head_dim=8, addition_embed_type="text", addition_embed_type_num_heads=2,
        cross_attention_norm="group_norm", resnet_time_scale_shift="scale_shift", act_fn="gelu"),
                     "DDPMScheduler", dict(variance_type="learned_range"), "IFPipeline"),
    "deepfloyd-if-superres": ("UNet2DConditionModel", dict(
        _SIMPLE_CROSS, in_channels=6, out_channels=6, cross_attention_dim=32, encoder_hid_dim=32,
        attention_head_dim=8, addition_embed_type="text", addition_embed_type_num_heads=2,
        cross_attention_norm="group_norm", resnet_time_scale_shift="scale_shift", act_fn="gelu",
        class_embed_type="timestep", time_embedding_act_fn="gelu", time_embedding_dim=32),
                              "DDPMScheduler", dict(variance_type="learned_range"), "IFSuperResolutionPipeline"),
    "stable-unclip": ("UNet2DConditionModel", dict(
        _SD, in_channels=4, out_channels=4, cross_attention_dim=32, class_embed_type="projection",
        projection_class_embeddings_input_dim=64, use_linear_projection=True, upcast_attention=True),
                      "DDIMScheduler", dict(prediction_type="v_prediction"), "StableUnCLIPPipeline"),
    "unclip-decoder": ("UNet2DConditionModel", dict(
        _SIMPLE_CROSS, in_channels=3, out_channels=6, cross_attention_dim=32, attention_head_dim=4,
        resnet_time_scale_shift="scale_shift", class_embed_type="identity"),
                       "UnCLIPScheduler", {}, "UnCLIPPipeline (decoder)"),
    "kandinsky-2.1": ("UNet2DConditionModel", dict(
        _SIMPLE_CROSS, in_channels=4, out_channels=8, addition_embed_type="text_image", encoder_hid_dim=32,
        encoder_hid_dim_type="text_image_proj", cross_attention_dim=32, attention_head_dim=4,
        resnet_time_scale_shift="scale_shift"), "DDIMScheduler", {}, "KandinskyPipeline"),
    "kandinsky-2.2": ("UNet2DConditionModel", dict(
        _SIMPLE_CROSS, in_channels=4, out_channels=8, addition_embed_type="image", encoder_hid_dim=32,
        encoder_hid_dim_type="image_proj", cross_attention_dim=32, attention_head_dim=4,
        resnet_time_scale_shift="scale_shift"), "DDPMScheduler", {}, "KandinskyV22Pipeline"),
    "kandinsky-2.2-controlnet": ("UNet2DConditionModel", dict(
        _SIMPLE_CROSS, in_channels=8, out_channels=8, addition_embed_type="image_hint", encoder_hid_dim=32,
        encoder_hid_dim_type="image_proj", cross_attention_dim=32, attention_head_dim=4,
        resnet_time_scale_shift="scale_shift"), "DDPMScheduler", {}, "KandinskyV22ControlnetPipeline"),
    "gligen": ("UNet2DConditionModel", dict(_SD, in_channels=4, out_channels=4, cross_attention_dim=32,
                                            attention_type="gated"), "DDIMScheduler", {},
               "StableDiffusionGLIGENPipeline (without grounding: see outside_graph)"),
    "score-sde-ve": ("UNet2DModel", dict(
        _UNET2D, in_channels=3, out_channels=3, down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D"),
        up_block_types=("AttnSkipUpBlock2D", "SkipUpBlock2D"), time_embedding_type="fourier"),
                     "ScoreSdeVeScheduler", {}, "ScoreSdeVePipeline"),
    "ddpm-class-ids": ("UNet2DModel", dict(_UNET2D, in_channels=3, out_channels=3, num_class_embeds=10),
                       "DDPMScheduler", {}, "class-conditional UNet2DModel"),
    "unet2d-timestep-class": ("UNet2DModel", dict(_UNET2D, in_channels=3, out_channels=3,
                                                  class_embed_type="timestep"), "DDPMScheduler", {},
                              "UNet2DModel with a noise-level class embedding"),
    "unet2d-learned-variance": ("UNet2DModel", dict(_UNET2D, in_channels=3, out_channels=6), "DDIMScheduler", {},
                                "UNet2DModel predicting mean and variance (improved DDPM)"),
    "sd-latent-upscaler": ("UNet2DConditionModel", dict(
        act_fn="gelu", attention_head_dim=8, norm_num_groups=None, block_out_channels=(32, 32, 64, 64),
        time_cond_proj_dim=160, conv_in_kernel=1, conv_out_kernel=1, cross_attention_dim=32,
        down_block_types=("KDownBlock2D", "KCrossAttnDownBlock2D", "KCrossAttnDownBlock2D", "KCrossAttnDownBlock2D"),
        in_channels=8, mid_block_type=None, only_cross_attention=False, out_channels=5,
        resnet_time_scale_shift="scale_shift", time_embedding_type="fourier", timestep_post_act="gelu",
        up_block_types=("KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "KCrossAttnUpBlock2D", "KUpBlock2D"),
        sample_size=16), "EulerDiscreteScheduler", {}, "StableDiffusionLatentUpscalePipeline"),
}
# refused by the analysis, with the option named (inspect, prune and export work)
REFUSED = {"sd-latent-upscaler": "down_block_types with K-diffusion blocks"}
# refused by export, and so by build before its first stage: their pipelines give the UNet what no drop-in can take
# (tests/api/test_family_pipelines.py)
NO_DROP_IN = {"gligen": "attention_type='gated' is not supported by export",
              "unclip-decoder": "class_embed_type='identity' is not supported by export"}
BUILDS = [name for name in FAMILIES if name not in REFUSED and name not in NO_DROP_IN]


def make_unet(name: str, **overrides) -> torch.nn.Module:
    cls, config, *_ = FAMILIES[name]
    torch.manual_seed(0)
    return getattr(diffusers, cls)(**{**config, **overrides}).eval()


def make_pipeline(name: str, root: Path) -> Path:
    """A pipeline folder as diffusers saves one: model_index.json, unet/ (safetensors), scheduler/."""
    cls, _, scheduler, scheduler_config, _ = FAMILIES[name]
    folder = root / name
    make_unet(name).save_pretrained(folder / "unet", safe_serialization=True)
    getattr(diffusers, scheduler)(**scheduler_config).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(
        {"_class_name": "DiffusionPipeline", "unet": ["diffusers", cls], "scheduler": ["diffusers", scheduler]}))
    return folder
