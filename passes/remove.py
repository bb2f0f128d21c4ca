"""RemoveOperators: rewrite a traced UNet so that the operators of a RemovalPlan are gone from its graph.

For a planned operator ``y = f(x)`` (``s``: the block's output scale factor, no node when it is 1)::

    identity, block      y = f(x)              ->  y = x / s
    identity, branch     h = skip + [g *] f(x) ->  h = skip
    shortcut             y = f(x)              ->  y = f.conv_shortcut(x) / s
    conv1x1              y = f(x)              ->  y = P(x),  P a new 1x1 conv / Linear (partial identity)

Boundary cases; the branches of the code carry the same labels:

* [module returns a tuple -> getitem] the users read ``f(x)[0]``: the getitem is what gets replaced.
* [residual branch -> add replaced by skip] the add joining the branch is replaced by its other operand.
* [channels differ -> shortcut] the resnet's own 1x1 ``conv_shortcut`` stays; without one a new projection
  is added under the ``PROJECTION_ROOT`` ModuleDict.
* [output used by a skip concat] the down→up concatenation reads the replacement.
* [output is a graph output] the graph's output node reads the replacement.
* [several users] every user is rewired, not only the next operator.

Edit order: replace uses → erase the dead nodes in reverse order → DCE → lint → recompile → delete unused
submodules. The plan is validated whole before anything is touched; afterwards the output shape and the exact
parameter count are checked against the plan.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import difflib
import operator as pyop
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.fx
from torch import nn

from ldpruner.base.errors import PlanError, RewriteError
from ldpruner.compiler.graph import (
    Action,
    Operator,
    OperatorGraph,
    build_operator_graph,
    flop_counter,
    removed_nodes,
)
from ldpruner.compiler.passmanager import Pass, PassManager, PassResult
from ldpruner.compiler.removal import PROJECTION_ROOT, make_projection, output_scale
from ldpruner.compiler.tracer import TracedUNet
from ldpruner.compiler.verify import verify_graph

from .plan import RemovalPlan

__all__ = ["PrunedUNet", "RemoveOperators", "apply_plan", "count_params", "projection_key", "prune"]

_CAT_TARGETS = {torch.cat, torch.concat, torch.concatenate}

# the labels of the boundary cases, as the summary counts them
SKIP_CONCAT = "output used by a skip concat"
GRAPH_OUTPUT = "output is a graph output"
SEVERAL_USERS = "several users"
TUPLE_OUTPUT = "module returns a tuple -> getitem"
RESIDUAL_BRANCH = "residual branch -> add replaced by skip"
CHANNELS_SHORTCUT = "channels differ -> shortcut"
CHANNELS_PROJECTION = "channels differ -> new projection"


def count_params(module: nn.Module) -> int:
    """Parameters of ``module``, each shared tensor counted once."""
    return sum(p.numel() for p in module.parameters())


def projection_key(operator_name: str) -> str:
    """The key of a conv1x1 replacement in the ``PROJECTION_ROOT`` ModuleDict (ModuleDict keys cannot hold '.')."""
    return operator_name.replace(".", "__")


@dataclasses.dataclass(frozen=True)
class _Target:
    """One planned removal resolved against the graph being rewritten."""

    op: Operator
    node: torch.fx.Node  # the call_module node
    out: torch.fx.Node  # its tensor output: the node, or the getitem[0] after it
    join: torch.fx.Node | None = None  # branch operators: the residual add ...
    branch: torch.fx.Node | None = None  # ... and its operand that carries the branch


class RemoveOperators(Pass):
    """Apply ``plan`` to the GraphModule ``operator_graph`` was built from, or to a fresh trace of the same model
    (operators are matched by fx qualified name). In place: the module given is the module returned.

    A plan that does not fit raises :class:`PlanError` before anything changes; a :class:`RewriteError` from the
    checks after the edit leaves the module rewritten but unverified, which is why :func:`prune` works on a copy.
    ``allow_empty=True`` accepts a plan with no removals (the graph is returned unchanged, ``modified=False``)."""

    in_place = True

    def __init__(self, plan: RemovalPlan, operator_graph: OperatorGraph, *, allow_empty: bool = False):
        self.plan = plan
        self.operator_graph = operator_graph
        self.allow_empty = allow_empty

    # --- validation -------------------------------------------------------------------------------------------
    def _resolve(self, gm: torch.fx.GraphModule) -> list[_Target]:
        """Check the whole plan against the operator graph and ``gm``; collect every mismatch, then raise."""
        plan, og = self.plan, self.operator_graph
        problems: list[str] = []
        if plan.granularity != og.traced.granularity.value:
            problems.append(f"plan granularity {plan.granularity!r} differs from the graph's "
                            f"{og.traced.granularity.value!r}")
        if plan.model_class != og.traced.model_class:
            problems.append(f"plan model_class {plan.model_class!r} differs from the graph's {og.traced.model_class!r}")
        params_now = count_params(gm)
        if plan.total_params != params_now:
            problems.append(f"plan was made for a model with {plan.total_params:,} parameters, the graph has "
                            f"{params_now:,} (a plan applies once, to the dense model it was selected for)")

        live = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
        seen: set[str] = set()
        targets: list[_Target] = []
        for r in plan.removals:
            if r.name in seen:
                problems.append(f"{r.name!r} appears more than once in the plan")
                continue
            seen.add(r.name)
            if r.name not in og:
                close = difflib.get_close_matches(r.name, list(og.operators), n=3, cutoff=0.6)
                problems.append(f"{r.name!r} is not an operator of this {og.traced.model_class} "
                                f"({og.traced.granularity.value} granularity); close names: {close or 'none'}")
                continue
            op = og[r.name]
            if not op.removable:
                problems.append(f"{r.name!r} is not removable: {op.reason}")
                continue
            if r.action != op.action.value:
                problems.append(f"{r.name!r}: the plan says action {r.action!r}, the graph says {op.action.value!r}")
            if r.params != op.params:
                problems.append(f"{r.name!r}: the plan predicts {r.params:,} parameters removed, the graph "
                                f"{op.params:,}")
            node = live.get(r.name)
            if node is None:
                problems.append(f"{r.name!r} is no longer called in this graph (already removed? a plan applies once)")
                continue
            try:
                targets.append(_locate(op, node))
            except RewriteError as exc:
                problems.append(str(exc))
        if problems:
            raise PlanError("the plan does not fit this graph:\n  " + "\n  ".join(problems))
        return targets

    # --- the rewrite ------------------------------------------------------------------------------------------
    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        plan = self.plan
        if not plan.removals:
            if not self.allow_empty:
                raise RewriteError("the plan removes no operator, so the rewrite would change nothing; "
                                   "pass allow_empty=True to accept an unchanged graph")
            params = count_params(gm)
            return PassResult(gm, False, _summary(plan, [], collections.Counter(), params, params, plan.total_macs))

        targets = self._resolve(gm)
        traced = self.operator_graph.traced
        inputs = [traced.example_inputs[n] for n in traced.input_names]
        params_before = count_params(gm)
        modules_before = dict(gm.named_modules())  # references: the error path sizes what was deleted
        cases: collections.Counter[str] = collections.Counter()

        graph = gm.graph
        roots = [self._rewrite(gm, t, cases) for t in targets]

        dead: set[torch.fx.Node] = set()
        for root in roots:
            dead |= removed_nodes(root)
        position = {n: i for i, n in enumerate(graph.nodes)}
        for n in sorted(dead, key=position.__getitem__, reverse=True):
            if n.users:  # the liveness walk and the rewiring disagree: a bug, never a user error
                raise RewriteError(f"node {n.name} was to be erased but is still used by {list(n.users)}")
            graph.erase_node(n)
        graph.eliminate_dead_code()
        graph.lint()
        gm.recompile()
        gm.delete_all_unused_submodules()

        macs_after = _macs_per_sample(gm, inputs)

        params_after = count_params(gm)
        if params_before - params_after != plan.removed_params:
            raise RewriteError(_params_mismatch(plan, modules_before, gm, params_before, params_after))
        return PassResult(gm, True, _summary(plan, targets, cases, params_before, params_after, macs_after))

    def _rewrite(self, gm: torch.fx.GraphModule, target: _Target, cases: collections.Counter[str]) -> torch.fx.Node:
        """Rewire the users of one operator; return the node that lost its users (the root of what dies)."""
        op, node, out = target.op, target.node, target.out
        graph = gm.graph
        if out is not node:
            cases[TUPLE_OUTPUT] += 1  # [module returns a tuple -> getitem]: replacing the getitem frees both

        if target.join is not None:
            # [residual branch -> add replaced by skip]; the skip operand is read now, not when validating:
            # an earlier removal in the same block may have replaced it (attn1's add is attn2's skip)
            (skip,) = [a for a in target.join.args[:2] if a is not target.branch]
            cases[RESIDUAL_BRANCH] += 1
            _replace_uses(target.join, skip, cases)
            return target.join

        module = gm.get_submodule(op.name)
        x = node.args[0]
        with graph.inserting_before(node):
            if op.action is Action.IDENTITY:
                replacement, scale = x, output_scale(module)
            elif op.action is Action.SHORTCUT:
                # [channels differ -> shortcut]
                cases[CHANNELS_SHORTCUT] += 1
                replacement = graph.call_module(f"{op.name}.conv_shortcut", (x,))
                scale = output_scale(module)
            elif op.action is Action.CONV1X1:
                # [channels differ -> shortcut], without a shortcut to keep: a new projection
                cases[CHANNELS_PROJECTION] += 1
                key = projection_key(op.name)
                # the new weights take the removed operator's dtype and the device of the tensors that stay (the
                # removed operator's own may be meta tensors already: see _copy_keeping)
                kept = next((q for q in gm.parameters() if q.device.type != "meta"), torch.empty(0))
                dtype = next(module.parameters(), kept).dtype
                like = torch.empty(0, device=kept.device, dtype=dtype)
                _projection_root(gm)[key] = make_projection(op.in_shape, op.out_shape, like)
                replacement, scale = graph.call_module(f"{PROJECTION_ROOT}.{key}", (x,)), 1.0
            else:
                raise RewriteError(f"{op.name!r} has action {op.action.value!r}, which the rewrite cannot apply")
            if scale != 1.0:  # the block divided its sum by s; the bypass must too, or the output scale drifts
                replacement = graph.call_function(pyop.truediv, (replacement, scale))
            if replacement is not x:  # new nodes sit where the operator was: feature taps group them with it
                for new in (replacement, *replacement.all_input_nodes):
                    if new is not x and "nn_module_stack" in node.meta:
                        new.meta.setdefault("nn_module_stack", dict(node.meta["nn_module_stack"]))
        _replace_uses(out, replacement, cases)
        return out


def _macs_per_sample(gm: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> int:
    """MACs per sample of one run on the example inputs, with the analysis' own counter so before and after
    compare; a graph that cannot run is a RewriteError (the verifier, when it runs, says more)."""
    counter = flop_counter()
    try:
        with torch.no_grad(), counter:
            gm(*inputs)
    except Exception as exc:  # any failure of the rewritten graph on its example inputs
        raise RewriteError(f"the rewritten graph fails on its example inputs: {type(exc).__name__}: {exc}") from exc
    return counter.get_total_flops() // 2 // inputs[0].shape[0]


def _params_mismatch(plan: RemovalPlan, modules_before: Mapping[str, nn.Module], gm: torch.fx.GraphModule,
                     params_before: int, params_after: int) -> str:
    """Say by how much the count is off and which unplanned modules died (all their users were removed together,
    which per-operator predictions cannot see)."""
    remaining = {name for name, _ in gm.named_modules()}
    gone = [n for n in modules_before if n not in remaining and count_params(modules_before[n])]
    # neither a planned operator, nor inside one, nor a container of one
    unplanned = [n for n in gone
                 if not any(n == p or n.startswith(p + ".") or p.startswith(n + ".") for p in plan.names)]
    unplanned = [n for n in unplanned if not any(n.startswith(u + ".") for u in unplanned)]
    message = (f"the rewrite removed {params_before - params_after:,} parameters ({params_before:,} -> "
               f"{params_after:,}) but the plan predicts {plan.removed_params:,}")
    if unplanned:
        listed = ", ".join(f"{n} ({count_params(modules_before[n]):,})" for n in unplanned[:8])
        message += (f"; not planned but dead because every user is removed: {listed}. Keep at least one of their "
                    "users, or select the plan with these joint removals accounted for")
    return message


def _locate(op: Operator, node: torch.fx.Node) -> _Target:
    """Find, in the graph being rewritten, the nodes the analysis named; a graph that differs is an error."""
    out = node
    if op.output != op.node:
        # [module returns a tuple -> getitem]
        items = [u for u in node.users if u.op == "call_function" and u.target is pyop.getitem and u.args[1] == 0]
        if len(items) != 1 or len(node.users) != 1:
            raise RewriteError(f"{op.name!r} was analysed as returning a tuple read once through [0], but in this "
                               f"graph its users are {[u.name for u in node.users]}")
        out = items[0]
    if op.join is None:
        return _Target(op, node, out)
    branch = out  # walk down through at most two gate muls to the residual add
    for _ in range(3):
        if len(branch.users) != 1:
            break
        user = next(iter(branch.users))
        if user.name == op.join:
            operands = [a for a in user.args[:2] if a is not branch]
            if len(operands) == 1 and isinstance(operands[0], torch.fx.Node):
                return _Target(op, node, out, user, branch)
            break
        branch = user
    raise RewriteError(f"{op.name!r} was analysed as a residual branch joining at {op.join!r}, but no such add "
                       "follows it in this graph (was the plan made on another trace?)")


def _live_users(node: torch.fx.Node) -> list[torch.fx.Node]:
    # the trace leaves dead shape reads (``h.ndim``) behind; they are no real users and DCE takes them
    return [u for u in node.users if u.users or u.op == "output" or u.is_impure()]


def _replace_uses(old: torch.fx.Node, new: torch.fx.Node, cases: collections.Counter[str]) -> None:
    users = _live_users(old)
    # fx rewires a concat's list argument and the output node like any other use; the cases are counted so the
    # summary shows which boundaries the rewrite met.
    if any(u.op == "call_function" and u.target in _CAT_TARGETS for u in users):
        cases[SKIP_CONCAT] += 1  # [output used by a skip concat]
    if any(u.op == "output" for u in users):
        cases[GRAPH_OUTPUT] += 1  # [output is a graph output]
    if len(users) > 1:
        cases[SEVERAL_USERS] += 1  # [several users]
    old.replace_all_uses_with(new)


def _projection_root(gm: torch.fx.GraphModule) -> nn.ModuleDict:
    root = getattr(gm, PROJECTION_ROOT, None)
    if root is None:
        root = nn.ModuleDict()
        gm.add_module(PROJECTION_ROOT, root)
    elif not isinstance(root, nn.ModuleDict):
        raise RewriteError(f"the graph already has an attribute {PROJECTION_ROOT!r} that is not a ModuleDict")
    return root


def _summary(plan: RemovalPlan, targets: list[_Target], cases: Mapping[str, int], params_before: int,
             params_after: int, macs_after: int) -> dict[str, Any]:
    per_action = collections.Counter(t.op.action.value for t in targets)
    return {
        "ops_removed": len(targets),
        "removed": [t.op.name for t in targets],
        "per_action": {a.value: per_action.get(a.value, 0) for a in Action if a is not Action.NOT_REMOVABLE},
        "cases": dict(sorted(cases.items())),
        "params_before": params_before,
        "params_after": params_after,
        "macs_per_sample_before": plan.total_macs,
        "macs_per_sample_after": macs_after,
        "macs_per_sample_predicted": plan.predicted_macs,
    }


@dataclasses.dataclass(frozen=True)
class PrunedUNet:
    """A rewritten UNet: ``traced.gm`` is the pruned graph (call it as ``traced.gm(*[inputs[n] for n in
    traced.input_names])``), with the plan that made it, the rewrite summary and the dense model's config."""

    traced: TracedUNet
    plan: RemovalPlan
    summary: dict[str, Any]
    config: Mapping[str, Any] | None = None  # the diffusers config of the dense model (saving needs it)

    @property
    def gm(self) -> torch.fx.GraphModule:
        return self.traced.gm

    @property
    def input_names(self) -> tuple[str, ...]:
        return self.traced.input_names


def _copy_keeping(gm: torch.fx.GraphModule, plan: RemovalPlan, operator_graph: OperatorGraph) -> torch.fx.GraphModule:
    """A deep copy of ``gm`` for the rewrite, in which the tensors that only the planned removals hold are copied as
    meta tensors (same shapes, no memory): the rewrite deletes them, so a full-size model is never held twice.

    A tensor is left out only when every module path that reaches it lies inside a planned removal (and, for a
    ``shortcut`` removal, outside the ``conv_shortcut`` that stays); names the plan gets wrong are left to the
    rewrite's validation."""
    removed: dict[str, str | None] = {}  # removal prefix → the kept part under it
    for r in plan.removals:
        if r.name in operator_graph.operators:
            shortcut = operator_graph[r.name].action is Action.SHORTCUT
            removed[r.name + "."] = f"{r.name}.conv_shortcut." if shortcut else None
    if not removed:
        return copy.deepcopy(gm)

    def dropped(path: str) -> bool:
        return any(path.startswith(prefix) and not (kept and path.startswith(kept))
                   for prefix, kept in removed.items())

    owners: dict[int, list[str]] = collections.defaultdict(list)
    tensors: dict[int, torch.Tensor] = {}
    for name, tensor in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        owners[id(tensor)].append(name)
        tensors[id(tensor)] = tensor
    memo: dict[int, Any] = {}
    for key, names in owners.items():
        if all(dropped(name) for name in names):
            tensor = tensors[key]
            meta = torch.empty_like(tensor, device="meta")
            memo[key] = nn.Parameter(meta, requires_grad=tensor.requires_grad) if isinstance(
                tensor, nn.Parameter) else meta
    return copy.deepcopy(gm, memo)


def apply_plan(
    gm: torch.fx.GraphModule,
    plan: RemovalPlan,
    operator_graph: OperatorGraph,
    *,
    verify: bool = True,
    allow_empty: bool = False,
) -> PassResult:
    """Rewrite ``gm`` in place by ``plan`` through the pass manager: :class:`RemoveOperators`, then — with
    ``verify`` — the verifier as its declared post-condition (every called module exists, ``graph.lint()``, one run
    on the example inputs giving the dense model's output shape)."""
    traced = operator_graph.traced
    verifier = None
    if verify:
        inputs = [traced.example_inputs[n] for n in traced.input_names]

        def verifier(module: torch.fx.GraphModule) -> None:
            verify_graph(module, inputs, operator_graph.output_shape)

    manager = PassManager([RemoveOperators(plan, operator_graph, allow_empty=allow_empty)], verify=verifier)
    return manager(gm)


def prune(
    traced: TracedUNet,
    plan: RemovalPlan,
    *,
    operator_graph: OperatorGraph | None = None,
    extra_operator_types: Iterable[type] = (),
    config: Mapping[str, Any] | None = None,
    allow_empty: bool = False,
    verify: bool = True,
) -> PrunedUNet:
    """Apply ``plan`` to a copy of ``traced.gm`` (:func:`apply_plan`); ``traced`` (and the model it came from) stay
    unchanged.

    ``operator_graph`` defaults to ``build_operator_graph(traced, extra_operator_types=...)`` (one profiling run);
    ``config`` is the dense model's ``model.config``, kept for :func:`save_student`."""
    if operator_graph is None:
        operator_graph = build_operator_graph(traced, extra_operator_types=extra_operator_types)
    gm = _copy_keeping(traced.gm, plan, operator_graph)
    result = apply_plan(gm, plan, operator_graph, verify=verify, allow_empty=allow_empty)
    pruned = dataclasses.replace(traced, gm=result.gm)
    summary = result.summary[RemoveOperators.__name__]
    return PrunedUNet(traced=pruned, plan=plan, summary=summary, config=dict(config) if config is not None else None)
