"""What an operator becomes when it is removed, as a module: used to apply a candidate in place (analysis) and
to build the replacement the rewrite keeps (shortcut conv, new 1×1 projection).

The stand-ins reproduce exactly what the graph rewrite computes, so a score measured with a stand-in swapped in
is the score of the rewritten model:

* identity, block:     ``x / s``  (``s``: the block's output scale factor, 1 in every published config)
* identity, branch:    the branch contributes ``0`` to its residual add
* shortcut:            ``conv_shortcut(x) / s``
* conv1x1:             a new 1×1 conv (Linear on tokens), partial identity
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx
from torch import nn

from ldpruner.base.errors import RewriteError

from .graph import Action, Operator

__all__ = ["output_scale", "make_projection", "stand_in", "swapped", "PROJECTION_ROOT"]

# replacements created by conv1x1 removals live under this top-level ModuleDict of the rewritten graph
PROJECTION_ROOT = "ldpruner_projections"


def output_scale(module: nn.Module) -> float:
    """The factor a residual block divides its sum by (diffusers' output_scale_factor / rescale_output_factor)."""
    for attr in ("output_scale_factor", "rescale_output_factor"):
        value = getattr(module, attr, None)
        if value is not None:
            return float(value)
    return 1.0


def make_projection(in_shape: tuple[int, ...], out_shape: tuple[int, ...], like: torch.Tensor) -> nn.Module:
    """A 1×1 conv (4-D feature maps) or Linear (tokens) mapping channels, initialised as a partial identity:
    channel i of the output copies channel i of the input for i < min(C_in, C_out); the rest start at zero."""
    if len(out_shape) == 4:
        proj: nn.Module = nn.Conv2d(in_shape[1], out_shape[1], kernel_size=1)
        with torch.no_grad():
            nn.init.dirac_(proj.weight)
    else:
        proj = nn.Linear(in_shape[-1], out_shape[-1])
        with torch.no_grad():
            proj.weight.zero_()
            n = min(in_shape[-1], out_shape[-1])
            proj.weight[:n, :n] = torch.eye(n)
    with torch.no_grad():
        proj.bias.zero_()
    return proj.to(device=like.device, dtype=like.dtype)


class _Bypass(nn.Module):
    def __init__(self, scale: float, tuple_out: bool):
        super().__init__()
        self.scale, self.tuple_out = scale, tuple_out

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        y = x if self.scale == 1.0 else x / self.scale
        return (y,) if self.tuple_out else y


class _Shortcut(nn.Module):
    def __init__(self, conv: nn.Module, scale: float):
        super().__init__()
        self.conv, self.scale = conv, scale

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = self.conv(x.contiguous())
        return y if self.scale == 1.0 else y / self.scale


class _ZeroBranch(nn.Module):
    def __init__(self, tuple_out: bool):
        super().__init__()
        self.tuple_out = tuple_out

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        y = torch.zeros_like(x)
        return (y,) if self.tuple_out else y


class _Projection(nn.Module):
    def __init__(self, proj: nn.Module, tuple_out: bool):
        super().__init__()
        self.proj, self.tuple_out = proj, tuple_out

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        y = self.proj(x)
        return (y,) if self.tuple_out else y


def stand_in(op: Operator, module: nn.Module) -> nn.Module:
    """The module that computes what the rewritten graph computes once ``op`` is removed."""
    if not op.removable:
        raise RewriteError(f"operator {op.name!r} is not removable: {op.reason}")
    tuple_out = op.output != op.node
    if op.action is Action.IDENTITY:
        return _ZeroBranch(tuple_out) if op.join is not None else _Bypass(output_scale(module), tuple_out)
    if op.action is Action.SHORTCUT:
        return _Shortcut(module.conv_shortcut, output_scale(module))
    if op.action is Action.CONV1X1:
        like = next(module.parameters(), torch.empty(0))
        return _Projection(make_projection(op.in_shape, op.out_shape, like), tuple_out)
    raise RewriteError(f"unknown action {op.action!r} for {op.name!r}")


def _set_submodule(root: nn.Module, qualname: str, module: nn.Module) -> None:
    parent_name, _, leaf = qualname.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, module) if not isinstance(parent, (nn.ModuleList, nn.Sequential)) else \
        parent.__setitem__(int(leaf), module)


@contextlib.contextmanager
def swapped(gm: torch.fx.GraphModule, op: Operator) -> Iterator[None]:
    """Apply one candidate in place (its module swapped for its stand-in) and restore it on exit.

    The graph is untouched; only the module the call_module node points to changes, so no copy is made."""
    original = gm.get_submodule(op.name)
    _set_submodule(gm, op.name, stand_in(op, original))
    try:
        yield
    finally:
        _set_submodule(gm, op.name, original)
