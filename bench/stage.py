"""The bench stage: dense vs pruned (vs pruned + distilled) side by side, per model and parameter budget.

For each model: LD-score analysis once, then for each budget select → prune → export (ONNX, validated) → [distill];
measured in one run: UNet params, MACs per sample, torch eager latency (dense diffusers UNet vs pruned fx graph)
and onnxruntime latency (dense vs pruned ONNX) at batch 1 and batch 2 (classifier-free guidance), dense and
pruned interleaved; peak resident memory of a process serving each ONNX model; and, for zoo models with a
held-out real set, quality (FD/KID, digit metrics) of images sampled from the same seeds. Writes ``report.json``,
``report.md``, plots and sample grids. A distilled student has the pruned graph (same operators, same shapes),
so its params, MACs and latency are the pruned ones; only its quality is measured separately.

Called by ``ldpruner bench`` (``ldpruner.api.bench``); it drives the stages (:mod:`ldpruner.stages`) with the stage
configs a build uses, the sections of :class:`~ldpruner.stages.config.BenchConfig`.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ldpruner.base import devices
from ldpruner.base.artifact import ArtifactFile
from ldpruner.base.errors import ArtifactError
from ldpruner.base.io import check_replaceable, write_text_atomic
from ldpruner.base.placement import place
from ldpruner.passes.config import OptimizeConfig
from ldpruner.stages.config import BenchConfig

from .latency import ort_latency, ort_session, peak_memory, torch_latency
from .show import audio_clips, audio_models, grids, markdown, plots, slug

__all__ = ["BenchConfig", "run_bench", "BENCH_FORMAT"]

# 2: the config in sections (analysis, distill, …)
REPORT = ArtifactFile("report.json", "ldpruner.bench/2", "bench report")
BENCH_FORMAT = REPORT.format


def _environment(placement: Any) -> dict[str, Any]:
    import onnxruntime
    import torch

    device, threads = placement.device, placement.threads
    return {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "cpu_count": os.cpu_count(), "threads": threads,
            "available_cpus": devices.available_cpus(),
            "device": str(device), "accelerator": devices.accelerator_name(device),
            "onnxruntime_providers": onnxruntime.get_available_providers(),
            "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def run_bench(config: BenchConfig, *, progress: bool = False,
              objects: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Run the benchmark described by ``config``; returns the report (also written to ``config.out``).

    ``objects`` maps a name in ``config.models`` to an in-memory model (a diffusers UNet) to use instead of
    loading that name."""
    from .preflight import check_bench_inputs

    builds = check_bench_inputs(config, objects)  # every precondition before the first model's analysis
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"--out {config.out!r} is a file, not a folder")
    check_replaceable(out / REPORT.name, config.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    # every stage of the bench (analysis, export, distillation, the timings) runs with this placement: its device,
    # its threads, its torchrun world
    with place(config.placement.device, config.placement.threads) as placement:
        report: dict[str, Any] = {"format": BENCH_FORMAT, "config": config.to_dict(),
                                  "environment": _environment(placement), "models": []}
        for spec in config.models:
            if spec in builds:
                record = _bench_build(spec, builds[spec], config, out, placement, progress)
            else:
                record = _bench_model(spec, (objects or {}).get(spec, spec), config, out, placement, progress)
            report["models"].append(record)
            _write(out, report)  # a long run leaves a readable report after every model
        report["environment"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        _write(out, report)
        return report


def _write(out: Path, report: dict[str, Any]) -> None:
    REPORT.write(out / REPORT.name, report)
    write_text_atomic(out / "report.md", markdown(report))


def _validation(summary: Mapping[str, Any]) -> dict[str, Any]:
    v = summary["validation"]
    return {"passed": bool(v.get("passed")), "max_abs_diff": v.get("max_abs_diff"), "provider": v.get("provider")}


def _log(progress: bool, message: str) -> None:
    if progress:
        import sys

        print(f"[bench] {message}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class _Dense:
    """What every plan of one model is measured against: the dense model as loaded (torch) and exported (ONNX), its
    trace (the timing inputs), and the quality sampler with the dense samples."""

    spec: str  # what the record is called (a model, or a build folder)
    model_spec: str  # the model it measures (a build folder's model), for its quality reference
    loaded: Any
    graph: Any  # the dense OperatorGraph
    unet: Any  # the loaded UNet, on the device
    session: Any  # the dense ONNX model's timing session
    record: dict[str, Any]
    model_dir: Path
    device: Any
    home: Any  # where the loaded weights live (students go back there after timing)
    threads: int
    sampler: Any = None
    meter: Any = None
    digits: Any = None
    grids: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def traced(self) -> Any:
        return self.graph.traced


def _dense(spec: str, loaded: Any, graph: Any, analysis: dict[str, Any], config: BenchConfig, model_dir: Path,
           placement: Any, progress: bool, model_spec: str | None = None, export_config: Any = None) -> _Dense:
    """The dense side of a model's record: params, MACs, its validated ONNX export and peak memory, and (for zoo
    models with real data) its samples and their quality."""
    from ldpruner import stages
    from ldpruner.passes.onnx.export import export_onnx
    from ldpruner.passes.remove import count_params

    device, threads = placement.device, placement.threads
    dense = graph.traced
    _log(progress, f"{spec}: exporting the dense UNet")
    dense_onnx = model_dir / "dense" / "onnx" / "unet.onnx"
    # validated where the students' exports are (stages.export): on a CUDA placement, on its provider
    dense_export = export_onnx(dense, dense_onnx, config=stages.placed_export_config(export_config, placement),
                               overwrite=True).to_dict()
    session = ort_session(dense_onnx, threads=threads, device=device)
    record: dict[str, Any] = {
        "model": spec, "class": type(loaded.unet).__name__,
        "random_weights": bool(loaded.describe().get("random_weights")),
        "model_weights": loaded.weights_id,  # the dense weights every number of this record was measured on
        "latent_shape": list(dense.example_inputs[dense.input_names[0]].shape[1:]), "analysis": analysis,
        "dense": {"params": count_params(dense.gm), "macs_per_sample": graph.total_macs,
                  "onnx": {"path": str(dense_onnx), **_validation(dense_export)},
                  "peak_memory_onnx": peak_memory(dense_onnx, session, dense, threads, config)},
        "budgets": [],
    }
    home = next(loaded.unet.parameters()).device
    ctx = _Dense(spec, model_spec or spec, loaded, graph, loaded.placed(device, next(loaded.unet.parameters()).dtype),
                 session, record, model_dir, device, home, threads)
    quality: dict[str, Any] = {"available": False}
    if config.quality:
        ctx.sampler, ctx.meter, ctx.digits, reason = _quality_setup(ctx.model_spec, loaded, config)
        if reason is not None:
            quality["reason"] = reason
        else:
            _log(progress, f"{spec}: sampling the dense model ({config.samples} images)")
            quality["available"] = True
            images = ctx.sampler(None)
            ctx.grids["dense"] = images
            quality["dense"] = ctx.meter(images, ctx.digits)
    else:
        quality["reason"] = "quality=False"
    record["quality"] = quality
    return ctx


def _plan_entry(ctx: _Dense, plan: Any, pruned: Any, onnx_path: Path, export_summary: Mapping[str, Any],
                config: BenchConfig, *, label: str, cost_report: Any = None, distilled: Any = None,
                distill_record: dict[str, Any] | None = None, progress: bool) -> dict[str, Any]:
    """One plan measured beside the dense model: params, MACs, torch latency (the pruned graph), onnxruntime latency
    (``onnx_path``: the model that ships), peak memory, the budget asked for against what it achieved, and quality
    of the pruned (and ``distilled``) student."""
    import torch

    from ldpruner.passes.remove import count_params

    totals = plan.to_dict()["totals"]
    dense = ctx.traced
    dense_params = ctx.record["dense"]["params"]
    session = ort_session(onnx_path, threads=ctx.threads, device=ctx.device)
    shipped = distilled if distilled is not None else pruned  # the same graph; the ONNX model is this one's
    pruned_params = count_params(pruned.gm)
    entry: dict[str, Any] = {
        "budget": plan.budget.get("budget"), "metric": plan.budget.get("metric"), "order": plan.budget.get("order"),
        "label": label, "removed": [r.name for r in plan.removals],
        # the LD score of the removed set, measured whole, beside the sum of its single scores; the search's record
        "joint_score": plan.joint, "search": plan.budget.get("search"),
        "params": {"dense": dense_params, "pruned": pruned_params, "ratio": pruned_params / dense_params},
        "macs_per_sample": {"dense": totals["macs_per_sample_before"], "pruned": totals["macs_per_sample_after"],
                            "ratio": totals["macs_per_sample_after"] / totals["macs_per_sample_before"]},
        "onnx": {"path": str(onnx_path), **_validation(export_summary)},
        "latency": {"torch": {}, "onnxruntime": {}},
    }
    # torch first, then onnxruntime: alternating the two runtimes would make their thread pools compete
    for batch in config.batch_sizes:
        entry["latency"]["torch"][f"batch_{batch}"] = torch_latency(ctx.unet, shipped.gm.to(ctx.device), dense,
                                                                     batch, config, ctx.device)
    shipped.gm.to(ctx.home)  # back beside its example inputs: distillation and sampling expect it there
    for batch in config.batch_sizes:
        entry["latency"]["onnxruntime"][f"batch_{batch}"] = ort_latency(ctx.session, session, dense, batch, config)
    if cost_report is not None and plan.latency is not None:
        entry["latency_prediction"] = _prediction(entry, plan, cost_report, dense, pruned, config, ctx.device)
    mem = peak_memory(onnx_path, session, dense, ctx.threads, config)
    dense_mem = ctx.record["dense"]["peak_memory_onnx"]
    if mem.get("available") and dense_mem.get("available"):
        mem["run_peak_ratio"] = mem["run_peak_mib"] / dense_mem["run_peak_mib"]
    entry["peak_memory_onnx"] = mem
    # the budget asked for against what was achieved: a latency budget against this run's own timing
    entry["target"] = plan.target(tolerance=config.check.target_tolerance, measured=entry.get("latency_prediction"))
    entry["distill"] = distill_record
    if ctx.record["quality"]["available"]:
        from ldpruner.runtime.graph_unet import GraphUNet

        entry["quality"] = {}
        for variant, model in [("pruned", pruned)] + ([("distilled", distilled)] if distilled is not None else []):
            _log(progress, f"{ctx.spec}: sampling {variant} ({label})")
            images = ctx.sampler(GraphUNet.of(model))
            ctx.grids[f"{variant} {label}"] = images
            entry["quality"][variant] = ctx.meter(images, ctx.digits)
    torch.set_num_threads(ctx.threads)  # distillation or sampling may change it
    return entry


def _finish(ctx: _Dense, t_model: float) -> dict[str, Any]:
    record = ctx.record
    record["plots"] = plots(record, ctx.model_dir)
    if ctx.grids:
        record["samples"] = grids(ctx.grids, ctx.model_dir / "samples", ctx.model_dir)
        if ctx.model_spec.startswith("zoo:") and ctx.model_spec.removeprefix("zoo:") in audio_models():
            record["samples"]["audio"] = audio_clips(ctx.grids, ctx.model_spec, ctx.model_dir / "samples")
    record["wall_time_s"] = round(time.perf_counter() - t_model, 1)
    return record


def _bench_model(spec: str, model: Any, config: BenchConfig, out: Path, placement: Any,
                 progress: bool) -> dict[str, Any]:
    """One model: its analysis once, then per budget the stages a build runs (select → prune → export → distill),
    with the same stage configs (``config``'s sections)."""
    import copy

    from ldpruner import stages

    t_model = time.perf_counter()
    model_dir = out / slug(spec)
    model_dir.mkdir(parents=True, exist_ok=True)
    loaded = stages.load_model(model, config.inputs)
    analysis = config.analysis
    _log(progress, f"{spec}: analysis ({analysis.num_samples} samples × {analysis.steps} steps)")
    graph, analysis, calib = stages.analysis_inputs(loaded, config.trace, analysis, config.inputs.prompts, placement)
    scores = stages.analyze(loaded, graph, analysis, calib, placement, out=model_dir, overwrite=True,
                            progress=progress)
    # each plan's joint score and the set search sample as the analysis did, on the graph it scored
    sampling = stages.Sampling(graph, analysis, calib, stages.calibration.sampling_scheduler(loaded)[0])
    graph = stages.inspect(loaded, config.trace)  # the loaded UNet itself (the analysis may have scored a cast copy)
    cost_report = None
    if config.selection.metric == "latency":
        _log(progress, f"{spec}: latency costs per operator ({config.costs.runtime})")
        cost_report = stages.costs(loaded, config.trace, config.costs, placement, out=model_dir,
                                   overwrite=True, progress=progress)
    ctx = _dense(spec, loaded, graph, {"unet_calls": scores.unet_calls, "wall_time_s": scores.wall_time_s,
                                       "num_samples": analysis.num_samples, "steps": analysis.steps,
                                       "scheduler": scores.scheduler}, config, model_dir, placement, progress,
                 export_config=config.export)
    for budget in config.budgets:
        _log(progress, f"{spec}: budget {budget:.0%}")
        bdir = model_dir / f"budget-{budget:.2f}"
        selection = dataclasses.replace(config.selection, budget=budget)
        plan = stages.select(scores, graph, selection, out=None, overwrite=False, cost_report=cost_report,
                             model_weights=loaded.weights_id, sampling=sampling, placement=placement,
                             progress=progress)
        pruned = stages.prune(loaded, plan, config.trace, config.prune, out=None, overwrite=False, graph=graph)
        export_summary = stages.export(pruned, config.export, OptimizeConfig(), placement, out=bdir,
                                       overwrite=True)["export"]
        distilled = distill_record = None
        if config.distill.steps:
            _log(progress, f"{spec}: distilling {config.distill.steps} steps at budget {budget:.0%}")
            distill = _distill_config(spec, config.distill)
            result = stages.distill(loaded, copy.deepcopy(pruned), distill, placement, out=bdir / "distill",
                                    data=config.distill_data, prompts_file=config.inputs.prompts, resume=False,
                                    overwrite=True, progress=progress)
            s = result.summary
            distill_record = {"steps": s["steps"], "wall_time_s": s["wall_time_s_this_run"],
                              "options": {name: getattr(distill, name) for name in sorted(distill.given())},
                              "data": config.distill_data or "teacher trajectories",
                              "loss_first_10pct": s["loss_first_10pct"]["loss"],
                              "loss_last_10pct": s["loss_last_10pct"]["loss"],
                              "student": str(bdir / "distill" / "student")}
            distilled = result.student
        # the pruned graph's ONNX model is timed (a distilled student has the same graph: the same latency)
        ctx.record["budgets"].append(_plan_entry(
            ctx, plan, pruned, bdir / "onnx" / "unet.onnx", export_summary, config, label=f"{budget:.0%}",
            cost_report=cost_report, distilled=distilled, distill_record=distill_record, progress=progress))
        del pruned, distilled
    return _finish(ctx, t_model)


def _distill_config(spec: str, distill: Any) -> Any:
    """``distill`` with the zoo model's own distillation settings where it was not told otherwise (the teacher's
    trajectories follow how the model is sampled: guidance 5 for the text-to-image zoo model)."""
    from .quality import distill_options

    given = distill.given()
    zoo = {k: v for k, v in (distill_options(spec.removeprefix("zoo:")) if spec.startswith("zoo:") else {}).items()
           if k not in given}
    if not zoo:
        return distill
    return distill.replace(on_purpose=zoo, **zoo)


def _bench_build(spec: str, build: Any, config: BenchConfig, out: Path, placement: Any,
                 progress: bool) -> dict[str, Any]:
    """A finished build measured as it ships: its plan, its pruned (and distilled) student and its ONNX model,
    beside the dense model it was built from (loaded as the build loaded it: model, scheduler, latent size), with
    the budget the build asked for against what it achieved."""
    from ldpruner import stages
    from ldpruner.base.errors import ModelLoadError
    from ldpruner.passes.cost_report import CostReport
    from ldpruner.passes.plan import RemovalPlan
    from ldpruner.passes.scores import ImportanceReport
    from ldpruner.passes.student import load_student

    t_model = time.perf_counter()
    cfg = build.config
    model_dir = out / slug(spec)
    model_dir.mkdir(parents=True, exist_ok=True)
    _log(progress, f"{spec}: the build of {cfg.model} (metric {cfg.selection.metric}, budget "
                   f"{cfg.selection.budget:g})")
    try:
        loaded = stages.load_model(cfg.model, dataclasses.replace(cfg.inputs, calibration=None))
    except ModelLoadError as exc:
        raise ModelLoadError(f"the build in {spec!r} was made from MODEL {cfg.model!r}, which does not load now: "
                             f"{exc}") from exc
    plan = RemovalPlan.load(build.plan).for_weights(loaded.weights_id, "bench", allow=False,
                                                    made=f"the build in {spec!r} was made for")
    graph = stages.inspect(loaded, dataclasses.replace(cfg.trace, granularity=plan.granularity))
    scores = ImportanceReport.load(build.path / stages.SCORES.name)
    analysis = {"unet_calls": scores.unet_calls, "wall_time_s": scores.wall_time_s,
                "num_samples": scores.config.num_samples, "steps": scores.config.steps,
                "scheduler": scores.scheduler, "from_build": str(build.path)}
    # the dense baseline exported as the build exported its student: a ratio of two exports, not of two exporters
    ctx = _dense(spec, loaded, graph, analysis, config, model_dir, placement, progress, model_spec=cfg.model,
                 export_config=cfg.export)
    measured = stages.LATENCY.fields(build.latency) if build.latency is not None else None
    ctx.record["build"] = {"path": str(build.path), "model": cfg.model, "metric": cfg.selection.metric,
                           "budget": cfg.selection.budget, "order": cfg.selection.order,
                           "distill_steps": cfg.distill.steps, "onnx": str(build.onnx),
                           # the build's own latency check, beside which this bench's timing can be read
                           "latency_check": measured, "summary": build.report.get("summary")}
    pruned = load_student(build.pruned)
    distilled = load_student(build.distilled) if build.distilled is not None else None
    export_summary = stages.EXPORT_SUMMARY.read(build.onnx.with_name(stages.EXPORT_SUMMARY.name))["export"]
    cost_report = CostReport.load(build.path / stages.COSTS.name) if cfg.selection.metric == "latency" else None
    distill_record = None
    if distilled is not None:
        summary = stages.DISTILL_SUMMARY.read(build.distilled.parent / stages.DISTILL_SUMMARY.name)
        distill_record = {"steps": summary["steps"], "wall_time_s": summary["wall_time_s_this_run"],
                          "options": summary.get("config"), "data": summary["data"]["kind"],
                          "loss_first_10pct": summary["loss_first_10pct"]["loss"],
                          "loss_last_10pct": summary["loss_last_10pct"]["loss"], "student": str(build.distilled)}
    entry = _plan_entry(ctx, plan, pruned, build.onnx, export_summary, config, label="build", cost_report=cost_report,
                        distilled=distilled, distill_record=distill_record, progress=progress)
    ctx.record["budgets"].append(entry)
    return _finish(ctx, t_model)


def _prediction(entry: dict[str, Any], plan: Any, costs: Any, dense: Any, pruned: Any, config: BenchConfig,
                device: Any) -> dict[str, Any]:
    """The plan's predicted latency cut beside the measured one on the costs' runtime and batch: read from this
    budget's latency table when it has that batch, else measured for the purpose."""
    from ldpruner.passes.latency_check import check_latency

    runtime, batch = costs.placement["runtime"], int(costs.placement["batch"])
    predicted_cut = plan.latency["predicted_removed_fraction"]
    measured = entry["latency"][runtime].get(f"batch_{batch}")
    if measured is None:
        check = check_latency(dense, pruned.traced, costs, plan.names, tolerance=config.check.latency_tolerance,
                              precision=config.check.latency_precision, device=device)
        measured_cut = check["measured_cut"]
    else:
        measured_cut = 1 - measured["ratio"]
    shortfall = (predicted_cut - measured_cut) / predicted_cut if predicted_cut > 0 else 0.0
    return {"runtime": runtime, "batch": batch, "predicted_cut": predicted_cut, "measured_cut": measured_cut,
            "shortfall": shortfall, "tolerance": config.check.latency_tolerance,
            "flagged": shortfall > config.check.latency_tolerance}


def _quality_setup(spec: str, loaded: Any, config: BenchConfig):
    """(sampler, meter, digits, None) or (None, None, None, why quality is not measured for this model)."""
    from .quality import QUALITY_MODELS, QualityMeter, zoo_sampler

    if not spec.startswith("zoo:"):
        return None, None, None, (f"quality needs a zoo model with held-out real data ({', '.join(QUALITY_MODELS)}); "
                                  f"{spec} is not one")
    name = spec.removeprefix("zoo:")
    if name not in QUALITY_MODELS:
        return None, None, None, f"no quality reference for zoo:{name} yet (have: {', '.join(QUALITY_MODELS)})"
    sampler, digits = zoo_sampler(name, config.samples, config.sample_steps)
    return sampler, QualityMeter(name, config.samples), digits, None
