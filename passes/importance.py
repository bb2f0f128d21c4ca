"""Importance analysis (LD-Pruner): how far the distribution of final latents moves when one operator goes.

With μ, σ the elementwise mean and standard deviation over N samples of the final latents, generated from the
same noise, conditioning, scheduler and step count by the dense UNet (d) and by the UNet without candidate c:

    score(c) = ‖μ_d − μ_c‖₂ + ‖σ_d − σ_c‖₂

A low score means the operator can go. The analysis is pure: each candidate is applied in place by swapping its
module for the stand-in that computes what the rewrite will compute, and swapped back; graph and weights are
unchanged afterwards. Candidates are independent, so under torch.distributed each rank scores a share.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import sys
import time
from typing import Any

import torch
import torch.fx
from torch import nn

from ldpruner.base import devices, distributed
from ldpruner.base.errors import ConfigError, ModelLoadError
from ldpruner.base.fingerprint import weights_fingerprint
from ldpruner.compiler.graph import Operator, OperatorGraph

from .conditioning import Conditioning, uses_guidance
from .config import AnalysisConfig
from .deviation import LatentDeviation, LatentMoments, analysis_conditioning, latent_deviation_score, latent_stats
from .inputs import (
    SCHEDULER_SOURCES,
    latent_size,
    scheduler_record,
)
from .scores import SCORES_FORMAT, CandidateScore, ImportanceReport, _check_finite_scores

__all__ = [
    "LatentMoments",
    "analyze_importance",
    "cache_key",
    "check_finite_weights",
    "latent_deviation_score",
    "latent_stats",
]


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




# --- cache key -----------------------------------------------------------------------------------------------

def _cache_key(operator_graph: OperatorGraph, conditioning: Conditioning, config: AnalysisConfig,
               scheduler_info: dict[str, Any]) -> str:
    traced = operator_graph.traced
    # options spelled differently but meaning the same analysis share a key
    options = config.to_dict()
    options["height"], options["width"] = latent_size(traced, config.height, config.width)
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
    Compute it before analysing and pass it to ``ImportanceReport.load_cached`` to reuse a previous scores.json.
    ``config`` None is ``AnalysisConfig()``."""
    config = config if config is not None else AnalysisConfig()
    _, record = scheduler_record(scheduler)
    conditioning = analysis_conditioning(operator_graph.traced, calib, config, scheduler)
    return _cache_key(operator_graph, conditioning, config, record)


# --- running it ------------------------------------------------------------------------------------------------

def _threads_text() -> str:
    """"N threads" (torch's intra-op threads as the analysis runs), with a hint when other jobs load the machine."""
    threads = torch.get_num_threads()
    text = f"{threads} thread{'s' if threads != 1 else ''}"
    load = devices.busy_load()
    if load is not None and threads > 1:
        text += (f" (the machine is busy: load average {load:g} over {devices.available_cpus()} CPUs; --threads 1 "
                 "may be faster)")
    return text


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
    world: distributed.World | None = None,
) -> ImportanceReport:
    """Score every removable operator of ``operator_graph`` by the latent deviation its removal causes.

    ``calib``: see :func:`~ldpruner.passes.inputs.resolve_conditioning`. ``scheduler``: a diffusers scheduler
    (copied for every generation, never stepped itself); None uses ``diffusers.DDIMScheduler()`` with its default
    config. The report records which, and where it came from (``scheduler_source``: "model", "asked"; None:
    "given" — :func:`~ldpruner.passes.inputs.scheduler_record`). ``save_to``: a file or folder for scores.json,
    written by rank 0 only. ``model_weights``: the identity of the dense weights
    (:func:`ldpruner.sources.weights_id`) the report records, so that a plan made from it is never applied to other
    weights unnoticed.

    Under torch.distributed (``world``: this process's place, as the command's placement joined it; None: the process
    group already initialised, else one process) rank r scores ``candidates[r::world]`` and every rank returns the
    full report. Place the model on the rank's device first.
    The graph and its weights are unchanged afterwards.
    """
    config = config if config is not None else AnalysisConfig()
    if not isinstance(config, AnalysisConfig):
        raise ConfigError(f"config must be an AnalysisConfig, got {type(config).__name__}")
    start = time.perf_counter()
    traced = operator_graph.traced
    scheduler, scheduler_info = scheduler_record(scheduler, scheduler_source)
    conditioning = analysis_conditioning(traced, calib, config, scheduler)
    train_steps = getattr(getattr(scheduler, "config", None), "num_train_timesteps", None)
    if train_steps is not None and config.steps > train_steps:
        raise ConfigError(f"steps={config.steps} exceeds the scheduler's num_train_timesteps={train_steps}")
    key = _cache_key(operator_graph, conditioning, config, scheduler_info)
    deviation = LatentDeviation(operator_graph, conditioning, config, scheduler, scheduler_info)
    device, dtype, batch, use_cfg = deviation.device, deviation.dtype, deviation.batch, deviation.use_cfg

    joined = world if world is not None else distributed.current()
    rank, world = joined.rank, joined.size
    mine: list[Operator] = operator_graph.candidates[rank::world]
    # the dense model is generated once (with the extra channels' reference, where drawn, by every rank)
    per_set = deviation.calls_per_generation
    planned = deviation.dense_calls + len(mine) * per_set
    planned_total = world * deviation.dense_calls + len(operator_graph.candidates) * per_set
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
    deviation.on_call = lambda: bar.update(1)

    devices.reset_peak_memory(device)
    results: list[dict[str, Any]] = []
    diverged: list[str] = []
    bar.set_postfix_str("dense", refresh=False)
    with deviation:
        for op in mine:
            bar.set_postfix_str(op.name, refresh=False)
            mu_term, sigma_term = deviation.score([op])
            if math.isinf(mu_term):  # without this operator the samples are not finite: never make the removal
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

    calls = deviation.unet.calls
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
        latent_shape=deviation.shape,
        dense_mean_norm=deviation.dense_norms[0],
        dense_std_norm=deviation.dense_norms[1],
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
