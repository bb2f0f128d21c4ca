"""The Python API: one function per stage, and :func:`build` that runs them all.

Every keyword here is a CLI flag (``num_samples`` ↔ ``--num-samples``). MODEL is a local diffusers pipeline
folder, a UNet folder, ``random:<family>`` or an in-memory diffusers UNet; the caller's model is never changed.
Outputs are written atomically, and an existing output is replaced only with ``overwrite=True``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from .sources import ZOO_PREFIX, LoadedModel, load_model
from .config import BuildConfig, load_config
from . import distributed
from .errors import ArtifactError, BenchError, ConfigError
from .io import read_json

__all__ = ["inspect", "analyze", "select", "prune", "distill", "export", "bench", "build"]

ModelLike = Any  # str | os.PathLike | torch.nn.Module | LoadedModel

SCORES = "scores.json"
PLAN = "plan.json"
STUDENT = "student"
DISTILL_DIR = "distill"
ONNX_DIR = "onnx"
REPORT = "report.json"
SAMPLES = "samples.png"
_STATE = ".ldpruner-build.json"  # input keys of each stage's artifact, for reuse across builds


def _trace(loaded: LoadedModel, granularity: str, height: int | None, width: int | None):
    from ldpruner.compiler.tracer import trace_unet, unet_example_inputs

    inputs = unet_example_inputs(loaded.unet, batch=2, height=height, width=width)
    return trace_unet(loaded.unet, inputs, granularity=granularity)


def _unet_config(unet: Any) -> dict[str, Any] | None:
    """The diffusers config as plain JSON values (it may hold paths, e.g. ``_name_or_path``)."""
    if not hasattr(unet, "config"):
        return None
    return json.loads(json.dumps(dict(unet.config), default=str))


def _guard(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise ArtifactError(f"{str(path)!r} exists; pass --overwrite (overwrite=True) to replace it")


def inspect(model: ModelLike, *, granularity: str = "block", height: int | None = None, width: int | None = None):
    """Trace ``model`` and describe its operators (an :class:`~ldpruner.compiler.graph.OperatorGraph`)."""
    from ldpruner.compiler.graph import build_operator_graph

    return build_operator_graph(_trace(load_model(model), granularity, height, width))


def _analysis_setup(loaded: LoadedModel, *, granularity, height, width, num_samples, steps, seed, guidance_scale,
                    prompts):
    from ldpruner.compiler.graph import build_operator_graph
    from ldpruner.passes.importance import AnalysisConfig, read_prompt_file

    prompt_list = read_prompt_file(prompts) if prompts else loaded.default_prompts
    config = AnalysisConfig(num_samples=num_samples, steps=steps, seed=seed, height=height, width=width,
                            guidance_scale=guidance_scale, prompts=prompt_list)
    graph = build_operator_graph(_trace(loaded, granularity, height, width))
    calib = loaded.pipeline_dir if loaded.pipeline_dir and (loaded.pipeline_dir / "text_encoder").is_dir() else None
    if loaded.text_encoder_config is not None:
        calib = _zoo_conditioning(loaded, config)
    return graph, config, calib


def _zoo_conditioning(loaded: LoadedModel, config):
    """A zoo text-to-image model's prompts, encoded by the frozen text encoder it was trained with."""
    from ldpruner.passes.importance import DEFAULT_PROMPTS, Conditioning
    from ldpruner.zoo.text import TextEncoder

    encoder = TextEncoder.from_config_file(loaded.text_encoder_config)
    prompts = tuple(config.prompts or DEFAULT_PROMPTS)
    return Conditioning(
        encoder_hidden_states=encoder.encode(list(prompts)),
        negative_encoder_hidden_states=encoder.encode_negative(1),
        source=f"{loaded.source}: {encoder.describe().get('package', 'text encoder')} on {len(prompts)} prompts",
        prompts=prompts,
    )


def analyze(
    model: ModelLike,
    *,
    out: str | os.PathLike | None = None,
    granularity: str = "block",
    height: int | None = None,
    width: int | None = None,
    num_samples: int = 8,
    steps: int = 10,
    seed: int = 0,
    guidance_scale: float = 7.5,
    prompts: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
):
    """Score every removable operator by latent deviation; writes ``out/scores.json`` when ``out`` is given.

    A ``scores.json`` already in ``out`` whose cache key (model weights + config) matches is reused."""
    from ldpruner.passes.importance import analyze_importance, cache_key, load_cached

    loaded = load_model(model)
    graph, config, calib = _analysis_setup(loaded, granularity=granularity, height=height, width=width,
                                           num_samples=num_samples, steps=steps, seed=seed,
                                           guidance_scale=guidance_scale, prompts=prompts)
    path = Path(out) / SCORES if out is not None else None
    if path is not None and path.exists():
        key = cache_key(graph, calib, config=config, scheduler=loaded.scheduler)
        cached = load_cached(path, key)
        if cached is not None:
            return cached
        _guard(path, overwrite)
    return analyze_importance(graph, calib, config=config, scheduler=loaded.scheduler, progress=progress,
                              save_to=path)


def select(
    scores: Any,
    *,
    model: ModelLike | None = None,
    budget: float = 0.3,
    metric: str = "params",
    order: str = "score",
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
):
    """Choose removals under ``budget`` from an ImportanceReport or a scores.json path; writes ``out/plan.json``.

    With ``model`` (the one that was analysed) selection also skips candidates that, together with earlier ones,
    would remove shared modules (see ``OperatorGraph.jointly_removed``); without it such a plan is refused at
    prune time instead."""
    graph = None
    if model is not None:
        report = _load_scores(scores)
        graph = inspect(model, granularity=report.granularity)
    return _select(scores, graph, budget=budget, metric=metric, order=order, out=out, overwrite=overwrite)


def _load_scores(scores: Any):
    from ldpruner.passes.importance import ImportanceReport

    return scores if isinstance(scores, ImportanceReport) else ImportanceReport.load(Path(scores))


def _select(scores: Any, graph: Any, *, budget, metric, order, out, overwrite):
    from ldpruner.passes.select import SelectionConfig, select_removals

    report = _load_scores(scores)
    plan = select_removals(
        report,
        total_params=report.total_params,
        total_macs=report.total_macs,
        model_class=report.model_class,
        granularity=report.granularity,
        config=SelectionConfig(budget=budget, metric=metric, order=order),
        jointly_removed=graph.jointly_removed if graph is not None else None,
    )
    if out is not None:
        path = Path(out) / PLAN
        _guard(path, overwrite)
        plan.save(path)
    return plan


def prune(
    model: ModelLike,
    plan: Any,
    *,
    out: str | os.PathLike | None = None,
    height: int | None = None,
    width: int | None = None,
    overwrite: bool = False,
):
    """Apply a RemovalPlan (or a plan.json path) to a copy of ``model``; writes ``out/student/``."""
    from ldpruner.compiler.graph import build_operator_graph
    from ldpruner.passes.plan import RemovalPlan
    from ldpruner.passes.remove import prune as prune_graph
    from ldpruner.passes.student import save_student

    plan = plan if isinstance(plan, RemovalPlan) else RemovalPlan.load(Path(plan))
    loaded = load_model(model)
    if type(loaded.unet).__name__ != plan.model_class:
        raise ConfigError(f"plan was made for a {plan.model_class}, but the model is a {type(loaded.unet).__name__}")
    traced = _trace(loaded, plan.granularity, height, width)
    graph = build_operator_graph(traced)
    pruned = prune_graph(traced, plan, operator_graph=graph, config=_unet_config(loaded.unet))
    if out is not None:
        path = Path(out) / STUDENT
        _guard(path, overwrite)
        save_student(pruned, path, overwrite=overwrite)
    return pruned


def distill(
    model: ModelLike,
    student: Any,
    *,
    out: str | os.PathLike,
    data: str | os.PathLike | None = None,
    prompts: str | os.PathLike | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    **options: Any,
):
    """Fine-tune a pruned ``student`` (a PrunedUNet or a student/ folder) against the dense ``model`` it was
    pruned from; writes ``out/student/`` (the distilled student), the loss log and plot, ``distill.json`` and
    ``out/checkpoints/``. Returns a :class:`~ldpruner.passes.distill.DistillResult` whose ``student`` is the
    trained copy: an in-memory ``student`` passed in stays as it was.

    ``options`` are :class:`~ldpruner.passes.distill.DistillConfig` fields (steps, batch_size, lr, w_out, …).
    ``data`` None distills data-free on the teacher's own sampling trajectories (prompts: ``prompts``, else the
    model's own prompt set, else the built-in one); a folder of images (captions in ``metadata.jsonl`` or
    ``<image>.txt``) is encoded through the model's VAE and adds the denoising (task) loss. Under torchrun every
    rank runs this and trains on its own shard; rank 0 writes."""
    from ldpruner.passes.distill import DistillConfig
    from ldpruner.passes.distill import distill as run_distill
    from ldpruner.passes.remove import PrunedUNet, count_params
    from ldpruner.passes.student import load_student

    config = DistillConfig.from_dict(options)
    loaded = load_model(model)
    # train a copy: the caller's pruned model stays comparable to the distilled one
    pruned = copy.deepcopy(student) if isinstance(student, PrunedUNet) else load_student(Path(student))
    if type(loaded.unet).__name__ != pruned.plan.model_class:
        raise ConfigError(f"the student was pruned from a {pruned.plan.model_class}, MODEL is a "
                          f"{type(loaded.unet).__name__}")
    teacher = _teacher_trace(loaded, pruned)
    if count_params(teacher.gm) != pruned.plan.total_params:
        raise ConfigError(f"MODEL has {count_params(teacher.gm):,} UNet parameters, the student's plan was made for "
                          f"{pruned.plan.total_params:,}: pass the dense model the student was pruned from")
    joined = distributed.join(distributed.default_device())
    rank, world = joined.rank, joined.size
    try:
        source = _distill_data(loaded, teacher, config, data=data, prompts=prompts, rank=rank, world=world,
                               progress=progress)
        return run_distill(pruned, teacher, source, config=config, out=out, resume=resume, overwrite=overwrite,
                           progress=progress)
    finally:
        distributed.leave(joined)


def _teacher_trace(loaded: LoadedModel, pruned: Any):
    """The dense model traced like the student (same inputs, shapes, granularity), to be its frozen teacher."""
    from ldpruner.compiler.tracer import trace_unet

    traced = pruned.traced
    return trace_unet(loaded.unet, {n: traced.example_inputs[n] for n in traced.input_names},
                      granularity=traced.granularity.value)


def _distill_data(loaded: LoadedModel, teacher: Any, config: Any, *, data, prompts, rank: int, world: int,
                  progress: bool):
    from ldpruner.passes.distill.data import LatentData, TeacherTrajectories
    from ldpruner.passes.importance import AnalysisConfig, _scheduler_record, read_prompt_file, resolve_conditioning

    scheduler, _ = _scheduler_record(loaded.scheduler)
    sample = teacher.example_inputs[teacher.input_names[0]]
    prompt_list = read_prompt_file(prompts) if prompts else loaded.default_prompts
    analysis = AnalysisConfig(num_samples=config.trajectories, seed=config.seed, prompts=prompt_list,
                              height=int(sample.shape[-2]), width=int(sample.shape[-1]))
    if data is not None:
        from ldpruner.passes.distill.datasets import encode_dataset

        latents, captions = encode_dataset(loaded, Path(data), latent_size=tuple(sample.shape[-2:]),
                                           progress=progress and rank == 0)
        conditioning = cond_ids = None
        if "encoder_hidden_states" in teacher.input_names:
            if captions is None:
                raise ConfigError(f"{str(data)!r} has no captions, and {teacher.model_class} is conditioned on "
                                  "text: add metadata.jsonl ({\"file_name\": ..., \"text\": ...} per line) or "
                                  "<image>.txt beside each image")
            unique = tuple(dict.fromkeys(captions))
            conditioning = _caption_conditioning(loaded, teacher, unique, analysis)
            import torch

            cond_ids = torch.tensor([unique.index(c) for c in captions], dtype=torch.int64)
        return LatentData(latents, scheduler, teacher.input_names, conditioning=conditioning, cond_ids=cond_ids,
                          source=str(data), rank=rank, world=world)
    calib = None
    if loaded.text_encoder_config is not None:
        calib = _zoo_conditioning(loaded, analysis)
    elif loaded.pipeline_dir is not None and (loaded.pipeline_dir / "text_encoder").is_dir():
        calib = loaded.pipeline_dir
    conditioning = resolve_conditioning(teacher, calib, analysis)
    return TeacherTrajectories(
        teacher.gm, teacher.input_names, scheduler, conditioning=conditioning,
        latent_shape=tuple(sample.shape[1:]), trajectories=config.trajectories, steps=config.trajectory_steps,
        guidance_scale=config.guidance_scale, seed=config.seed, renoise=config.renoise, rank=rank, world=world,
        batch_size=max(1, config.batch_size), progress=progress and rank == 0)


def _caption_conditioning(loaded: LoadedModel, teacher: Any, captions: tuple[str, ...], analysis: Any):
    import dataclasses

    from ldpruner.passes.importance import encode_prompts, resolve_conditioning

    if loaded.text_encoder_config is not None:
        return _zoo_conditioning(loaded, dataclasses.replace(analysis, prompts=captions))
    if loaded.pipeline_dir is not None and (loaded.pipeline_dir / "text_encoder").is_dir():
        return resolve_conditioning(teacher, encode_prompts(loaded.pipeline_dir, captions), analysis)
    raise ConfigError(f"{loaded.source} has no text encoder to encode the dataset's captions with: pass a pipeline "
                      "folder with tokenizer/ and text_encoder/, or distill data-free (no data)")


def export(
    student: Any,
    *,
    out: str | os.PathLike,
    exporter: str = "legacy",
    opset: int | None = None,
    optimize: bool = False,
    fp16: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Export a pruned student (a PrunedUNet or a student/ folder) to ``out/onnx/unet.onnx``, validated against
    torch; with ``optimize`` also the onnxruntime-optimized model (and its fp16 variant with ``fp16``)."""
    from ldpruner.passes.onnx.export import ExportConfig, export_onnx
    from ldpruner.passes.remove import PrunedUNet
    from ldpruner.passes.student import load_student

    if fp16 and not optimize:
        raise ConfigError("fp16=True needs optimize=True: the fp16 variant is made from the optimized model")
    pruned = student if isinstance(student, PrunedUNet) else load_student(Path(student))
    onnx_dir = Path(out) / ONNX_DIR
    result = export_onnx(
        pruned.traced, None, None, onnx_dir / "unet.onnx",
        config=ExportConfig(exporter=exporter, opset=opset),
        unet_config=pruned.config,
        overwrite=overwrite,
    )
    summary: dict[str, Any] = {"export": result.to_dict()}
    if optimize:
        import onnxruntime as ort

        from ldpruner.passes.onnx.optimize import optimize_onnx

        use_gpu = "CUDAExecutionProvider" in ort.get_available_providers()
        variants = [("optimized", "unet.opt.onnx", False)] + ([("fp16", "unet.fp16.onnx", True)] if fp16 else [])
        for name, filename, half in variants:
            opt = optimize_onnx(result.onnx_path, onnx_dir / filename, use_gpu=use_gpu, fp16=half,
                                overwrite=overwrite)
            summary[name] = opt.to_dict()
    return summary


# --- bench -------------------------------------------------------------------------------------------------------

def bench(
    models: ModelLike | list[ModelLike] | tuple[ModelLike, ...],
    *,
    out: str | os.PathLike,
    budgets: tuple[float, ...] | list[float] = (0.1, 0.2, 0.3, 0.4, 0.5),
    metric: str = "params",
    distill_steps: int = 0,
    repeats: int = 10,
    warmup: int = 3,
    batch_sizes: tuple[int, ...] | list[int] = (1, 2),
    quality: bool = True,
    samples: int = 100,
    sample_steps: int = 25,
    num_samples: int = 8,
    steps: int = 10,
    threads: int | None = None,
    memory: bool = True,
    distill_options: dict[str, Any] | None = None,
    distill_data: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Dense vs pruned (vs pruned + distilled) side by side for each model and budget: params, MACs, torch and
    onnxruntime latency at each batch size (interleaved, median of ``repeats``), ONNX peak memory and — for zoo
    models with held-out real data — quality on the same seeds. Writes ``out/report.json``, ``out/report.md``,
    plots and sample grids; returns the report. ``distill_options`` are extra DistillConfig fields;
    ``distill_data`` a dataset folder to distil on (one model per run; data-free without it)."""
    if isinstance(models, (str, os.PathLike)) or not isinstance(models, (list, tuple)):
        models = [models]
    names, objects = [], {}
    for i, m in enumerate(models):  # an in-memory UNet is benchmarked under a label
        if isinstance(m, (str, os.PathLike)):
            names.append(os.fspath(m))
        else:
            names.append(f"<{type(m).__name__} #{i}>")
            objects[names[-1]] = m
    from ldpruner.bench import BenchConfig, run_bench

    config = BenchConfig(
        models=tuple(names), out=os.fspath(out), budgets=tuple(float(b) for b in budgets),
        metric=metric, distill_steps=distill_steps, repeats=repeats, warmup=warmup, batch_sizes=tuple(batch_sizes),
        quality=quality, samples=samples, sample_steps=sample_steps, num_samples=num_samples, steps=steps,
        threads=threads, memory=memory, distill_options=dict(distill_options or {}),
        distill_data=os.fspath(distill_data) if distill_data is not None else None, overwrite=overwrite)
    return run_bench(config, progress=progress, objects=objects)


# --- build -------------------------------------------------------------------------------------------------------

def _stage_key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_state(out: Path) -> dict[str, str]:
    """The input keys of the last build's stages (empty when there was none or the file is unreadable: every
    stage then runs again, and guards its outputs)."""
    try:
        return read_json(out / _STATE, what="build state")
    except ArtifactError:
        return {}


def build(model: ModelLike | None = None, *, out: str | os.PathLike | None = None,
          config: str | os.PathLike | None = None, progress: bool = True, **options: Any) -> dict[str, Any]:
    """Run inspect → analyze → select → prune → export into ``out`` and write ``report.json`` / ``report.md``.

    ``options`` are :class:`~ldpruner.config.BuildConfig` fields (the CLI flags); ``config`` is a TOML file with
    the same keys (keywords win). An artifact whose inputs did not change since the last build into ``out`` is
    reused; one that would change is replaced only with ``overwrite=True``."""
    from ldpruner.io import write_text_atomic
    from ldpruner.passes.importance import analyze_importance, cache_key

    given = {k: v for k, v in options.items() if v is not None}
    if model is not None and not isinstance(model, (str, os.PathLike)):
        raise ConfigError("build takes MODEL as a path or spec string; for an in-memory model use the stage functions")
    if model is not None:
        given["model"] = os.fspath(model)
    if out is not None:
        given["out"] = os.fspath(out)
    cfg = load_config(config, **given) if config is not None else BuildConfig.from_dict(given)
    out_dir = Path(cfg.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ArtifactError(f"--out {cfg.out!r} is a file, not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    state = _read_state(out_dir)
    timings: dict[str, float] = {}
    reused: list[str] = []

    def stage(name: str, key: str, artifact: Path, run) -> Any:
        """Run a stage unless its artifact exists with the same input key; guard replacement."""
        if artifact.exists() and state.get(name) == key:
            reused.append(name)
            return None
        _guard(artifact, cfg.overwrite)
        t0 = time.perf_counter()
        result = run()
        timings[name] = round(time.perf_counter() - t0, 3)
        state[name] = key
        if rank == 0:
            write_text_atomic(out_dir / _STATE, json.dumps(state, indent=2))
        return result

    t0 = time.perf_counter()
    loaded = load_model(cfg.model)
    # under torchrun every rank scores its share of the candidates; rank 0 alone writes and runs the rest
    joined = distributed.join(next(loaded.unet.parameters()).device)
    rank, world = joined.rank, joined.size
    graph, analysis_config, calib = _analysis_setup(
        loaded, granularity=cfg.granularity, height=cfg.height, width=cfg.width, num_samples=cfg.num_samples,
        steps=cfg.steps, seed=cfg.seed, guidance_scale=cfg.guidance_scale, prompts=cfg.prompts)
    timings["load+trace"] = round(time.perf_counter() - t0, 3)
    from ldpruner.passes.select import SelectionConfig, check_budget

    # an unreachable budget is known from the operator graph alone: fail before the costly analysis
    check_budget(graph.candidates, total_params=graph.total_params, total_macs=graph.total_macs,
                 config=SelectionConfig(budget=cfg.budget, metric=cfg.metric, order=cfg.order))
    if rank == 0:
        write_text_atomic(out_dir / "operators.txt", graph.table() + "\n")
        write_text_atomic(out_dir / "operators.json", graph.to_json() + "\n")

    # analyze: keyed by model weights + analysis config (the importance pass's own cache key)
    analysis_key = cache_key(graph, calib, config=analysis_config, scheduler=loaded.scheduler)
    scores_path = out_dir / SCORES
    stage("analyze", analysis_key, scores_path,
          lambda: analyze_importance(graph, calib, config=analysis_config, scheduler=loaded.scheduler,
                                     progress=progress, save_to=scores_path))
    rank_summary = {"summary": f"rank {rank} of {world}: scored its share of the candidates"
                               f"{' and trained on its data shard' if cfg.distill_steps else ''}; rank 0 writes "
                               "the build", "timings_s": timings}
    if rank != 0 and not cfg.distill_steps:
        return rank_summary

    from ldpruner.passes.plan import RemovalPlan
    from ldpruner.passes.remove import prune as prune_graph
    from ldpruner.passes.student import save_student

    selection = {"budget": cfg.budget, "metric": cfg.metric, "order": cfg.order}
    select_key = _stage_key(analysis_key, selection)
    prune_key = _stage_key(select_key, cfg.height, cfg.width)
    pruned_holder: dict[str, Any] = {}
    if rank == 0:
        stage("select", select_key, out_dir / PLAN,
              lambda: _select(scores_path, graph, out=out_dir, overwrite=True, **selection))

        def run_prune():
            pruned = prune_graph(graph.traced, plan, operator_graph=graph, config=_unet_config(loaded.unet))
            save_student(pruned, out_dir / STUDENT, overwrite=True)
            pruned_holder["pruned"] = pruned
            return pruned

        plan = RemovalPlan.load(out_dir / PLAN)
        stage("prune", prune_key, out_dir / STUDENT, run_prune)
    if world > 1:  # the other ranks wait for rank 0's student/, then every rank distills on its own shard
        import torch.distributed as dist

        dist.barrier()

    # distill: a copy of the student trained against the dense model, in distill/student (student/ stays the
    # pruned-only model, so a change of distillation settings never trains an already-distilled student again)
    student_key = prune_key
    if cfg.distill_steps:
        distill_options = {"steps": cfg.distill_steps, "seed": cfg.seed, "guidance_scale": cfg.guidance_scale}
        distill_key = _stage_key(prune_key, distill_options, cfg.prompts)

        def run_distill():
            from ldpruner.passes.student import load_student

            result = distill(loaded, load_student(out_dir / STUDENT), out=out_dir / DISTILL_DIR,
                             prompts=cfg.prompts, overwrite=True, progress=progress, **distill_options)
            pruned_holder["pruned"] = result.student
            return result

        stage("distill", distill_key, out_dir / DISTILL_DIR / "distill.json", run_distill)
        if "distill" in reused:
            pruned_holder.pop("pruned", None)
        student_key = distill_key
    if rank != 0:
        return rank_summary
    student_dir = out_dir / DISTILL_DIR / STUDENT if cfg.distill_steps else out_dir / STUDENT

    export_options = {"exporter": cfg.exporter, "opset": cfg.opset, "optimize": cfg.optimize, "fp16": cfg.fp16}
    export_key = _stage_key(student_key, export_options)
    export_summary_path = out_dir / ONNX_DIR / "export.json"

    def run_export():
        summary = export(pruned_holder.get("pruned") or student_dir, out=out_dir, overwrite=True,
                         **export_options)
        write_text_atomic(export_summary_path, json.dumps(summary, indent=2, default=str) + "\n")
        return summary

    stage("export", export_key, export_summary_path, run_export)

    # zoo models: one look at the result, dense / pruned / distilled on the same seeds and prompts
    rows = _sample_rows(loaded, cfg)
    if rows:
        def run_samples():
            from ldpruner.passes.student import load_student
            from ldpruner.runtime.graph_unet import GraphUNet
            from ldpruner.zoo.preview import preview_grid

            folders = {"pruned": out_dir / STUDENT, "distilled": out_dir / DISTILL_DIR / STUDENT}
            variants = {r: None if r == "dense" else GraphUNet.of(load_student(folders[r])) for r in rows}
            return preview_grid(loaded.source.removeprefix(ZOO_PREFIX), variants, out_dir / SAMPLES)

        stage("samples", _stage_key(student_key, prune_key, "samples/1"), out_dir / SAMPLES, run_samples)

    report = _build_report(cfg, loaded, graph, plan, out_dir, timings, reused)
    write_text_atomic(out_dir / REPORT, json.dumps(report, indent=2, default=str) + "\n")
    write_text_atomic(out_dir / "report.md", _report_markdown(report))
    return report


def _build_report(cfg: BuildConfig, loaded: LoadedModel, graph, plan, out_dir: Path, timings, reused) -> dict:
    from ldpruner.passes.importance import ImportanceReport

    scores = ImportanceReport.load(out_dir / SCORES)
    export_summary = json.loads((out_dir / ONNX_DIR / "export.json").read_text())
    validation = export_summary["export"]["validation"]
    totals = plan.to_dict()["totals"]
    removed = [dict(r.to_dict(), kind=graph[r.name].kind) for r in plan.removals]
    sample_rows = _sample_rows(loaded, cfg)
    summary = (
        f"{cfg.model}: removed {len(plan.removals)} of {len(graph.candidates)} candidate operators; "
        f"UNet params {totals['params_before']:,} -> {totals['params_after']:,} "
        f"(-{totals['params_removed_fraction']:.1%}), MACs/sample -{totals['macs_removed_fraction']:.1%}; "
        f"ONNX {'validated' if validation.get('passed') else 'NOT validated'} "
        f"(max abs diff {validation.get('max_abs_diff', float('nan')):.2e}); report: {out_dir / 'report.md'}"
    )
    return {
        "format": "ldpruner.report/1",
        "summary": summary,
        "config": cfg.to_dict(),
        "model": loaded.describe(),
        "trace": graph.traced.validity(),
        "operators": {"total": len(graph.operators), "candidates": len(graph.candidates)},
        "params": {"dense": totals["params_before"], "pruned": totals["params_after"],
                   "removed_fraction": totals["params_removed_fraction"]},
        "macs_per_sample": {"dense": totals["macs_per_sample_before"], "pruned": totals["macs_per_sample_after"],
                            "removed_fraction": totals["macs_removed_fraction"],
                            "at_latent_shape": graph.traced.validity()["traced_sample_shape"][1:]},
        "analysis": {"conditioning": scores.conditioning, "unet_calls": scores.unet_calls,
                     "wall_time_s": scores.wall_time_s, "scheduler": scores.scheduler},
        "removed": removed,
        "distill": _distill_report(out_dir / DISTILL_DIR) if cfg.distill_steps else None,
        "samples": {"path": str(out_dir / SAMPLES), "rows": sample_rows} if sample_rows else None,
        "export": export_summary,
        "timings_s": timings,
        "reused_stages": reused,
        "artifacts": {name: str(out_dir / name) for name in
                      (SCORES, PLAN, STUDENT, *([f"{DISTILL_DIR}/{STUDENT}"] if cfg.distill_steps else []),
                       f"{ONNX_DIR}/unet.onnx", "operators.txt", REPORT, "report.md",
                       *([SAMPLES] if sample_rows else []))},
    }


def _sample_rows(loaded: LoadedModel, cfg: BuildConfig) -> list[str]:
    """The rows of build's samples.png (zoo models only: they know how to sample and decode)."""
    if not loaded.source.startswith(ZOO_PREFIX):
        return []
    return ["dense", "pruned"] + (["distilled"] if cfg.distill_steps else [])


def _distill_report(folder: Path) -> dict[str, Any]:
    summary = json.loads((folder / "distill.json").read_text())
    return {"steps": summary["steps"], "wall_time_s": summary["wall_time_s_this_run"],
            "data": summary["data"]["kind"], "feature_taps": summary["feature_taps"]["groups"],
            "loss_first_10pct": summary["loss_first_10pct"], "loss_last_10pct": summary["loss_last_10pct"],
            "student": str(folder / STUDENT), "loss_plot": str(folder / "loss.png"),
            "loss_log": str(folder / "loss.csv")}


def _report_markdown(report: dict[str, Any]) -> str:
    p, m = report["params"], report["macs_per_sample"]
    val = report["export"]["export"]["validation"]
    lines = [
        "# ldpruner build report",
        "",
        report["summary"],
        "",
    ]
    if report["model"].get("random_weights"):
        lines += ["> **Random weights.** This model was created from a config with random weights: the numbers",
                  "> below prove the pipeline, not pruning quality.", ""]
    lines += [
        "| | dense | pruned | removed |",
        "|---|---:|---:|---:|",
        f"| UNet parameters | {p['dense']:,} | {p['pruned']:,} | {p['removed_fraction']:.1%} |",
        f"| MACs / sample at latent {'x'.join(map(str, m['at_latent_shape']))} | {m['dense']:,} | {m['pruned']:,} "
        f"| {m['removed_fraction']:.1%} |",
        "",
        f"## Removed operators ({len(report['removed'])})",
        "",
        "| operator | kind | action | LD score | params |",
        "|---|---|---|---:|---:|",
    ]
    for r in report["removed"]:
        lines.append(f"| `{r['name']}` | {r['kind']} | {r['action']} | {r['score']:.4g} | {r['params']:,} |")
    d = report.get("distill")
    if d:
        first, last = d["loss_first_10pct"], d["loss_last_10pct"]
        lines += [
            "",
            f"## Distillation ({d['steps']} steps, {d['data']}, {d['wall_time_s']:.0f} s)",
            "",
            "| loss term | first 10 % of steps | last 10 % of steps |",
            "|---|---:|---:|",
            *[f"| {k} | {first[k]:.4g} | {last[k]:.4g} |" for k in ("loss", "out", "feat", "task") if first[k] or last[k]],
            "",
            f"Feature taps: {', '.join(f'`{g}`' for g in d['feature_taps'])}. Distilled student: `{d['student']}`; "
            f"loss log `{d['loss_log']}`.",
            "",
            f"![distillation loss]({DISTILL_DIR}/loss.png)",
        ]
    if report.get("samples"):
        lines += ["", "## Samples", "",
                  f"Rows: {', '.join(report['samples']['rows'])} — the same seeds (and prompts) in every row; quality "
                  "numbers come from `ldpruner bench`.", "", f"![samples]({SAMPLES})"]
    lines += [
        "",
        "## Export",
        "",
        f"- ONNX: `{report['artifacts']['onnx/unet.onnx']}`; validation against torch: "
        f"{'passed' if val.get('passed') else 'FAILED'}, max abs diff {val.get('max_abs_diff', float('nan')):.2e}",
        f"- trace validity: {report['trace']['note']}",
        f"- analysis: {report['analysis']['unet_calls']} UNet calls in {report['analysis']['wall_time_s']:.1f} s, "
        f"conditioning: {report['analysis']['conditioning']}",
        f"- stage timings (s): {json.dumps(report['timings_s'])}; reused: {report['reused_stages'] or 'none'}",
        "",
    ]
    return "\n".join(lines)
