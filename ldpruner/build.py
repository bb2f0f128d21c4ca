"""``ldpruner build``: every stage into one folder, as a declared sequence (:data:`STAGES`).

Each :class:`Stage` names its artifact (a path in the build folder), the stage whose result it reads, the inputs
its result depends on, and how to run it. A stage's key hashes its inputs with the key of the stage it reads (the
analysis, which reads none, is keyed by the importance pass's own cache key), so a changed option invalidates
exactly the stages downstream of it; a stage whose artifact exists with the key it had
in the last build into the same folder, and whose files are all there unchanged, is reused
(``.ldpruner-build.json`` keeps the keys and the sha256 of every file each stage wrote); one whose artifact would
change, or whose files were changed by someone else, is replaced only with ``overwrite``, and one whose files were
deleted (or whose input files were made again) is made again. Under torchrun the stages marked ``all_ranks`` run on
every rank (the analysis scores its share of the candidates, distillation trains on its shard of the data), as rank 0
decides; rank 0 alone runs the others and writes the report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from . import calibration, devices, distributed, report, stages
from .config import ANALYSIS_OPTIONS, BuildConfig
from .errors import ArtifactError, ConfigError
from .io import check_replaceable, output_dir, read_json, write_json_atomic, write_text_atomic
from .passes.config import (
    CostConfig,
    DistillConfig,
    ExportConfig,
    OptimizeConfig,
    PruneConfig,
    SelectionConfig,
    TraceConfig,
)
from .sources import LoadedModel, load

__all__ = ["STAGES", "STATE_FILE", "BuildFolder", "Stage", "is_build_folder", "read_build_folder", "run_build"]

STATE_FILE = ".ldpruner-build.json"  # the key of each stage's artifact in the last build, for reuse
PENDING = "pending:"  # the state of a stage that started and has not finished (a killed build leaves it)


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
    world: distributed.World
    state: dict[str, str]
    analysis_key: str  # the importance pass's own cache key: weights, options, conditioning, scheduler
    description: dict[str, Any]  # the loaded model's, for the report (the model itself is let go before the export)
    keys: dict[str, str] = dataclasses.field(default_factory=dict)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    reused: list[str] = dataclasses.field(default_factory=list)
    threads: int = 1  # torch's intra-op threads (and onnxruntime's) in every stage of this build
    ran_with: dict[str, int] = dataclasses.field(default_factory=dict)  # the threads of each stage run in this build
    students: dict[str, Any] = dataclasses.field(default_factory=dict)  # made in this run, by stage: not reloaded
    found: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)  # sha256 of each stage's files now

    def enabled(self, name: str) -> bool:
        return next(s for s in STAGES if s.name == name).enabled(self)

    def student(self, stage: str) -> Any:
        """The student the ``stage`` stage wrote: from memory when it ran in this build, else from its folder."""
        if stage in self.students:
            return self.students[stage]
        from ldpruner.passes.student import load_student

        return load_student(self.out / STUDENT_FOLDERS[stage])


@dataclasses.dataclass(frozen=True)
class Stage:
    """One step of a build: ``run(build)`` writes ``artifact``; the artifact is current while the stage's key —
    a hash of the key of the first enabled stage in ``reads`` and the parts ``inputs(build)`` (a stage that reads
    none: its one input itself) — is unchanged."""

    name: str
    artifact: str
    reads: tuple[str, ...]
    inputs: Callable[[Build], tuple[Any, ...]]
    run: Callable[[Build], Any]
    enabled: Callable[[Build], bool] = lambda build: True
    all_ranks: bool = False
    # the files and folders (paths in the build folder) the stage writes and later stages read: their sha256 is
    # recorded when the stage finishes and checked before the stage is reused; None: just the artifact
    outputs: tuple[str, ...] | None = None
    uses: tuple[str, ...] = ()  # stages whose files it also reads (made again with other bytes: so is this one)
    own_cache: bool = False  # the artifact carries its own cache key: a killed stage's file may still be reused
    # what differs between the artifact there and what this build would make, for a refusal to say (None: unknown)
    explain: Callable[[Build], str | None] | None = None

    def written(self) -> tuple[str, ...]:
        return self.outputs if self.outputs is not None else (self.artifact,)


def _timed(b: Build) -> bool:
    """The budget is latency: the build measures costs first and checks the student's latency after pruning."""
    return b.cfg.metric == "latency"


def _costs(b: Build) -> None:
    stages.costs(b.loaded, b.cfg.part(TraceConfig), b.cfg.part(CostConfig), device=b.cfg.device, threads=b.threads,
                 out=b.out, overwrite=True, progress=b.progress)


def _costs_differ(b: Build) -> str | None:
    """How the costs there were measured, where this build would measure them otherwise (threads, device)."""
    from ldpruner.passes.costs import CostReport

    try:
        there = CostReport.load(b.out / stages.COSTS).placement
    except (ArtifactError, OSError):
        return None
    now = {"threads": devices.resolve_threads(b.cfg.threads), "device": str(devices.resolve_device(b.cfg.device))}
    changed = [f"{name} {there.get(name)} here, {value} now" for name, value in now.items() if there.get(name) != value]
    if not changed:
        return None
    return (f"the costs there were measured with other settings: {', '.join(changed)}; pass "
            f"--threads {there.get('threads')} to reuse them")


def _onnx_differs(b: Build) -> str | None:
    """An ONNX model there whose text length is fixed (an earlier ldpruner's export)."""
    try:
        axes = read_json(b.out / EXPORT_SUMMARY, what="export summary")["export"]["dynamic_axes"]
    except (ArtifactError, KeyError, TypeError):
        return None
    if "encoder_hidden_states" not in axes or "1" in axes["encoder_hidden_states"]:
        return None
    return ("the ONNX model there takes a fixed number of tokens, as an earlier ldpruner exported it, and pipelines "
            "with another text length cannot use it: --overwrite exports it again with the text length free")


def _cost_report(b: Build) -> Any:
    from ldpruner.passes.costs import CostReport

    return CostReport.load(b.out / stages.COSTS) if _timed(b) else None


def _analyze(b: Build) -> None:
    if _timed(b):  # an unreachable latency budget is known from the costs: fail before the costly analysis
        from ldpruner.passes.select import check_budget

        check_budget(b.graph.candidates, total_params=b.graph.total_params, total_macs=b.graph.total_macs,
                     config=b.cfg.part(SelectionConfig), costs=_cost_report(b))
    stages.analyze(b.loaded, b.graph, b.analysis, b.calib, out=b.out, overwrite=True, progress=b.progress)


def _rewrite_graph(b: Build) -> Any:
    """The operator graph selection and the rewrite work on: the analysis' own when it traced the loaded UNet as it
    is, else (the analysis ran on a cast or moved copy) a trace of the loaded UNet, and the copy is let go."""
    param, loaded = next(b.graph.traced.gm.parameters()), next(b.loaded.unet.parameters())
    if (param.dtype, param.device) != (loaded.dtype, loaded.device):
        b.graph = None
        gc.collect()  # fx graphs hold reference cycles: free the copy now, before the trace that replaces it
        b.graph = stages.inspect(b.loaded, b.cfg.part(TraceConfig))
    return b.graph


def _select(b: Build) -> None:
    from ldpruner.passes.importance import ImportanceReport

    stages.select(ImportanceReport.load(b.out / stages.SCORES), _rewrite_graph(b), b.cfg.part(SelectionConfig),
                  out=b.out, overwrite=True, cost_report=_cost_report(b))


def _prune(b: Build) -> None:
    from ldpruner.passes.plan import RemovalPlan

    b.students["prune"] = stages.prune(b.loaded, RemovalPlan.load(b.out / stages.PLAN), b.cfg.part(TraceConfig),
                                       b.cfg.part(PruneConfig), out=b.out, overwrite=True, graph=_rewrite_graph(b))


def _latency(b: Build) -> None:
    stages.check_latency(b.loaded, b.student("prune"), _cost_report(b), b.cfg.part(TraceConfig), device=b.cfg.device,
                         tolerance=b.cfg.latency_tolerance, precision=b.cfg.latency_precision, out=b.out,
                         overwrite=True)


def _distill_options(b: Build) -> dict[str, Any]:
    """The DistillConfig of the build: its steps, the analysis' seed and guidance, then ``distill_options``."""
    return {"steps": b.cfg.distill_steps, "seed": b.cfg.seed, "guidance_scale": b.cfg.guidance_scale,
            **b.cfg.distill_options}


def _distill(b: Build) -> None:
    # the student trains into distill/student while student/ stays the pruned-only model, so a change of
    # distillation settings never trains an already distilled student again; the pruned student of this run (saved
    # already) trains in place rather than beside a reloaded copy, which would hold the model twice
    from ldpruner.passes.student import load_student

    pruned = b.students.pop("prune", None)
    pruned = pruned if pruned is not None else load_student(b.out / stages.STUDENT)
    result = stages.distill(b.loaded, pruned, DistillConfig(**_distill_options(b)),
                            out=b.out / stages.DISTILL_DIR, data=None, prompts_file=b.cfg.prompts, resume=False,
                            overwrite=True, progress=b.progress, device=b.cfg.device,
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
    stages.export(student, b.cfg.part(ExportConfig), b.cfg.part(OptimizeConfig), out=b.out, overwrite=True,
                  device=b.cfg.device, threads=b.threads)  # writes EXPORT_SUMMARY


def _on_cuda(b: Build) -> bool:
    """The export's checks and optimizer target CUDA (other fusions, another provider: another artifact)."""
    return stages.export_on_cuda(b.cfg.device)


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


EXPORT_SUMMARY = f"{stages.ONNX_DIR}/{stages.EXPORT_SUMMARY}"
STUDENT_FOLDERS = {"prune": stages.STUDENT, "distill": f"{stages.DISTILL_DIR}/{stages.STUDENT}"}

STAGES: tuple[Stage, ...] = (
    Stage("costs", stages.COSTS, reads=(), inputs=lambda b: (_cost_key(b),), run=_costs, enabled=_timed,
          own_cache=True, explain=_costs_differ),
    Stage("analyze", stages.SCORES, reads=(), all_ranks=True,
          inputs=lambda b: (b.analysis_key,), run=_analyze, own_cache=True),
    Stage("select", stages.PLAN, reads=("analyze",),
          inputs=lambda b: (b.cfg.part(SelectionConfig).to_dict(),) + ((b.keys["costs"],) if _timed(b) else ()),
          run=_select, uses=("costs",)),
    Stage("prune", stages.STUDENT, reads=("select",),
          inputs=lambda b: (b.cfg.height, b.cfg.width), run=_prune),
    Stage("latency", stages.LATENCY, reads=("prune",),
          inputs=lambda b: (b.cfg.latency_tolerance, b.cfg.latency_precision), run=_latency, enabled=_timed,
          uses=("costs",)),
    Stage("distill", f"{stages.DISTILL_DIR}/distill.json", reads=("prune",), all_ranks=True,
          inputs=lambda b: (_distill_options(b), b.cfg.prompts, _file_digest(b.cfg.calibration)), run=_distill,
          enabled=lambda b: b.cfg.distill_steps > 0,
          outputs=(f"{stages.DISTILL_DIR}/distill.json", STUDENT_FOLDERS["distill"])),
    Stage("export", EXPORT_SUMMARY, reads=("distill", "prune"),
          inputs=lambda b: ({n: getattr(b.cfg, n) for n in ("exporter", "opset", "optimize", "fp16", "controlnet",
                                                           "adapter")}
                            | ({"target": "cuda"} if _on_cuda(b) else {}),
                            "onnx/2"),  # the format: the text length free (an earlier export fixed it)
          run=_export, outputs=(stages.ONNX_DIR,), explain=_onnx_differs),
    Stage("samples", report.SAMPLES, reads=("distill", "prune"),
          inputs=lambda b: (b.keys["prune"], "samples/1"), run=_samples, enabled=lambda b: bool(sample_rows(b))),
)


def _file_digest(path: str | None) -> str | None:
    """sha256 of a file the build reads (its content, not its name, decides whether a stage reruns)."""
    return _sha256(Path(path)) if path is not None else None


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _cost_key(b: Build) -> str:
    """The cost stage's key: the costs' own cache key (graph, options, device, runtime versions), from the graph
    already traced (operators and shapes are the same at any dtype)."""
    from ldpruner.passes.costs import cache_key

    return cache_key(b.graph, b.cfg.part(CostConfig), devices.resolve_device(b.cfg.device), b.threads)


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_state(out: Path, overwrite: bool) -> dict[str, Any]:
    """The keys of the last build's stages and the files they wrote ({} when there was no build). A record that
    cannot be read or does not hold what a build writes is refused — ldpruner could not tell its files from yours —
    unless ``overwrite`` (then every stage is made again)."""
    path = out / STATE_FILE
    if not path.exists():  # no build yet (under torchrun, rank 0 may not have written it yet)
        return {}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        problem = _state_problem(state)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        state, problem = None, f"{type(exc).__name__}: {exc}"
    if problem is None:
        return state
    if overwrite:
        return {}
    raise ArtifactError(f"the build record {str(path)!r} is damaged ({problem}); ldpruner cannot tell which files a "
                        "build wrote: pass --overwrite to make every stage again")


def _state_problem(state: Any) -> str | None:
    """What is wrong with a build record, or None."""
    if not isinstance(state, dict):
        return f"a {type(state).__name__}, not an object"
    outputs = {s.name: s.written() for s in STAGES}
    for name in outputs:
        if name in state and not isinstance(state[name], str):
            return f"stage {name!r} has {state[name]!r}, not a key"
    files, made_from = state.get(FILES, {}), state.get(MADE_FROM, {})
    if not isinstance(files, dict) or not isinstance(made_from, dict):
        return f"{FILES!r} and {MADE_FROM!r} must be objects"
    for name, record in files.items():
        if name not in outputs or not isinstance(record, dict):
            return f"{FILES}.{name} is not a record of a stage's files"
        for rel, digest in record.items():
            inside = isinstance(rel, str) and not rel.startswith("/") and ".." not in rel.split("/") and any(
                rel == w or rel.startswith(w + "/") for w in outputs[name])
            if not inside or not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
                return f"{FILES}.{name} lists {rel!r}: {digest!r}, not a file of the stage with its sha256"
    if any(not (v is None or isinstance(v, str)) for v in made_from.values()):
        return f"{MADE_FROM!r} holds a value that is not a hash"
    return None


def run_build(cfg: BuildConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run :data:`STAGES` into ``cfg.out``; returns the report (rank 0) or what this rank did (other ranks)."""
    out = output_dir(cfg.out)
    record = out / STATE_FILE
    if record.is_symlink() or (record.exists() and not record.is_file()):
        raise ArtifactError(f"{str(record)!r} is not a file; a build keeps its record there: remove it (or choose "
                            "another folder)")
    _check_out_is_ours(out, cfg.overwrite)
    t0, load_average = time.perf_counter(), devices.load_average()  # the load before this build adds its own
    loaded = load(cfg.model, scheduler=cfg.scheduler)
    calibration.sampling_scheduler(loaded)  # a pipeline folder without its scheduler: refused before any write
    if cfg.calibration is not None:
        from ldpruner.passes.conditioning import read_calibration_file

        read_calibration_file(cfg.calibration)  # a bad file fails before anything is traced or written
        loaded.calibration = Path(cfg.calibration)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    # under torchrun the ranks build into one folder together: rank 0 holds the lock for them
    lock = _lock(out) if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext()
    try:
        # every stage computes with the same threads (torch's, and every onnxruntime session's): the report says so
        with lock, devices.intra_op_threads(cfg.threads):
            return _run_build(cfg, out, loaded, t0, progress, load_average)
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):  # a refused build leaves no empty folder behind
            out.rmdir()
        raise


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
        return self.path / stages.PLAN

    @property
    def pruned(self) -> Path:
        return self.path / STUDENT_FOLDERS["prune"]

    @property
    def distilled(self) -> Path | None:
        folder = self.path / STUDENT_FOLDERS["distill"]
        return folder if self.config.distill_steps > 0 and folder.is_dir() else None

    @property
    def onnx(self) -> Path:
        return self.path / stages.ONNX_DIR / "unet.onnx"

    @property
    def latency(self) -> Path | None:
        path = self.path / stages.LATENCY
        return path if self.config.metric == "latency" and path.is_file() else None


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
        state = _read_state(out, overwrite=False)
    except ArtifactError as exc:
        raise ArtifactError(f"{str(exc).split(': pass --overwrite')[0]}; {rebuild}") from None
    pending = [name for name, key in state.items() if isinstance(key, str) and key.startswith(PENDING)]
    made = report.REPORT
    if pending or not (out / made).is_file():
        why = f"its {pending[0]} stage did not finish" if pending else f"it has no {made}"
        raise ArtifactError(f"{str(out)!r} holds no finished build ({why}): run `ldpruner build` into it first")
    data = read_json(out / made, what="build report")
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
        if not found.is_file() or _sha256(found) != digest:
            raise ArtifactError(f"{str(found)!r} {'changed' if found.is_file() else 'is missing'} since the build "
                                f"wrote it: bench measures a build only as it was made; {rebuild}")
    return BuildFolder(out, config, data)


LOCK_FILE = ".ldpruner-build.lock"  # held while a build writes into its folder: the pid and host of the build


def _written_by_a_build(out: Path) -> list[str]:
    """The names in ``out`` that a build writes (its artifacts, report and operator table)."""
    names = {s.artifact.split("/")[0] for s in STAGES} | {"operators.txt", "operators.json", report.REPORT,
                                                            report.REPORT_MD}
    return sorted(n for n in names if (out / n).exists())


def _check_out_is_ours(out: Path, overwrite: bool) -> None:
    """Before anything is written: ``--out`` must not lead into another folder through a link, and the files a build
    writes may be replaced only when an earlier build wrote them (its state file is there) or with --overwrite."""
    if overwrite:
        return
    if out.is_symlink():
        raise ArtifactError(f"--out {str(out)!r} is a symbolic link (to {str(out.resolve())!r}); ldpruner does not "
                            "write through a link into another folder: pass the folder itself, or --overwrite")
    if out.is_dir() and not (out / STATE_FILE).exists():
        found = _written_by_a_build(out)
        if found:
            raise ArtifactError(f"--out {str(out)!r} holds {found}, which no ldpruner build wrote (there is no "
                                f"{STATE_FILE}); they may be your files: choose another folder, or pass --overwrite "
                                "to replace them")


@contextlib.contextmanager
def _lock(out: Path) -> Iterator[None]:
    """Hold ``out``'s build lock: a second build into the same folder is refused while the first one runs (a lock
    whose process is gone, after a kill, is taken over)."""
    path = out / LOCK_FILE
    me = f"{os.getpid()} {socket.gethostname()} {_started(os.getpid()) or '?'}"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = path.read_text(errors="replace").strip() if path.exists() else ""
            pid, host, started = (holder.split() + ["", "", ""])[:3]
            # stale: its build is gone, the pid is this very process's (a container restarted with the same pids), or
            # the pid now names another process (one that started at another time than the build that wrote it)
            if pid.isdigit() and host == socket.gethostname() and (
                    int(pid) == os.getpid() or not _alive(int(pid))
                    or started not in ("", "?") and _started(int(pid)) not in (None, started)):
                path.unlink(missing_ok=True)  # stale: its build was killed
                continue
            raise ArtifactError(f"another build (pid {pid or '?'} on {host or '?'}) is writing into --out "
                                f"{str(out)!r}; wait for it to finish or choose another folder (if no build runs, "
                                f"delete {str(path)!r})") from None
        with os.fdopen(fd, "w") as f:
            f.write(me + "\n")
        break
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def _started(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, from /proc), or None where that cannot be read: with the
    pid it names one process, even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # the command name, in parentheses, may hold spaces
    return fields[19] if len(fields) > 19 else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _run_build(cfg: BuildConfig, out: Path, loaded: LoadedModel, t0: float, progress: bool,
               load_average: float | None) -> dict[str, Any]:
    # NCCL when the ranks work on GPUs, gloo on CPUs
    world = distributed.join(devices.resolve_device(cfg.device))
    try:
        build = _prepare(cfg, out, loaded, world, progress)
        build.timings["load+trace"] = round(time.perf_counter() - t0, 3)
        _run_stages(build)
        if not world.is_main:
            ran = ", ".join(s.name for s in STAGES if s.all_ranks and s.enabled(build))
            return {"summary": f"rank {world.rank} of {world.size}: ran {ran} on its share; rank 0 writes the build",
                    "timings_s": build.timings}
        from ldpruner.passes.plan import RemovalPlan

        result = report.build_report(cfg, build.description, RemovalPlan.load(out / stages.PLAN), out,
                                     build.timings, build.reused, sample_rows(build),
                                     files={p: d for s in STAGES if s.enabled(build)
                                            for p, d in build.state.get(FILES, {}).get(s.name, {}).items()},
                                     threads=report.threads_record(
                                         cfg.threads, build.threads, [s.name for s in STAGES if s.enabled(build)],
                                         build.ran_with, out, load_average))
        write_json_atomic(out / report.REPORT, result)
        write_text_atomic(out / report.REPORT_MD, report.report_markdown(result))
        return result
    finally:
        distributed.leave(world)


def _prepare(cfg: BuildConfig, out: Path, loaded: LoadedModel, world: distributed.World, progress: bool) -> Build:
    """Trace, the analysis inputs, the budget check (an unreachable budget is known from the operator graph alone:
    fail before the costly analysis) and the operator table; a UNet the export refuses is refused before all that."""
    from ldpruner.passes.importance import cache_key
    from ldpruner.passes.select import check_budget

    stages.check_exportable(loaded.unet_config)
    analysis_options = {n: getattr(cfg, n) for n in ANALYSIS_OPTIONS}
    graph, analysis, calib = stages.analysis_inputs(loaded, cfg.part(TraceConfig), analysis_options, cfg.prompts,
                                                    cfg.device)
    if cfg.metric != "latency":  # a latency budget is checked once the costs are measured
        check_budget(graph.candidates, total_params=graph.total_params, total_macs=graph.total_macs,
                     config=cfg.part(SelectionConfig))
    if world.is_main:
        if not (out / STATE_FILE).exists():  # the folder is a build's from its first file on (see _check_out_is_ours)
            write_json_atomic(out / STATE_FILE, {})
        write_text_atomic(out / "operators.txt", graph.table() + "\n")
        write_text_atomic(out / "operators.json", graph.to_json() + "\n")
    return Build(cfg=cfg, out=out, progress=progress, loaded=loaded, graph=graph, analysis=analysis, calib=calib,
                 world=world, state=_read_state(out, cfg.overwrite), description=loaded.describe(),
                 analysis_key=cache_key(graph, calib, config=analysis, scheduler=loaded.scheduler),
                 threads=devices.resolve_threads(None))  # the build's own (run_build set them)


def _run_stages(build: Build) -> None:
    """Every enabled stage in order; a rank other than 0 runs the ``all_ranks`` ones only, after rank 0 has run the
    others since the last one (their artifacts are what it reads) — or raises what stopped rank 0 there."""
    world = build.world
    enabled = [s for s in STAGES if s.enabled(build)]
    last_all_ranks = max((i for i, s in enumerate(enabled) if s.all_ranks), default=-1)
    for stage in enabled:  # a key depends on options and the keys before it, never on a stage's result
        inputs = stage.inputs(build)
        if stage.reads:
            build.keys[stage.name] = _key(next(build.keys[r] for r in stage.reads if r in build.keys), *inputs)
        else:
            (build.keys[stage.name],) = inputs
    # every refusal (a file changed or added, an artifact of other inputs, files nobody recorded) before any work
    _on_rank0(world, world.size > 1, lambda: ([_decide(build, s, build.keys[s.name], quiet=True) for s in enabled],
                                              _retire(build, [s for s in STAGES if s not in enabled])))
    main_only_since_sync = False
    for i, stage in enumerate(enabled):
        key = build.keys[stage.name]
        if stage.all_ranks and main_only_since_sync and world.size > 1:
            _share(world, None, None)
            main_only_since_sync = False
        if not stage.all_ranks:
            main_only_since_sync = True
            if not world.is_main:
                continue
        try:
            _run_stage(build, stage, key)
        except Exception as exc:
            if not stage.all_ranks and world.size > 1 and i < last_all_ranks:
                _share(world, None, exc)  # the other ranks wait at the next all-ranks stage: they raise it there
            raise
        if not world.is_main and i >= last_all_ranks:
            return


def _retire(build: Build, off: list[Stage]) -> None:
    """The files an earlier build wrote for stages this build does not run (``--no-samples``, no distillation, a
    budget that is not latency) describe that earlier build, not this one: removed when they are as it wrote them,
    with their record. A stage whose artifact carries its own cache key (costs.json) keeps it for a later build;
    files changed since are not ldpruner's any more, and stay."""
    import logging

    for stage in off:
        recorded = _recorded(build, stage.name)
        if stage.own_cache or recorded is None or _digests(build.out, stage.written()) != recorded:
            continue
        _remove(build.out, stage.written())
        for table in (build.state, build.state.get(FILES, {}), build.state.get(MADE_FROM, {})):
            table.pop(stage.name, None)
        write_json_atomic(build.out / STATE_FILE, build.state)
        logging.getLogger("ldpruner.build").warning("removed %s: the %s stage is off in this build, and they "
                                                    "described an earlier one", ", ".join(stage.written()),
                                                    stage.name)


def _share(world: distributed.World, value: Any, error: BaseException | None) -> Any:
    """Rank 0's ``value`` on every rank, or the ``error`` rank 0 sends raised on every rank (every rank calls this
    at the same point: it is a collective)."""
    import torch.distributed as dist

    box = [(value, error) if world.is_main else None]
    dist.broadcast_object_list(box, src=0)
    value, error = box[0]
    if error is not None:
        raise error
    return value


def _on_rank0(world: distributed.World, together: bool, work: Callable[[], Any]) -> Any:
    """``work()`` done by rank 0; with ``together`` (every rank calls this) each rank gets its result, or raises
    what it raised, so that no rank waits in a collective for one that failed."""
    value = error = None
    if world.is_main:
        try:
            value = work()
        except Exception as exc:
            if not together:
                raise
            error = exc
    return _share(world, value, error) if together else value


FILES = "files"  # the state's record of each finished stage's outputs: {stage: {path: sha256}}
MADE_FROM = "made_from"  # {stage: hash of the recorded files of the stage it read when it ran}


def _listing(out: Path, paths: tuple[str, ...]) -> list[str]:
    """Every file under ``paths`` (files or folders in ``out``), as paths relative to ``out``."""
    found: list[str] = []
    for rel in paths:
        path = out / rel
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
        found += [f.relative_to(out).as_posix() for f in files]
    return found


def _digests(out: Path, paths: tuple[str, ...]) -> dict[str, str]:
    """sha256 of every file under ``paths`` (files or folders in ``out``), by path relative to ``out``."""
    return {rel: _sha256(out / rel) for rel in _listing(out, paths)}


def _recorded(build: Build, stage: str) -> dict[str, str] | None:
    """The sha256 of the files ``stage`` wrote, as the state recorded them when it last finished (None: unknown)."""
    files = build.state.get(FILES)
    record = files.get(stage) if isinstance(files, dict) else None
    return record if isinstance(record, dict) else None


def _reuse(build: Build, stage: Stage, key: str, *, quiet: bool = False) -> tuple[bool, bool, bool]:
    """(reuse the stage's files, they are ldpruner's own and may be replaced without --overwrite, they may be removed
    before the stage runs again). Files are reused only when the stage's key is the one recorded and every file it
    wrote is there byte for byte. A file missing is made again; a file changed or added since it was recorded (by
    someone, or a disk fault) needs --overwrite, whatever the key, and so do files nobody recorded (a folder from
    before files were recorded, an edited record). A stage a killed build had started is ldpruner's own."""
    recorded, state_key = _recorded(build, stage.name), build.state.get(stage.name)
    overwrite, pending = build.cfg.overwrite, str(state_key or "").startswith(PENDING)
    if pending:
        # started by a build that was killed before it finished: its files are ours, made again from an empty place
        # — but a scores.json or costs.json written before the kill is reused when its own cache key matches
        return False, True, overwrite or not stage.own_cache
    if recorded is None:  # a first build; or files nobody recorded, which may be yours
        there = _listing(build.out, stage.written())
        if there and state_key is None:  # no build ran the stage here: whoever made these files, they are not ours
            check_replaceable(build.out / there[0], overwrite)
        if there and not overwrite:
            raise ArtifactError(f"{str(build.out / there[0])!r} was written by a build that did not record its files "
                                f"(an earlier ldpruner, or an edited {STATE_FILE}); ldpruner cannot tell them from "
                                f"yours: pass --overwrite to make the {stage.name} stage again")
        return False, state_key == key, overwrite
    found = _found(build, stage)
    made_from = build.state.get(MADE_FROM, {})
    upstream_same = stage.name not in made_from or made_from[stage.name] == _upstream(build, stage)
    if state_key == key and found == recorded and upstream_same:
        return True, True, False
    foreign = sorted(p for p in found if recorded.get(p) != found[p])
    if foreign and not overwrite:
        what = "was added" if foreign[0] not in recorded else "changed"
        raise ArtifactError(f"{str(build.out / foreign[0])!r} {what} since the build that wrote "
                            f"{', '.join(stage.written())} ({stage.name} stage); ldpruner reuses only what it wrote, "
                            "byte for byte: restore it, or pass --overwrite to make the stage again")
    if state_key != key:  # other inputs: the files it wrote are replaced only with --overwrite
        if found and not (build.out / stage.artifact).exists():
            check_replaceable(build.out / next(iter(found)), overwrite)
        return False, False, True
    if not quiet:
        import logging

        missing = sorted(set(recorded) - set(found))
        why = (f"{len(missing)} file(s) missing ({missing[0]})" if missing else f"{len(foreign)} file(s) changed"
               if foreign else "the files of the stage it reads were made again")
        logging.getLogger("ldpruner.build").warning("%s: %s since the last build; making it again", stage.name, why)
    return False, True, True


def _upstream(build: Build, stage: Stage) -> str | None:
    """A hash of the recorded files of every stage ``stage`` reads (None for a stage that reads none): a stage made
    from files since made again (with other bytes) is made again too, though its key is the same."""
    used = [r for r in (*stage.reads, *stage.uses) if r in build.keys]
    return _key({r: _recorded(build, r) for r in used}) if used else None


def _decide(build: Build, stage: Stage, key: str, *, quiet: bool = False) -> tuple[bool, bool]:
    """(reuse the stage's files, remove them before it runs again), or what running ``stage`` is refused for; touches
    nothing."""
    reuse, ours, clear = _reuse(build, stage, key, quiet=quiet)
    if not reuse:  # an artifact that is not ours (other inputs, a file no build wrote) needs --overwrite
        try:
            check_replaceable(build.out / stage.artifact, build.cfg.overwrite or ours)
        except ArtifactError as exc:
            why = stage.explain(build) if stage.explain is not None else None
            if why is None:
                raise
            raise ArtifactError(f"{exc} ({why})") from None
    return reuse, clear


def _mark_started(build: Build, stage: Stage, key: str, clear: bool) -> None:
    """Before ``stage`` runs: its old files removed when ``clear`` (nothing it reads back, or leaves beside its new
    files, is an old or damaged file), and the stage marked pending in the record (a kill leaves it so)."""
    if clear:
        _remove(build.out, stage.written())
    build.state[stage.name] = PENDING + key
    build.state.setdefault(FILES, {}).pop(stage.name, None)
    write_json_atomic(build.out / STATE_FILE, build.state)


def _found(build: Build, stage: Stage) -> dict[str, str]:
    """sha256 of the files ``stage`` wrote, as they are now (computed once per build until the stage runs)."""
    if stage.name not in build.found:
        build.found[stage.name] = _digests(build.out, stage.written())
    return build.found[stage.name]


def _run_stage(build: Build, stage: Stage, key: str) -> None:
    together = stage.all_ranks and build.world.size > 1  # every rank reuses or runs it, or fails, as rank 0 decided
    reuse, clear = _on_rank0(build.world, together, lambda: _decide(build, stage, key))
    if reuse:
        build.reused.append(stage.name)
        return
    # the other ranks start once rank 0 has cleared the way (or raise what stopped it)
    _on_rank0(build.world, together, lambda: _mark_started(build, stage, key, clear))
    start = time.perf_counter()
    stage.run(build)
    build.timings[stage.name] = round(time.perf_counter() - start, 3)
    build.ran_with[stage.name] = build.threads
    build.state[stage.name] = key
    if build.world.is_main:
        build.found.pop(stage.name, None)
        build.state.setdefault(FILES, {})[stage.name] = _digests(build.out, stage.written())
        build.state.setdefault(MADE_FROM, {})[stage.name] = _upstream(build, stage)
        write_json_atomic(build.out / STATE_FILE, build.state)


def _remove(out: Path, paths: tuple[str, ...]) -> None:
    import shutil

    for rel in paths:
        path = out / rel
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def build_config(model: Any, *, out: str | os.PathLike | None, config: str | os.PathLike | None,
                 options: dict[str, Any]) -> BuildConfig:
    """The BuildConfig of an API or CLI call: ``options`` (None means not given) over the TOML file ``config``."""
    from .config import load_config

    given = {k: v for k, v in options.items() if v is not None}
    if model is not None:
        given["model"] = os.fspath(model)
    if out is not None:
        given["out"] = os.fspath(out)
    return load_config(config, **given) if config is not None else BuildConfig.from_dict(given)
