"""OperatorGraph: the traced UNet seen as operators, with shapes, costs, structure and removal actions.

Built from a :class:`TracedUNet` by one profiling run on its example inputs (shapes per node, MACs per node from
``torch.utils.flop_counter``). Structure is a networkx DiGraph over the leaf modules and inputs/outputs
(:mod:`.structure`: ``data``, ``skip`` and ``residual`` edges). Removal actions:

* ``identity`` — output shape equals input shape: the operator is bypassed (block) or its residual branch is
  dropped (sublayer: the residual add is replaced by its other operand).
* ``shortcut`` — a ResnetBlock2D whose channels change: its 1×1 ``conv_shortcut`` stays, the rest goes.
* ``conv1x1`` — same spatial size, different channels, no shortcut: a new 1×1 conv (Linear on tokens),
  initialised as a partial identity.
* ``not-removable`` — with the reason.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import operator as pyop
from collections.abc import Iterable, Iterator
from typing import Any

import networkx as nx
import torch
import torch.fx
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .operators import is_operator, operator_kind
from .structure import build_structure
from .tracer import OUTSIDE_WHY, TracedUNet

__all__ = ["Action", "Operator", "OperatorGraph", "build_operator_graph", "flop_counter", "removed_nodes"]

_ADD_TARGETS = {pyop.add, torch.add, pyop.iadd}
_GATE_TARGETS = {pyop.mul, torch.mul}  # ada-norm-zero gates the branch before the residual add


class Action(str, enum.Enum):
    IDENTITY = "identity"
    SHORTCUT = "shortcut"
    CONV1X1 = "conv1x1"
    NOT_REMOVABLE = "not-removable"


@dataclasses.dataclass(frozen=True)
class Operator:
    """One operator of the traced UNet, keyed by its fx qualified name."""

    name: str
    node: str
    kind: str
    module_class: str
    in_shape: tuple[int, ...] | None
    out_shape: tuple[int, ...] | None
    params: int  # parameters the rewrite drops when this operator is removed (net of what it keeps or adds)
    macs: int  # multiply-accumulates per sample it saves, at the traced size
    action: Action
    reason: str
    join: str | None = None  # fx node name of the residual add, for branch operators
    output: str | None = None  # fx node name of its tensor output (a getitem when the module returns a tuple)

    @property
    def removable(self) -> bool:
        return self.action is not Action.NOT_REMOVABLE

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["action"] = self.action.value
        d["in_shape"] = list(self.in_shape) if self.in_shape else None
        d["out_shape"] = list(self.out_shape) if self.out_shape else None
        return d


@dataclasses.dataclass
class OperatorGraph:
    """The operators of one traced UNet and its structure. Pure data: building it never changes the graph."""

    traced: TracedUNet
    operators: dict[str, Operator]
    structure: nx.DiGraph
    total_params: int
    total_macs: int
    node_macs: dict[str, int]
    output_shape: tuple[int, ...] | None = None  # the UNet's output at the traced inputs (what a rewrite must keep)

    def __iter__(self) -> Iterator[Operator]:
        return iter(self.operators.values())

    def __getitem__(self, name: str) -> Operator:
        return self.operators[name]

    def __contains__(self, name: str) -> bool:
        return name in self.operators

    @property
    def candidates(self) -> list[Operator]:
        return [op for op in self if op.removable]

    def _removal_roots(self, op: Operator) -> tuple[torch.fx.Node, list[torch.fx.Node]]:
        """The node that loses its users when ``op`` is removed, and the nodes that take them over."""
        nodes = {n.name: n for n in self.traced.gm.graph.nodes}
        if op.join is not None:
            join, node = nodes[op.join], nodes[op.node]
            return join, [a for a in join.all_input_nodes if not _depends_on(a, node)]
        node = nodes[op.node]
        return nodes[op.output], [node.args[0]]

    def removed_by(self, name: str) -> frozenset[str]:
        """The fx nodes (by name) that removing operator ``name`` deletes: the ones its MACs count and its latency
        cost times (the operator, its tuple unpacking, modules only it feeds, a branch's residual add)."""
        return frozenset(n.name for n in removed_nodes(*self._removal_roots(self.operators[name])))

    def jointly_removed(self, names: Iterable[str]) -> dict[str, int]:
        """Modules that no single removal kills but the removals together do (every user of theirs is gone,
        e.g. the time embedding once every resnet is removed): qualified name → parameters.

        Per-operator costs cannot see these; selection uses this to keep plans exact."""
        ops = [self.operators[n] for n in names]
        singles: set[str] = set()
        roots, keeps = [], []
        for op in ops:
            root, keep = self._removal_roots(op)
            roots.append(root)
            keeps.extend(keep)
            singles |= {n.target for n in removed_nodes(root, keep) if n.op == "call_module"}
        dead = removed_nodes(roots, keeps)
        gm = self.traced.gm
        live = {n.target for n in gm.graph.nodes if n.op == "call_module" and n not in dead}
        extra = {n.target for n in dead if n.op == "call_module"} - live - singles
        return {t: _module_params(gm.get_submodule(t)) for t in sorted(extra) if _module_params(gm.get_submodule(t))}

    def skip_edges(self) -> list[tuple[str, str]]:
        return [(u, v) for u, v, k in self.structure.edges(data="kind") if k == "skip"]

    def table(self) -> str:
        """A fixed-width operator table (stable: golden tests compare it)."""
        rows = [("operator", "kind", "action", "in", "out", "params", "MACs")]
        for op in self:
            rows.append((
                op.name,
                op.kind,
                op.action.value,
                "x".join(map(str, op.in_shape[1:])) if op.in_shape else "-",
                "x".join(map(str, op.out_shape[1:])) if op.out_shape else "-",
                f"{op.params:,}",
                f"{op.macs:,}",
            ))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) if i < 5 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
                 for r in rows]
        removable = self.candidates
        lines.append(
            f"{len(self.operators)} operators, {len(removable)} removable; UNet params {self.total_params:,}, "
            f"MACs/sample {self.total_macs:,}"
        )
        if self.traced.outside:
            modules = ", ".join(f"{name} ({count:,})" for name, count in self.traced.outside.items())
            lines.append(f"outside the graph: {self.traced.outside_params:,} params in {modules} — {OUTSIDE_WHY}")
        return "\n".join(lines)

    def outside_graph(self) -> dict[str, Any] | None:
        """The model's parameters the graph does not hold, and why (None when it holds them all)."""
        if not self.traced.outside:
            return None
        return {"params": self.traced.outside_params, "modules": dict(self.traced.outside), "why": OUTSIDE_WHY}

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_class": self.traced.model_class,
            "granularity": self.traced.granularity.value,
            "total_params": self.total_params,
            "outside_graph": self.outside_graph(),
            "total_macs_per_sample": self.total_macs,
            "trace": self.traced.validity(),
            "operators": [op.to_dict() for op in self],
            "skip_edges": [list(e) for e in self.skip_edges()],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


class _Profiler(torch.fx.Interpreter):
    """Runs the graph once, recording each node's output shape and MACs."""

    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__(gm)
        self.shapes: dict[str, tuple[int, ...] | None] = {}
        self.macs: dict[str, int] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.op in ("call_module", "call_function", "call_method"):
            counter = flop_counter()
            with counter:
                out = super().run_node(n)
            self.macs[n.name] = counter.get_total_flops() // 2
        else:
            out = super().run_node(n)
        self.shapes[n.name] = tuple(out.shape) if isinstance(out, torch.Tensor) else None
        return out


def flop_counter() -> FlopCounterMode:
    """A FlopCounterMode that also counts attention on CPU: torch has no formula for its fused CPU kernel
    (``_scaled_dot_product_flash_attention_for_cpu``), so scores and value mixing would count as zero."""
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is None:  # a private op name: without it the stock formulas are all there is
        return FlopCounterMode(display=False)
    return FlopCounterMode(display=False, custom_mapping={cpu_sdpa: _sdpa_flops})


def _sdpa_flops(query_shape, key_shape, value_shape, *args: Any, out_shape=None, **kwargs: Any) -> int:
    """Q·Kᵀ then softmax(·)·V: 2·b·h·s_q·s_kv·(d_qk + d_v) flops."""
    b, h, s_q, d_qk = query_shape
    s_kv, d_v = value_shape[-2], value_shape[-1]
    return 2 * b * h * s_q * s_kv * (d_qk + d_v)


def _module_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def removed_nodes(root: torch.fx.Node | Iterable[torch.fx.Node], keep: Iterable[torch.fx.Node] = ()
                  ) -> set[torch.fx.Node]:
    """The nodes that die when ``root`` (one node or several) loses all its users (roots included), except
    ``keep`` (nodes that take over the roots' users): a backward liveness walk."""
    roots = [root] if isinstance(root, torch.fx.Node) else list(root)
    dead = set(roots)
    keep = set(keep) - dead
    stack = [a for r in roots for a in r.all_input_nodes]
    while stack:
        n = stack.pop()
        if n in dead or n in keep or n.op in ("placeholder", "output"):
            continue
        if n.users and all(u in dead for u in n.users):
            dead.add(n)
            stack.extend(n.all_input_nodes)
    return dead


def _find_join(node: torch.fx.Node, shapes: dict[str, Any]) -> tuple[torch.fx.Node, torch.fx.Node] | None:
    """If ``node`` is a residual branch (node → [gate mul] → add(branch, skip)), return (add, skip)."""
    branch = node
    for _ in range(3):
        if len(branch.users) != 1:
            return None
        user = next(iter(branch.users))
        target = user.target if user.op == "call_function" else (user.target if user.op == "call_method" else None)
        is_add = ((user.op == "call_function" and target in _ADD_TARGETS)
                  or (user.op == "call_method" and target == "add"))
        is_gate = ((user.op == "call_function" and target in _GATE_TARGETS)
                   or (user.op == "call_method" and target == "mul"))
        if is_add:
            others = [a for a in user.args[:2] if a is not branch]
            if len(others) != 1 or not isinstance(others[0], torch.fx.Node):
                return None
            skip = others[0]
            if skip.op == "placeholder":  # a graph input added on (ControlNet's residuals): not the op's own skip
                return None
            if shapes.get(skip.name) is None or shapes.get(skip.name) != shapes.get(user.name):
                return None
            if _depends_on(skip, node):
                return None
            return user, skip
        if not is_gate:
            return None
        branch = user
    return None


def _depends_on(n: torch.fx.Node, ancestor: torch.fx.Node) -> bool:
    seen: set[torch.fx.Node] = set()
    stack = [n]
    while stack:
        m = stack.pop()
        if m is ancestor:
            return True
        if m in seen:
            continue
        seen.add(m)
        stack.extend(m.all_input_nodes)
    return False


def tensor_output(node: torch.fx.Node, shapes: dict[str, Any]) -> torch.fx.Node | None:
    """The node carrying the module's tensor result: itself, or ``out[0]`` when it returns a 1-tuple/ModelOutput
    whose only use is that item."""
    if shapes.get(node.name) is not None:
        return node
    users = list(node.users)
    if users and all(u.op == "call_function" and u.target is pyop.getitem and u.args[1] == 0 for u in users) \
            and len(users) == 1:
        return users[0]
    return None


def _removal_action(node: torch.fx.Node, module: nn.Module, shapes: dict[str, Any], calls: int
                    ) -> tuple[Action, str, torch.fx.Node | None]:
    name = type(module).__name__
    if calls > 1:
        return Action.NOT_REMOVABLE, f"module is called {calls} times", None
    if not node.args or not isinstance(node.args[0], torch.fx.Node):
        return Action.NOT_REMOVABLE, "first input is not a tensor", None
    out = tensor_output(node, shapes)
    in_shape = shapes.get(node.args[0].name)
    if in_shape is None or out is None:
        return Action.NOT_REMOVABLE, "input or output is not a single tensor", None
    out_shape = shapes[out.name]
    if name == "ResnetBlock2D" and (getattr(module, "up", False) or getattr(module, "down", False)):
        return Action.NOT_REMOVABLE, "resnet with built-in up/down-sampling changes spatial size", None
    join = _find_join(out, shapes)
    # a branch whose removal leaves zeros in its place: the zeros take the input's shape, so only a branch that
    # keeps the shape qualifies (score-SDE's skip blocks add a downsampling resnet to a skip path)
    if join is not None and in_shape == out_shape:
        return Action.IDENTITY, "residual branch: its residual add becomes the skip", join[0]
    if name == "Attention" and not getattr(module, "residual_connection", False):
        # its input is the normalised features, not the stream it is added to: bypassing it would add them on
        # (K-diffusion's attention blocks reshape the output before their residual add, out of the join's reach)
        return Action.NOT_REMOVABLE, "attention branch whose residual add was not found", None
    if len(in_shape) != len(out_shape) or (len(out_shape) == 4 and in_shape[2:] != out_shape[2:]) or \
            (len(out_shape) == 3 and in_shape[1] != out_shape[1]):
        return Action.NOT_REMOVABLE, f"changes spatial size {_fmt(in_shape)} -> {_fmt(out_shape)}", None
    if name == "ResnetBlock2D" and getattr(module, "conv_shortcut", None) is not None:
        return Action.SHORTCUT, "channels change: keeps its 1x1 conv_shortcut", None
    if in_shape == out_shape:
        return Action.IDENTITY, "shapes equal: bypassed", None
    if len(out_shape) in (3, 4) and in_shape[0] == out_shape[0]:
        return (Action.CONV1X1, f"channels change {_channels(in_shape)} -> {_channels(out_shape)}: new 1x1 projection",
                None)
    return Action.NOT_REMOVABLE, f"shape changes {_fmt(in_shape)} -> {_fmt(out_shape)}", None


def _channels(shape: tuple[int, ...]) -> int:
    return shape[1] if len(shape) == 4 else shape[-1]


def _fmt(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape[1:]))


def conv1x1_params(in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> int:
    cin, cout = _channels(in_shape), _channels(out_shape)
    return cin * cout + cout


def build_operator_graph(traced: TracedUNet, *, extra_operator_types: Iterable[type] = ()) -> OperatorGraph:
    """Profile the traced graph on its example inputs and describe every operator. Never mutates the graph."""
    gm = traced.gm
    extra = tuple(extra_operator_types)
    prof = _Profiler(gm)
    with torch.no_grad():
        prof.run(*[traced.example_inputs[n] for n in traced.input_names])
    batch = traced.example_inputs[traced.input_names[0]].shape[0]
    node_macs = {k: v // batch for k, v in prof.macs.items()}
    shapes = prof.shapes

    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1

    modules = dict(gm.named_modules())
    operators: dict[str, Operator] = {}
    for n in gm.graph.nodes:
        if n.op != "call_module":
            continue
        module = modules[n.target]
        if not is_operator(module, traced.granularity, extra):
            continue
        action, reason, join = _removal_action(n, module, shapes, calls[n.target])
        in_shape = shapes.get(n.args[0].name) if n.args and isinstance(n.args[0], torch.fx.Node) else None
        out = tensor_output(n, shapes)
        params, macs = 0, 0
        if action is not Action.NOT_REMOVABLE:
            params, macs = _removal_cost(gm, modules, n, out, join, action, module, in_shape, shapes[out.name],
                                         node_macs)
        operators[n.target] = Operator(
            name=n.target,
            node=n.name,
            kind=operator_kind(module),
            module_class=type(module).__name__,
            in_shape=in_shape,
            out_shape=shapes[out.name] if out is not None else None,
            params=params,
            macs=macs,
            action=action,
            reason=reason,
            join=join.name if join is not None else None,
            output=out.name if out is not None else None,
        )

    total_params = _module_params(gm)
    total_macs = sum(node_macs.values())
    (result,) = [n for n in gm.graph.nodes if n.op == "output"]
    out_arg = result.args[0]
    output_shape = shapes.get(out_arg.name) if isinstance(out_arg, torch.fx.Node) else None
    return OperatorGraph(
        traced=traced,
        operators=operators,
        structure=build_structure(gm, modules, traced.granularity, extra, operators, shapes),
        total_params=total_params,
        total_macs=total_macs,
        node_macs=node_macs,
        output_shape=output_shape,
    )


def _removal_cost(gm, modules, node, out, join, action, module, in_shape, out_shape, node_macs) -> tuple[int, int]:
    if join is not None:  # the residual add is replaced by its skip operand, which takes over its users
        dead = removed_nodes(join, keep=[a for a in join.all_input_nodes if not _depends_on(a, node)])
    else:
        dead = removed_nodes(out, keep=[node.args[0]])
    live_targets = {n.target for n in gm.graph.nodes if n.op == "call_module" and n not in dead}
    dead_targets = {n.target for n in dead if n.op == "call_module"} - live_targets
    params = sum(_module_params(modules[t]) for t in dead_targets)
    macs = sum(node_macs.get(n.name, 0) for n in dead if n is not join)
    if action is Action.SHORTCUT:
        params -= _module_params(module.conv_shortcut)
        macs -= _conv_macs(module.conv_shortcut, out_shape)
    elif action is Action.CONV1X1:
        params -= conv1x1_params(in_shape, out_shape)
        spatial = out_shape[2] * out_shape[3] if len(out_shape) == 4 else out_shape[1]
        macs -= _channels(in_shape) * _channels(out_shape) * spatial
    return params, macs


def _conv_macs(conv: nn.Module, out_shape: tuple[int, ...]) -> int:
    weight = conv.weight
    return weight.numel() * out_shape[2] * out_shape[3] if len(out_shape) == 4 else weight.numel()
