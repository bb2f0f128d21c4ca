"""The LD score of any removed set S: with μ, σ the elementwise mean and standard deviation over N samples of the
final latents, generated from the same noise, conditioning, scheduler and step count by the dense UNet (d) and by the
UNet with every operator of S removed together,

    score(S) = ‖μ_d − μ_S‖₂ + ‖σ_d − σ_S‖₂

:class:`LatentDeviation` fixes the sampling once (noise, per-sample seeds, conditioning, micro-batches, scheduler),
generates the dense latents once, and scores any set by swapping the set's stand-ins in (what the rewrite will
compute) and back: the graph and weights are unchanged afterwards. The one-shot analysis
(:mod:`~ldpruner.passes.importance`) scores every singleton; the set search scores growing sets.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.fx

from ldpruner.base.errors import ConfigError
from ldpruner.base.unet_inputs import GUIDED_INPUTS
from ldpruner.compiler.graph import Operator, OperatorGraph
from ldpruner.compiler.removal import swapped
from ldpruner.runtime.graph_unet import GraphUNet
from ldpruner.runtime.sampling import sample_latents, unet_calls_per_step

from .conditioning import Conditioning, uses_guidance
from .config import AnalysisConfig
from .inputs import SCHEDULER_SOURCES, default_extra_channels, extra_channel_count, latent_size, resolve_conditioning

__all__ = ["LatentDeviation", "LatentMoments", "analysis_conditioning", "latent_deviation_score", "latent_stats"]


# --- the score -------------------------------------------------------------------------------------------------

def latent_stats(latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Elementwise mean and standard deviation over the samples (dim 0), in float64.

    σ is the population standard deviation (``torch.std(..., unbiased=False)``, i.e. ``correction=0``): the
    statistic of the N samples themselves, as the score compares two sets of N samples."""
    x = latents.detach().to(torch.float64)
    return x.mean(dim=0), torch.std(x, dim=0, correction=0)


class LatentMoments:
    """Elementwise mean and population standard deviation of latents that arrive in micro-batches, accumulated in
    float64 with Chan et al.'s pairwise update (count, mean, sum of squared deviations), so only one batch is ever
    held and the result is that of all latents at once up to summation order::

        δ = μ_b − μ,   μ ← μ + δ·n_b/n,   M2 ← M2 + M2_b + δ²·n·n_b/(n + n_b),   σ = √(M2 / n)
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def update(self, latents: torch.Tensor) -> None:
        x = latents.detach().to(torch.float64)
        n_b = x.shape[0]
        mean_b = x.mean(dim=0)
        m2_b = (x - mean_b).square().sum(dim=0)
        if self.count == 0:
            self.count, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta.square() * (self.count * n_b / n)
        self.count = n

    def stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(μ, σ) over every latent so far."""
        if self.count == 0:
            raise ConfigError("no latents were accumulated")
        return self.mean, (self.m2 / self.count).sqrt()


def latent_deviation_score(dense: tuple[torch.Tensor, torch.Tensor],
                           latents: torch.Tensor | LatentMoments) -> tuple[float, float]:
    """(‖μ_dense − μ_c‖₂, ‖σ_dense − σ_c‖₂) over all latent elements; the score is their sum."""
    mu, sigma = latents.stats() if isinstance(latents, LatentMoments) else latent_stats(latents)
    return (float(torch.linalg.vector_norm(dense[0] - mu)), float(torch.linalg.vector_norm(dense[1] - sigma)))


def analysis_conditioning(traced: Any, calib: Conditioning | str | os.PathLike | None, config: AnalysisConfig,
                          scheduler: Any | None) -> Conditioning:
    """The conditioning the analysis samples with at ``config`` (see
    :func:`~ldpruner.passes.inputs.resolve_conditioning`)."""
    return resolve_conditioning(traced, calib, num_samples=config.num_samples, seed=config.seed,
                                guidance_scale=config.guidance_scale, prompts=config.prompts, height=config.height,
                                width=config.width, scheduler=scheduler)


# --- the sampling, fixed once ------------------------------------------------------------------------------------

class LatentDeviation:
    """The analysis' sampling of ``operator_graph``'s traced UNet, fixed once, and the LD score of any removed set.

    Use it as a context manager: entering puts the model in analysis mode (eval, no autograd, the global RNG
    untouched), draws the data-free extra channels where the model takes them, and generates the dense moments
    (ConfigError when they are not finite); :meth:`score` then scores a set. ``on_call`` is called after every UNet
    call (a progress bar). The conditioning must be resolved for this graph and config
    (:func:`~ldpruner.passes.inputs.resolve_conditioning`)."""

    def __init__(self, operator_graph: OperatorGraph, conditioning: Conditioning, config: AnalysisConfig,
                 scheduler: Any, scheduler_info: Mapping[str, Any], *,
                 on_call: Callable[[], None] | None = None) -> None:
        traced = operator_graph.traced
        self.gm, self.config, self.scheduler, self.scheduler_info = traced.gm, config, scheduler, scheduler_info
        self.conditioning, self.on_call = conditioning, on_call
        height, width = latent_size(traced, config.height, config.width)
        self.use_cfg = uses_guidance(traced.input_names, config.guidance_scale)
        if self.use_cfg and not conditioning.has_negative:
            raise ConfigError(
                f"guidance_scale={config.guidance_scale} enables classifier-free guidance, but the conditioning "
                f"lacks the negative of {[n for n in GUIDED_INPUTS if n in traced.input_names]}; add them or set "
                "guidance_scale <= 1")
        param = next(self.gm.parameters())
        self.device, self.dtype = param.device, param.dtype
        if self.dtype != getattr(torch, config.dtype):
            raise ConfigError(f"the analysis is configured for dtype={config.dtype!r} but the traced UNet is in "
                              f"{str(self.dtype).removeprefix('torch.')}: cast the model before tracing it (the API "
                              "does)")
        extra = extra_channel_count(traced, scheduler)
        channels = traced.sample_channels - extra
        self.shape = (config.num_samples, channels, height, width)
        self._traced, self._extra = traced, extra
        self.make_extra = extra > 0 and conditioning.extra_channels is None
        # inpainting's data-free masks are drawn over one more dense generation (every rank makes the same)
        self.references = int(self.make_extra and extra == channels + 1)
        self.noise = torch.randn(self.shape, generator=torch.Generator().manual_seed(config.seed)).to(
            device=self.device, dtype=self.dtype)
        self.unet = GraphUNet(self.gm, traced.input_names)
        self.batch = config.batch_size or config.num_samples
        self.batches = [torch.arange(b, min(b + self.batch, config.num_samples))
                        for b in range(0, config.num_samples, self.batch)]
        # one generation = every micro-batch through every step
        self.calls_per_generation = len(self.batches) * config.steps * unet_calls_per_step(scheduler)
        # the dense generation (and, where drawn, the extra channels' reference): what entering costs each process
        self.dense_calls = (1 + self.references) * self.calls_per_generation
        self.dense: tuple[torch.Tensor, torch.Tensor] | None = None
        self._mode: contextlib.ExitStack | None = None

    def __enter__(self) -> LatentDeviation:
        self._mode = contextlib.ExitStack()
        self._mode.enter_context(_analysis_mode(self.gm))
        try:
            if self.make_extra:
                self.conditioning = self.conditioning.replace(extra_channels=default_extra_channels(
                    self._traced, self.scheduler, noise=self.noise, sample=self._dense_samples, seed=self.config.seed))
            self.dense = self._moments().stats()
            if not all(bool(torch.isfinite(t).all()) for t in self.dense):
                raise ConfigError(_not_finite_message(str(self.dtype).removeprefix("torch."), self.scheduler_info))
        except BaseException:
            self._mode.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._mode is not None
        self._mode.close()

    @property
    def dense_norms(self) -> tuple[float, float]:
        """(‖μ_dense‖₂, ‖σ_dense‖₂): the scale the terms of a score compare to."""
        assert self.dense is not None, "enter the LatentDeviation first"
        return float(torch.linalg.vector_norm(self.dense[0])), float(torch.linalg.vector_norm(self.dense[1]))

    def score(self, removed: Sequence[Operator]) -> tuple[float, float]:
        """(‖μ_d − μ_S‖₂, ‖σ_d − σ_S‖₂) with every operator of ``removed`` swapped for its stand-in; both +inf when
        the samples without them are not finite (a removal that breaks the model)."""
        assert self.dense is not None, "enter the LatentDeviation first"
        with contextlib.ExitStack() as swaps:
            for op in removed:
                swaps.enter_context(swapped(self.gm, op))
            mu_term, sigma_term = latent_deviation_score(self.dense, self._moments())
        if not (math.isfinite(mu_term) and math.isfinite(sigma_term)):
            return math.inf, math.inf
        return mu_term, sigma_term

    def _counted(self, **inputs: torch.Tensor) -> torch.Tensor:
        out = self.unet.flat(**inputs)
        if self.on_call is not None:
            self.on_call()
        return out

    def _generate(self, rows: Conditioning) -> Iterator[torch.Tensor]:
        config = self.config
        for index in self.batches:
            generators = [torch.Generator().manual_seed((config.seed << 20) + int(i) + 1) for i in index]
            yield sample_latents(
                self._counted, self.scheduler, noise=self.noise[index], steps=config.steps,
                guidance_scale=config.guidance_scale if self.use_cfg else 1.0, generator=generators,
                **rows.rows(index, self.device, self.dtype))

    def _moments(self) -> LatentMoments:
        moments = LatentMoments()
        for latents in self._generate(self.conditioning):
            moments.update(latents)
        return moments

    def _dense_samples(self, _noise: torch.Tensor, extra_rows: torch.Tensor) -> torch.Tensor:
        return torch.cat(list(self._generate(self.conditioning.replace(extra_channels=extra_rows))))


@contextlib.contextmanager
def _analysis_mode(gm: torch.fx.GraphModule) -> Iterator[None]:
    """eval mode, no autograd, and the global RNG untouched (stand-ins initialise new layers), all restored."""
    modes = {name: m.training for name, m in gm.named_modules()}
    gm.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            yield
    finally:
        for name, m in gm.named_modules():
            m.training = modes.get(name, m.training)


def _not_finite_message(dtype: str, scheduler_info: Mapping[str, Any]) -> str:
    """Why the dense samples may not be finite, and the fix that matches the settings: a half-precision dtype first,
    else the scheduler (a default one above all: the model's own may not be what the UNet was trained with)."""
    start = f"the dense model's samples are not finite (NaN or Inf) in {dtype}"
    if dtype != "float32":
        return (f"{start} at these settings; the analysis would score nothing: analyse in float32 (dtype='float32') "
                "or check the model")
    name, source = scheduler_info["class"], scheduler_info["source"]
    if source == "default":
        return (f"{start} with {name}() at diffusers' defaults (the model brings no scheduler); the analysis would "
                "score nothing: the default scheduler is the likely cause, pass the model's own with --scheduler "
                "(scheduler=: a scheduler folder, or a class such as ScoreSdeVeScheduler) or check the model")
    return (f"{start} with {name} ({SCHEDULER_SOURCES[source]}); the analysis would score nothing: check that the "
            "scheduler is the one the model was trained with (--scheduler picks another) and that the model's "
            "outputs are finite")
