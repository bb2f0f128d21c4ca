"""verify_graph: each check fails with a VerificationError that names it."""

from __future__ import annotations

import pytest
import torch
import torch.fx
from torch import nn

from ldpruner.base.errors import VerificationError
from ldpruner.compiler.verify import verify_graph


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(x) + 1


def traced():
    torch.manual_seed(0)
    return torch.fx.symbolic_trace(Net())


def test_a_good_graph_passes_and_returns_its_output():
    gm = traced()
    x = torch.randn(2, 3, 5, 5)
    out = verify_graph(gm, [x], (2, 4, 5, 5))
    assert torch.equal(out, gm(x))


def test_wrong_output_shape_is_named():
    with pytest.raises(VerificationError,
                       match=r"output shape \(2, 4, 5, 5\) differs from the expected \(2, 3, 5, 5\)"):
        verify_graph(traced(), [torch.randn(2, 3, 5, 5)], (2, 3, 5, 5))


def test_missing_module_is_named():
    gm = traced()
    del gm.conv  # the node still calls it
    with pytest.raises(VerificationError, match=r"target module does not exist: \['conv -> conv'\]"):
        verify_graph(gm, [torch.randn(1, 3, 2, 2)])


def test_lint_failure_is_named():
    gm = traced()
    conv = next(n for n in gm.graph.nodes if n.op == "call_module")
    add = next(iter(conv.users))
    conv.prepend(add)  # a use before its definition
    with pytest.raises(VerificationError, match="graph.lint"):
        verify_graph(gm, [torch.randn(1, 3, 2, 2)])


def test_a_graph_that_fails_to_run_is_named():
    with pytest.raises(VerificationError, match="fails on its example inputs: RuntimeError"):
        verify_graph(traced(), [torch.randn(1, 5, 2, 2)])  # 5 channels into a 3-channel conv


def test_non_tensor_output_is_rejected():
    gm = torch.fx.symbolic_trace(lambda x: (x, x))
    with pytest.raises(VerificationError, match="returns tuple, expected one tensor"):
        verify_graph(gm, [torch.randn(2)])
