"""The sampling loop the analysis uses: noise → final latents with a diffusers scheduler, optionally with
classifier-free guidance (``ε = ε_u + g·(ε_c − ε_u)``, both halves in one batch of 2N).

No sampler is written here: the scheduler does every update (``init_noise_sigma``, ``scale_model_input``,
``step``). The UNet is any callable taking the flat tensor inputs by keyword, so the same loop drives a diffusers
UNet, a traced fx graph or an onnxruntime session.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ldpruner.errors import ConfigError

__all__ = ["sample_latents", "fresh_scheduler"]

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
    class_labels: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    guided: bool | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    seed: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """Run ``steps`` scheduler steps from ``noise`` (N, C, H, W) and return the final latents (N, C, H, W).

    ``unet_fn(sample=, timestep=, [encoder_hidden_states=, text_embeds=, time_ids=, class_labels=])`` returns
    the UNet's prediction; ``timestep`` is passed as a (batch,) tensor. Conditioning tensors have one row per
    sample; negatives and ``time_ids`` may have one row shared by all samples.

    Classifier-free guidance runs when ``guidance_scale > 1`` and ``encoder_hidden_states`` is given: the
    negative half comes first in the batch, as in diffusers pipelines. ``guidance_scale <= 1`` runs the
    conditional half alone (no negatives needed). ``guided`` True applies the guidance formula at any scale
    (0 gives the unconditional prediction; the zoo samplers guide whenever the scale is not 1), False never.

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
    n = noise.shape[0]
    use_cfg = encoder_hidden_states is not None and (guidance_scale > 1.0 if guided is None else guided)
    if encoder_hidden_states is None and (text_embeds is not None or time_ids is not None):
        raise ConfigError("text_embeds / time_ids (SDXL) need encoder_hidden_states")
    encoder_hidden_states = _per_sample("encoder_hidden_states", encoder_hidden_states, n, allow_one=False)
    text_embeds = _per_sample("text_embeds", text_embeds, n, allow_one=False)
    time_ids = _per_sample("time_ids", time_ids, n, allow_one=True)
    class_labels = _per_sample("class_labels", class_labels, n, allow_one=False)
    if use_cfg:
        if negative_encoder_hidden_states is None:
            raise ConfigError(
                f"guidance_scale={guidance_scale} enables classifier-free guidance, which needs "
                "negative_encoder_hidden_states; pass them or set guidance_scale <= 1"
            )
        if text_embeds is not None and negative_text_embeds is None:
            raise ConfigError("classifier-free guidance on an SDXL UNet needs negative_text_embeds")
        negative_encoder_hidden_states = _per_sample(
            "negative_encoder_hidden_states", negative_encoder_hidden_states, n, allow_one=True)
        negative_text_embeds = _per_sample("negative_text_embeds", negative_text_embeds, n, allow_one=True)

    # The batch the UNet sees, built once: [negative half; positive half] under guidance.
    def both(neg: torch.Tensor | None, pos: torch.Tensor | None) -> torch.Tensor | None:
        if pos is None:
            return None
        return torch.cat([neg if neg is not None else pos, pos]) if use_cfg else pos

    cond: dict[str, torch.Tensor] = {}
    for name, value in (
        ("encoder_hidden_states", both(negative_encoder_hidden_states, encoder_hidden_states)),
        ("text_embeds", both(negative_text_embeds, text_embeds)),
        ("time_ids", both(None, time_ids)),
        ("class_labels", both(None, class_labels)),
    ):
        if value is not None:
            cond[name] = value
    batch = 2 * n if use_cfg else n

    scheduler = fresh_scheduler(scheduler)
    scheduler.set_timesteps(steps, device=noise.device)
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    step_kwargs: dict[str, Any] = {"return_dict": True}
    if _accepts(scheduler.step, "generator"):
        step_kwargs["generator"] = list(generator) if isinstance(generator, Sequence) else generator

    latents = noise * scheduler.init_noise_sigma
    timesteps = scheduler.timesteps
    if progress:
        from tqdm.auto import tqdm

        timesteps = tqdm(timesteps, desc="sampling", leave=False)
    for t in timesteps:
        model_input = torch.cat([latents, latents]) if use_cfg else latents
        model_input = scheduler.scale_model_input(model_input, t)
        timestep = torch.as_tensor(t, device=noise.device).reshape(1).repeat(batch)
        prediction = unet_fn(sample=model_input, timestep=timestep, **cond)
        if not isinstance(prediction, torch.Tensor):
            raise TypeError(f"unet_fn must return a tensor, got {type(prediction).__name__}")
        if use_cfg:
            uncond, text = prediction.chunk(2)
            prediction = uncond + guidance_scale * (text - uncond)
        latents = scheduler.step(prediction, t, latents, **step_kwargs).prev_sample
    return latents
