"""The Python API: one function per stage, :func:`build` that runs them all, :func:`bench` that measures them, and
:func:`load` that resolves a MODEL.

MODEL is a local diffusers pipeline folder, a UNet folder, ``zoo:<name>``, ``random:<family>``, an in-memory
diffusers UNet or a :class:`~ldpruner.sources.LoadedModel`; the caller's model is never changed. A stage's keyword
options are the fields of its config (:mod:`ldpruner.passes.config`), the same names as the CLI flags
(``num_samples`` ↔ ``--num-samples``); an unknown keyword is a ConfigError that lists the known ones. Outputs are
written atomically, and an existing output is replaced only with ``overwrite=True``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

from ldpruner import stages
from ldpruner.base.errors import ConfigError
from ldpruner.base.placement import place
from ldpruner.passes.config import InputsConfig, TraceConfig
from ldpruner.sources import LoadedModel
from ldpruner.sources import load as _load
from ldpruner.stages.config import (
    AnalyzeOptions,
    CostsOptions,
    DistillOptions,
    ExportOptions,
    InspectOptions,
    PruneOptions,
    SelectOptions,
)

__all__ = ["analyze", "bench", "build", "costs", "distill", "export", "inspect", "load", "prune", "select"]

ModelLike = Any  # str | os.PathLike | torch.nn.Module | LoadedModel


def load(model: ModelLike, *, scheduler: str | os.PathLike | None = None) -> LoadedModel:
    """The UNet MODEL names, with what the stages use beside it (scheduler, text encoder, prompts). ``scheduler``
    (a diffusers scheduler class such as ``"DDIMScheduler"``, with its default config, or a scheduler folder or
    ``scheduler_config.json``) replaces the model's own, or gives one to a model without one."""
    return _load(model, scheduler=scheduler)


def inspect(model: ModelLike, **options: Any) -> Any:
    """Trace ``model`` and describe its operators (an :class:`~ldpruner.compiler.graph.OperatorGraph`).

    ``options``: TraceConfig fields (granularity, height, width) and DeviceConfig's threads (the trace runs the
    model once)."""
    o = InspectOptions.from_dict(options)
    with place("cpu", o.placement.threads, join=False):  # the model is traced where it was loaded
        return stages.inspect(load(model), o.trace)


def analyze(model: ModelLike, *, out: str | os.PathLike | None = None, prompts: str | os.PathLike | None = None,
            calibration: str | os.PathLike | None = None, scheduler: str | os.PathLike | None = None,
            overwrite: bool = False, progress: bool = True, **options: Any) -> Any:
    """Score every removable operator by latent deviation (an
    :class:`~ldpruner.passes.scores.ImportanceReport`); writes ``out/scores.json`` when ``out`` is given, and
    reuses one already there whose cache key (model weights + options + conditioning) matches.

    ``options``: TraceConfig fields (granularity, height, width), AnalysisConfig fields (num_samples, steps,
    seed, guidance_scale, batch_size, dtype) and DeviceConfig's fields (device, threads). ``prompts``: a prompt file
    (default: the model's own prompts, else the built-in set). ``calibration``: a safetensors file of conditioning
    inputs (:func:`~ldpruner.passes.conditioning.read_calibration_file`; default: data-free stand-ins).
    ``scheduler``: what the generations sample with instead of the model's own (see :func:`load`); a model without
    one samples with ``DDIMScheduler()`` at diffusers' defaults (a notice says so; scores.json records which), and
    a pipeline folder without its ``scheduler/`` is refused."""
    out = _out(out)
    o = AnalyzeOptions.from_dict(options)
    inputs = InputsConfig(prompts=prompts, calibration=calibration, scheduler=scheduler)
    with place(o.placement.device, o.placement.threads) as placement:
        loaded = stages.load_model(model, inputs)
        graph, config, calib = stages.analysis_inputs(loaded, o.trace, o.analysis, inputs.prompts, placement)
        return stages.analyze(loaded, graph, config, calib, placement, out=out, overwrite=overwrite,
                              progress=progress)


def costs(model: ModelLike, *, out: str | os.PathLike | None = None, overwrite: bool = False, progress: bool = True,
          **options: Any) -> Any:
    """Measure what removing each operator saves in latency on the target runtime (a
    :class:`~ldpruner.passes.cost_report.CostReport`); writes ``out/costs.json`` when ``out`` is given, and reuses one
    already there whose key (graph, options, device, runtime versions) matches.

    ``options``: TraceConfig fields (granularity, height, width: the latent size deployed), CostConfig fields
    (runtime, latency_batch, latency_dtype, latency_repeats, latency_warmup) and DeviceConfig's fields (device,
    threads: what the latency is measured with, part of the costs' key)."""
    out = _out(out)
    o = CostsOptions.from_dict(options)
    with place(o.placement.device, o.placement.threads, join=False) as placement:
        return stages.costs(load(model), o.trace, o.costs, placement, out=out, overwrite=overwrite,
                            progress=progress)


def select(scores: Any, *, model: ModelLike | None = None, costs: Any = None, out: str | os.PathLike | None = None,
           overwrite: bool = False, allow_other_weights: bool = False, progress: bool = True, **options: Any) -> Any:
    """Choose removals (a :class:`~ldpruner.passes.plan.RemovalPlan`) from an ImportanceReport or a scores.json
    path; writes ``out/plan.json``.

    ``options``: SelectionConfig fields (budget, metric, order, the set search's shortlist and search_cap) and
    DeviceConfig's (device, threads: where the model runs, with ``model``). With
    ``model`` (the one that was analysed) selection skips candidates that, together with earlier ones, would remove
    shared modules (see ``OperatorGraph.jointly_removed``); without it such a plan is refused at prune time instead.
    With the model the plan records the joint LD score of its removed set (sampled as the analysis sampled), and
    ``order="greedy"`` (the set search) can run. ``costs``: a
    CostReport or a costs.json path (:func:`costs`), needed for ``metric="latency"``; with it any plan records the
    latency it predicts. ``model`` must have the weights the scores were made for unless ``allow_other_weights``
    (the plan records it)."""
    out = _out(out)
    from ldpruner.passes.cost_report import CostReport
    from ldpruner.passes.scores import ImportanceReport

    o = SelectOptions.from_dict(options)
    selection = o.selection
    report = scores if isinstance(scores, ImportanceReport) else ImportanceReport.load(Path(scores))
    cost_report = costs if costs is None or isinstance(costs, CostReport) else CostReport.load(Path(costs))
    loaded = load(model) if model is not None else None
    graph = stages.inspect(loaded, TraceConfig(granularity=report.granularity)) if loaded is not None else None
    if loaded is None or (loaded.weights_id != report.model_weights and allow_other_weights):
        return stages.select(report, graph, selection, out=out, overwrite=overwrite, cost_report=cost_report,
                             model_weights=loaded.weights_id if loaded is not None else None,
                             allow_other_weights=allow_other_weights)
    # the model samples as the analysis did (its threads too, unless asked: a text encoder's outputs, and so the
    # conditioning in the scores' cache key, depend on them): the plan records its joint score, the search can run
    threads = o.placement.threads if "threads" in o.placement.given() else report.placement.get("threads")
    with place(o.placement.device, threads) as placement:
        sampling = stages.sampling_of(loaded, report, placement)
        if sampling is None:
            why = ("this model with its conditioning does not make the scores' cache key again (another calibration "
                   "file, prompts, or --threads than the analysis'?)")
            if selection.order == "greedy":
                raise ConfigError(f"order='greedy' samples as the analysis did, but {why}: select within `ldpruner "
                                  "build`, or choose another order")
            import logging

            logging.getLogger("ldpruner.plan").warning("the plan's joint score is not measured: %s", why)
        return stages.select(report, graph, selection, out=out, overwrite=overwrite, cost_report=cost_report,
                             model_weights=loaded.weights_id, allow_other_weights=allow_other_weights,
                             sampling=sampling, placement=placement, progress=progress)


def prune(model: ModelLike, plan: Any, *, out: str | os.PathLike | None = None, overwrite: bool = False,
          allow_other_weights: bool = False, **options: Any) -> Any:
    """Apply a RemovalPlan (or a plan.json path) to a copy of ``model`` (a
    :class:`~ldpruner.passes.remove.PrunedUNet`); writes ``out/student/``. A plan made for other weights (of the
    same architecture: a fine-tune, say) is refused unless ``allow_other_weights``; the student records it.

    ``options``: the trace's latent size (height, width), PruneConfig fields (verify) and DeviceConfig's threads
    (the trace and the verifier run the model)."""
    out = _out(out)
    from ldpruner.passes.plan import RemovalPlan

    o = PruneOptions.from_dict(options)
    plan = plan if isinstance(plan, RemovalPlan) else RemovalPlan.load(Path(plan))
    with place("cpu", o.placement.threads, join=False):  # the model is traced where it was loaded
        return stages.prune(load(model), plan, dataclasses.replace(o.trace, granularity=plan.granularity), o.prune,
                            out=out, overwrite=overwrite, allow_other_weights=allow_other_weights)


def distill(model: ModelLike, student: Any, *, out: str | os.PathLike, data: str | os.PathLike | None = None,
            prompts: str | os.PathLike | None = None, calibration: str | os.PathLike | None = None,
            scheduler: str | os.PathLike | None = None, resume: bool = False, overwrite: bool = False,
            progress: bool = True, allow_other_weights: bool = False, **options: Any) -> Any:
    """Fine-tune a pruned ``student`` (a PrunedUNet or a student/ folder) against the dense ``model`` it was
    pruned from (other weights, or resuming against another teacher, only with ``allow_other_weights``: recorded);
    writes ``out/student/`` (the distilled student), the loss log and plot, ``distill.json`` and
    ``out/checkpoints/``. Returns a :class:`~ldpruner.passes.distill.DistillResult` whose ``student`` is the
    trained copy: an in-memory ``student`` passed in stays as it was.

    ``options``: DistillConfig fields (steps, batch_size, lr, w_out, …) and DeviceConfig's fields (device: where the
    student trains, under torchrun each rank's GPU; threads). ``scheduler``: what the data-free trajectories sample
    with instead of the model's own (see :func:`analyze`). ``data`` None distills data-free on the
    teacher's own sampling trajectories (prompts: ``prompts``, else the model's own prompt set, else the built-in
    one); a folder of images (captions in ``metadata.jsonl`` or ``<image>.txt``) is encoded through the model's
    VAE and adds the denoising (task) loss. ``resume`` continues from the newest checkpoint in ``out``. Under
    torchrun every rank runs this and trains on its own shard; rank 0 writes."""
    out = _out(out)
    import copy

    o = DistillOptions.from_dict(options)
    inputs = InputsConfig(prompts=prompts, calibration=calibration, scheduler=scheduler)
    with place(o.placement.device, o.placement.threads) as placement:
        pruned = copy.deepcopy(student) if not isinstance(student, (str, os.PathLike)) else _load_student(student)
        return stages.distill(stages.load_model(model, inputs),
                              pruned, o.distill, placement, out=out, data=data, prompts_file=inputs.prompts,
                              resume=resume, overwrite=overwrite, progress=progress,
                              allow_other_weights=allow_other_weights)


def export(model: Any, *, out: str | os.PathLike, overwrite: bool = False, controlnet: bool = False,
           adapter: bool = False, **options: Any) -> dict[str, Any]:
    """Export a UNet to ``out/onnx/unet.onnx`` (with ``config.json``), validated against torch; returns what was
    written and the validation numbers. ``model``: a pruned student (a PrunedUNet, a StudentUNet or a student/
    folder) or any model ldpruner loads (a pipeline or UNet folder, ``zoo:``, ``random:``, a diffusers UNet): the
    dense baseline, from the same exporter.

    ``options``: ExportConfig fields (exporter, opset, …), OptimizeConfig fields (optimize: also the
    onnxruntime-optimized model; fp16: also its fp16 variant), DeviceConfig's fields (device — CUDA: the checks run
    on onnxruntime's CUDA provider, the optimizer targets it; threads) and, for a dense model, TraceConfig's height
    and width (the traced latent size; the ONNX model's spatial size stays dynamic). ``controlnet``: the ONNX model also
    takes ControlNet's residuals (``down_block_additional_residual_<i>``, ``mid_block_additional_residual``), as
    optimum's Stable Diffusion ControlNet export does; ``adapter``: T2I-Adapter's features
    (``down_intrablock_additional_residual_<i>``)."""
    out = _out(out)
    o = ExportOptions.from_dict(options)  # checked before exporting
    trace = {name: getattr(o.trace, name) for name in o.trace.given()}
    with place(o.placement.device, o.placement.threads, join=False) as placement:
        return _export(model, o.export, o.variants, placement, out=out, overwrite=overwrite, trace=trace,
                       controlnet=controlnet, adapter=adapter)


def _export(model: Any, config: Any, variants: Any, placement: Any, *, out: Path, overwrite: bool,
            trace: dict[str, Any], controlnet: bool, adapter: bool) -> dict[str, Any]:
    student = getattr(model, "pruned", model)  # a StudentUNet carries its PrunedUNet
    if isinstance(student, (str, os.PathLike)) and _is_student_folder(student):
        student = _load_student(student)
    if hasattr(student, "traced"):
        if trace:
            raise ConfigError(f"height/width ({trace}) apply to a dense model; a student exports at the size it was "
                              "traced at (its ONNX model takes any multiple of the UNet's spatial multiple)")
    else:
        loaded = load(model)
        stages.check_exportable(loaded.unet_config)  # before the trace
        student = stages.dense_as_student(loaded, TraceConfig(**trace))
    if controlnet or adapter:
        from ldpruner.passes.student import with_residual_inputs

        student = with_residual_inputs(student, controlnet=controlnet, adapter=adapter)
    return stages.export(student, config, variants, placement, out=out, overwrite=overwrite)


def lora(student: Any, lora: str | os.PathLike, *, out: str | os.PathLike | None = None, scale: float = 1.0,
         overwrite: bool = False) -> tuple[Any, dict[str, Any]]:
    """Fuse a LoRA trained for the dense UNet (a diffusers / PEFT / kohya ``.safetensors`` file) into a pruned
    ``student`` (a PrunedUNet, a StudentUNet or a student/ folder; never changed): LoRA pairs inside operators the
    plan removed are dropped and counted. Returns (the fused student as a :class:`~ldpruner.unet.StudentUNet`, the
    report); with ``out`` also writes ``out/student/`` and ``out/lora.json``."""
    out = _out(out)
    from ldpruner.unet import StudentUNet

    pruned = getattr(student, "pruned", student)
    if isinstance(pruned, (str, os.PathLike)):
        pruned = _load_student(pruned)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ConfigError(f"scale={scale!r} must be a finite number")
    fused, report = stages.lora(pruned, lora, scale=float(scale), out=out, overwrite=overwrite)
    return StudentUNet(fused), report


def _is_student_folder(path: str | os.PathLike) -> bool:
    from ldpruner.passes.student import TRACE_NAME

    return (Path(path) / TRACE_NAME).is_file()


def bench(models: ModelLike | list[ModelLike] | tuple[ModelLike, ...], *, out: str | os.PathLike,
          progress: bool = True, **options: Any) -> dict[str, Any]:
    """Dense vs pruned (vs pruned + distilled) side by side for each model and budget: params, MACs, torch and
    onnxruntime latency (interleaved, median of repeats), ONNX peak memory and — for zoo models with held-out real
    data — quality on the same seeds. Writes ``out/report.json``, ``out/report.md``, plots and sample grids;
    returns the report.

    ``options``: BenchConfig fields (budgets, metric, distill_steps, distill_options, distill_data, repeats, …)."""
    out = _out(out)
    from ldpruner.bench import run_bench
    from ldpruner.stages.config import BenchConfig

    if isinstance(models, (str, os.PathLike)) or not isinstance(models, (list, tuple)):
        models = [models]
    names, objects = [], {}
    for i, m in enumerate(models):  # an in-memory UNet is benchmarked under a label
        if isinstance(m, (str, os.PathLike)):
            names.append(os.fspath(m))
        else:
            names.append(f"<{type(m).__name__} #{i}>")
            objects[names[-1]] = m
    config = BenchConfig.from_dict({**options, "models": tuple(names), "out": os.fspath(out)})
    return run_bench(config, progress=progress, objects=objects)


def build(model: ModelLike | None = None, *, out: str | os.PathLike | None = None,
          config: str | os.PathLike | None = None, progress: bool = True, **options: Any) -> dict[str, Any]:
    """Run inspect → analyze → select → prune → distill → export into ``out`` and write ``report.json`` /
    ``report.md`` (:mod:`ldpruner.stages.build`); returns the report.

    ``options`` are :class:`~ldpruner.stages.config.BuildConfig` fields (the CLI flags); ``config`` is a TOML file with
    the same keys (keywords win). An artifact whose inputs did not change since the last build into ``out`` is
    reused; one that would change is replaced only with ``overwrite=True``."""
    from ldpruner.base.errors import ConfigError
    from ldpruner.stages.build import build_config, run_build

    if model is not None and not isinstance(model, (str, os.PathLike)):
        raise ConfigError("build takes MODEL as a path or spec string; for an in-memory model use the stage functions")
    return run_build(build_config(model, out=out, config=config, options=options), progress=progress)


def _out(out: str | os.PathLike | None) -> Path | None:
    """The output folder checked before any work: not empty, not a file, writable."""
    from ldpruner.base.io import output_dir

    return output_dir(out) if out is not None else None


def _load_student(path: str | os.PathLike) -> Any:
    from ldpruner.passes.student import load_student

    return load_student(Path(path))
