"""The verifier run after a rewrite: the graph is well formed, every module it calls exists, and one run on the
example inputs gives the output shape the dense model gave."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx

from ldpruner.base.errors import VerificationError

__all__ = ["verify_graph"]


def verify_graph(
    gm: torch.fx.GraphModule,
    example_inputs_list: Sequence[Any],
    expected_output_shape: Sequence[int] | None = None,
) -> torch.Tensor:
    """Check that every call_module target exists, lint ``gm``, run it once (no grad) and check the output shape.

    Returns the output tensor so a caller can reuse the run. Raises :class:`VerificationError` naming the check
    that failed."""
    # checked before lint, which also notices a missing target but says less about it
    missing = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            try:
                gm.get_submodule(node.target)
            except AttributeError:
                missing.append(f"{node.name} -> {node.target}")
    if missing:
        raise VerificationError(f"call_module nodes whose target module does not exist: {missing}")

    try:
        gm.graph.lint()
    except Exception as exc:  # lint raises bare RuntimeError / AssertionError subclasses
        raise VerificationError(f"graph.lint() failed: {exc}") from exc

    try:
        with torch.no_grad():
            out = gm(*example_inputs_list)
    except Exception as exc:  # any failure of the rewritten graph on its example inputs
        raise VerificationError(f"the graph fails on its example inputs: {type(exc).__name__}: {exc}") from exc
    if not isinstance(out, torch.Tensor):
        raise VerificationError(f"the graph returns {type(out).__name__}, expected one tensor")
    if expected_output_shape is not None and tuple(out.shape) != tuple(expected_output_shape):
        raise VerificationError(
            f"output shape {tuple(out.shape)} differs from the expected {tuple(expected_output_shape)}"
        )
    return out
