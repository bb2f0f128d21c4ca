"""Selection: turn per-operator importance scores into a RemovalPlan that meets a budget.

Candidates are taken lowest score first (``order="score"``, the paper's rule) or lowest score per unit of removed
cost first (``order="score-per-cost"``), until the removed fraction of the budget metric (UNet parameters or
MACs per sample) reaches the budget. The last removal may overshoot; the plan states the fraction it reaches.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from ldpruner.errors import BudgetError

from .config import SelectionConfig
from .plan import PlannedRemoval, RemovalPlan

__all__ = ["SelectionConfig", "ScoredCandidate", "check_budget", "select_removals"]



class ScoredCandidate(Protocol):
    name: str
    score: float
    params: int
    macs: int
    action: str


def _action(c: ScoredCandidate) -> str:
    return getattr(c.action, "value", c.action)


def check_budget(candidates: Iterable[Any], *, total_params: int, total_macs: int,
                 config: SelectionConfig) -> list[Any]:
    """The candidates that remove something under ``config.metric``; BudgetError if together they fall short of
    the budget. Needs no scores, so a build can check the budget before the (costly) analysis."""
    total = total_params if config.metric == "params" else total_macs
    if total <= 0:
        raise BudgetError(f"the model has no {config.metric} to remove (total {total})")
    useful = [c for c in candidates if _action(c) != "not-removable"
              and (c.params if config.metric == "params" else c.macs) > 0]
    reachable = sum(c.params if config.metric == "params" else c.macs for c in useful) / total
    if reachable < config.budget:
        raise BudgetError(
            f"budget {config.metric}={config.budget:g} removes more than the {reachable:.1%} of {config.metric} "
            f"that are removable ({len(useful)} candidates); "
            f"the largest reachable is {math.floor(reachable * 100) / 100:g}"
        )
    return useful


def select_removals(
    candidates: Iterable[ScoredCandidate],
    *,
    total_params: int,
    total_macs: int,
    model_class: str,
    granularity: str,
    config: SelectionConfig | None = None,
    jointly_removed: Callable[[Sequence[str]], dict[str, int]] | None = None,
) -> RemovalPlan:
    """Pick removals in rank order until ``config.budget`` of ``config.metric`` is removed.

    ``jointly_removed`` (``OperatorGraph.jointly_removed``) names the modules a set of removals kills together
    although no single one does (the time embedding once every resnet is gone); a candidate that would cause
    that is skipped, so the plan's predicted totals stay exact and shared structure is never removed by accident.
    Raises :class:`BudgetError` naming the largest reachable fraction when even removing every candidate
    falls short."""
    config = config if config is not None else SelectionConfig()
    useful = check_budget(candidates, total_params=total_params, total_macs=total_macs, config=config)
    total = total_params if config.metric == "params" else total_macs

    def cost(c: ScoredCandidate) -> int:
        return c.params if config.metric == "params" else c.macs

    def rank(c: ScoredCandidate) -> tuple[float, str]:
        key = c.score if config.order == "score" else c.score / cost(c)
        return (key, c.name)  # name breaks ties, so plans are reproducible

    target = config.budget * total
    chosen: list[PlannedRemoval] = []
    skipped: list[dict[str, Any]] = []
    removed = 0
    for c in sorted(useful, key=rank):
        if removed >= target:
            break
        if jointly_removed is not None:
            extra = jointly_removed([r.name for r in chosen] + [c.name])
            if extra:
                skipped.append({"name": c.name, "reason": "with the removals before it, it would also remove "
                                + ", ".join(f"{m} ({p:,} params)" for m, p in extra.items())})
                continue
        removed += cost(c)
        chosen.append(PlannedRemoval(
            name=c.name,
            action=_action(c),
            params=c.params,
            macs=c.macs,
            score=float(c.score),
            reason=(f"rank {len(chosen) + 1} by {config.order}; "
                    f"cumulative {config.metric} removed {removed / total:.1%}"),
        ))
    if removed < target:
        raise BudgetError(
            f"budget {config.metric}={config.budget:g} is out of reach once the {len(skipped)} candidates that would "
            f"remove shared modules are skipped ({'; '.join(s['name'] + ': ' + s['reason'] for s in skipped)}); "
            f"the largest reachable is {math.floor(removed / total * 100) / 100:g}"
        )
    budget: dict[str, Any] = dataclasses.asdict(config)
    budget["reached"] = removed / total
    budget["skipped"] = skipped
    return RemovalPlan(
        removals=tuple(chosen),
        model_class=model_class,
        granularity=granularity,
        total_params=total_params,
        total_macs=total_macs,
        budget=budget,
    )
