"""The latency cost model: what removing each operator saves, measured on the runtime the model is deployed on.

Parameters and MACs do not track time on SD-class UNets (the 64×64 operators hold few parameters and much of the
compute; small ops are bound by memory and launch overhead), so a latency budget needs the time itself. It is
measured the cheap way that stays honest: repeated runs of the dense model at the deployed batch, latent size,
dtype and device, each node's time attributed to the operator whose removal deletes it.

* ``torch``: an fx interpreter times every node of the traced graph (the device synchronised around each), and the
  stand-in each removal leaves behind (the kept 1×1 shortcut, a new 1×1 projection) on the same input in the same
  run. An operator's cost is the time of the nodes its removal deletes (the nodes its MAC count covers, plus a
  branch's residual add), less its stand-in's.
* ``onnxruntime``: the dense graph is exported with every leaf module under a flat unique name, so that the
  exporter's scope names say which module each ONNX node came from, and run under onnxruntime's profiler. Nodes the
  session inserted (layout reorders) are charged to the node that ran before them; the kept shortcut conv is timed
  where it runs, in the graph; a new 1×1 projection (none in the published UNets) is estimated from the operator's
  time by its share of the MACs.

Per-operator times are medians over the timed runs, as shares of the profiled run applied to the dense latency
timed without the profiler (or the interpreter), which slows every node a little; ``attributed_ms`` / ``dense_ms``
says how much of it the operators account for (the rest is glue: embeddings, concatenations, resampling). A plan
predicts ``dense_ms − Σ saves_ms``; build and bench measure the pruned model beside the dense one and flag a
prediction that falls short (:func:`check_latency`).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.fx

from ldpruner import devices
from ldpruner.compiler.graph import Action, OperatorGraph
from ldpruner.compiler.removal import stand_in
from ldpruner.errors import ArtifactError, ConfigError
from ldpruner.io import json_safe, read_json, write_json_atomic
from ldpruner.runtime.timing import measure_interleaved, measure_ratio, onnx_feeds, ort_session

from .config import CostConfig

__all__ = ["COSTS_FORMAT", "CostConfig", "CostReport", "OperatorCost", "check_latency", "latency_batch",
           "measure_costs", "timing_inputs"]

COSTS_FORMAT = "ldpruner.costs/1"


@dataclasses.dataclass(frozen=True)
class OperatorCost:
    """The measured time of what removing one operator deletes, and of what it leaves in its place."""

    name: str
    ms: float  # median over the timed runs of the time of the nodes its removal deletes (in dense-latency ms)
    iqr_ms: float
    kept_ms: float  # the stand-in: the kept shortcut conv, a new 1×1 projection; ~0 for a bypass
    kept_basis: str  # "measured" | "macs-scaled" (a new projection under onnxruntime)

    @property
    def saves_ms(self) -> float:
        """What the removal saves; never negative (a stand-in timed slower than its operator saves nothing)."""
        return max(0.0, self.ms - self.kept_ms)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "saves_ms": self.saves_ms}


@dataclasses.dataclass(frozen=True)
class CostReport:
    """The latency costs of one traced UNet on one runtime: written as ``costs.json``, keyed like ``scores.json``."""

    operators: Mapping[str, OperatorCost]
    dense_ms: float  # median latency of the dense model (no profiler, no interpreter)
    dense_iqr_ms: float
    attributed_ms: float  # Σ of the candidates' times: the share of a profiled run the operators account for
    profiled_ms: float  # the median profiled run (interpreter or profiler on): the base the attribution splits
    config: CostConfig
    placement: Mapping[str, Any]  # runtime, provider, device, accelerator, dtype, batch, sample shape, threads
    model_class: str
    granularity: str
    cache_key: str
    wall_time_s: float = 0.0

    def saves_ms(self, name: str) -> float:
        """What removing operator ``name`` saves (0 for an operator the costs do not know)."""
        cost = self.operators.get(name)
        return cost.saves_ms if cost is not None else 0.0

    def predicted_ms(self, names: Any) -> float:
        """The latency predicted after removing ``names``: the dense latency less what each removal saves."""
        return self.dense_ms - sum(self.saves_ms(n) for n in names)

    def basis(self) -> dict[str, Any]:
        """What a prediction from these costs rests on (for a plan to record)."""
        return {**self.placement, "repeats": self.config.latency_repeats, "dense_ms": self.dense_ms,
                "costs_key": self.cache_key}

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": COSTS_FORMAT,
            "cache_key": self.cache_key,
            "model_class": self.model_class,
            "granularity": self.granularity,
            "config": self.config.to_dict(),
            "placement": dict(self.placement),
            "dense_ms": self.dense_ms,
            "dense_iqr_ms": self.dense_iqr_ms,
            "profiled_ms": self.profiled_ms,
            "attributed_ms": self.attributed_ms,
            "wall_time_s": self.wall_time_s,
            "operators": [c.to_dict() for c in sorted(self.operators.values(), key=lambda c: -c.saves_ms)],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CostReport:
        if not isinstance(data, Mapping) or data.get("format") != COSTS_FORMAT:
            found = data.get("format") if isinstance(data, Mapping) else type(data).__name__
            raise ArtifactError(f"not an ldpruner costs file: expected format {COSTS_FORMAT!r}, got {found!r}")
        try:
            fields = {f.name for f in dataclasses.fields(OperatorCost)}
            operators = {c["name"]: OperatorCost(**{k: v for k, v in c.items() if k in fields})
                         for c in data["operators"]}
            return cls(operators=operators, dense_ms=float(data["dense_ms"]),
                       dense_iqr_ms=float(data["dense_iqr_ms"]), attributed_ms=float(data["attributed_ms"]),
                       profiled_ms=float(data["profiled_ms"]),
                       # costs.json of earlier versions kept the threads in the config; the placement has them
                       config=CostConfig.from_dict({k: v for k, v in data["config"].items() if k != "threads"}),
                       placement=dict(data["placement"]), model_class=data["model_class"],
                       granularity=data["granularity"], cache_key=data["cache_key"],
                       wall_time_s=float(data.get("wall_time_s", 0.0)))
        except (KeyError, TypeError, ValueError, ConfigError) as exc:
            raise ArtifactError(f"malformed costs file: {type(exc).__name__}: {exc}") from exc

    def save(self, path: str | Path) -> None:
        write_json_atomic(Path(path), json_safe(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> CostReport:
        return cls.from_dict(read_json(path, what="costs file"))


# --- inputs ----------------------------------------------------------------------------------------------------

def latency_batch(graph: OperatorGraph, config: CostConfig) -> int:
    """The batch the latency is measured at: the configured one, else 2 for a text-conditioned UNet (the two
    halves of one classifier-free-guided step), else 1."""
    if config.latency_batch is not None:
        return config.latency_batch
    return 2 if "encoder_hidden_states" in graph.traced.input_names else 1


def timing_inputs(traced: Any, batch: int) -> dict[str, torch.Tensor]:
    """Seeded inputs at ``batch`` shaped like the trace's examples (text length, latent size), on their device, in
    their dtype; timesteps mid-schedule."""
    g = torch.Generator().manual_seed(batch)
    result = {}
    for name in traced.input_names:
        ex = traced.example_inputs[name]
        shape = (batch, *ex.shape[1:]) if ex.dim() else (batch,)
        if ex.is_floating_point() and name != "timestep":
            value = torch.randn(shape, generator=g, dtype=torch.float32)
        else:
            value = torch.full(shape, 500)
        result[name] = value.to(device=ex.device, dtype=ex.dtype)
    return result


# options that judge a plan's latency, not how the costs are measured: not in the costs' key
_JUDGING = ("latency_tolerance", "latency_precision")


def cache_key(graph: OperatorGraph, config: CostConfig, device: Any, threads: int | None = None) -> str:
    """What the costs depend on: the graph's operators and shapes, the measurement options (not the tolerance and
    the precision, which judge plans), the device, the threads (None: :func:`ldpruner.devices.resolve_threads`) and the
    versions of the runtimes. Not the weights' values (nor their dtype: ``latency_dtype`` says it)."""
    import onnxruntime

    payload = {
        "format": COSTS_FORMAT,
        "operators": [op.to_dict() for op in graph],
        "inputs": {n: list(t.shape) for n, t in graph.traced.example_inputs.items()},
        "config": {k: v for k, v in config.to_dict().items() if k not in _JUDGING},
        "device": str(device),
        "accelerator": devices.accelerator_name(device),
        "threads": devices.resolve_threads(threads),
        "versions": [torch.__version__, onnxruntime.__version__],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def load_cached(path: Path, key: str) -> CostReport | None:
    """``path``'s costs when they were measured under ``key``; None when absent, unreadable or stale."""
    try:
        report = CostReport.load(path)
    except ArtifactError:
        return None
    return report if report.cache_key == key else None


# --- measuring -------------------------------------------------------------------------------------------------

def measure_costs(graph: OperatorGraph, config: CostConfig | None = None, *, device: Any = None,
                  threads: int | None = None, progress: bool = False, save_to: str | Path | None = None
                  ) -> CostReport:
    """Measure the latency cost of every candidate of ``graph`` on ``config.runtime``: torch on the device the
    traced graph is on, in its dtype; onnxruntime on ``device``'s provider (CUDA for a CUDA device with
    onnxruntime-gpu, else the CPU; None: the graph's device). Either runs with ``threads`` intra-op threads (None:
    :func:`ldpruner.devices.resolve_threads`), recorded in the placement and the cache key."""
    config = config if config is not None else CostConfig()
    with devices.intra_op_threads(threads) as threads:
        return _measure_costs(graph, config, device=device, threads=threads, progress=progress, save_to=save_to)


def _measure_costs(graph: OperatorGraph, config: CostConfig, *, device: Any, threads: int, progress: bool,
                   save_to: str | Path | None) -> CostReport:
    param = next(graph.traced.gm.parameters())
    dtype = param.dtype
    device = param.device if config.runtime == "torch" or device is None else torch.device(device)
    if config.runtime == "torch" and dtype != devices.torch_dtype(config.latency_dtype):
        raise ConfigError(f"the costs are configured for latency_dtype={config.latency_dtype!r} but the traced UNet "
                          f"is in {str(dtype).removeprefix('torch.')}: cast the model before tracing it (the API "
                          "does)")
    batch = latency_batch(graph, config)
    inputs = timing_inputs(graph.traced, batch)
    started = time.perf_counter()
    if config.runtime == "torch":
        measured = _torch_costs(graph, config, inputs, device, progress)
    else:
        measured = _onnxruntime_costs(graph, config, inputs, device, threads, progress)
    placement = {"runtime": config.runtime, **measured.pop("placement"), "device": str(device),
                 "accelerator": devices.accelerator_name(device), "dtype": config.latency_dtype, "batch": batch,
                 "sample_shape": list(inputs[graph.traced.input_names[0]].shape), "threads": threads}
    report = CostReport(config=config, placement=placement, model_class=graph.traced.model_class,
                        granularity=graph.traced.granularity.value, cache_key=cache_key(graph, config, device, threads),
                        wall_time_s=time.perf_counter() - started, **measured)
    if save_to is not None:
        report.save(save_to)
    return report


def _median_iqr(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return (values[0] if values else 0.0), 0.0
    q = statistics.quantiles(values, n=4, method="inclusive")
    return statistics.median(values), q[2] - q[0]


def _measured(graph: OperatorGraph, per_run: Callable[[Any], tuple[list[float], list[float], str]], dense: Any,
              profiled_ms: list[float], *, provider: str | None) -> dict[str, Any]:
    """The CostReport fields of one measurement: ``per_run(op)`` gives an operator's times per timed run (ms),
    its stand-in's, and how the stand-in's were found; ``dense`` the unprofiled runs; ``profiled_ms`` the profiled
    runs' totals."""
    stats = dense.stats["dense"]
    dense_ms, profiled = stats.median_s * 1e3, _median_iqr(profiled_ms)[0]
    # the profiler (the interpreter) slows every node a little: a node's time counts as its share of the profiled
    # run, applied to the unprofiled latency
    scale = dense_ms / profiled if profiled > 0 else 1.0
    costs = {}
    for op in graph.candidates:
        times, kept, basis = per_run(op)
        ms, iqr = _median_iqr([t * scale for t in times])
        costs[op.name] = OperatorCost(name=op.name, ms=ms, iqr_ms=iqr, kept_ms=_median_iqr(kept)[0] * scale,
                                      kept_basis=basis)
    return {"operators": costs, "dense_ms": dense_ms, "dense_iqr_ms": stats.iqr_s * 1e3, "profiled_ms": profiled,
            "attributed_ms": sum(c.ms for c in costs.values()), "placement": {"provider": provider}}


def _synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


class _NodeTimer(torch.fx.Interpreter):
    """Runs the graph, timing every computing node and, after each operator, its stand-in on the same inputs."""

    def __init__(self, gm: torch.fx.GraphModule, stand_ins: Mapping[str, torch.nn.Module],
                 sync: Callable[[], None]):
        super().__init__(gm)
        self.stand_ins, self.sync = stand_ins, sync
        self.times: dict[str, float] = {}
        self.kept: dict[str, float] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.op not in ("call_module", "call_function", "call_method"):
            return super().run_node(n)
        self.sync()
        start = time.perf_counter()
        out = super().run_node(n)
        self.sync()
        self.times[n.name] = time.perf_counter() - start
        if n.name in self.stand_ins:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            self.sync()
            start = time.perf_counter()
            self.stand_ins[n.name](*args, **kwargs)
            self.sync()
            self.kept[n.name] = time.perf_counter() - start
        return out


def _torch_costs(graph: OperatorGraph, config: CostConfig, inputs: Mapping[str, torch.Tensor], device: Any,
                 progress: bool) -> dict[str, Any]:
    from tqdm.auto import tqdm

    gm = graph.traced.gm.eval()
    args = [inputs[n] for n in graph.traced.input_names]
    stand_ins = {op.node: stand_in(op, gm.get_submodule(op.name)) for op in graph.candidates}
    sync = _synchronizer(device)
    timer = _NodeTimer(gm, stand_ins, sync)
    runs: list[tuple[dict[str, float], dict[str, float], float]] = []
    with torch.inference_mode():
        for r in tqdm(range(config.latency_warmup + config.latency_repeats), desc="costs (torch, per node)",
                      disable=not progress, leave=False):
            sync()
            start = time.perf_counter()
            timer.run(*args)
            sync()
            elapsed = time.perf_counter() - start - sum(timer.kept.values())
            if r >= config.latency_warmup:
                runs.append((dict(timer.times), dict(timer.kept), elapsed))

        def call() -> None:
            gm(*args)
            sync()

        dense = measure_interleaved({"dense": call}, warmup=config.latency_warmup, repeats=config.latency_repeats)
    removed = {op.name: graph.removed_by(op.name) for op in graph.candidates}

    def per_run(op: Any) -> tuple[list[float], list[float], str]:
        times = [1e3 * sum(t.get(n, 0.0) for n in removed[op.name]) for t, _, _ in runs]
        return times, [1e3 * k[op.node] for _, k, _ in runs], "measured"

    return _measured(graph, per_run, dense, [1e3 * e for _, _, e in runs], provider=None)


# --- onnxruntime ---------------------------------------------------------------------------------------------------

_FLAT_PREFIX = "ldpruner_leaf_"


def _flattened(gm: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, dict[str, str]]:
    """A graph module computing what ``gm`` does whose every called module (and fetched attribute) sits under one
    flat, unique name (the modules themselves are shared, not copied), and the map flat name → qualified name.

    The TorchScript exporter names each ONNX node after the modules it ran in, but by their unqualified names
    (``resnets.0``): in a flat fx graph, ``down_blocks.0.resnets.0`` and ``up_blocks.1.resnets.0`` would look
    alike. Flat names without dots keep them apart."""
    root = torch.nn.Module()
    graph = torch.fx.Graph()
    names: dict[str, str] = {}
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op in ("call_module", "get_attr"):
            flat = names.setdefault(node.target, f"{_FLAT_PREFIX}{len(names)}")
            if not hasattr(root, flat):
                value = gm.get_submodule(node.target) if node.op == "call_module" else _attr(gm, node.target)
                if isinstance(value, torch.nn.Module):
                    root.add_module(flat, value)
                elif isinstance(value, torch.nn.Parameter):
                    root.register_parameter(flat, value)
                else:
                    root.register_buffer(flat, value)
            copied = graph.node_copy(node, lambda n: env[n])
            copied.target = flat
        else:
            copied = graph.node_copy(node, lambda n: env[n])
        env[node] = copied
    return torch.fx.GraphModule(root, graph), {flat: target for target, flat in names.items()}


def _attr(gm: torch.nn.Module, target: str) -> Any:
    value: Any = gm
    for atom in target.split("."):
        value = getattr(value, atom)
    return value


def _profile_runs(profile: Path, warmup: int) -> list[list[dict[str, Any]]]:
    """The node events of each timed run of an onnxruntime profile, in execution order (the warm-up runs
    dropped)."""
    events = json.loads(profile.read_text())
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    nodes = sorted((e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")),
                   key=lambda e: e["ts"])
    grouped: list[list[dict[str, Any]]] = [[] for _ in runs]
    starts = [r["ts"] for r in runs]
    import bisect

    for e in nodes:
        i = bisect.bisect_right(starts, e["ts"]) - 1
        if i >= 0 and e["ts"] <= runs[i]["ts"] + runs[i]["dur"]:
            grouped[i].append(e)
    return grouped[warmup:]


def _owner(node_name: str, names: Mapping[str, str]) -> tuple[str, str] | None:
    """(qualified leaf module, the scope inside it) of an ONNX node named after the flat leaf it ran in; None for
    a node outside any leaf (glue between modules) or one the session inserted."""
    if not node_name.startswith("/"):
        return None
    parts = node_name.split("/")
    return (names[parts[1]], "/".join(parts[2:-1])) if parts[1] in names else None


def _onnxruntime_costs(graph: OperatorGraph, config: CostConfig, inputs: Mapping[str, torch.Tensor], device: Any,
                       threads: int, progress: bool) -> dict[str, Any]:
    from ldpruner.passes.config import ExportConfig
    from ldpruner.passes.onnx.export import export_onnx

    traced = graph.traced
    flat, names = _flattened(traced.gm)
    with tempfile.TemporaryDirectory(prefix="ldpruner-costs-") as tmp:
        path = Path(tmp) / "dense.onnx"
        if progress:
            print("costs: exporting the dense model for onnxruntime's profiler", file=sys.stderr, flush=True)
        export_onnx(flat, traced.input_names, traced.example_inputs, path, config=ExportConfig(validate=False),
                    spatial_multiple=traced.spatial_multiple)
        dense, provider = _time_plain(path, inputs, config, device, threads)  # closed before the next opens
        profiled = ort_session(path, threads=threads, device=device, profile_prefix=str(Path(tmp) / "profile"))
        feeds = onnx_feeds(profiled, inputs)
        for _ in range(config.latency_warmup + config.latency_repeats):
            profiled.run(None, feeds)
        runs = _profile_runs(Path(profiled.end_profiling()), config.latency_warmup)
    if len(runs) != config.latency_repeats or not all(runs):
        raise ArtifactError(f"onnxruntime's profile holds {len(runs)} timed runs with node events, "
                            f"{config.latency_repeats} were made: this onnxruntime writes another profile format")
    # per run: microseconds per leaf module (and per (leaf, inner scope) for the kept shortcut convs)
    leaf_us: list[collections.Counter[str]] = []
    scope_us: list[collections.Counter[tuple[str, str]]] = []
    for events in runs:
        leaves: collections.Counter[str] = collections.Counter()
        scopes: collections.Counter[tuple[str, str]] = collections.Counter()
        owner: tuple[str, str] | None = None
        for e in events:
            named = _owner(e["name"].removesuffix("_kernel_time"), names)
            if named is not None or not e["name"].startswith("/"):
                owner = named if named is not None else owner  # an inserted node: the one that ran before it
            else:
                owner = None  # glue
            if owner is not None:
                leaves[owner[0]] += e["dur"]
                scopes[(owner[0], owner[1].split("/")[0])] += e["dur"]
        leaf_us.append(leaves)
        scope_us.append(scopes)
    modules_of = {op.name: _dead_modules(graph, op.name) for op in graph.candidates}

    def per_run(op: Any) -> tuple[list[float], list[float], str]:
        times = [sum(leaves[m] for m in modules_of[op.name]) / 1e3 for leaves in leaf_us]
        if op.action is Action.SHORTCUT:
            return times, [scopes[(op.name, "conv_shortcut")] / 1e3 for scopes in scope_us], "measured"
        if op.action is Action.CONV1X1:
            share = _projection_macs(op) / max(1, op.macs + _projection_macs(op))
            return times, [t * share for t in times], "macs-scaled"
        return times, [0.0 for _ in times], "measured"

    return _measured(graph, per_run, dense, [sum(e["dur"] for e in events) / 1e3 for events in runs],
                     provider=provider)


def _time_plain(path: Path, inputs: Mapping[str, torch.Tensor], config: CostConfig, device: Any,
                threads: int) -> tuple[Any, str]:
    """The dense ONNX model's latency without the profiler, and the provider it ran on."""
    session = ort_session(path, threads=threads, device=device)
    feeds = onnx_feeds(session, inputs)
    run = measure_interleaved({"dense": lambda: session.run(None, feeds)}, warmup=config.latency_warmup,
                              repeats=config.latency_repeats)
    return run, session.get_providers()[0]


def _dead_modules(graph: OperatorGraph, name: str) -> set[str]:
    """The modules whose every call dies with operator ``name`` (itself included)."""
    dead = graph.removed_by(name)
    calls = collections.defaultdict(list)
    for n in graph.traced.gm.graph.nodes:
        if n.op == "call_module":
            calls[n.target].append(n.name)
    return {target for target, nodes in calls.items() if all(n in dead for n in nodes)}


def _projection_macs(op: Any) -> int:
    out = op.out_shape
    spatial = out[2] * out[3] if len(out) == 4 else out[1]
    return op.in_shape[1 if len(op.in_shape) == 4 else -1] * out[1 if len(out) == 4 else -1] * spatial


# --- predicted vs measured -----------------------------------------------------------------------------------------

def check_latency(dense: Any, pruned: Any, costs: CostReport, names: Any, *, repeats: int | None = None,
                  warmup: int | None = None, tolerance: float | None = None, precision: float | None = None,
                  device: Any = None) -> dict[str, Any]:
    """Time the pruned model (a traced graph) beside the dense one on the costs' runtime, batch and threads,
    interleaved, until the 95 % interval of their latency ratio lies within ± ``precision`` of it (at least
    ``repeats`` rounds; :func:`ldpruner.runtime.timing.measure_ratio`), and set the measured cut against the cut
    ``costs`` predict for removing ``names``. ``flagged`` when the measured cut falls short of the predicted one by
    more than ``tolerance`` of it."""
    config = costs.config
    repeats = repeats if repeats is not None else config.latency_repeats
    warmup = warmup if warmup is not None else config.latency_warmup
    tolerance = tolerance if tolerance is not None else config.latency_tolerance
    precision = precision if precision is not None else config.latency_precision
    batch = int(costs.placement["batch"])
    predicted_cut = 1 - costs.predicted_ms(names) / costs.dense_ms
    with devices.intra_op_threads(costs.placement.get("threads")) as threads:  # the threads the costs were timed at
        if config.runtime == "torch":
            ratio = _torch_pair(dense, pruned, batch, repeats, warmup, precision)
        else:
            ratio = _onnxruntime_pair(dense, pruned, batch, repeats, warmup, threads, device, precision)
    run = ratio.run
    measured_cut = 1 - ratio.ratio
    shortfall = (predicted_cut - measured_cut) / predicted_cut if predicted_cut > 0 else 0.0
    result = {"runtime": config.runtime, "batch": batch, "repeats": run.repeats, "threads": threads,
              "dense_ms": run.stats["dense"].median_s * 1e3, "pruned_ms": run.stats["pruned"].median_s * 1e3,
              "measured_ratio": ratio.ratio, "measured_cut": measured_cut,
              # the 95 % interval of the measured cut, and whether it is as narrow as asked
              "measured_cut_interval": [1 - ratio.high, 1 - ratio.low], "precision": precision,
              "converged": ratio.converged, "measured": ratio.describe(),
              "predicted_ratio": 1 - predicted_cut, "predicted_cut": predicted_cut, "shortfall": shortfall,
              "tolerance": tolerance, "flagged": shortfall > tolerance, "message": None}
    if result["flagged"]:
        result["message"] = (f"the measured latency cut {measured_cut:.1%} falls short of the predicted "
                             f"{predicted_cut:.1%} by {shortfall:.0%} of it (tolerance {tolerance:.0%}): the "
                             f"per-operator costs ({config.runtime}) overstate what these removals save")
    return result


def _torch_pair(dense: Any, pruned: Any, batch: int, repeats: int, warmup: int, precision: float) -> Any:
    device = next(pruned.gm.parameters()).device
    sync = _synchronizer(device)
    dense_args = [timing_inputs(dense, batch)[n] for n in dense.input_names]
    pruned_args = [timing_inputs(pruned, batch)[n] for n in pruned.input_names]

    def timed(gm: Any, args: list[Any]) -> Callable[[], None]:
        return lambda: (gm(*args), sync())

    with torch.inference_mode():
        return measure_ratio({"dense": timed(dense.gm.eval(), dense_args), "pruned": timed(pruned.gm.eval(),
                                                                                         pruned_args)},
                             "pruned", "dense", warmup=warmup, repeats=repeats, precision=precision)


def _onnxruntime_pair(dense: Any, pruned: Any, batch: int, repeats: int, warmup: int, threads: int | None,
                      device: Any, precision: float) -> Any:
    from ldpruner.passes.config import ExportConfig
    from ldpruner.passes.onnx.export import export_onnx

    with tempfile.TemporaryDirectory(prefix="ldpruner-latency-") as tmp:
        sessions, feeds = {}, {}
        for name, traced in (("dense", dense), ("pruned", pruned)):
            path = Path(tmp) / f"{name}.onnx"
            export_onnx(traced, None, None, path, config=ExportConfig(validate=False))
            sessions[name] = ort_session(path, threads=threads, device=device)
            feeds[name] = onnx_feeds(sessions[name], timing_inputs(traced, batch))
        return measure_ratio({n: (lambda n=n: sessions[n].run(None, feeds[n])) for n in sessions}, "pruned", "dense",
                             warmup=warmup, repeats=repeats, precision=precision)
