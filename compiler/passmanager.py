"""A small sequential pass manager with one rewrite signature and a verifier after each pass.

A pass is ``pass(gm) -> PassResult(gm, modified, summary)`` and declares itself in-place or functional
(``Pass.in_place``); the manager checks the promise: a functional pass must leave its input graph unchanged,
an in-place pass must return the very module it was given.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx

from ldpruner.base.errors import LdprunerError, RewriteError

__all__ = ["PassResult", "Pass", "PassManager"]


@dataclasses.dataclass
class PassResult:
    gm: torch.fx.GraphModule
    modified: bool
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)


class Pass(abc.ABC):
    """A graph rewrite. Subclasses set ``in_place`` and implement :meth:`call`."""

    in_place: bool = True

    @property
    def name(self) -> str:
        return type(self).__name__

    @abc.abstractmethod
    def call(self, gm: torch.fx.GraphModule) -> PassResult: ...

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        before = None if self.in_place else gm.code
        result = self.call(gm)
        if self.in_place and result.gm is not gm:
            raise RewriteError(f"pass {self.name} is declared in-place but returned a new module")
        if not self.in_place and gm.code != before:
            raise RewriteError(f"pass {self.name} is declared functional but changed its input graph")
        return result


class PassManager:
    """Runs passes in order; after each one, ``verify(gm)`` when given (lint + shape check)."""

    def __init__(self, passes: Sequence[Pass], *, verify: Callable[[torch.fx.GraphModule], None] | None = None):
        self.passes = list(passes)
        self.verify = verify

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        done: list[str] = []
        modified = False
        summaries: dict[str, Any] = {}
        for p in self.passes:
            try:
                result = p(gm)
                if self.verify is not None:
                    self.verify(result.gm)
            except LdprunerError as exc:
                # the same exception (type, attributes, traceback), its message naming the pass and what ran before
                ran = ", ".join(done) or "none"
                exc.args = (f"in pass {p.name} (passes already run: {ran}): {exc}", *exc.args[1:])
                raise
            gm = result.gm
            modified |= result.modified
            summaries[p.name] = result.summary
            done.append(p.name)
        return PassResult(gm, modified, summaries)
