"""Importance analysis (LD-Pruner): how far the distribution of final latents moves when one operator goes.

With μ, σ the elementwise mean and standard deviation over N samples of the final latents, generated from the
same noise, conditioning, scheduler and step count by the dense UNet (d) and by the UNet without candidate c:

    score(c) = ‖μ_d − μ_c‖₂ + ‖σ_d − σ_c‖₂

A low score means the operator can go. The analysis is pure: each candidate is applied in place by swapping its
module for the stand-in that computes what the rewrite will compute, and swapped back; graph and weights are
unchanged afterwards. Candidates are independent, so under torch.distributed each rank scores a share.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.fx
from torch import nn

from ldpruner import devices, distributed
from ldpruner.compiler.graph import Operator, OperatorGraph
from ldpruner.compiler.removal import swapped
from ldpruner.compiler.tracer import TracedUNet
from ldpruner.errors import ArtifactError, ConfigError, ModelLoadError, UnsupportedModelError
from ldpruner.io import json_safe, read_json, write_text_atomic
from ldpruner.runtime.graph_unet import GraphUNet
from ldpruner.runtime.sampling import (
    guidance_embedding,
    latent_channels,
    learned_variance,
    sample_latents,
    unet_calls_per_step,
)
from ldpruner.unet_inputs import FLAT_INPUTS, GUIDED_INPUTS

from .conditioning import (
    DEFAULT_PROMPTS,
    RANDOM_EMBEDDINGS,
    Conditioning,
    encode_prompts,
    random_conditioning,
    read_prompt_file,
    uses_guidance,
)
from .config import AnalysisConfig
from .plan import check_weights_id

__all__ = [
    "SCHEDULER_SOURCES",
    "AnalysisConfig",
    "CandidateScore",
    "LatentMoments",
    "Conditioning",
    "DEFAULT_PROMPTS",
    "ImportanceReport",
    "SCORES_FORMAT",
    "analyze_importance",
    "check_analysable",
    "cache_key",
    "encode_prompts",
    "latent_deviation_score",
    "latent_stats",
    "load_cached",
    "random_conditioning",
    "read_prompt_file",
    "resolve_conditioning",
    "scheduler_record",
    "weights_fingerprint",
]

SCORES_FORMAT = "ldpruner.scores/1"


@dataclasses.dataclass(frozen=True)
class CandidateScore:
    """The score of one candidate, with its two terms and what removing it saves."""

    name: str  # fx qualified name of the operator's module
    score: float
    mu_term: float  # ‖μ_dense − μ_c‖₂
    sigma_term: float  # ‖σ_dense − σ_c‖₂
    params: int
    macs: int
    action: str
    kind: str
    module_class: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ImportanceReport:
    """Per-candidate scores keyed by fx qualified name, plus what produced them. Written as scores.json.

    ``entries`` keeps graph order; treat it as read-only. ``unet_calls`` is summed over ranks (each rank
    generates the dense latents once); ``wall_time_s`` is the slowest rank's."""

    FILENAME: ClassVar[str] = "scores.json"

    model_class: str
    granularity: str
    total_params: int
    total_macs: int
    config: AnalysisConfig
    scheduler: dict[str, Any]
    conditioning: str
    prompts: tuple[str, ...] | None
    classifier_free_guidance: bool
    latent_shape: tuple[int, ...]
    dense_mean_norm: float  # ‖μ_dense‖₂: the scale the μ-terms compare to
    dense_std_norm: float  # ‖σ_dense‖₂
    entries: dict[str, CandidateScore]
    unet_calls: int
    wall_time_s: float
    world_size: int
    cache_key: str
    placement: dict[str, str] = dataclasses.field(default_factory=dict)  # device, dtype, accelerator
    planned_unet_calls: int | None = None  # announced before the scoring started
    peak_memory: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # one entry per rank
    # the identity of the dense weights analysed (ldpruner.sources.weights_id); None: not recorded
    model_weights: str | None = None

    def __getitem__(self, name: str) -> CandidateScore:
        return self.entries[name]

    def __iter__(self) -> Iterator[CandidateScore]:
        return iter(self.entries.values())

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def scores(self) -> dict[str, float]:
        return {name: e.score for name, e in self.entries.items()}

    def ranked(self) -> list[CandidateScore]:
        """Least important first (the order LD-Pruner removes in); ties keep graph order."""
        return sorted(self.entries.values(), key=lambda e: e.score)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SCORES_FORMAT,
            "cache_key": self.cache_key,
            "model_class": self.model_class,
            "model_weights": self.model_weights,
            "granularity": self.granularity,
            "total_params": self.total_params,
            "total_macs_per_sample": self.total_macs,
            "config": self.config.to_dict(),
            "scheduler": self.scheduler,
            "conditioning": self.conditioning,
            "prompts": list(self.prompts) if self.prompts is not None else None,
            "classifier_free_guidance": self.classifier_free_guidance,
            "latent_shape": list(self.latent_shape),
            "score": "||mu_dense - mu_c||_2 + ||sigma_dense - sigma_c||_2; sigma: population std (unbiased=False)",
            "dense": {"mean_norm": self.dense_mean_norm, "std_norm": self.dense_std_norm},
            "placement": self.placement,
            "cost": {"unet_calls": self.unet_calls, "planned_unet_calls": self.planned_unet_calls,
                     "wall_time_s": self.wall_time_s, "world_size": self.world_size,
                     "peak_memory": self.peak_memory},
            "candidates": [e.to_dict() for e in self.entries.values()],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ImportanceReport:
        if not isinstance(data, Mapping) or data.get("format") != SCORES_FORMAT:
            found = data.get("format") if isinstance(data, Mapping) else type(data).__name__
            raise ArtifactError(f"not an ldpruner scores file: expected format {SCORES_FORMAT!r}, got {found!r}")
        try:
            entries = [CandidateScore(**e) for e in data["candidates"]]
            cost = data["cost"]
            _check_finite_scores(entries, "scores.json")
            return cls(
                model_class=data["model_class"],
                granularity=data["granularity"],
                total_params=int(data["total_params"]),
                total_macs=int(data["total_macs_per_sample"]),
                config=AnalysisConfig.from_dict(data["config"]),
                scheduler=dict(data["scheduler"]),
                conditioning=data["conditioning"],
                prompts=tuple(data["prompts"]) if data["prompts"] is not None else None,
                classifier_free_guidance=bool(data["classifier_free_guidance"]),
                latent_shape=tuple(data["latent_shape"]),
                dense_mean_norm=float(data["dense"]["mean_norm"]),
                dense_std_norm=float(data["dense"]["std_norm"]),
                entries={e.name: e for e in entries},
                unet_calls=int(cost["unet_calls"]),
                wall_time_s=float(cost["wall_time_s"]),
                world_size=int(cost["world_size"]),
                cache_key=data["cache_key"],
                placement=dict(data.get("placement") or {}),
                planned_unet_calls=cost.get("planned_unet_calls"),
                peak_memory=list(cost.get("peak_memory") or []),
                model_weights=check_weights_id(data.get("model_weights"), "scores.json's model_weights"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"malformed scores file: {type(exc).__name__}: {exc}") from exc

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def check_finite(self, where: str = "the scores") -> None:
        """ArtifactError when a score or one of its terms is NaN, infinite or not a number: never ranked."""
        _check_finite_scores(list(self.entries.values()), where)

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically; ``path`` is a file, or a folder that receives ``scores.json``."""
        path = Path(path)
        if path.is_dir():
            path = path / self.FILENAME
        write_text_atomic(path, self.to_json())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ImportanceReport:
        path = Path(path)
        if path.is_dir():
            path = path / cls.FILENAME
        return cls.from_dict(read_json(path, what="scores file"))


def _check_finite_scores(entries: list[CandidateScore], where: str) -> None:
    """A score is a finite number, or +inf (its removal makes the samples non-finite: never selected)."""
    bad = []
    for e in entries:
        values = (e.score, e.mu_term, e.sigma_term)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and (math.isfinite(v) or v == math.inf)
                   for v in values):
            bad.append(f"{e.name} ({e.score!r})")
    if bad:
        raise ArtifactError(f"{where} hold non-finite or non-numeric scores for {bad[:5]}"
                            f"{' …' if len(bad) > 5 else ''}; a NaN would rank first and be removed: re-run the "
                            "analysis (a model whose outputs are not finite is refused there)")


def check_finite_weights(module: nn.Module, what: str = "the model") -> None:
    """ModelLoadError naming the tensors that hold NaN or Inf: such a model's outputs cannot be finite, so its
    scores, plan and export would be meaningless."""
    bad = []
    with torch.no_grad():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                count = int((~torch.isfinite(tensor)).sum())
                kinds = sorted({"nan" if bool(torch.isnan(tensor).any()) else "", "inf" if bool(
                    torch.isinf(tensor).any()) else ""} - {""})
                bad.append(f"{name} ({count} {'/'.join(kinds)})")
    if bad:
        raise ModelLoadError(f"{what} has non-finite weights: {', '.join(bad[:5])}{' …' if len(bad) > 5 else ''}; "
                             "its outputs cannot be finite, so ldpruner does not analyse or prune it")


def load_cached(path: str | os.PathLike, key: str) -> ImportanceReport | None:
    """The report at ``path`` if it was computed with cache key ``key`` (see :func:`cache_key`), else None.

    A missing file is a miss; a file that is not a scores file raises :class:`ArtifactError` rather than
    being treated as a miss and overwritten later."""
    path = Path(path)
    if path.is_dir():
        path = path / ImportanceReport.FILENAME
    if not path.is_file():
        return None
    report = ImportanceReport.load(path)
    return report if report.cache_key == key else None


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


# --- inputs: conditioning, scheduler, latent size --------------------------------------------------------------

def resolve_conditioning(traced: TracedUNet, calib: Conditioning | str | os.PathLike | None,
                         config: AnalysisConfig, scheduler: Any | None = None) -> Conditioning:
    """The conditioning the analysis uses, checked against the traced UNet's inputs.

    ``calib`` is a :class:`Conditioning`, a local diffusers pipeline folder (its tokenizer/ and text_encoder/
    encode ``config.prompts``), or None: unconditional UNets need nothing; conditional ones get seeded random rows
    for every input (:func:`_default_conditioning`), labelled ``"random-embeddings"`` in the report. Inputs a given
    Conditioning lacks (class labels, ``timestep_cond``, an image embedding …) get the same defaults, and the
    source says which. ``extra_channels`` a UNet needs and the Conditioning lacks are made later, by the analysis
    (:func:`default_extra_channels`); the source names the default. ``scheduler`` (None: DDIM) decides whether the
    prediction carries a learned variance, and with it which input channels are the latent."""
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
        calib = encode_prompts(calib, config.prompts or DEFAULT_PROMPTS, device=next(traced.gm.parameters()).device)
    if calib is not None and not isinstance(calib, Conditioning):
        raise ConfigError(f"calib must be a Conditioning, a pipeline folder or None, got {type(calib).__name__}")
    defaults = _default_conditioning(traced, config, rows=calib.rows_count if calib is not None else None)
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
                calib.hint.shape[2:]) != tuple(d * _hint_scale(traced) for d in _latent_size(traced, config))):
            size = [d * _hint_scale(traced) for d in _latent_size(traced, config)]
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


def _default_conditioning(traced: TracedUNet, config: AnalysisConfig, rows: int | None = None) -> Conditioning:
    """Seeded stand-ins for every conditioning input the UNet takes (``rows`` prompt rows; None: one per sample):
    N(0, 1) token, pooled-text and image embeddings with one shared negative each (random_conditioning), SDXL's
    size ids, uniform [0, 1] control hints at the analysed size, random class ids below the embedding's size, the
    pipelines' default noise level for upscalers' labels (20 for the x4 upscaler's ids, 250 for IF stage II's
    timestep-embedded level; the low-resolution channels are not noised to it), N(0, 1) label embeddings, and LCM's
    embedding of ``guidance_scale``."""
    names, example = traced.input_names, traced.example_inputs
    rows = rows or config.num_samples
    gen = torch.Generator().manual_seed(config.seed + 7_919)
    fields: dict[str, Any] = {}
    sources = []
    labels = example.get("class_labels")
    embedding = getattr(traced.gm, "class_embedding", None)
    # ids or noise levels beside extra image channels are that image's noise level (the x4 upscaler, IF stage II)
    extra_channels_present = _if_super_resolution(traced) or (traced.out_channels is not None and latent_channels(
        traced.sample_channels, traced.out_channels, None) < traced.sample_channels)
    class_ids = labels is not None and not labels.is_floating_point() and isinstance(embedding, nn.Embedding)
    if "encoder_hidden_states" in names:
        height, width = _latent_size(traced, config)
        time_ids = example.get("time_ids")
        # SDXL's size ids are in image pixels; the traced example says how latent pixels map to them
        scale = int(time_ids[0, 0].item()) // example["sample"].shape[-2] if time_ids is not None else 8
        random = random_conditioning(
            num_rows=rows, seed=config.seed, cross_attention_dim=example["encoder_hidden_states"].shape[-1],
            pooled_dim=example["text_embeds"].shape[-1] if "text_embeds" in names else None,
            image_size=(height * scale, width * scale),
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
        height, width = _latent_size(traced, config)
        scale = _hint_scale(traced)
        fields["hint"] = torch.rand(rows, example["hint"].shape[1], height * scale, width * scale, generator=gen)
        sources.append("random-hints")
    if labels is not None and "class_labels" not in fields:
        if class_ids and not extra_channels_present:  # class-conditional: own generator, as random_conditioning's
            fields["class_labels"] = torch.randint(0, embedding.num_embeddings, (rows,),
                                                   generator=torch.Generator().manual_seed(config.seed))
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
        fields["timestep_cond"] = guidance_embedding(config.guidance_scale, example["timestep_cond"].shape[-1])
        sources.append(f"guidance-embedding(w={config.guidance_scale - 1:g})")
    if not fields:
        return Conditioning(source="unconditional")
    return Conditioning(source=" + ".join(sources) if sources else RANDOM_EMBEDDINGS, **fields)


def _latent_size(traced: TracedUNet, config: AnalysisConfig) -> tuple[int, int]:
    traced_h, traced_w = traced.example_inputs[traced.input_names[0]].shape[-2:]
    height = config.height if config.height is not None else int(traced_h)
    width = config.width if config.width is not None else int(traced_w)
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


def _threads_text() -> str:
    """"N threads" (torch's intra-op threads as the analysis runs), with a hint when other jobs load the machine."""
    threads = torch.get_num_threads()
    text = f"{threads} thread{'s' if threads != 1 else ''}"
    load = devices.busy_load()
    if load is not None and threads > 1:
        text += (f" (the machine is busy: load average {load:g} over {devices.available_cpus()} CPUs; --threads 1 "
                 "may be faster)")
    return text


# --- cache key -----------------------------------------------------------------------------------------------

def weights_fingerprint(module: nn.Module) -> str:
    """sha256 over the state_dict: every tensor's name, dtype, shape and bytes, in sorted name order."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach()
        h.update(f"{name}:{tensor.dtype}:{list(tensor.shape)};".encode())
        # a byte view hashes any dtype (bf16 has no numpy type) without converting it
        h.update(tensor.reshape(-1).contiguous().cpu().view(torch.uint8).numpy())
    return h.hexdigest()


def _cache_key(operator_graph: OperatorGraph, conditioning: Conditioning, config: AnalysisConfig,
               scheduler_info: dict[str, Any]) -> str:
    traced = operator_graph.traced
    # options spelled differently but meaning the same analysis share a key
    options = config.to_dict()
    options["height"], options["width"] = _latent_size(traced, config)
    # the dtype is in the weights' fingerprint already; left out, a float32 key is the one earlier versions wrote
    options.pop("dtype")
    if not uses_guidance(traced.input_names, 2.0) and "timestep_cond" not in traced.input_names:
        options["guidance_scale"] = None  # ignored by UNets without guided inputs
    payload = {
        "format": SCORES_FORMAT,
        "model_class": traced.model_class,
        "granularity": traced.granularity.value,
        "input_shapes": {n: list(traced.example_inputs[n].shape) for n in traced.input_names},
        "candidates": [[op.name, op.action.value] for op in operator_graph.candidates],
        "weights": weights_fingerprint(traced.gm),
        "config": options,
        "scheduler": {"class": scheduler_info["class"], "config": scheduler_info["config"]},
        "conditioning": conditioning.fingerprint(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def cache_key(operator_graph: OperatorGraph, calib: Conditioning | str | os.PathLike | None = None, *,
              config: AnalysisConfig | None = None, scheduler: Any | None = None) -> str:
    """The key :func:`analyze_importance` stores in its report: sha256 of the weights, the config, the
    granularity, the traced input shapes, the candidates, the scheduler and the conditioning tensors.
    Compute it before analysing and pass it to :func:`load_cached` to reuse a previous scores.json. ``config``
    None is ``AnalysisConfig()``."""
    config = config if config is not None else AnalysisConfig()
    _, record = scheduler_record(scheduler)
    conditioning = resolve_conditioning(operator_graph.traced, calib, config, scheduler)
    return _cache_key(operator_graph, conditioning, config, record)


# --- running it ------------------------------------------------------------------------------------------------

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


def analyze_importance(
    operator_graph: OperatorGraph,
    calib: Conditioning | str | os.PathLike | None = None,
    *,
    config: AnalysisConfig | None = None,
    scheduler: Any | None = None,
    progress: bool = True,
    save_to: str | os.PathLike | None = None,
    model_weights: str | None = None,
    scheduler_source: str | None = None,
) -> ImportanceReport:
    """Score every removable operator of ``operator_graph`` by the latent deviation its removal causes.

    ``calib``: see :func:`resolve_conditioning`. ``scheduler``: a diffusers scheduler (copied for every
    generation, never stepped itself); None uses ``diffusers.DDIMScheduler()`` with its default config. The
    report records which, and where it came from (``scheduler_source``: "model", "asked"; None: "given" —
    :func:`scheduler_record`). ``save_to``: a file or folder for scores.json, written by rank 0 only.
    ``model_weights``: the identity of the dense weights (:func:`ldpruner.sources.weights_id`) the report records,
    so that a plan made from it is never applied to other weights unnoticed.

    Under torch.distributed (initialised by the caller, or by this function when WORLD_SIZE > 1) rank r scores
    ``candidates[r::world]`` and every rank returns the full report. Place the model on the rank's device first.
    The graph and its weights are unchanged afterwards.
    """
    config = config if config is not None else AnalysisConfig()
    if not isinstance(config, AnalysisConfig):
        raise ConfigError(f"config must be an AnalysisConfig, got {type(config).__name__}")
    start = time.perf_counter()
    traced = operator_graph.traced
    gm = traced.gm
    scheduler, scheduler_info = scheduler_record(scheduler, scheduler_source)
    conditioning = resolve_conditioning(traced, calib, config, scheduler)
    train_steps = getattr(getattr(scheduler, "config", None), "num_train_timesteps", None)
    if train_steps is not None and config.steps > train_steps:
        raise ConfigError(f"steps={config.steps} exceeds the scheduler's num_train_timesteps={train_steps}")
    height, width = _latent_size(traced, config)
    use_cfg = uses_guidance(traced.input_names, config.guidance_scale)
    if use_cfg and not conditioning.has_negative:
        raise ConfigError(
            f"guidance_scale={config.guidance_scale} enables classifier-free guidance, but the conditioning lacks "
            f"the negative of {[n for n in GUIDED_INPUTS if n in traced.input_names]}; add them or set "
            "guidance_scale <= 1")
    key = _cache_key(operator_graph, conditioning, config, scheduler_info)

    param = next(gm.parameters())
    device, dtype = param.device, param.dtype
    if dtype != getattr(torch, config.dtype):
        raise ConfigError(f"the analysis is configured for dtype={config.dtype!r} but the traced UNet is in "
                          f"{str(dtype).removeprefix('torch.')}: cast the model before tracing it (the API does)")
    extra = extra_channel_count(traced, scheduler)
    channels = traced.sample_channels - extra
    shape = (config.num_samples, channels, height, width)
    make_extra = extra > 0 and conditioning.extra_channels is None
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(config.seed)).to(device=device, dtype=dtype)
    unet = GraphUNet(gm, traced.input_names)
    batch = config.batch_size or config.num_samples
    batches = [torch.arange(b, min(b + batch, config.num_samples)) for b in range(0, config.num_samples, batch)]

    joined = distributed.join(device)
    rank, world = joined.rank, joined.size
    mine: list[Operator] = operator_graph.candidates[rank::world]
    # one generation = every micro-batch through every step; the dense model is generated once
    calls_per_generation = len(batches) * config.steps * unet_calls_per_step(scheduler)
    # inpainting's data-free masks are drawn over one more dense generation (every rank makes the same)
    references = int(make_extra and extra == channels + 1)
    planned = (1 + references + len(mine)) * calls_per_generation
    planned_total = (world * (1 + references) + len(operator_graph.candidates)) * calls_per_generation
    from tqdm.auto import tqdm

    show = progress and rank == 0
    if show:
        tqdm.write(f"analysis: {len(operator_graph.candidates)} candidates + the dense model, {config.num_samples} "
                   f"samples (micro-batches of {batch}{', x2 with guidance' if use_cfg else ''}) x {config.steps} "
                   f"steps = {planned_total:,} UNet calls{f' over {world} ranks' if world > 1 else ''}, "
                   f"{str(dtype).removeprefix('torch.')} on {device}, {_threads_text()}, {scheduler_info['class']} "
                   f"({SCHEDULER_SOURCES[scheduler_info['source']]})", file=sys.stderr)
    bar = tqdm(total=planned, desc=f"importance (rank {rank}/{world})" if world > 1 else "importance",
               disable=not show, unit="call", dynamic_ncols=True)

    def counted(**inputs: torch.Tensor) -> torch.Tensor:
        out = unet.flat(**inputs)
        bar.update(1)
        return out

    def generate(rows: Conditioning) -> Iterator[torch.Tensor]:
        for index in batches:
            generators = [torch.Generator().manual_seed((config.seed << 20) + int(i) + 1) for i in index]
            yield sample_latents(
                counted, scheduler, noise=noise[index], steps=config.steps,
                guidance_scale=config.guidance_scale if use_cfg else 1.0, generator=generators,
                **rows.rows(index, device, dtype))

    def final_moments() -> LatentMoments:
        moments = LatentMoments()
        for latents in generate(conditioning):
            moments.update(latents)
        return moments

    def dense_samples(_noise: torch.Tensor, extra_rows: torch.Tensor) -> torch.Tensor:
        return torch.cat(list(generate(conditioning.replace(extra_channels=extra_rows))))

    devices.reset_peak_memory(device)
    results: list[dict[str, Any]] = []
    diverged: list[str] = []
    with _analysis_mode(gm):
        if make_extra:
            bar.set_postfix_str("extra channels", refresh=False)
            conditioning = conditioning.replace(extra_channels=default_extra_channels(
                traced, scheduler, noise=noise, sample=dense_samples, seed=config.seed))
        bar.set_postfix_str("dense", refresh=False)
        dense = final_moments().stats()
        if not all(bool(torch.isfinite(t).all()) for t in dense):
            raise ConfigError(_not_finite_message(str(dtype).removeprefix("torch."), scheduler_info))
        for op in mine:
            bar.set_postfix_str(op.name, refresh=False)
            with swapped(gm, op):
                mu_term, sigma_term = latent_deviation_score(dense, final_moments())
            if not (math.isfinite(mu_term) and math.isfinite(sigma_term)):
                # without this operator the samples are not finite: the removal breaks the model, never make it
                mu_term = sigma_term = math.inf
                diverged.append(op.name)
            results.append(CandidateScore(
                name=op.name, score=mu_term + sigma_term, mu_term=mu_term, sigma_term=sigma_term,
                params=op.params, macs=op.macs, action=op.action.value, kind=op.kind,
                module_class=op.module_class).to_dict())
    bar.close()
    if diverged:
        logging.getLogger("ldpruner.analysis").warning(
            "removing %s makes the samples non-finite: scored +inf, never selected", ", ".join(diverged))
    elapsed = time.perf_counter() - start
    peaks = [{"rank": rank, **devices.peak_memory(device)}]

    calls = unet.calls
    if world > 1:
        import torch.distributed as dist

        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, (results, calls, elapsed, peaks))
        results = [r for part in gathered for r in part[0]]
        calls = sum(part[1] for part in gathered)
        elapsed = max(part[2] for part in gathered)
        peaks = [p for part in gathered for p in part[3]]
    by_name = {r["name"]: CandidateScore(**r) for r in results}
    _check_finite_scores(list(by_name.values()), "the analysis' scores")

    report = ImportanceReport(
        model_class=traced.model_class,
        granularity=traced.granularity.value,
        total_params=operator_graph.total_params,
        total_macs=operator_graph.total_macs,
        config=config,
        scheduler=scheduler_info,
        conditioning=conditioning.source,
        prompts=conditioning.prompts,
        classifier_free_guidance=use_cfg,
        latent_shape=shape,
        dense_mean_norm=float(torch.linalg.vector_norm(dense[0])),
        dense_std_norm=float(torch.linalg.vector_norm(dense[1])),
        entries={op.name: by_name[op.name] for op in operator_graph.candidates},
        unet_calls=calls,
        wall_time_s=elapsed,
        placement=devices.describe(device, dtype),
        planned_unet_calls=planned_total,
        peak_memory=peaks,
        world_size=world,
        cache_key=key,
        model_weights=model_weights,
    )
    if save_to is not None and rank == 0:
        report.save(save_to)
    return report
