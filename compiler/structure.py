"""The structure view of an OperatorGraph: a networkx DiGraph over the traced UNet's leaf modules, inputs and
outputs, with edges labelled ``data`` (a direct path), ``skip`` (a path through a concatenation of feature maps:
the down→up skips) and ``residual`` (a branch operator joining its residual add).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import networkx as nx
import torch
import torch.fx

from .operators import Granularity

__all__ = ["build_structure"]

_CAT_TARGETS = {torch.cat, torch.concat, torch.concatenate}


def build_structure(gm, modules, granularity: Granularity, extra, operators: dict[str, Any],
                    shapes: dict[str, Any]) -> nx.DiGraph:
    """The structure of ``gm``; ``operators``: the OperatorGraph's operators by name (each with its ``join``)."""
    g = nx.DiGraph()
    sources: dict[torch.fx.Node, set[tuple[str, bool]]] = {}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    leaf_order: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "call_module", "output"):
            key = n.target if n.op == "call_module" else f"<{n.op}:{n.name}>"
            attrs: dict[str, Any] = {"op": n.op}
            if n.op == "call_module":
                attrs["operator"] = n.target in operators
                attrs["module_class"] = type(modules[n.target]).__name__
            g.add_node(key, **attrs)
            leaf_order[key] = order[n]
            for a in n.all_input_nodes:
                for src, via_cat in sources.get(a, ()):
                    g.add_edge(src, key, kind="skip" if via_cat else "data")
            sources[n] = {(key, False)}
        else:
            acc: set[tuple[str, bool]] = set()
            # a skip joins feature maps; SDXL's concat of pooled text and time-id embeddings (2-D) is not one.
            # Of a concat's operands, the one produced last is the main path; the older ones are the skips.
            is_cat = n.op == "call_function" and n.target in _CAT_TARGETS and len(shapes.get(n.name) or ()) == 4
            operands = [sources.get(a, set()) for a in n.all_input_nodes]
            newest = max((max((leaf_order[s] for s, _ in o), default=-1) for o in operands), default=-1)
            for o in operands:
                is_skip = is_cat and max((leaf_order[s] for s, _ in o), default=-1) < newest
                acc |= {(s, via or is_skip) for s, via in o}
            sources[n] = acc
    for op in operators.values():
        if op.join is not None:
            join_node = next(n for n in gm.graph.nodes if n.name == op.join)
            for user in join_node.users:
                for dst in _leaf_consumers(user, sources, gm):
                    g.add_edge(op.name, dst, kind="residual")
    return g


def _leaf_consumers(n: torch.fx.Node, sources, gm) -> Iterator[str]:
    stack, seen = [n], set()
    while stack:
        m = stack.pop()
        if m in seen:
            continue
        seen.add(m)
        if m.op == "call_module":
            yield m.target
        elif m.op == "output":
            yield f"<output:{m.name}>"
        else:
            stack.extend(m.users)
