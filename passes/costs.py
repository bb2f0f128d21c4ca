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
prediction that falls short (:func:`~ldpruner.passes.latency_check.check_latency`). The report and its file,
costs.json, are :mod:`ldpruner.passes.cost_report`.
"""

from __future__ import annotations

import collections
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

from ldpruner.base import devices
from ldpruner.base.errors import ArtifactError, ConfigError
from ldpruner.compiler.graph import Action, OperatorGraph
from ldpruner.compiler.removal import stand_in
from ldpruner.runtime.timing import measure_interleaved, onnx_feeds, ort_session

from .config import CostConfig
from .cost_report import COSTS_FORMAT, CostReport, OperatorCost

__all__ = ["CostConfig", "cache_key", "latency_batch", "measure_costs", "timing_inputs"]


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



def cache_key(graph: OperatorGraph, config: CostConfig, device: Any, threads: int | None = None) -> str:
    """What the costs depend on: the graph's operators and shapes, the measurement options (not the tolerance and
    the precision, which judge plans), the device, the threads (None: :func:`ldpruner.base.devices.resolve_threads`)
    and the versions of the runtimes. Not the weights' values (nor their dtype: ``latency_dtype`` says it)."""
    import onnxruntime

    payload = {
        "format": COSTS_FORMAT,
        "operators": [op.to_dict() for op in graph],
        "inputs": {n: list(t.shape) for n, t in graph.traced.example_inputs.items()},
        "config": config.to_dict(),
        "device": str(device),
        "accelerator": devices.accelerator_name(device),
        "threads": devices.resolve_threads(threads),
        "versions": [torch.__version__, onnxruntime.__version__],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()



# --- measuring -------------------------------------------------------------------------------------------------

def measure_costs(graph: OperatorGraph, config: CostConfig | None = None, *, device: Any = None,
                  threads: int | None = None, progress: bool = False, save_to: str | Path | None = None
                  ) -> CostReport:
    """Measure the latency cost of every candidate of ``graph`` on ``config.runtime``: torch on the device the
    traced graph is on, in its dtype; onnxruntime on ``device``'s provider (CUDA for a CUDA device with
    onnxruntime-gpu, else the CPU; None: the graph's device). Either runs with ``threads`` intra-op threads (None:
    :func:`ldpruner.base.devices.resolve_threads`), recorded in the placement and the cache key."""
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
        export_onnx(flat, path, input_names=traced.input_names, example_inputs=traced.example_inputs,
                    config=ExportConfig(validate=False),
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
