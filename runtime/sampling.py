"""The sampling loop the analysis uses: noise → final latents with a diffusers scheduler, optionally with
classifier-free guidance (``ε = ε_u + g·(ε_c − ε_u)``, both halves in one batch of 2N).

No sampler is written here: the scheduler does every update (``init_noise_sigma``, ``scale_model_input``,
``step``). The UNet is any callable taking the flat tensor inputs by keyword, so the same loop drives a diffusers
UNet, a traced fx graph or an onnxruntime session.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ldpruner.base.errors import ConfigError, UnsupportedModelError

__all__ = ["fresh_scheduler", "guidance_embedding", "latent_channels", "learned_variance", "sample_latents",
           "unet_calls_per_step"]

UNetFn = Callable[..., torch.Tensor]


def fresh_scheduler(scheduler: Any) -> Any:
    """A private copy of ``scheduler`` for one generation.

    Schedulers are stateful (timesteps, step index, multistep history); sharing one instance between
    generations would let one leak into the next, so each generation deep-copies it and ``set_timesteps``
    resets the copy. A deep copy rather than ``from_config``: diffusers' ``from_config`` re-applies class
    defaults for the keys listed in ``_use_default_values``, which undoes config edits made after
    construction (StableDiffusionPipeline patches ``clip_sample`` / ``steps_offset`` that way)."""
    return copy.deepcopy(scheduler)


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False


def _per_sample(name: str, value: torch.Tensor | None, n: int, *, allow_one: bool) -> torch.Tensor | None:
    """Check a conditioning tensor has one row per sample (or one row for all, where broadcasting is allowed)."""
    if value is None:
        return None
    if value.shape[0] == n:
        return value
    if allow_one and value.shape[0] == 1:
        return value.expand(n, *value.shape[1:])
    rows = f"{n}{' or 1' if allow_one else ''}"
    raise ConfigError(f"{name} has {value.shape[0]} rows; it needs {rows} (one per noise sample)")


def unet_calls_per_step(scheduler: Any) -> int:
    """UNet calls per sampling step, per micro-batch (guidance doubles the batch, not the calls): one, or for a
    score-SDE scheduler its Langevin corrections plus the prediction."""
    if hasattr(scheduler, "step_pred") and hasattr(scheduler, "step_correct"):
        return 1 + int(scheduler.config.correct_steps)
    return 1


def learned_variance(scheduler: Any) -> bool:
    """The scheduler takes the UNet's predicted variance (``variance_type`` learned / learned_range)."""
    return getattr(getattr(scheduler, "config", None), "variance_type", None) in ("learned", "learned_range")


def latent_channels(sample_channels: int, out_channels: int, scheduler: Any) -> int:
    """The channels of the latent the scheduler denoises, for a UNet whose ``sample`` input has
    ``sample_channels`` and whose prediction has ``out_channels``:

    * a learned-variance scheduler: half the prediction (the other half is the variance; DeepFloyd IF, unCLIP);
    * a prediction twice the input: the input (the second half is a variance the scheduler ignores: Kandinsky);
    * a prediction narrower than the input: the prediction; the other input channels are conditioning the
      pipeline concatenates to the latent (SD inpainting 9 → 4, the x4 upscaler 7 → 4).
    """
    if learned_variance(scheduler):
        if out_channels % 2:
            raise UnsupportedModelError(f"out_channels={out_channels} is not supported with the scheduler's "
                                        f"variance_type={scheduler.config.variance_type!r}: a learned variance "
                                        "doubles the prediction, so out_channels must be even")
        channels = out_channels // 2
    elif out_channels == 2 * sample_channels:
        channels = sample_channels
    else:
        channels = out_channels
    if channels > sample_channels:
        raise UnsupportedModelError(f"out_channels={out_channels} is not supported with in_channels="
                                    f"{sample_channels}: the UNet predicts more channels than it is given")
    return channels


def guidance_embedding(guidance_scale: float, dim: int, rows: int = 1) -> torch.Tensor:
    """LCM's ``timestep_cond``: the sinusoidal embedding of ``w = guidance_scale − 1`` the latent-consistency
    pipelines pass (diffusers' ``get_guidance_scale_embedding``), ``rows`` × ``dim``, float32."""
    w = torch.full((rows,), float(guidance_scale) - 1.0) * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    emb = w[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


def sample_latents(
    unet_fn: UNetFn,
    scheduler: Any,
    *,
    noise: torch.Tensor,
    steps: int,
    encoder_hidden_states: torch.Tensor | None = None,
    negative_encoder_hidden_states: torch.Tensor | None = None,
    text_embeds: torch.Tensor | None = None,
    negative_text_embeds: torch.Tensor | None = None,
    time_ids: torch.Tensor | None = None,
    image_embeds: torch.Tensor | None = None,
    negative_image_embeds: torch.Tensor | None = None,
    hint: torch.Tensor | None = None,
    class_labels: torch.Tensor | None = None,
    timestep_cond: torch.Tensor | None = None,
    extra_channels: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    guided: bool | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    seed: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """Run ``steps`` scheduler steps from ``noise`` (N, C, H, W) and return the final latents (N, C, H, W).

    ``unet_fn(sample=, timestep=, [encoder_hidden_states=, text_embeds=, time_ids=, image_embeds=, hint=,
    class_labels=, timestep_cond=])`` returns the UNet's prediction; ``timestep`` is passed as a (batch,) tensor.
    Conditioning tensors have one row per sample; negatives, ``time_ids`` and ``timestep_cond`` may have one row
    shared by all samples. ``extra_channels`` (N, E, H, W) are concatenated to the scaled latent before every call
    (inpainting's mask and masked-image latents, an upscaler's low-resolution image), as the pipelines do.

    Classifier-free guidance runs when ``guidance_scale > 1`` and a guided input (``encoder_hidden_states``,
    ``text_embeds``, ``image_embeds``) is given: the negative half comes first in the batch, as in diffusers
    pipelines; the other inputs are repeated for both halves. ``guidance_scale <= 1`` runs the conditional half
    alone (no negatives needed). ``guided`` True applies the guidance formula at any scale (0 gives the
    unconditional prediction; the zoo samplers guide whenever the scale is not 1), False never.

    A prediction with 2C channels carries a variance (DeepFloyd IF, unCLIP, Kandinsky): guidance applies to the
    first C, and the variance (of the conditional half) goes to the scheduler only when its ``variance_type`` is
    learned, as the IF and Kandinsky pipelines do.

    The scheduler is deep-copied (:func:`fresh_scheduler`) so no state survives between calls. Schedulers that draw
    noise in ``step`` (DDPM, ancestral samplers) get ``generator``: one generator, or a list of one per
    sample (diffusers then draws each sample's noise from its own generator, which makes a sample's
    trajectory independent of how the samples are batched). When ``generator`` is None a CPU generator
    seeded with ``seed`` is used, so the result is a function of the inputs alone.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ConfigError(f"steps={steps!r} must be a positive integer")
    if noise.ndim != 4:
        raise ConfigError(f"noise must be (N, C, H, W), got shape {tuple(noise.shape)}")
    n, channels = noise.shape[0], noise.shape[1]
    given = {"encoder_hidden_states": encoder_hidden_states, "text_embeds": text_embeds,
             "image_embeds": image_embeds}
    negatives = {"encoder_hidden_states": negative_encoder_hidden_states, "text_embeds": negative_text_embeds,
                 "image_embeds": negative_image_embeds}
    conditional = any(v is not None for v in given.values())
    use_cfg = conditional and (guidance_scale > 1.0 if guided is None else guided)
    if time_ids is not None and text_embeds is None:
        raise ConfigError("time_ids (SDXL) need text_embeds")
    per_sample = {name: _per_sample(name, value, n, allow_one=False) for name, value in given.items()}
    per_sample.update({
        "time_ids": _per_sample("time_ids", time_ids, n, allow_one=True),
        "timestep_cond": _per_sample("timestep_cond", timestep_cond, n, allow_one=True),
        "hint": _per_sample("hint", hint, n, allow_one=False),
        "class_labels": _per_sample("class_labels", class_labels, n, allow_one=False),
    })
    extra_channels = _per_sample("extra_channels", extra_channels, n, allow_one=False)
    if extra_channels is not None and extra_channels.shape[2:] != noise.shape[2:]:
        raise ConfigError(f"extra_channels have spatial size {tuple(extra_channels.shape[2:])}, the latents "
                          f"{tuple(noise.shape[2:])}")
    if use_cfg:
        for name, value in given.items():
            if value is not None and negatives[name] is None:
                raise ConfigError(
                    f"guidance_scale={guidance_scale} enables classifier-free guidance, which needs negative_{name}; "
                    "pass it or set guidance_scale <= 1")
            negatives[name] = _per_sample(f"negative_{name}", negatives[name], n, allow_one=True)

    # The batch the UNet sees, built once: [negative half; positive half] under guidance.
    def both(neg: torch.Tensor | None, pos: torch.Tensor | None) -> torch.Tensor | None:
        if pos is None:
            return None
        return torch.cat([neg if neg is not None else pos, pos]) if use_cfg else pos

    cond = {name: both(negatives.get(name), value) for name, value in per_sample.items()}
    cond = {name: value for name, value in cond.items() if value is not None}
    extra = both(None, extra_channels)
    batch = 2 * n if use_cfg else n
    keep_variance = learned_variance(scheduler)

    if hasattr(scheduler, "step_pred") and hasattr(scheduler, "step_correct"):
        if use_cfg or extra is not None:
            raise ConfigError(f"{type(scheduler).__name__} samples unconditional UNets only")
        return _sample_score_sde(unet_fn, scheduler, noise=noise, steps=steps, cond=cond,
                                 generator=generator if generator is not None else torch.Generator().manual_seed(seed))
    scheduler = fresh_scheduler(scheduler)
    try:
        scheduler.set_timesteps(steps, device=noise.device)
    except (ValueError, IndexError, RuntimeError) as exc:  # e.g. PNDM's Runge-Kutta warm-up needs more steps
        raise ConfigError(f"steps={steps} does not work with {type(scheduler).__name__}: set_timesteps failed "
                          f"({type(exc).__name__}: {exc}); use more steps or the pipeline's own scheduler "
                          "settings") from exc
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    step_kwargs: dict[str, Any] = {"return_dict": True}
    if _accepts(scheduler.step, "generator"):
        step_kwargs["generator"] = list(generator) if isinstance(generator, Sequence) else generator
    # UnCLIPScheduler steps to the timestep it is told (else t - 1), as UnCLIPPipeline tells it
    previous = _accepts(scheduler.step, "prev_timestep")

    latents = noise * scheduler.init_noise_sigma
    schedule = list(scheduler.timesteps)
    timesteps = scheduler.timesteps
    if progress:
        from tqdm.auto import tqdm

        timesteps = tqdm(timesteps, desc="sampling", leave=False)
    for i, t in enumerate(timesteps):
        if previous:
            step_kwargs["prev_timestep"] = schedule[i + 1] if i + 1 < len(schedule) else None
        model_input = torch.cat([latents, latents]) if use_cfg else latents
        model_input = scheduler.scale_model_input(model_input, t)
        if extra is not None:
            model_input = torch.cat([model_input, extra.to(model_input.dtype)], dim=1)
        timestep = torch.as_tensor(t, device=noise.device).reshape(1).repeat(batch)
        prediction = unet_fn(sample=model_input, timestep=timestep, **cond)
        if not isinstance(prediction, torch.Tensor):
            raise TypeError(f"unet_fn must return a tensor, got {type(prediction).__name__}")
        if prediction.shape[1] not in (channels, 2 * channels):
            raise ConfigError(f"the UNet predicts {prediction.shape[1]} channels for a {channels}-channel latent "
                              f"(expected {channels}, or {2 * channels} with a learned variance)")
        variance = None
        if prediction.shape[1] == 2 * channels:
            prediction, variance = prediction.split(channels, dim=1)
        if use_cfg:
            uncond, text = prediction.chunk(2)
            prediction = uncond + guidance_scale * (text - uncond)
            variance = variance.chunk(2)[1] if variance is not None else None
        if variance is not None and keep_variance:
            prediction = torch.cat([prediction, variance], dim=1)
        latents = scheduler.step(prediction, t, latents, **step_kwargs).prev_sample
    return latents


def _sample_score_sde(unet_fn: UNetFn, scheduler: Any, *, noise: torch.Tensor, steps: int,
                      cond: dict[str, torch.Tensor], generator: Any) -> torch.Tensor:
    """The predictor-corrector loop of ``ScoreSdeVePipeline`` (score-SDE / NCSN++ UNets): per step, the scheduler's
    ``correct_steps`` Langevin corrections, then one reverse-SDE prediction; the UNet sees the noise level sigma as
    its timestep and returns the score. The final latents are the last prediction's mean, as in the pipeline."""
    scheduler = fresh_scheduler(scheduler)
    scheduler.set_timesteps(steps, device=noise.device)
    scheduler.set_sigmas(steps)
    generator = list(generator) if isinstance(generator, Sequence) else generator
    sample = noise * scheduler.init_noise_sigma
    mean = sample
    for i, t in enumerate(scheduler.timesteps):
        sigma = (scheduler.sigmas[i] * torch.ones(sample.shape[0])).to(sample.device)
        for _ in range(scheduler.config.correct_steps):
            score = unet_fn(sample=sample, timestep=sigma, **cond)
            sample = scheduler.step_correct(score, sample, generator=generator).prev_sample
        score = unet_fn(sample=sample, timestep=sigma, **cond)
        output = scheduler.step_pred(score, t, sample, generator=generator)
        sample, mean = output.prev_sample, output.prev_sample_mean
    return mean
