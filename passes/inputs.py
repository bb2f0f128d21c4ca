"""What a generation of the analysis or the distillation is driven with, fitted to a traced UNet: its conditioning
rows (a given :class:`~ldpruner.passes.conditioning.Conditioning` checked against the UNet's inputs and completed,
or seeded stand-ins for every input it takes), the channels a pipeline concatenates to the latent, the latent size
and the scheduler.

Where conditioning comes from (prompts, text encoders, calibration files, random embeddings) is
:mod:`ldpruner.passes.conditioning`; this module turns it into what one UNet is called with.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ldpruner.base.errors import ConfigError, UnsupportedModelError
from ldpruner.base.io import json_safe
from ldpruner.base.unet_inputs import FLAT_INPUTS, GUIDED_INPUTS
from ldpruner.compiler.tracer import TracedUNet
from ldpruner.runtime.sampling import guidance_embedding, latent_channels, learned_variance

from .conditioning import DEFAULT_PROMPTS, RANDOM_EMBEDDINGS, Conditioning, encode_prompts, random_conditioning

__all__ = [
    "IF_NOISE_LEVEL",
    "SCHEDULER_SOURCES",
    "UPSCALER_NOISE_LEVEL",
    "check_analysable",
    "default_extra_channels",
    "extra_channel_count",
    "latent_size",
    "resolve_conditioning",
    "scheduler_record",
]


def resolve_conditioning(traced: TracedUNet, calib: Conditioning | str | os.PathLike | None, *, num_samples: int,
                         seed: int, guidance_scale: float, prompts: Sequence[str] | None = None,
                         height: int | None = None, width: int | None = None,
                         scheduler: Any | None = None) -> Conditioning:
    """The conditioning a generation of ``num_samples`` samples uses, checked against the traced UNet's inputs.

    ``calib`` is a :class:`Conditioning`, a local diffusers pipeline folder (its tokenizer/ and text_encoder/
    encode ``prompts``; None: :data:`DEFAULT_PROMPTS`), or None: unconditional UNets need nothing; conditional ones
    get rows seeded by ``seed`` for every input (:func:`_default_conditioning`), labelled ``"random-embeddings"`` in
    the report. Inputs a given Conditioning lacks (class labels, ``timestep_cond``: the embedding of
    ``guidance_scale``, an image embedding …) get the same defaults, and the source says which. ``height`` /
    ``width``: the latent size sampled at (:func:`latent_size`; None: the traced one). ``extra_channels`` a UNet
    needs and the Conditioning lacks are made later, by the caller (:func:`default_extra_channels`); the source
    names the default. ``scheduler`` (None: DDIM) decides whether the prediction carries a learned variance, and
    with it which input channels are the latent."""
    names = traced.input_names
    unsupported = [n for n in names if n not in FLAT_INPUTS]
    if unsupported:
        raise ConfigError(f"the analysis cannot drive UNet inputs {unsupported}; supported: {list(FLAT_INPUTS)}")
    check_analysable(traced)
    example = traced.example_inputs
    if isinstance(calib, (str, os.PathLike)):
        if "encoder_hidden_states" not in names:
            raise ConfigError(f"calib={str(calib)!r} is a text encoder, but {traced.model_class} takes no text")
        # the text encoder runs where the UNet does
        calib = encode_prompts(calib, prompts or DEFAULT_PROMPTS, device=next(traced.gm.parameters()).device)
    if calib is not None and not isinstance(calib, Conditioning):
        raise ConfigError(f"calib must be a Conditioning, a pipeline folder or None, got {type(calib).__name__}")
    defaults = _default_conditioning(traced, rows=calib.rows_count if calib is not None else num_samples, seed=seed,
                                     guidance_scale=guidance_scale, height=height, width=width)
    if calib is None:
        calib = defaults
    else:
        guided = {*GUIDED_INPUTS, *(f"negative_{n}" for n in GUIDED_INPUTS)}
        # a negative is never a stand-in for the negative of real embeddings: it pairs with the default positive only
        given = {f"negative_{n}" for n in GUIDED_INPUTS if getattr(calib, n) is not None}
        filled = {n: getattr(defaults, n) for n in _conditioning_inputs(names)
                  if getattr(calib, n) is None and getattr(defaults, n) is not None
                  and (calib.partial or n not in guided) and n not in given}
        if filled:
            calib = calib.replace(**filled, source=f"{calib.source}; {', '.join(filled)}: seeded defaults")

    errors = []
    for name in ("encoder_hidden_states", "text_embeds", "time_ids", "image_embeds", "hint", "class_labels",
                 "timestep_cond"):
        given = getattr(calib, name) is not None
        if given and name not in names:
            errors.append(f"{name} is given but {traced.model_class} takes no {name}")
        elif not given and name in names:
            errors.append(f"{traced.model_class} needs {name}, which the conditioning lacks")
        elif given and example[name].ndim > 1 and tuple(getattr(calib, name).shape[1:]) != tuple(
                example[name].shape[1:]) and name not in ("encoder_hidden_states", "hint"):
            errors.append(f"{name} rows have shape {tuple(getattr(calib, name).shape[1:])}, the UNet expects "
                          f"{tuple(example[name].shape[1:])}")
        elif given and name == "hint" and (calib.hint.shape[1] != example["hint"].shape[1] or tuple(
                calib.hint.shape[2:]) != tuple(d * _hint_scale(traced) for d in latent_size(traced, height, width))):
            size = [d * _hint_scale(traced) for d in latent_size(traced, height, width)]
            errors.append(f"hint rows have shape {tuple(calib.hint.shape[1:])}; at this latent size the UNet takes "
                          f"({example['hint'].shape[1]}, {size[0]}, {size[1]})")
        elif given and name == "class_labels" and example[name].ndim == 1 and getattr(calib, name).ndim != 1:
            errors.append(f"class_labels must be one id per row for {traced.model_class}, got shape "
                          f"{tuple(calib.class_labels.shape)}")
    value = calib.encoder_hidden_states
    if value is not None and "encoder_hidden_states" in example and \
            value.shape[-1] != example["encoder_hidden_states"].shape[-1]:
        errors.append(f"encoder_hidden_states has dim {value.shape[-1]}, the UNet expects "
                      f"{example['encoder_hidden_states'].shape[-1]}")
    extra = extra_channel_count(traced, scheduler)
    if calib.extra_channels is not None and calib.extra_channels.shape[1] != extra:
        errors.append(f"extra_channels has {calib.extra_channels.shape[1]} channels; {traced.model_class} takes "
                      f"{traced.sample_channels} input channels, {extra} of them besides the latent")
    if errors:
        raise ConfigError("conditioning does not fit the UNet: " + "; ".join(errors))
    if extra and calib.extra_channels is None:
        calib = calib.replace(source=f"{calib.source}; extra channels: {_extra_default_name(traced, scheduler)}")
    return calib


def _conditioning_inputs(names: tuple[str, ...]) -> list[str]:
    """The Conditioning fields a UNet with these inputs reads (negatives included)."""
    out = []
    for name in names:
        if name in ("sample", "timestep"):
            continue
        out.append(name)
        if name in GUIDED_INPUTS:
            out.append(f"negative_{name}")
    return out


# the resamplers of diffusers' K-blocks (KDownBlock2D, KCrossAttnUpBlock2D, ...): leaves of every trace
_K_RESAMPLERS = ("KDownsample2D", "KUpsample2D")


def check_analysable(traced: TracedUNet) -> None:
    """Refuse, naming the option, a traced UNet the sampling loop cannot drive (K-diffusion blocks): stages call this
    right after the trace, before a budget check or any other work."""
    found = sorted({type(m).__name__ for m in traced.gm.modules() if type(m).__name__ in _K_RESAMPLERS})
    if found:
        raise UnsupportedModelError(
            "down_block_types with K-diffusion blocks (KDownBlock2D, KCrossAttnDownBlock2D, …: this UNet has "
            f"their resamplers {found}) are not supported by the analysis: the K-upscaler of "
            "StableDiffusionLatentUpscalePipeline preconditions its inputs and outputs outside the UNet (Karras "
            "c_in/c_out scaling, a fifth output channel), which the sampling loop does not reproduce; inspect, "
            "prune and export work")


# the noise levels the pipelines use by default: StableDiffusionUpscalePipeline (noise_level=20) and
# IFSuperResolutionPipeline (noise_level=250)
UPSCALER_NOISE_LEVEL = 20
IF_NOISE_LEVEL = 250


def _hint_scale(traced: TracedUNet) -> int:
    """How much larger than the latent Kandinsky's control hint is (8: the hint block downsamples it 3 times)."""
    return int(traced.example_inputs["hint"].shape[-2]) // int(traced.example_inputs["sample"].shape[-2])


def _if_super_resolution(traced: TracedUNet) -> bool:
    """A UNet that embeds a noise level like a timestep (class_embed_type='timestep') and predicts as many
    channels as it takes: IF stage II, whose input holds the latent and the upscaled image, whose output the mean
    and the variance."""
    labels = traced.example_inputs.get("class_labels")
    embedding = getattr(traced.gm, "class_embedding", None)
    return (traced.model_class == "UNet2DConditionModel" and labels is not None and not labels.is_floating_point()
            and not isinstance(embedding, nn.Embedding)
            and traced.out_channels == traced.sample_channels and traced.sample_channels % 2 == 0)


def extra_channel_count(traced: TracedUNet, scheduler: Any | None = None) -> int:
    """How many of the ``sample`` input's channels are conditioning the pipeline concatenates to the latent."""
    if traced.out_channels is None:
        return 0
    if _if_super_resolution(traced) and not learned_variance(scheduler):
        name = type(scheduler).__name__ if scheduler is not None else "the default DDIMScheduler"
        raise UnsupportedModelError(
            f"variance_type={getattr(getattr(scheduler, 'config', None), 'variance_type', None)!r} ({name}) is not "
            f"supported for this UNet: with class_embed_type='timestep' and out_channels=in_channels="
            f"{traced.sample_channels} (IF super-resolution) only a learned-variance scheduler tells the latent from "
            "the upscaled image's channels; use the pipeline folder with its DDPMScheduler(variance_type="
            "'learned_range')")
    return traced.sample_channels - latent_channels(traced.sample_channels, traced.out_channels, scheduler)


def _extra_default_name(traced: TracedUNet, scheduler: Any | None) -> str:
    latent = traced.sample_channels - extra_channel_count(traced, scheduler)
    if extra_channel_count(traced, scheduler) == latent + 1:
        return "inpainting masks over the dense model's own samples"
    return "smooth random images"


def default_extra_channels(traced: TracedUNet, scheduler: Any, *,
                           noise: torch.Tensor, sample: Any, seed: int) -> torch.Tensor:
    """Data-free extra input channels, one row per noise sample (N, E, H, W), float32 on the CPU.

    * E = C + 1 (SD inpainting: a mask and the masked image's latents): the dense model first generates its own
      samples with everything masked (mask 1, masked latents 0: "inpaint the whole image", a valid pipeline
      input); each sample then gets a seeded random rectangle mask (a quarter to three quarters of each side) and
      its latent outside the mask: ``[mask, sample · (1 − mask)]``, the mask first as in the pipeline.
    * otherwise (an upscaler's low-resolution image, IF's upscaled stage-I image): smooth seeded random images in
      [−1, 1] (Gaussian noise at a quarter of the size, upsampled bicubically, squashed by tanh).

    ``sample(noise, extra)`` runs the dense model's sampling loop with these extra channels and returns the final
    latents. Pass real inputs as ``Conditioning(extra_channels=...)`` to calibrate on them instead."""
    n, latent, height, width = noise.shape
    extra = extra_channel_count(traced, scheduler)
    gen = torch.Generator().manual_seed(seed + 104_729)
    if extra == latent + 1:
        full = torch.cat([torch.ones(n, 1, height, width), torch.zeros(n, latent, height, width)], dim=1)
        reference = sample(noise, full).float().cpu()
        mask = torch.zeros(n, 1, height, width)
        for i in range(n):
            h = int(torch.randint(max(1, height // 4), max(2, 3 * height // 4 + 1), (1,), generator=gen))
            w = int(torch.randint(max(1, width // 4), max(2, 3 * width // 4 + 1), (1,), generator=gen))
            top = int(torch.randint(0, height - h + 1, (1,), generator=gen))
            left = int(torch.randint(0, width - w + 1, (1,), generator=gen))
            mask[i, :, top:top + h, left:left + w] = 1.0
        return torch.cat([mask, reference * (1 - mask)], dim=1)
    coarse = torch.randn(n, extra, max(1, height // 4), max(1, width // 4), generator=gen)
    smooth = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    return torch.tanh(smooth)


def _default_conditioning(traced: TracedUNet, *, rows: int, seed: int, guidance_scale: float, height: int | None,
                          width: int | None) -> Conditioning:
    """Seeded stand-ins for every conditioning input the UNet takes, ``rows`` prompt rows at the latent size
    ``height`` x ``width`` (:func:`latent_size`): N(0, 1) token, pooled-text and image embeddings with one shared
    negative each (random_conditioning), SDXL's size ids, uniform [0, 1] control hints at that size, random class
    ids below the embedding's size, the pipelines' default noise level for upscalers' labels (20 for the x4
    upscaler's ids, 250 for IF stage II's timestep-embedded level; the low-resolution channels are not noised to
    it), N(0, 1) label embeddings, and LCM's embedding of ``guidance_scale``."""
    names, example = traced.input_names, traced.example_inputs
    gen = torch.Generator().manual_seed(seed + 7_919)
    fields: dict[str, Any] = {}
    sources = []
    labels = example.get("class_labels")
    embedding = getattr(traced.gm, "class_embedding", None)
    # ids or noise levels beside extra image channels are that image's noise level (the x4 upscaler, IF stage II)
    extra_channels_present = _if_super_resolution(traced) or (traced.out_channels is not None and latent_channels(
        traced.sample_channels, traced.out_channels, None) < traced.sample_channels)
    class_ids = labels is not None and not labels.is_floating_point() and isinstance(embedding, nn.Embedding)
    if "encoder_hidden_states" in names:
        latent_h, latent_w = latent_size(traced, height, width)
        time_ids = example.get("time_ids")
        # SDXL's size ids are in image pixels; the traced example says how latent pixels map to them
        scale = int(time_ids[0, 0].item()) // example["sample"].shape[-2] if time_ids is not None else 8
        random = random_conditioning(
            num_rows=rows, seed=seed, cross_attention_dim=example["encoder_hidden_states"].shape[-1],
            pooled_dim=example["text_embeds"].shape[-1] if "text_embeds" in names else None,
            image_size=(latent_h * scale, latent_w * scale),
            num_classes=embedding.num_embeddings if class_ids and not extra_channels_present else None)
        fields.update({k: v for k, v in random.tensors().items() if k != "time_ids" or "time_ids" in names})
        sources.append(RANDOM_EMBEDDINGS)
        if class_ids and not extra_channels_present:
            sources.append("random-class-labels")
    elif "text_embeds" in names:
        fields["text_embeds"] = torch.randn(rows, example["text_embeds"].shape[-1], generator=gen)
        fields["negative_text_embeds"] = torch.randn(1, example["text_embeds"].shape[-1], generator=gen)
    if "image_embeds" in names:
        dim = example["image_embeds"].shape[-1]
        fields["image_embeds"] = torch.randn(rows, dim, generator=gen)
        fields["negative_image_embeds"] = torch.randn(1, dim, generator=gen)
        sources.append("random-image-embeddings")
    if "hint" in names:
        latent_h, latent_w = latent_size(traced, height, width)
        scale = _hint_scale(traced)
        fields["hint"] = torch.rand(rows, example["hint"].shape[1], latent_h * scale, latent_w * scale, generator=gen)
        sources.append("random-hints")
    if labels is not None and "class_labels" not in fields:
        if class_ids and not extra_channels_present:  # class-conditional: own generator, as random_conditioning's
            fields["class_labels"] = torch.randint(0, embedding.num_embeddings, (rows,),
                                                   generator=torch.Generator().manual_seed(seed))
            sources.append("random-class-labels")
        elif class_ids:  # beside extra image channels: an upscaler, the ids are the low-resolution image's noise level
            level = min(UPSCALER_NOISE_LEVEL, embedding.num_embeddings - 1)
            fields["class_labels"] = torch.full((rows,), level, dtype=torch.long)
            sources.append(f"noise-level {level}")
        elif labels.is_floating_point():
            fields["class_labels"] = torch.randn(rows, *labels.shape[1:], generator=gen)
            sources.append("random-class-embeddings")
        else:  # class_embed_type="timestep": a noise level, embedded like the timestep (IF super-resolution)
            fields["class_labels"] = torch.full((rows,), IF_NOISE_LEVEL, dtype=torch.long)
            sources.append(f"noise-level {IF_NOISE_LEVEL}")
    if "timestep_cond" in names:
        fields["timestep_cond"] = guidance_embedding(guidance_scale, example["timestep_cond"].shape[-1])
        sources.append(f"guidance-embedding(w={guidance_scale - 1:g})")
    if not fields:
        return Conditioning(source="unconditional")
    return Conditioning(source=" + ".join(sources) if sources else RANDOM_EMBEDDINGS, **fields)


def latent_size(traced: TracedUNet, height: int | None = None, width: int | None = None) -> tuple[int, int]:
    """The latent (height, width) a generation samples at: the ones asked (None: the traced size), refused when the
    traced graph is not valid for them."""
    traced_h, traced_w = traced.example_inputs[traced.input_names[0]].shape[-2:]
    height = height if height is not None else int(traced_h)
    width = width if width is not None else int(traced_w)
    multiple = traced.spatial_multiple
    errors = []
    for name, value, traced_value in (("height", height, traced_h), ("width", width, traced_w)):
        if multiple is None and value != traced_value:
            errors.append(f"{name}={value} differs from the traced size {int(traced_value)}, the only size this "
                          "graph is valid for")
        elif multiple is not None and value % multiple:
            errors.append(f"{name}={value} is not a multiple of {multiple} (2^number of upsamplers)")
    if errors:
        raise ConfigError("invalid latent size: " + "; ".join(errors))
    return height, width


SCHEDULER_SOURCES = {
    "model": "the model's own",
    "asked": "asked for with --scheduler",
    "given": "given by the caller",
    "default": "the default: the model brings none",
}


def scheduler_record(scheduler: Any | None, source: str | None = None) -> tuple[Any, dict[str, Any]]:
    """The scheduler a generation uses (``scheduler``, or diffusers' ``DDIMScheduler()`` when None) and how the
    report records it: class, where it came from (``source``: "model" — the model's own, "asked" — named with
    ``--scheduler``; None: "given"; "default" when ``scheduler`` is None; see :data:`SCHEDULER_SOURCES`), its
    config."""
    if scheduler is None:
        from diffusers import DDIMScheduler

        default = DDIMScheduler()
        return default, {"class": "DDIMScheduler", "source": "default",
                         "config": json_safe(default.config, drop_private_keys=True)}
    if source is not None and source not in SCHEDULER_SOURCES:
        raise ConfigError(f"scheduler source {source!r} is not one of {sorted(SCHEDULER_SOURCES)}")
    score_sde = all(hasattr(scheduler, a) for a in ("set_timesteps", "set_sigmas", "step_pred", "step_correct"))
    if not score_sde and not all(hasattr(scheduler, a)
                                 for a in ("set_timesteps", "step", "scale_model_input", "init_noise_sigma")):
        raise ConfigError(f"scheduler must be a diffusers scheduler, got {type(scheduler).__name__}")
    config = getattr(scheduler, "config", {})
    return scheduler, {"class": type(scheduler).__name__, "source": source or "given",
                       "config": json_safe(config, drop_private_keys=True)}

