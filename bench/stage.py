"""The bench stage: dense vs pruned (vs pruned + distilled) side by side, per model and parameter budget.

For each model: LD-score analysis once, then for each budget select → prune → export (ONNX, validated) → [distill];
measured in one run: UNet params, MACs per sample, torch eager latency (dense diffusers UNet vs pruned fx graph)
and onnxruntime latency (dense vs pruned ONNX) at batch 1 and batch 2 (classifier-free guidance), dense and
pruned interleaved; peak resident memory of a process serving each ONNX model; and, for zoo models with a
held-out real set, quality (FD/KID, digit metrics) of images sampled from the same seeds. Writes ``report.json``,
``report.md``, plots and sample grids. A distilled student has the pruned graph (same operators, same shapes),
so its params, MACs and latency are the pruned ones; only its quality is measured separately.

Called by ``ldpruner bench`` (``ldpruner.api.bench``).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ldpruner import devices
from ldpruner.config import BenchConfig
from ldpruner.errors import ArtifactError
from ldpruner.io import check_replaceable, write_json_atomic, write_text_atomic

from .latency import measure_ratio, onnx_feeds, onnx_peak_memory, ort_session

__all__ = ["BenchConfig", "run_bench", "BENCH_FORMAT"]

BENCH_FORMAT = "ldpruner.bench/1"


def _environment(threads: int, device_name: str) -> dict[str, Any]:
    import onnxruntime
    import torch

    device = devices.resolve_device(device_name)
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
    check_replaceable(out / "report.json", config.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    # every stage of the bench (analysis, export, distillation, the timings) computes with these threads
    with devices.intra_op_threads(config.threads) as threads:
        report: dict[str, Any] = {"format": BENCH_FORMAT, "config": config.to_dict(),
                                  "environment": _environment(threads, config.device), "models": []}
        for spec in config.models:
            if spec in builds:
                record = _bench_build(spec, builds[spec], config, out, threads, progress)
            else:
                record = _bench_model(spec, (objects or {}).get(spec, spec), config, out, threads, progress)
            report["models"].append(record)
            _write(out, report)  # a long run leaves a readable report after every model
        report["environment"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        _write(out, report)
        return report


def _write(out: Path, report: dict[str, Any]) -> None:
    write_json_atomic(out / "report.json", report)
    write_text_atomic(out / "report.md", markdown(report))


def _slug(spec: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._]+", "-", spec).strip("-_.") or "model"


def _inputs(traced: Any, batch: int) -> dict[str, Any]:
    """Seeded inputs at ``batch`` shaped like the trace's examples (the cost model's own, so a latency it predicts
    and one measured here run on the same inputs)."""
    from ldpruner.passes.costs import timing_inputs

    return timing_inputs(traced, batch)


def _torch_latency(dense_unet: Any, pruned_gm: Any, traced: Any, batch: int, config: BenchConfig,
                   device: Any) -> dict[str, Any]:
    import torch

    inputs = {n: t.to(device) for n, t in _inputs(traced, batch).items()}
    args = [inputs[n] for n in traced.input_names]
    dense_unet.eval()
    pruned_gm.eval()

    def timed(call: Any) -> Any:  # a CUDA call returns before the GPU is done: wait for it inside the timing
        return (lambda: (call(), torch.cuda.synchronize(device))) if device.type == "cuda" else call

    with torch.inference_mode():
        return _ratio({"dense": timed(lambda: dense_unet(**inputs)), "pruned": timed(lambda: pruned_gm(*args))},
                      config)


def _ort_latency(dense_session: Any, pruned_session: Any, traced: Any, batch: int,
                 config: BenchConfig) -> dict[str, Any]:
    inputs = _inputs(traced, batch)
    dense_feeds = onnx_feeds(dense_session, inputs)
    pruned_feeds = onnx_feeds(pruned_session, {**_zero_residuals(pruned_session, batch), **inputs})
    return _ratio({"dense": lambda: dense_session.run(None, dense_feeds),
                   "pruned": lambda: pruned_session.run(None, pruned_feeds)}, config)


def _zero_residuals(session: Any, batch: int) -> dict[str, Any]:
    """Zeros for the ControlNet / T2I-Adapter inputs an exported model takes (a build with --controlnet or
    --adapter), shaped as the export recorded them at ``batch``: the call without a ControlNet, as a pipeline makes
    it."""
    import json

    import numpy as np

    from ldpruner.runtime.unet import EXPORT_METADATA_KEY
    from ldpruner.unet_inputs import FLAT_INPUTS

    raw = session.get_modelmeta().custom_metadata_map.get(EXPORT_METADATA_KEY)
    shapes = json.loads(raw).get("input_shapes", {}) if raw else {}
    return {name: np.zeros((batch, *shape[1:]), dtype=np.float32) for name, shape in shapes.items()
            if name not in FLAT_INPUTS}


def _ratio(variants: Mapping[str, Any], config: BenchConfig) -> dict[str, Any]:
    """Dense and pruned interleaved, at least ``repeats`` rounds and more until the ratio is known to
    ``latency_precision`` (its 95 % interval recorded), as the build's latency check times them."""
    measured = measure_ratio(variants, "pruned", "dense", warmup=config.warmup, repeats=config.repeats,
                             precision=config.latency_precision)
    return {**measured.run.to_dict(ratio=("pruned", "dense")), "interval": [measured.low, measured.high],
            "converged": measured.converged, "precision": measured.precision}


def _memory(path: Path, session: Any, traced: Any, threads: int, config: BenchConfig) -> dict[str, Any]:
    if not config.memory:
        return {"available": False, "reason": "memory=False"}
    batch = max(config.batch_sizes)
    feeds = onnx_feeds(session, {**_zero_residuals(session, batch), **_inputs(traced, batch)})
    return onnx_peak_memory(path, {n: (a.shape, a.dtype.name) for n, a in feeds.items()}, threads=threads)


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
           threads: int, progress: bool, model_spec: str | None = None, export_config: Any = None) -> _Dense:
    """The dense side of a model's record: params, MACs, its validated ONNX export and peak memory, and (for zoo
    models with real data) its samples and their quality."""
    from ldpruner.passes.onnx.export import export_onnx
    from ldpruner.passes.remove import count_params

    device = devices.resolve_device(config.device)
    dense = graph.traced
    _log(progress, f"{spec}: exporting the dense UNet")
    dense_onnx = model_dir / "dense" / "onnx" / "unet.onnx"
    dense_export = export_onnx(dense, None, None, dense_onnx, config=export_config, overwrite=True).to_dict()
    session = ort_session(dense_onnx, threads=threads, device=device)
    record: dict[str, Any] = {
        "model": spec, "class": type(loaded.unet).__name__,
        "random_weights": bool(loaded.describe().get("random_weights")),
        "model_weights": loaded.weights_id,  # the dense weights every number of this record was measured on
        "latent_shape": list(dense.example_inputs[dense.input_names[0]].shape[1:]), "analysis": analysis,
        "dense": {"params": count_params(dense.gm), "macs_per_sample": graph.total_macs,
                  "onnx": {"path": str(dense_onnx), **_validation(dense_export)},
                  "peak_memory_onnx": _memory(dense_onnx, session, dense, threads, config)},
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
        "params": {"dense": dense_params, "pruned": pruned_params, "ratio": pruned_params / dense_params},
        "macs_per_sample": {"dense": totals["macs_per_sample_before"], "pruned": totals["macs_per_sample_after"],
                            "ratio": totals["macs_per_sample_after"] / totals["macs_per_sample_before"]},
        "onnx": {"path": str(onnx_path), **_validation(export_summary)},
        "latency": {"torch": {}, "onnxruntime": {}},
    }
    # torch first, then onnxruntime: alternating the two runtimes would make their thread pools compete
    for batch in config.batch_sizes:
        entry["latency"]["torch"][f"batch_{batch}"] = _torch_latency(ctx.unet, shipped.gm.to(ctx.device), dense,
                                                                     batch, config, ctx.device)
    shipped.gm.to(ctx.home)  # back beside its example inputs: distillation and sampling expect it there
    for batch in config.batch_sizes:
        entry["latency"]["onnxruntime"][f"batch_{batch}"] = _ort_latency(ctx.session, session, dense, batch, config)
    if cost_report is not None and plan.latency is not None:
        entry["latency_prediction"] = _prediction(entry, plan, cost_report, dense, pruned, config, ctx.device)
    mem = _memory(onnx_path, session, dense, ctx.threads, config)
    dense_mem = ctx.record["dense"]["peak_memory_onnx"]
    if mem.get("available") and dense_mem.get("available"):
        mem["run_peak_ratio"] = mem["run_peak_mib"] / dense_mem["run_peak_mib"]
    entry["peak_memory_onnx"] = mem
    # the budget asked for against what was achieved: a latency budget against this run's own timing
    entry["target"] = plan.target(tolerance=config.target_tolerance, measured=entry.get("latency_prediction"))
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
    record["plots"] = _plots(record, ctx.model_dir)
    if ctx.grids:
        record["samples"] = _grids(ctx.grids, ctx.model_dir / "samples", ctx.model_dir)
        if ctx.model_spec.startswith("zoo:") and ctx.model_spec.removeprefix("zoo:") in _audio_models():
            record["samples"]["audio"] = _audio(ctx.grids, ctx.model_spec, ctx.model_dir / "samples")
    record["wall_time_s"] = round(time.perf_counter() - t_model, 1)
    return record


def _bench_model(spec: str, model: Any, config: BenchConfig, out: Path, threads: int, progress: bool) -> dict[str, Any]:
    from ldpruner import api

    t_model = time.perf_counter()
    model_dir = out / _slug(spec)
    model_dir.mkdir(parents=True, exist_ok=True)
    loaded = api.load(model, scheduler=config.scheduler)
    _log(progress, f"{spec}: analysis ({config.num_samples} samples × {config.steps} steps)")
    scores = api.analyze(loaded, out=model_dir, num_samples=config.num_samples, steps=config.steps,
                         batch_size=config.batch_size, dtype=config.dtype, device=config.device, overwrite=True,
                         progress=progress)
    graph = api.inspect(loaded, granularity=scores.granularity)
    cost_report = None
    if config.metric == "latency":
        _log(progress, f"{spec}: latency costs per operator ({config.runtime})")
        cost_report = api.costs(loaded, out=model_dir, overwrite=True, progress=progress,
                                granularity=scores.granularity, runtime=config.runtime,
                                latency_repeats=config.repeats, latency_warmup=config.warmup, threads=threads,
                                device=config.device)
    ctx = _dense(spec, loaded, graph, {"unet_calls": scores.unet_calls, "wall_time_s": scores.wall_time_s,
                                       "num_samples": config.num_samples, "steps": config.steps,
                                       "scheduler": scores.scheduler}, config, model_dir, threads, progress)
    for budget in config.budgets:
        _log(progress, f"{spec}: budget {budget:.0%}")
        bdir = model_dir / f"budget-{budget:.2f}"
        plan = api.select(scores, model=loaded, costs=cost_report, budget=budget, metric=config.metric,
                          order=config.order)
        pruned = api.prune(loaded, plan)
        export_summary = api.export(pruned, out=bdir, overwrite=True)["export"]
        distilled = distill_record = None
        if config.distill_steps:
            _log(progress, f"{spec}: distilling {config.distill_steps} steps at budget {budget:.0%}")
            from .quality import distill_options

            # the teacher's trajectories follow how the model is sampled (guidance for the T2I zoo model)
            zoo_defaults = distill_options(spec.removeprefix("zoo:")) if spec.startswith("zoo:") else {}
            options = {"steps": config.distill_steps, **zoo_defaults, **dict(config.distill_options)}
            result = api.distill(loaded, pruned, out=bdir / "distill", overwrite=True, progress=progress,
                                 data=config.distill_data, device=config.device, **options)
            s = result.summary
            distill_record = {"steps": s["steps"], "wall_time_s": s["wall_time_s_this_run"], "options": options,
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


def _bench_build(spec: str, build: Any, config: BenchConfig, out: Path, threads: int,
                 progress: bool) -> dict[str, Any]:
    """A finished build measured as it ships: its plan, its pruned (and distilled) student and its ONNX model,
    beside the dense model it was built from (loaded as the build loaded it: model, scheduler, latent size), with
    the budget the build asked for against what it achieved."""
    from ldpruner import api
    from ldpruner.errors import ModelLoadError
    from ldpruner.io import read_json
    from ldpruner.passes.config import ExportConfig
    from ldpruner.passes.costs import CostReport
    from ldpruner.passes.importance import ImportanceReport
    from ldpruner.passes.plan import RemovalPlan
    from ldpruner.passes.student import load_student

    t_model = time.perf_counter()
    cfg = build.config
    model_dir = out / _slug(spec)
    model_dir.mkdir(parents=True, exist_ok=True)
    _log(progress, f"{spec}: the build of {cfg.model} (metric {cfg.metric}, budget {cfg.budget:g})")
    try:
        loaded = api.load(cfg.model, scheduler=cfg.scheduler)
    except ModelLoadError as exc:
        raise ModelLoadError(f"the build in {spec!r} was made from MODEL {cfg.model!r}, which does not load now: "
                             f"{exc}") from exc
    plan = RemovalPlan.load(build.plan).for_weights(loaded.weights_id, "bench", allow=False,
                                                    made=f"the build in {spec!r} was made for")
    graph = api.inspect(loaded, granularity=plan.granularity, height=cfg.height, width=cfg.width)
    scores = ImportanceReport.load(build.path / "scores.json")
    analysis = {"unet_calls": scores.unet_calls, "wall_time_s": scores.wall_time_s,
                "num_samples": scores.config.num_samples, "steps": scores.config.steps,
                "scheduler": scores.scheduler, "from_build": str(build.path)}
    # the dense baseline exported as the build exported its student: a ratio of two exports, not of two exporters
    ctx = _dense(spec, loaded, graph, analysis, config, model_dir, threads, progress, model_spec=cfg.model,
                 export_config=cfg.part(ExportConfig))
    measured = read_json(build.latency, what="latency check") if build.latency is not None else None
    ctx.record["build"] = {"path": str(build.path), "model": cfg.model, "metric": cfg.metric, "budget": cfg.budget,
                           "order": cfg.order, "distill_steps": cfg.distill_steps, "onnx": str(build.onnx),
                           # the build's own latency check, beside which this bench's timing can be read
                           "latency_check": measured, "summary": build.report.get("summary")}
    pruned = load_student(build.pruned)
    distilled = load_student(build.distilled) if build.distilled is not None else None
    export_summary = read_json(build.onnx.with_name("export.json"), what="export summary")["export"]
    cost_report = CostReport.load(build.path / "costs.json") if cfg.metric == "latency" else None
    distill_record = None
    if distilled is not None:
        summary = read_json(build.path / "distill" / "distill.json", what="distillation summary")
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
    from ldpruner.passes.costs import check_latency

    runtime, batch = costs.placement["runtime"], int(costs.placement["batch"])
    predicted_cut = plan.latency["predicted_removed_fraction"]
    measured = entry["latency"][runtime].get(f"batch_{batch}")
    if measured is None:
        check = check_latency(dense, pruned.traced, costs, plan.names, tolerance=config.latency_tolerance,
                              precision=config.latency_precision, device=device)
        measured_cut = check["measured_cut"]
    else:
        measured_cut = 1 - measured["ratio"]
    shortfall = (predicted_cut - measured_cut) / predicted_cut if predicted_cut > 0 else 0.0
    return {"runtime": runtime, "batch": batch, "predicted_cut": predicted_cut, "measured_cut": measured_cut,
            "shortfall": shortfall, "tolerance": config.latency_tolerance,
            "flagged": shortfall > config.latency_tolerance}


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


# --- plots, grids, markdown ----------------------------------------------------------------------------------

def _plots(record: dict[str, Any], model_dir: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = record["budgets"]
    x = [b["budget"] for b in budgets]
    paths: dict[str, str] = {}
    fig, ax = plt.subplots(figsize=(6, 4))
    for runtime, style in (("torch", "-o"), ("onnxruntime", "-s")):
        for key in budgets[0]["latency"][runtime]:
            ax.plot(x, [b["latency"][runtime][key]["ratio"] for b in budgets], style,
                    label=f"{runtime} {key.replace('_', ' ')}")
    ax.plot(x, [b["macs_per_sample"]["ratio"] for b in budgets], "k--", label="MACs ratio")
    ax.plot(x, [b["params"]["ratio"] for b in budgets], "k:", label="params ratio")
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set_xlabel(f"budget ({budgets[0]['metric']} removed)")
    ax.set_ylabel("pruned / dense")
    ax.set_title(f"{record['model']}: latency ratio (median) vs MACs")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(model_dir / "latency.png", dpi=100)
    plt.close(fig)
    paths["latency"] = str(model_dir / "latency.png")

    if record["quality"].get("available"):
        from .quality import primary

        dense_q = primary(record["quality"]["dense"])
        feature_name = {"efficientnet": "EfficientNet-Lite0", "spoken_digits": "spoken-digit classifier"}[
            record["quality"]["dense"]["primary"]]
        fig, ax = plt.subplots(figsize=(6, 4))
        for variant, style in (("pruned", "-o"), ("distilled", "-s")):
            if variant in budgets[0]["quality"]:
                ax.plot(x, [primary(b["quality"][variant])["fd"] for b in budgets], style, label=f"{variant} FD")
        ax.axhline(dense_q["fd"], color="k", ls="--", label="dense FD")
        ax.axhline(dense_q["fd_real_vs_real"], color="grey", ls=":", label="real vs real FD")
        ax.set_xlabel(f"budget ({budgets[0]['metric']} removed)")
        ax.set_ylabel(f"FD ({feature_name} features)")
        ax.set_title(f"{record['model']}: quality vs budget")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(model_dir / "quality.png", dpi=100)
        plt.close(fig)
        paths["quality"] = str(model_dir / "quality.png")
    return paths


def _grids(grids: Mapping[str, Any], samples_dir: Path, model_dir: Path, shown: int = 16) -> dict[str, Any]:
    """One PNG grid (64 samples evenly spaced over the set) per variant, and one figure with ``shown`` evenly spaced
    samples of every variant side by side (same seeds, same prompts: cell by cell the same noise)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from .metrics import image_grid, save_image_grid

    def spread(images, k):  # evenly spaced over the set: T2I samples come in prompt order, one digit after another
        return images[torch.linspace(0, len(images) - 1, min(k, len(images))).round().long()]

    samples_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, images in grids.items():
        path = samples_dir / f"{name.replace(' ', '-').replace('%', 'pct')}.png"
        save_image_grid(spread(images, 64), path, 8, scale=2)
        files[name] = str(path)
    fig, axes = plt.subplots(1, len(grids), figsize=(2.6 * len(grids), 2.9), squeeze=False)
    for ax, (name, images) in zip(axes[0], grids.items()):
        grid = image_grid(spread(images, shown), 4, scale=2)
        ax.imshow(grid, cmap="gray" if grid.ndim == 2 else None, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(model_dir / "samples.png", dpi=100)
    plt.close(fig)
    return {"grids": files, "side_by_side": str(model_dir / "samples.png")}


def _audio_models() -> tuple[str, ...]:
    from .quality import AUDIO_MODELS

    return AUDIO_MODELS


def _audio(grids: Mapping[str, Any], spec: str, samples_dir: Path, clips: int = 8) -> dict[str, list[str]]:
    """The first ``clips`` mel samples of every variant as WAVs (Griffin-Lim), same seeds across variants:
    ``samples/<variant>/clip-00.wav`` …, to listen to dense vs pruned side by side."""
    from ldpruner.zoo import model_dir as zoo_folder
    from ldpruner.zoo.audio import MelConfig, mel_to_waveform

    from .metrics import save_wav

    config = MelConfig.from_folder(zoo_folder(spec.removeprefix("zoo:")))
    files: dict[str, list[str]] = {}
    for name, mels in grids.items():
        folder = samples_dir / name.replace(" ", "-").replace("%", "pct")
        audio = mel_to_waveform(mels[:clips], config, value_range=(0.0, 1.0))
        files[name] = [str(save_wav(a, config.sample_rate, folder / f"clip-{i:02d}.wav")) for i, a in enumerate(audio)]
    return files


def _ms(stats: Mapping[str, Any]) -> str:
    return f"{stats['median_ms']:.2f} ± {stats['iqr_ms']:.2f}"


def _label(entry: Mapping[str, Any]) -> str:
    """A budget's row label: its share ("30%"), or "build (params 30%)" for a build measured as it ships."""
    share = f"{entry['budget']:.0%}" if isinstance(entry.get("budget"), (int, float)) else "?"
    return f"build ({entry.get('metric')} {share})" if entry.get("label") == "build" else share


def _ratio_text(latency: Mapping[str, Any]) -> str:
    interval = latency.get("interval")
    if not interval:
        return f"**{latency['ratio']:.3f}**"
    return (f"**{latency['ratio']:.3f}** [{interval[0]:.3f}, {interval[1]:.3f}]"
            f"{'' if latency.get('converged', True) else '*'}")


def markdown(report: Mapping[str, Any]) -> str:
    env = report["environment"]
    cfg = report["config"]
    lines = ["# ldpruner bench", "",
             f"torch {env['torch']}, onnxruntime {env['onnxruntime']}, {env['cpu_count']} CPUs, {env['threads']} "
             f"threads; load average at start {env.get('load_average_start')}, at end {env.get('load_average_end')}.",
             "",
             f"Latency: median ± IQR (ms) of at least {cfg['repeats']} timed rounds after {cfg['warmup']} warm-up "
             "calls, dense and pruned interleaved in one run (order rotated every round), more rounds until the 95 % "
             f"interval of the ratio is within ±{cfg.get('latency_precision', 0.02):.0%} of it (shown as [low, high]; "
             "a ratio marked * did not get there in the time allowed). **The pruned / dense ratios are the "
             "evidence; absolute times depend on the machine and its load.** Torch: the dense diffusers UNet vs the "
             "pruned fx graph, eager. ORT: both exported through `ldpruner.passes.onnx.export`, CPU provider, no "
             "spinning. Memory: peak RSS of a fresh process serving the ONNX model at the largest batch, minus its "
             "RSS after importing onnxruntime (weights + activations + runtime arenas).", ""]
    for rec in report["models"]:
        d = rec["dense"]
        lines += [f"## {rec['model']} ({rec['class']}, latent {'×'.join(map(str, rec['latent_shape']))})", ""]
        if rec["random_weights"]:
            lines += ["> Random weights: the numbers prove the pipeline, not pruning quality.", ""]
        lines += [f"Dense: {d['params']:,} UNet params, {d['macs_per_sample']:,} MACs/sample; ONNX validated: "
                  f"{d['onnx']['passed']} (max abs diff {d['onnx']['max_abs_diff']:.1e}).", ""]
        built = rec.get("build")
        if built:
            lines += [f"The build in `{built['path']}` as it ships: its plan ({built['metric']} budget "
                      f"{built['budget']:g}, order {built['order']}), its students and its ONNX model "
                      f"`{built['onnx']}`, measured beside `{built['model']}`.", ""]
            check = built.get("latency_check")
            if check:
                lines += [f"The build's own latency check measured the cut at {check['measured_cut']:.1%} "
                          f"({check['runtime']}, batch {check['batch']}, {check.get('repeats')} rounds).", ""]
        for e in rec["budgets"]:
            if e.get("target"):
                lines.append(f"- {_label(e)}: {e['target']['line']}{'' if e['target']['met'] else ' **MISSED**'}")
        lines.append("")
        batches = list(rec["budgets"][0]["latency"]["torch"])
        header = ["budget", "removed ops", "params (ratio)", "MACs ratio"]
        for runtime in ("torch", "ORT"):
            for b in batches:
                header += [f"{runtime} {b.replace('batch_', 'b')} dense ms", "pruned ms", "ratio"]
        header += ["ORT peak MiB (ratio)", "ONNX valid"]
        predicted = any(e.get("latency_prediction") for e in rec["budgets"])
        if predicted:
            header += ["latency cut predicted / measured"]
        lines += ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
        for e in rec["budgets"]:
            row = [_label(e), str(len(e["removed"])),
                   f"{e['params']['pruned']:,} ({e['params']['ratio']:.3f})", f"{e['macs_per_sample']['ratio']:.3f}"]
            for runtime in ("torch", "onnxruntime"):
                for b in batches:
                    lat = e["latency"][runtime][b]
                    row += [_ms(lat["dense"]), _ms(lat["pruned"]), _ratio_text(lat)]
            mem = e["peak_memory_onnx"]
            row.append(f"{mem['run_peak_mib']:.0f} ({mem.get('run_peak_ratio', float('nan')):.2f})"
                       if mem.get("available") else "n/a")
            row.append("yes" if e["onnx"]["passed"] else "NO")
            if predicted:
                lp = e["latency_prediction"]
                row.append(f"{lp['predicted_cut']:.1%} / {lp['measured_cut']:.1%} ({lp['runtime']} "
                           f"b{lp['batch']}){' **FLAGGED**' if lp['flagged'] else ''}")
            lines.append("| " + " | ".join(row) + " |")
        dense_mem = d["peak_memory_onnx"]
        if dense_mem.get("available"):
            lines += ["", f"Dense ONNX peak: {dense_mem['run_peak_mib']:.0f} MiB above baseline "
                          f"({dense_mem['peak_rss_mib']:.0f} MiB RSS)."]
        distilled = [e for e in rec["budgets"] if e.get("distill")]
        if distilled:
            lines += ["", "| budget | distill steps | loss first 10 % | loss last 10 % | wall s |",
                      "|---|---:|---:|---:|---:|"]
            for e in distilled:
                ds = e["distill"]
                lines.append(f"| {_label(e)} | {ds['steps']} | {ds['loss_first_10pct']:.4g} | "
                             f"{ds['loss_last_10pct']:.4g} | {ds['wall_time_s']:.0f} |")
        q = rec["quality"]
        lines.append("")
        if q.get("available"):
            from .quality import quality_table

            audio = "recognisability" in q["dense"]
            space = ("the spoken-digit classifier's features vs held-out real clips" if audio else
                     "EfficientNet-Lite0 features vs held-out real images")
            lines += [f"Quality: {cfg['samples']} samples per variant, {cfg['sample_steps']} steps, same seeds; "
                      f"FD/KID on {space} (relative numbers, not published FID).", ""]
            rows = [("dense", q["dense"])] + [(f"{v} {_label(e)}", qq) for e in rec["budgets"]
                                               for v, qq in e.get("quality", {}).items()]
            lines += quality_table(rows)
            slug = _slug(rec["model"])
            lines += ["", f"![samples]({slug}/samples.png)", "", f"![quality]({slug}/quality.png)"]
        else:
            lines.append(f"Quality: not measured ({q.get('reason')}).")
        lines += ["", f"![latency]({_slug(rec['model'])}/latency.png)", ""]
    return "\n".join(lines)
