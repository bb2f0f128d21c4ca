"""Feature taps: the output of each operator group (a top-level block such as ``down_blocks.1`` or ``mid_block``)
made an extra output of a traced graph, so a teacher and its pruned student can be compared block by block
without forward hooks.

A node belongs to the group named first in its ``nn_module_stack`` (the outermost module it was traced inside);
top-level leaves (``conv_in``, ``time_embedding``) belong to no group. A group's output is its last node in graph
order: the value the next group reads. Removing operators inside a group leaves that meaning intact (the rewrite
gives replacement nodes the stack of the operator they replace), so teacher and student taps match by name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from ldpruner.base.errors import TapError

__all__ = ["FeatureTaps", "TapError", "group_outputs", "match_taps", "tapped"]


def _group(node: torch.fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    first_key, first_value = next(iter(stack.items()))
    outer = first_value[0] if isinstance(first_value, tuple) else first_key
    if node.op == "call_module" and node.target == outer:
        return None  # a top-level leaf operator, not a block
    return outer


def group_outputs(gm: torch.fx.GraphModule) -> dict[str, torch.fx.Node]:
    """{group name: its output node}, in graph order of the groups' outputs."""
    last: dict[str, torch.fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        group = _group(node)
        if group is not None:
            last.pop(group, None)  # re-insert: the order follows the outputs, not the first nodes
            last[group] = node
    return last


def tapped(gm: torch.fx.GraphModule, groups: Sequence[str]) -> torch.fx.GraphModule:
    """A GraphModule over the same modules as ``gm`` (parameters shared, nothing copied) that returns
    ``(output, (feature of groups[0], …))``. ``gm`` itself is not changed."""
    outputs = group_outputs(gm)
    missing = [g for g in groups if g not in outputs]
    if missing:
        raise TapError(f"no operator group {missing} in this graph; groups: {list(outputs)}")
    graph = torch.fx.Graph()
    value_map: dict[torch.fx.Node, torch.fx.Node] = {}
    result = graph.graph_copy(gm.graph, value_map)
    graph.output((result, tuple(value_map[outputs[g]] for g in groups)))
    return torch.fx.GraphModule(gm, graph, class_name="Tapped" + type(gm).__name__)


@dataclasses.dataclass(frozen=True)
class FeatureTaps:
    """The groups tapped in both graphs, and the teacher's groups the student no longer has."""

    groups: tuple[str, ...]
    teacher_only: tuple[str, ...]

    def to_dict(self) -> dict[str, list[str]]:
        return {"groups": list(self.groups), "teacher_only": list(self.teacher_only)}


def match_taps(teacher: torch.fx.GraphModule, student: torch.fx.GraphModule) -> FeatureTaps:
    """The groups both graphs have, in the teacher's order. A group the student lost entirely (every operator
    in it removed) has no output to compare and is listed in ``teacher_only``."""
    t, s = group_outputs(teacher), group_outputs(student)
    return FeatureTaps(groups=tuple(g for g in t if g in s), teacher_only=tuple(g for g in t if g not in s))
