"""The stages, on loaded objects and validated configs: each runs its pass and, given an output folder, writes its
artifact there (atomically; an existing artifact is replaced only with ``overwrite``). The API
(:mod:`ldpruner.api`) resolves paths and keyword options into these arguments; ``ldpruner build``
(:mod:`ldpruner.stages.build`) chains them.

    stage     reads                              writes (in ``out``)
    inspect   a model                            — (an OperatorGraph)
    costs     a model                            costs.json: the latency each removal saves on the target runtime
                                                 (reused when its key — graph, options, device, versions — matches)
    analyze   a model + its calibration          scores.json: the LD score of every candidate (reused when its
                                                 cache key — weights, options, conditioning — matches)
    select    scores (+ the operator graph,      plan.json: the removals under the budget
              + costs)
    latency   the dense model + a student        latency.json: the student's measured latency beside the dense
                                                 model's, against the plan's prediction
    prune     a model + a plan                   student/: the rewritten graph's weights, plan and trace
    distill   the dense model + a student        student/, loss log and plot, checkpoints, distill.json
    export    a student                          onnx/unet.onnx (+ .data, optimized / fp16 variants), validated
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ldpruner.base import devices
from ldpruner.base.errors import ArtifactError, ConfigError, UnsupportedModelError
from ldpruner.base.io import check_replaceable
from ldpruner.base.placement import Placement
from ldpruner.stages import calibration
from ldpruner.stages.layout import (
    COSTS,
    DISTILL_DIR,
    DISTILL_SUMMARY,
    EXPORT_SUMMARY,
    LATENCY,
    LORA,
    ONNX_DIR,
    PLAN,
    SCORES,
    STUDENT,
)
from ldpruner.stages.selection import Sampling, select

if TYPE_CHECKING:  # torch loads when a stage runs, not when the CLI reads the configs for its flags
    from ldpruner.sources import LoadedModel

__all__ = [
    "COSTS",
    "DISTILL_DIR",
    "DISTILL_SUMMARY",
    "EXPORT_SUMMARY",
    "LATENCY",
    "LORA",
    "ONNX_DIR",
    "PLAN",
    "SCORES",
    "STUDENT",
    "Sampling",
    "analysis_inputs",
    "analyze",
    "check_latency",
    "costs",
    "distill",
    "export",
    "inspect",
    "placed_export_config",
    "prune",
    "sampling_of",
    "select",
]

def load_model(model: Any, inputs: Any) -> LoadedModel:
    """MODEL as the stages take it, with the scheduler and calibration file ``inputs`` (an InputsConfig) name: the
    file is read here, before anything is traced; a LoadedModel passed in is never changed."""
    from ldpruner.sources import load

    loaded = load(model, scheduler=inputs.scheduler)
    if inputs.calibration is not None:
        from ldpruner.passes.conditioning import read_calibration_file

        read_calibration_file(inputs.calibration)
        loaded = dataclasses.replace(loaded, calibration=Path(inputs.calibration))
    return loaded


def inspect(loaded: LoadedModel, trace: Any) -> Any:
    """The model's :class:`~ldpruner.compiler.graph.OperatorGraph` at ``trace`` (a TraceConfig)."""
    from ldpruner.compiler.graph import build_operator_graph

    return build_operator_graph(loaded.trace(trace))


def analysis_inputs(loaded: LoadedModel, trace: Any, analysis: Any,
                    prompts_file: str | os.PathLike | None, placement: Placement) -> tuple[Any, Any, Any]:
    """(operator graph, AnalysisConfig, conditioning source) of an analysis: the trace at ``trace``, ``analysis`` (an
    AnalysisConfig) at the trace's latent size with the prompts the model uses. The graph is
    of the model placed on ``placement.device`` in the analysis dtype:
    the loaded UNet itself when it is there already, else a cast copy. A pipeline folder without its scheduler is
    refused here, before any work (:func:`ldpruner.stages.calibration.sampling_scheduler`)."""
    from ldpruner.passes.importance import check_finite_weights
    from ldpruner.passes.inputs import check_analysable

    calibration.sampling_scheduler(loaded)
    check_finite_weights(loaded.unet, repr(loaded.source))  # before any tracing or scoring
    config = calibration.analysis_config(loaded, {**analysis.to_dict(), "height": trace.height, "width": trace.width},
                                         prompts_file)
    unet = loaded.placed(placement.device, devices.torch_dtype(config.dtype))
    from ldpruner.compiler.graph import build_operator_graph

    graph = build_operator_graph(loaded.trace(trace, unet=unet))
    check_analysable(graph.traced)
    return graph, config, calibration.conditioning_source(loaded, config.prompts)


def analyze(loaded: LoadedModel, graph: Any, config: Any, calib: Any, placement: Placement, *,
            out: str | os.PathLike | None, overwrite: bool, progress: bool) -> Any:
    """Score every candidate of ``graph``; with ``out``, reuse ``out/scores.json`` when its cache key matches and
    write it otherwise. The scheduler is the model's own, the one ``--scheduler`` named, or the default (said in a
    notice); scores.json records which."""
    from ldpruner.passes.importance import analyze_importance, cache_key
    from ldpruner.passes.scores import ImportanceReport

    scheduler, source = calibration.sampling_scheduler(loaded)
    path = Path(out) / SCORES.name if out is not None else None
    if path is not None and path.exists():
        cached = ImportanceReport.load_cached(path, cache_key(graph, calib, config=config, scheduler=scheduler),
                                              overwrite=overwrite)
        if cached is not None and cached.model_weights == loaded.weights_id:
            return cached
        if cached is not None and cached.model_weights is None and not overwrite:
            raise ArtifactError(f"{str(path)!r} holds scores for these options from an ldpruner that did not record "
                                "the model's weights; pass --overwrite (overwrite=True) to analyse again")
        check_replaceable(path, overwrite)
    calibration.note_default_scheduler(loaded)
    return analyze_importance(graph, calib, config=config, scheduler=scheduler, scheduler_source=source,
                              progress=progress, save_to=path, model_weights=loaded.weights_id,
                              world=placement.world)


def _timed_graph(loaded: LoadedModel, trace: Any, config: Any, device: Any) -> Any:
    """The operator graph the latency is timed on: torch in ``config.latency_dtype`` on ``device``; onnxruntime on
    the float32 model (exported on the host; its session runs on ``device``'s provider)."""
    import torch

    if config.runtime == "torch":
        unet = loaded.placed(device, devices.torch_dtype(config.latency_dtype))
    else:
        unet = loaded.placed(torch.device("cpu"), torch.float32)
    from ldpruner.compiler.graph import build_operator_graph

    return build_operator_graph(loaded.trace(trace, unet=unet))


def costs(loaded: LoadedModel, trace: Any, config: Any, placement: Placement, *, out: str | os.PathLike | None,
          overwrite: bool, progress: bool) -> Any:
    """The latency cost of every candidate (a :class:`~ldpruner.passes.cost_report.CostReport`) of the model traced at
    ``trace`` under ``config`` (a CostConfig) on the placement's device with its threads; with ``out``, reuse
    ``out/costs.json`` when its key (which holds the threads) matches and write it otherwise."""
    from ldpruner.passes.cost_report import CostReport
    from ldpruner.passes.costs import cache_key, measure_costs

    device, threads = placement.device, placement.threads
    graph = _timed_graph(loaded, trace, config, device)
    path = Path(out) / COSTS.name if out is not None else None
    if path is not None and path.exists():
        cached = CostReport.load_cached(path, cache_key(graph, config, device, threads), overwrite=overwrite)
        if cached is not None:
            return cached
        check_replaceable(path, overwrite)
    return measure_costs(graph, config, device=device, threads=threads, progress=progress, save_to=path)


def check_latency(loaded: LoadedModel, student: Any, cost_report: Any, trace: Any, placement: Placement, *,
                  tolerance: float | None = None, precision: float | None = None,
                  out: str | os.PathLike | None = None, overwrite: bool = False) -> dict[str, Any]:
    """``student`` (a PrunedUNet) timed beside the dense ``loaded`` model on the runtime, batch, dtype and device of
    ``cost_report``, until their ratio is known to ``precision``, against the latency its plan predicts; with
    ``out``, written to ``out/latency.json``. A measured cut short of the predicted one by more than ``tolerance``
    is flagged, and logged. ``tolerance`` / ``precision``: None takes the costs' (the ones they were measured
    with; the costs are reused whatever these are)."""
    import dataclasses
    import logging

    from ldpruner.passes.latency_check import check_latency as check

    device = placement.device
    config = cost_report.config
    dense = _timed_graph(loaded, trace, config, device).traced
    pruned = student.traced
    if config.runtime == "torch":  # the student, placed like the dense model
        dtype = devices.torch_dtype(config.latency_dtype)
        pruned = dataclasses.replace(pruned, gm=devices.cast_copy(pruned.gm, device, dtype), example_inputs={
            n: t.to(device, dtype if t.is_floating_point() else t.dtype) for n, t in pruned.example_inputs.items()})
    result = check(dense, pruned, cost_report, student.plan.names, device=device, tolerance=tolerance,
                   precision=precision)
    result["predicted_by"] = cost_report.basis()
    result["model_weights"] = student.plan.model_weights  # the dense weights the student was pruned from
    if result["flagged"]:
        logging.getLogger("ldpruner.stages").warning(result["message"])
    if out is not None:
        path = Path(out) / LATENCY.name
        check_replaceable(path, overwrite)
        LATENCY.write(path, result)
    return result


def sampling_of(loaded: LoadedModel, report: Any, placement: Placement) -> Sampling | None:
    """How ``report``'s analysis sampled, made again on ``loaded`` (its conditioning, the scheduler it samples with,
    the analysis' options at their latent size); None when that does not reproduce the report's cache key (another
    conditioning, a calibration file not given here, other weights)."""
    from ldpruner.passes.config import TraceConfig
    from ldpruner.passes.importance import cache_key

    trace = TraceConfig(granularity=report.granularity, height=report.config.height, width=report.config.width)
    graph, config, calib = analysis_inputs(loaded, trace, report.config, None, placement)
    scheduler = calibration.sampling_scheduler(loaded)[0]
    if cache_key(graph, calib, config=config, scheduler=scheduler) != report.cache_key:
        return None
    return Sampling(graph, config, calib, scheduler)


def prune(loaded: LoadedModel, plan: Any, trace: Any, config: Any, *, out: str | os.PathLike | None,
          overwrite: bool, graph: Any = None, allow_other_weights: bool = False) -> Any:
    """``plan`` applied to a copy of the model traced at ``trace`` (a TraceConfig at the plan's granularity), through
    the pass manager (verifier per ``config.verify``); with ``out``, saved as ``out/student/``. ``graph`` reuses an
    operator graph of that trace. A plan made for other weights is refused unless ``allow_other_weights``; the
    student's plan records the weights it was pruned from (and any mismatch that was allowed)."""
    from ldpruner.passes.remove import prune as prune_graph
    from ldpruner.passes.student import save_student, student_config

    if type(loaded.unet).__name__ != plan.model_class:
        raise ConfigError(f"the plan was made for a {plan.model_class}, "
                          f"but the model is a {type(loaded.unet).__name__}")
    plan.check()
    plan = plan.for_weights(loaded.weights_id, "prune", allow=allow_other_weights, made="the plan was made for")
    graph = graph if graph is not None else inspect(loaded, trace)
    # the config the student carries is the one its folder holds, so an in-memory student exports like a saved one
    unet_config = student_config(loaded.unet_config, plan.model_class) if loaded.unet_config is not None else None
    pruned = prune_graph(graph.traced, plan, operator_graph=graph, config=unet_config, verify=config.verify)
    if out is not None:
        path = Path(out) / STUDENT
        check_replaceable(path, overwrite)
        save_student(pruned, path, overwrite=overwrite)
    return pruned


def distill(loaded: LoadedModel, student: Any, config: Any, placement: Placement, *, out: str | os.PathLike,
            data: str | os.PathLike | None, prompts_file: str | os.PathLike | None, resume: bool, overwrite: bool,
            progress: bool, consume: bool = False, allow_other_weights: bool = False) -> Any:
    """Fine-tune ``student`` (a PrunedUNet, trained in place) against the dense ``loaded`` model it was pruned from,
    on the teacher's trajectories or on ``data`` (:func:`ldpruner.stages.calibration.distill_data`). Under torchrun
    every rank calls this and trains on its own shard (the placement's world); rank 0 writes. The frozen teacher shares
    the loaded weights when they are on the placement's device in ``config.teacher_dtype``; otherwise it is a copy
    placed there in that dtype, or, with ``consume`` (the caller needs the dense model no more) and an owned model,
    the loaded weights moved and cast in place: the dense model is never held twice. A student pruned from other weights
    than ``loaded``'s (its plan records them), or a checkpoint trained against another teacher, is refused unless
    ``allow_other_weights``; the distilled student's plan and distill.json record any mismatch that was allowed."""
    from ldpruner.passes.distill import distill as run_distill
    from ldpruner.passes.remove import count_params

    if config.steps == 0:  # build and bench skip the stage instead
        raise ConfigError("steps=0 must be >= 1: distillation trains at least one step")
    if type(loaded.unet).__name__ != student.plan.model_class:
        raise ConfigError(f"the student was pruned from a {student.plan.model_class}, MODEL is a "
                          f"{type(loaded.unet).__name__}")
    calibration.sampling_scheduler(loaded)  # a pipeline folder without its scheduler: refused before any work
    calibration.check_distill_inputs(loaded, data=data, prompts_file=prompts_file)  # before the teacher's trace
    teacher_weights = loaded.weights_id  # before the teacher is placed (consume may cast the loaded weights)
    pruned = student
    plan = pruned.plan.for_weights(teacher_weights, "distill", allow=allow_other_weights,
                                   made="the student was pruned from")
    if plan is not pruned.plan:
        pruned = dataclasses.replace(pruned, plan=plan)
    device = placement.device
    # the teacher is placed now, before it samples the data-free trajectories on the device
    import torch

    loaded_dtype = next(loaded.unet.parameters()).dtype
    dtype = getattr(torch, config.teacher_dtype) if config.teacher_dtype is not None else loaded_dtype
    if (dtype, device) == (loaded_dtype, loaded.device):
        teacher = loaded.trace_like(pruned.traced, share=True)
    elif consume and loaded.owned:
        # nn.Module.to: diffusers' own .to warns about fp32-only modules on every cast, even when a model has none
        teacher = loaded.trace_like(pruned.traced, unet=torch.nn.Module.to(loaded.unet, device=device, dtype=dtype))
    else:  # a copy made on the device in the teacher's dtype: the loaded weights stay as they are
        teacher = loaded.trace_like(pruned.traced, unet=loaded.placed(device, dtype))
    teacher.gm.to(device)
    if count_params(teacher.gm) != pruned.plan.total_params:
        raise ConfigError(f"MODEL has {count_params(teacher.gm):,} UNet parameters, the student's plan was made for "
                          f"{pruned.plan.total_params:,}: pass the dense model the student was pruned from")
    world = placement.world
    source = calibration.distill_data(loaded, teacher, config, data=data, prompts_file=prompts_file,
                                      rank=world.rank, world=world.size, progress=progress)
    return run_distill(pruned, teacher, source, config=config, out=out, resume=resume, overwrite=overwrite,
                       progress=progress, device=device, teacher_weights=teacher_weights,
                       allow_other_weights=allow_other_weights, world=world)


def dense_as_student(loaded: LoadedModel, trace: Any) -> Any:
    """The dense model as an exportable "student": its trace at ``trace`` (a TraceConfig) with an empty plan, so the
    exporter that exports pruned students gives a validated dense baseline from the same code."""
    from ldpruner.passes.plan import RemovalPlan
    from ldpruner.passes.remove import PrunedUNet
    from ldpruner.passes.student import student_config

    traced = loaded.trace(trace)
    params = sum(p.numel() for p in traced.gm.parameters())
    plan = RemovalPlan((), traced.model_class, traced.granularity.value, params, 0,
                       budget={"note": "dense model: nothing removed"}, model_weights=loaded.weights_id)
    config = student_config(loaded.unet_config, traced.model_class) if loaded.unet_config is not None else None
    return PrunedUNet(traced=traced, plan=plan, summary={"removed": [], "dense": True}, config=config)


def lora(student: Any, lora_path: str | os.PathLike, *, scale: float, out: str | os.PathLike | None,
         overwrite: bool) -> tuple[Any, dict[str, Any]]:
    """A copy of ``student`` (a PrunedUNet) with the LoRA at ``lora_path`` fused into it (times ``scale``), and the
    report (``lora.json``): pairs fused, dropped with the operators the plan removed, their share of the LoRA.
    With ``out``: ``out/student/`` and ``out/lora.json``."""
    import copy

    from ldpruner.passes.lora import apply_lora, read_lora
    from ldpruner.passes.student import save_student

    if out is not None:
        for path in (Path(out) / STUDENT, Path(out) / LORA.name):
            check_replaceable(path, overwrite)
    adapter = read_lora(lora_path, unet_config=student.config)
    fused = copy.deepcopy(student)
    kept = tuple(f"{r.name}.conv_shortcut" for r in fused.plan.removals if r.action == "shortcut")
    report = apply_lora(fused.gm, adapter, removed=tuple(fused.plan.names), kept=kept, scale=scale)
    report["model_weights"] = fused.plan.model_weights  # the dense weights the student was pruned from
    if out is not None:
        save_student(fused, Path(out) / STUDENT, overwrite=overwrite)
        LORA.write(Path(out) / LORA.name, report)
    return fused, report


def check_exportable(unet_config: Any) -> None:
    """Refuse, before any export work, a UNet whose stock pipelines no drop-in can serve
    (:func:`ldpruner.base.unet_inputs.no_drop_in`)."""
    from ldpruner.base.unet_inputs import no_drop_in

    reason = no_drop_in(unet_config)
    if reason is not None:
        raise UnsupportedModelError(reason)


def export(student: Any, config: Any, variants: Any, placement: Placement, *, out: str | os.PathLike,
           overwrite: bool) -> dict[str, Any]:
    """``out/onnx/unet.onnx`` from ``student`` (a PrunedUNet, or any object with ``traced`` and ``config``) under
    ``config`` (an ExportConfig), validated against torch, with ``out/onnx/export.json`` (the summary returned: the
    validation, the weights the student was pruned from); with ``variants.optimize`` also onnxruntime's optimized
    model (``unet.opt.onnx``) and with ``variants.fp16`` its fp16 conversion (``unet.fp16.onnx``). On a CUDA
    ``device`` with onnxruntime-gpu the numeric checks run on the CUDA execution provider and the optimizer targets
    it (its CUDA-only fusions on). The checks run with the placement's threads in torch and onnxruntime; export.json
    records the number. A UNet no drop-in can serve in its stock pipelines is refused first
    (:func:`check_exportable`)."""
    from ldpruner.passes.onnx.export import export_onnx

    check_exportable(student.config)
    threads, on_cuda = placement.threads, placement.on_cuda_provider
    config = placed_export_config(config, placement)
    onnx_dir = Path(out) / ONNX_DIR
    result = export_onnx(student.traced, onnx_dir / "unet.onnx", config=config, unet_config=student.config,
                         overwrite=overwrite)
    plan = getattr(student, "plan", None)
    summary: dict[str, Any] = {"export": result.to_dict(),
                               # the dense weights the exported student was pruned from, and mismatches allowed
                               "model_weights": getattr(plan, "model_weights", None),
                               "other_weights": list(getattr(plan, "other_weights", ())),
                               "threads": threads}  # torch's and onnxruntime's in the validation
    if variants.optimize:
        from ldpruner.passes.onnx.optimize import fusion_sites, fusion_table, optimize_onnx

        results = {}
        for name, filename, half in [("optimized", "unet.opt.onnx", False)] + (
                [("fp16", "unet.fp16.onnx", True)] if variants.fp16 else []):
            results[name] = optimize_onnx(result.onnx_path, onnx_dir / filename, use_gpu=on_cuda, fp16=half,
                                          overwrite=overwrite)
            summary[name] = results[name].to_dict()
        pruned_sites, dense_sites = fusion_sites(student.gm), _dense_sites(student)
        summary["fusions"] = {name: fusion_table(results[name], pruned_sites, dense_sites) for name in results}
    EXPORT_SUMMARY.write(onnx_dir / EXPORT_SUMMARY.name, summary)
    return summary


def placed_export_config(config: Any, placement: Placement) -> Any:
    """``config`` (an ExportConfig; None: the defaults) with its numeric checks where the placement runs: on a CUDA
    placement, its onnxruntime providers unless the config names CUDA's already."""
    from ldpruner.passes.config import ExportConfig

    config = config if config is not None else ExportConfig()
    if placement.on_cuda_provider and "CUDAExecutionProvider" not in config.validation_providers:
        config = dataclasses.replace(config, validation_providers=placement.providers)
    return config


def _dense_sites(student: Any) -> dict[str, int] | None:
    """The fusion sites of the dense UNet the student was pruned from, counted on a weightless (meta) instance built
    from its config; None when the plan names no diffusers model class."""
    import diffusers
    import torch

    from ldpruner.passes.onnx.optimize import fusion_sites

    cls = getattr(diffusers, getattr(getattr(student, "plan", None), "model_class", None) or "", None)
    if student.config is None or cls is None:
        return None
    try:
        with torch.device("meta"):
            return fusion_sites(cls.from_config(dict(student.config)))
    except Exception as exc:  # a config this diffusers cannot build: the dense column stays empty
        import logging

        logging.getLogger("ldpruner.stages").debug("no dense fusion sites for %s: %s", cls.__name__, exc)
        return None

