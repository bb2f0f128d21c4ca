"""``ldpruner build``: every stage into one folder, as a declared sequence (:data:`STAGES`).

Each :class:`~ldpruner.stages.record.Stage` names its artifact (a path in the build folder), the stage whose result it
reads, the inputs its result depends on, and how to run it; the stage adapters here run :mod:`ldpruner.stages` on the
build's loaded objects. The analysis, which reads no stage, is keyed by the importance pass's own cache key, the costs
by theirs. :mod:`ldpruner.stages.record` decides which stages are reused from the folder (``.ldpruner-build.json`` keeps
their keys and the sha256 of every file each wrote), which are made again, and which files need ``overwrite``.
Under torchrun the stages marked ``all_ranks`` run on every rank (the analysis scores its share of the candidates,
distillation trains on its shard of the data), as rank 0 decides; rank 0 alone runs the others and writes the report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import time
from pathlib import Path
from typing import Any

from ldpruner import stages
from ldpruner.base import devices, distributed
from ldpruner.base.errors import ArtifactError, ConfigError
from ldpruner.base.io import output_dir, sha256_file, write_json_atomic, write_text_atomic
from ldpruner.base.placement import Placement, place
from ldpruner.sources import LoadedModel
from ldpruner.stages import calibration, report
from ldpruner.stages.config import BuildConfig
from ldpruner.stages.record import FILES, PENDING, STATE_FILE, Stage, check_out_is_ours, lock, read_state, run_stages

__all__ = ["STAGES", "STATE_FILE", "BuildFolder", "Stage", "is_build_folder", "read_build_folder", "run_build"]


@dataclasses.dataclass
class Build:
    """What the stages of one build share: the config, the loaded model and analysis inputs, the keys so far."""

    cfg: BuildConfig
    out: Path
    progress: bool
    loaded: LoadedModel
    graph: Any  # the dense model's OperatorGraph
    analysis: Any  # AnalysisConfig
    calib: Any  # the analysis' conditioning source
    placement: Placement  # device, threads (torch's and onnxruntime's, in every stage) and torchrun world
    state: dict[str, Any]  # the build record (ldpruner.stages.record)
    analysis_key: str  # the importance pass's own cache key: weights, options, conditioning, scheduler
    description: dict[str, Any]  # the loaded model's, for the report (the model itself is let go before the export)
    keys: dict[str, str] = dataclasses.field(default_factory=dict)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    reused: list[str] = dataclasses.field(default_factory=list)
    ran_with: dict[str, int] = dataclasses.field(default_factory=dict)  # the threads of each stage run in this build
    students: dict[str, Any] = dataclasses.field(default_factory=dict)  # made in this run, by stage: not reloaded
    found: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)  # sha256 of each stage's files now

    @property
    def overwrite(self) -> bool:
        return self.cfg.overwrite

    @property
    def world(self) -> distributed.World:
        return self.placement.world

    @property
    def threads(self) -> int:
        return self.placement.threads

    def enabled(self, name: str) -> bool:
        return next(s for s in STAGES if s.name == name).enabled(self)

    def student(self, stage: str) -> Any:
        """The student the ``stage`` stage wrote: from memory when it ran in this build, else from its folder."""
        if stage in self.students:
            return self.students[stage]
        from ldpruner.passes.student import load_student

        return load_student(self.out / STUDENT_FOLDERS[stage])


def _timed(b: Build) -> bool:
    """The budget is latency: the build measures costs first and checks the student's latency after pruning."""
    return b.cfg.selection.metric == "latency"


def _costs(b: Build) -> None:
    stages.costs(b.loaded, b.cfg.trace, b.cfg.costs, b.placement,
                 out=b.out, overwrite=True, progress=b.progress)


def _costs_differ(b: Build) -> str | None:
    """How the costs there were measured, where this build would measure them otherwise (threads, device)."""
    from ldpruner.passes.cost_report import CostReport

    try:
        there = CostReport.load(b.out / stages.COSTS.name).placement
    except (ArtifactError, OSError):
        return None
    now = {"threads": b.placement.threads, "device": str(b.placement.device)}
    changed = [f"{name} {there.get(name)} here, {value} now" for name, value in now.items() if there.get(name) != value]
    if not changed:
        return None
    return (f"the costs there were measured with other settings: {', '.join(changed)}; pass "
            f"--threads {there.get('threads')} to reuse them")


def _onnx_differs(b: Build) -> str | None:
    """An ONNX model there whose text length is fixed (an earlier ldpruner's export)."""
    try:
        axes = stages.EXPORT_SUMMARY.read(b.out / EXPORT_SUMMARY)["export"]["dynamic_axes"]
    except (ArtifactError, KeyError, TypeError):
        return None
    if "encoder_hidden_states" not in axes or "1" in axes["encoder_hidden_states"]:
        return None
    return ("the ONNX model there takes a fixed number of tokens, as an earlier ldpruner exported it, and pipelines "
            "with another text length cannot use it: --overwrite exports it again with the text length free")


def _cost_report(b: Build) -> Any:
    from ldpruner.passes.cost_report import CostReport

    return CostReport.load(b.out / stages.COSTS.name) if _timed(b) else None


def _analyze(b: Build) -> None:
    if _timed(b):  # an unreachable latency budget is known from the costs: fail before the costly analysis
        from ldpruner.passes.select import check_budget

        check_budget(b.graph.candidates, total_params=b.graph.total_params, total_macs=b.graph.total_macs,
                     config=b.cfg.selection, costs=_cost_report(b))
    stages.analyze(b.loaded, b.graph, b.analysis, b.calib, b.placement, out=b.out, overwrite=True,
                   progress=b.progress)


def _rewrite_graph(b: Build) -> Any:
    """The operator graph selection and the rewrite work on: the analysis' own when it traced the loaded UNet as it
    is, else (the analysis ran on a cast or moved copy) a trace of the loaded UNet, and the copy is let go."""
    param, loaded = next(b.graph.traced.gm.parameters()), next(b.loaded.unet.parameters())
    if (param.dtype, param.device) != (loaded.dtype, loaded.device):
        b.graph = None
        gc.collect()  # fx graphs hold reference cycles: free the copy now, before the trace that replaces it
        b.graph = stages.inspect(b.loaded, b.cfg.trace)
    return b.graph


def _select(b: Build) -> None:
    from ldpruner.passes.scores import ImportanceReport

    # the joint score and the set search sample as the analysis did: on its graph, options, conditioning, scheduler
    sampling = stages.Sampling(b.graph, b.analysis, b.calib, calibration.sampling_scheduler(b.loaded)[0])
    stages.select(ImportanceReport.load(b.out / stages.SCORES.name), _rewrite_graph(b), b.cfg.selection,
                  out=b.out, overwrite=True, cost_report=_cost_report(b), sampling=sampling, placement=b.placement,
                  progress=b.progress)
    del sampling
    gc.collect()  # the analysis' cast copy, when the rewrite graph replaced it: not held beside the student


def _prune(b: Build) -> None:
    from ldpruner.passes.plan import RemovalPlan

    b.students["prune"] = stages.prune(b.loaded, RemovalPlan.load(b.out / stages.PLAN.name), b.cfg.trace,
                                       b.cfg.prune, out=b.out, overwrite=True, graph=_rewrite_graph(b))


def _latency(b: Build) -> None:
    stages.check_latency(b.loaded, b.student("prune"), _cost_report(b), b.cfg.trace, b.placement,
                         tolerance=b.cfg.check.latency_tolerance,
                         precision=b.cfg.check.latency_precision, out=b.out,
                         overwrite=True)


def _distill_options(b: Build) -> dict[str, Any]:
    """What the distillation's result depends on: its steps, seed and guidance, and every other DistillConfig field
    set on purpose (a new option is in the key with no other edit)."""
    d = b.cfg.distill
    return {"steps": d.steps, "seed": d.seed, "guidance_scale": d.guidance_scale, **_given(d)}


def _selection_options(b: Build) -> dict[str, Any]:
    """What the plan depends on: the budget, its metric and the order, and every other SelectionConfig field set on
    purpose (the set search's, for one)."""
    s = b.cfg.selection
    return {"budget": s.budget, "metric": s.metric, "order": s.order, **_given(s)}


def _given(config: Any) -> dict[str, Any]:
    """The fields of ``config`` set on purpose, as a stage key records them."""
    values = config.to_dict()
    return {name: values[name] for name in sorted(config.given())}


def _distill(b: Build) -> None:
    # the student trains into distill/student while student/ stays the pruned-only model, so a change of
    # distillation settings never trains an already distilled student again; the pruned student of this run (saved
    # already) trains in place rather than beside a reloaded copy, which would hold the model twice
    from ldpruner.passes.student import load_student

    pruned = b.students.pop("prune", None)
    pruned = pruned if pruned is not None else load_student(b.out / stages.STUDENT)
    result = stages.distill(b.loaded, pruned, b.cfg.distill, b.placement,
                            out=b.out / stages.DISTILL_DIR, data=None, prompts_file=b.cfg.inputs.prompts,
                            resume=False, overwrite=True, progress=b.progress,
                            consume=True)  # no later stage needs the dense model (samples reload the zoo's own)
    b.students["distill"] = result.student


def _final_student(b: Build) -> str:
    """The stage whose student is exported: the distilled one when distillation is on, else the pruned one."""
    return "distill" if b.enabled("distill") else "prune"


def _export(b: Build) -> None:
    student = b.student(_final_student(b))
    if b.cfg.controlnet or b.cfg.adapter:
        from ldpruner.passes.student import with_residual_inputs

        student = with_residual_inputs(student, controlnet=b.cfg.controlnet, adapter=b.cfg.adapter)
    # no later stage needs the dense model: let it go, so that a full-size model and its exported student are not
    # in memory together (the ONNX export holds a second copy of the student's weights while it writes them)
    b.loaded.release()
    b.graph = None
    gc.collect()
    stages.export(student, b.cfg.export, b.cfg.variants, b.placement, out=b.out,
                  overwrite=True)  # writes EXPORT_SUMMARY


def _on_cuda(b: Build) -> bool:
    """The export's checks and optimizer target CUDA (other fusions, another provider: another artifact)."""
    return b.placement.on_cuda_provider


def sample_rows(b: Build) -> list[str]:
    """The rows of samples.png (zoo models only: they know how to sample and decode their outputs; none with
    ``--no-samples``)."""
    if b.loaded.zoo_name is None or not b.cfg.samples:
        return []
    return ["dense", "pruned"] + (["distilled"] if b.enabled("distill") else [])


def _samples(b: Build) -> None:
    from ldpruner.passes.student import load_student
    from ldpruner.runtime.graph_unet import GraphUNet
    from ldpruner.zoo.preview import preview_grid

    # reloaded from the folders on purpose: the grid shows the saved students
    variants = {row: None if row == "dense" else GraphUNet.of(load_student(b.out / STUDENT_FOLDERS[stage]))
                for row, stage in (("dense", None), ("pruned", "prune"), ("distilled", "distill"))
                if row in sample_rows(b)}
    preview_grid(b.loaded.zoo_name, variants, b.out / report.SAMPLES)


EXPORT_SUMMARY = f"{stages.ONNX_DIR}/{stages.EXPORT_SUMMARY.name}"
DISTILL_SUMMARY = f"{stages.DISTILL_DIR}/{stages.DISTILL_SUMMARY.name}"
STUDENT_FOLDERS = {"prune": stages.STUDENT, "distill": f"{stages.DISTILL_DIR}/{stages.STUDENT}"}

STAGES: tuple[Stage, ...] = (
    Stage("costs", stages.COSTS.name, reads=(), inputs=lambda b: (_cost_key(b),), run=_costs, enabled=_timed,
          own_cache=True, explain=_costs_differ),
    Stage("analyze", stages.SCORES.name, reads=(), all_ranks=True,
          inputs=lambda b: (b.analysis_key,), run=_analyze, own_cache=True),
    Stage("select", stages.PLAN.name, reads=("analyze",), all_ranks=True,  # the set search shares its sets
          inputs=lambda b: (_selection_options(b),) + ((b.keys["costs"],) if _timed(b) else ()),
          run=_select, uses=("costs",)),
    Stage("prune", stages.STUDENT, reads=("select",),
          inputs=lambda b: (b.cfg.trace.height, b.cfg.trace.width), run=_prune),
    Stage("latency", stages.LATENCY.name, reads=("prune",),
          inputs=lambda b: (b.cfg.check.latency_tolerance, b.cfg.check.latency_precision), run=_latency, enabled=_timed,
          uses=("costs",)),
    Stage("distill", DISTILL_SUMMARY, reads=("prune",), all_ranks=True,
          inputs=lambda b: (_distill_options(b), b.cfg.inputs.prompts, _file_digest(b.cfg.inputs.calibration)),
          run=_distill,
          enabled=lambda b: b.cfg.distill.steps > 0,
          outputs=(DISTILL_SUMMARY, STUDENT_FOLDERS["distill"])),
    Stage("export", EXPORT_SUMMARY, reads=("distill", "prune"),
          inputs=lambda b: ({"exporter": b.cfg.export.exporter, "opset": b.cfg.export.opset,
                             "optimize": b.cfg.variants.optimize, "fp16": b.cfg.variants.fp16,
                             "controlnet": b.cfg.controlnet, "adapter": b.cfg.adapter}
                            | _given(b.cfg.export) | ({"target": "cuda"} if _on_cuda(b) else {}),
                            "onnx/2"),  # the format: the text length free (an earlier export fixed it)
          run=_export, outputs=(stages.ONNX_DIR,), explain=_onnx_differs),
    Stage("samples", report.SAMPLES, reads=("distill", "prune"),
          inputs=lambda b: (b.keys["prune"], "samples/1"), run=_samples, enabled=lambda b: bool(sample_rows(b))),
)


def _file_digest(path: str | None) -> str | None:
    """sha256 of a file the build reads (its content, not its name, decides whether a stage reruns)."""
    return sha256_file(Path(path)) if path is not None else None


def _cost_key(b: Build) -> str:
    """The cost stage's key: the costs' own cache key (graph, options, device, runtime versions), from the graph
    already traced (operators and shapes are the same at any dtype)."""
    from ldpruner.passes.costs import cache_key

    return cache_key(b.graph, b.cfg.costs, b.placement.device, b.threads)


def run_build(cfg: BuildConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run :data:`STAGES` into ``cfg.out``; returns the report (rank 0) or what this rank did (other ranks)."""
    out = output_dir(cfg.out)
    record = out / STATE_FILE
    if record.is_symlink() or (record.exists() and not record.is_file()):
        raise ArtifactError(f"{str(record)!r} is not a file; a build keeps its record there: remove it (or choose "
                            "another folder)")
    check_out_is_ours(out, cfg.overwrite, _written_names())
    t0, load_average = time.perf_counter(), devices.load_average()  # the load before this build adds its own
    loaded = stages.load_model(cfg.model, cfg.inputs)  # a bad calibration file fails before anything is written
    calibration.sampling_scheduler(loaded)  # a pipeline folder without its scheduler: refused before any write
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    # under torchrun the ranks build into one folder together: rank 0 holds the lock for them
    held = lock(out) if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext()
    try:
        # every stage computes with the same threads (torch's, and every onnxruntime session's): the report says so;
        # under torchrun the ranks join their world here (NCCL when they work on GPUs, gloo on CPUs)
        with held, place(cfg.placement.device, cfg.placement.threads) as placement:
            return _run_build(cfg, out, loaded, placement, t0, progress, load_average)
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):  # a refused build leaves no empty folder behind
            out.rmdir()
        raise


def _written_names() -> set[str]:
    """The names a build writes into its folder (its artifacts, the set search's scores, report and operator table)."""
    from ldpruner.passes.search import SEARCH

    return {s.artifact.split("/")[0] for s in STAGES} | {"operators.txt", "operators.json", report.REPORT.name,
                                                        report.REPORT_MD, SEARCH.name}


def _run_build(cfg: BuildConfig, out: Path, loaded: LoadedModel, placement: Placement, t0: float, progress: bool,
               load_average: float | None) -> dict[str, Any]:
    world = placement.world
    build = _prepare(cfg, out, loaded, placement, progress)
    build.timings["load+trace"] = round(time.perf_counter() - t0, 3)
    run_stages(build, STAGES)
    if not world.is_main:
        ran = ", ".join(s.name for s in STAGES if s.all_ranks and s.enabled(build))
        return {"summary": f"rank {world.rank} of {world.size}: ran {ran} on its share; rank 0 writes the build",
                "timings_s": build.timings}
    from ldpruner.passes.plan import RemovalPlan

    result = report.build_report(cfg, build.description, RemovalPlan.load(out / stages.PLAN.name), out,
                                 build.timings, build.reused, sample_rows(build),
                                 files={p: d for s in STAGES if s.enabled(build)
                                        for p, d in build.state.get(FILES, {}).get(s.name, {}).items()},
                                 threads=report.threads_record(
                                     cfg.placement.threads, build.threads,
                                     [s.name for s in STAGES if s.enabled(build)], build.ran_with, out,
                                     load_average))
    report.REPORT.write(out / report.REPORT.name, result)
    write_text_atomic(out / report.REPORT_MD, report.report_markdown(result))
    return result


def _prepare(cfg: BuildConfig, out: Path, loaded: LoadedModel, placement: Placement, progress: bool) -> Build:
    """Trace, the analysis inputs, the budget check (an unreachable budget is known from the operator graph alone:
    fail before the costly analysis) and the operator table; a UNet the export refuses is refused before all that."""
    from ldpruner.passes.importance import cache_key
    from ldpruner.passes.select import check_budget

    stages.check_exportable(loaded.unet_config)
    graph, analysis, calib = stages.analysis_inputs(loaded, cfg.trace, cfg.analysis, cfg.inputs.prompts, placement)
    if cfg.selection.metric != "latency":  # a latency budget is checked once the costs are measured
        check_budget(graph.candidates, total_params=graph.total_params, total_macs=graph.total_macs,
                     config=cfg.selection)
    if placement.world.is_main:
        if not (out / STATE_FILE).exists():  # the folder is a build's from its first file on (check_out_is_ours)
            write_json_atomic(out / STATE_FILE, {})
        write_text_atomic(out / "operators.txt", graph.table() + "\n")
        write_text_atomic(out / "operators.json", graph.to_json() + "\n")
    return Build(cfg=cfg, out=out, progress=progress, loaded=loaded, graph=graph, analysis=analysis, calib=calib,
                 placement=placement, state=read_state(out, cfg.overwrite, STAGES), description=loaded.describe(),
                 analysis_key=cache_key(graph, calib, config=analysis, scheduler=loaded.scheduler))


def build_config(model: Any, *, out: str | os.PathLike | None, config: str | os.PathLike | None,
                 options: dict[str, Any]) -> BuildConfig:
    """The BuildConfig of an API or CLI call: ``options`` (None means not given) over the TOML file ``config``."""
    from ldpruner.stages.config import load_config

    given = {k: v for k, v in options.items() if v is not None}
    if model is not None:
        given["model"] = os.fspath(model)
    if out is not None:
        given["out"] = os.fspath(out)
    return load_config(config, **given) if config is not None else BuildConfig.from_dict(given)


@dataclasses.dataclass(frozen=True)
class BuildFolder:
    """A finished build, as ``bench BUILD_DIR`` measures it: its config, its plan, and the paths of the student it
    ships (the distilled one when it distilled, else the pruned one) and of its ONNX model. Every file its stages
    wrote was checked against the sha256 the build recorded."""

    path: Path
    config: BuildConfig
    report: dict[str, Any]

    @property
    def plan(self) -> Path:
        return self.path / stages.PLAN.name

    @property
    def pruned(self) -> Path:
        return self.path / STUDENT_FOLDERS["prune"]

    @property
    def distilled(self) -> Path | None:
        folder = self.path / STUDENT_FOLDERS["distill"]
        return folder if self.config.distill.steps > 0 and folder.is_dir() else None

    @property
    def onnx(self) -> Path:
        return self.path / stages.ONNX_DIR / "unet.onnx"

    @property
    def latency(self) -> Path | None:
        path = self.path / stages.LATENCY.name
        return path if self.config.selection.metric == "latency" and path.is_file() else None


def is_build_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder a build wrote into (its record is there)."""
    return (Path(path) / STATE_FILE).is_file()


def read_build_folder(path: str | os.PathLike) -> BuildFolder:
    """The finished build in ``path``: its report must describe the files its stages recorded last, and every one of
    them must be on disk byte for byte (the sha256 the report lists). An unfinished, damaged or edited build is an
    ArtifactError that names what is wrong."""
    out = Path(path)
    rebuild = f"run `ldpruner build` into {str(out)!r} again (with --overwrite)"
    try:
        state = read_state(out, overwrite=False, table=STAGES)
    except ArtifactError as exc:
        raise ArtifactError(f"{str(exc).split(': pass --overwrite')[0]}; {rebuild}") from None
    pending = [name for name, key in state.items() if isinstance(key, str) and key.startswith(PENDING)]
    made = report.REPORT.name
    if pending or not (out / made).is_file():
        why = f"its {pending[0]} stage did not finish" if pending else f"it has no {made}"
        raise ArtifactError(f"{str(out)!r} holds no finished build ({why}): run `ldpruner build` into it first")
    try:
        data = report.REPORT.read(out / made)
    except ArtifactError as exc:
        raise ArtifactError(f"{exc}; {rebuild}") from None
    try:
        config = BuildConfig.from_dict(data["config"])
        files = dict(data["files"]["sha256"])
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        raise ArtifactError(f"{str(out / made)!r} is not the report of a build of this ldpruner ({exc}); "
                            f"{rebuild}") from None
    recorded = {p: d for record in state.get(FILES, {}).values() if isinstance(record, dict) for p, d in record.items()}
    stale = sorted(p for p in files if recorded.get(p) != files[p])
    if not files or stale:
        raise ArtifactError(f"{str(out / made)!r} describes another build than the files beside it (e.g. "
                            f"{stale[0] if stale else 'no files at all'}: a build stopped after its stages, before "
                            f"its report); {rebuild}")
    for rel, digest in sorted(files.items()):
        found = out / rel
        if not found.is_file() or sha256_file(found) != digest:
            raise ArtifactError(f"{str(found)!r} {'changed' if found.is_file() else 'is missing'} since the build "
                                f"wrote it: bench measures a build only as it was made; {rebuild}")
    return BuildFolder(out, config, data)
