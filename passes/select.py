"""Selection: turn per-operator importance scores into a RemovalPlan that meets a budget.

The budget is a fraction of a metric: UNet parameters, MACs per sample, or the dense model's latency on the target
runtime (the per-operator costs of :mod:`ldpruner.passes.costs`). Four rules pick the removals:

* ``score`` (the paper's): lowest LD score first, until the removed fraction reaches the budget;
* ``score-per-cost``: lowest score per unit of the metric first (the most metric for the least damage);
* ``knapsack``: the exact answer to "the least total LD score whose removals reach the budget" (a 0/1 covering
  knapsack, solved by dynamic programming over the metric in 1/2000ths of the total: 40–80 candidates take
  milliseconds). Scores add up only approximately (each was measured alone), as for the other rules.
* ``greedy`` (the set search): removals compound, so it scores the removed set itself. Starting from the empty set
  S, at each step it scores S ∪ {c} for every short-listed c (``shortlist``: the lowest one-shot score per unit of
  the metric first; all when None) and adds the c whose removal raises the set's LD score least per unit of the
  metric, while the set stays under the budget and scores below the best plan found; every set it scores that
  reaches the budget is a candidate plan, and so are the score-per-cost and knapsack plans (scored whole first), and
  the least damaged of them is the plan (at the call cap, the least damaged so far). The scoring is injected
  (``score_sets``; :mod:`ldpruner.passes.search` runs it on the model); when the cap comes before any set reached
  the budget, or the short list is spent, the plan is finished in score-per-cost order and says so.

The greedy rules' last removal may overshoot; every plan states the fraction it reaches, and, when latency costs
are given, the latency it predicts and what that prediction rests on.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from ldpruner.base.errors import BudgetError, ConfigError

from .config import SelectionConfig
from .plan import PlannedRemoval, RemovalPlan

__all__ = ["SelectionConfig", "ScoredCandidate", "SetScorer", "check_budget", "select_removals"]

_KNAPSACK_UNITS = 2000  # the knapsack's resolution: the metric's total in this many units



class ScoredCandidate(Protocol):
    name: str
    score: float
    params: int
    macs: int
    action: str


# the set search's oracle: the LD scores of the given sets of removals (names), or None when scoring them would pass
# the call cap
SetScorer = Callable[[list[list[str]]], "list[float] | None"]


def _action(c: ScoredCandidate) -> str:
    return getattr(c.action, "value", c.action)


def _metric(config: SelectionConfig, costs: Any) -> Callable[[Any], float]:
    """A candidate's cost under ``config.metric``."""
    if config.metric == "latency":
        if costs is None:
            raise BudgetError("metric='latency' needs the latency costs (costs.json, from `ldpruner costs` or a build "
                              "with --metric latency); pass costs")
        return lambda c: costs.saves_ms(c.name)
    return (lambda c: c.params) if config.metric == "params" else (lambda c: c.macs)


def _total(config: SelectionConfig, total_params: int, total_macs: int, costs: Any) -> float:
    if config.metric == "latency":
        return costs.dense_ms
    return total_params if config.metric == "params" else total_macs


def check_budget(candidates: Iterable[Any], *, total_params: int, total_macs: int, config: SelectionConfig,
                 costs: Any = None) -> list[Any]:
    """The candidates that remove something under ``config.metric``; BudgetError if together they fall short of
    the budget. Needs no scores, so a build can check the budget before the (costly) analysis. ``costs``: a
    :class:`~ldpruner.passes.cost_report.CostReport` (needed for ``metric="latency"``)."""
    cost = _metric(config, costs)
    total = _total(config, total_params, total_macs, costs)
    if total <= 0:
        raise BudgetError(f"the model has no {config.metric} to remove (total {total})")
    # a candidate scored +inf (its removal makes the samples non-finite) is never removed
    useful = [c for c in candidates if _action(c) != "not-removable" and cost(c) > 0
              and math.isfinite(getattr(c, "score", 0.0))]
    reachable = sum(cost(c) for c in useful) / total
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
    costs: Any = None,
    score_sets: SetScorer | None = None,
) -> RemovalPlan:
    """Pick removals by ``config.order`` until ``config.budget`` of ``config.metric`` is removed.

    ``jointly_removed`` (``OperatorGraph.jointly_removed``) names the modules a set of removals kills together
    although no single one does (the time embedding once every resnet is gone); a candidate that would cause
    that is skipped, so the plan's predicted totals stay exact and shared structure is never removed by accident.
    ``costs`` (a :class:`~ldpruner.passes.cost_report.CostReport`): the per-operator latency, needed for
    ``metric="latency"``; with it, any plan records the latency it predicts. ``score_sets``: the set search's
    scorer (``order="greedy"`` needs it). Raises :class:`BudgetError` naming the largest reachable fraction when even
    removing every candidate falls short."""
    config = config if config is not None else SelectionConfig()
    if config.order == "greedy" and score_sets is None:
        raise ConfigError("order='greedy' scores sets of removals on the model: pass the model (--model), or choose "
                          "another order")
    useful = check_budget(candidates, total_params=total_params, total_macs=total_macs, config=config, costs=costs)
    total = _total(config, total_params, total_macs, costs)
    cost = _metric(config, costs)
    target = config.budget * total
    skipped: list[dict[str, Any]] = []
    search: dict[str, Any] | None = None
    if config.order == "knapsack":
        picked = _knapsack_avoiding(useful, cost, target, total, jointly_removed, skipped)
    elif config.order == "greedy":
        # the one-shot orders' plans, measured whole, are candidate plans too: the search never ends worse than they
        seeds: dict[str, tuple[list[Any], list[dict[str, Any]]]] = {}
        for name in ("score-per-cost", "knapsack"):
            seed_skipped: list[dict[str, Any]] = []
            plan = (_knapsack_avoiding(useful, cost, target, total, jointly_removed, seed_skipped) if name == "knapsack"
                    else _greedy(useful, cost, target, name, jointly_removed, seed_skipped))
            if plan and sum(cost(c) for c in plan) >= target * (1 - 1e-9):
                seeds[name] = (plan, seed_skipped)
        picked, search = _set_search(useful, cost, target, config.shortlist, jointly_removed, skipped, score_sets,
                                     seeds)
    else:
        picked = _greedy(useful, cost, target, config.order, jointly_removed, skipped)
    removed = sum(cost(c) for c in picked)
    if removed < target * (1 - 1e-9):
        raise BudgetError(
            f"budget {config.metric}={config.budget:g} is out of reach once the {len(skipped)} candidates that would "
            f"remove shared modules are skipped ({'; '.join(s['name'] + ': ' + s['reason'] for s in skipped)}); "
            f"the largest reachable is {math.floor(removed / total * 100) / 100:g}"
        )
    chosen: list[PlannedRemoval] = []
    cumulative = 0.0
    for c in picked:
        cumulative += cost(c)
        chosen.append(PlannedRemoval(
            name=c.name,
            action=_action(c),
            params=c.params,
            macs=c.macs,
            score=float(c.score),
            reason=_reason(config, search, len(chosen), cumulative / total),
            latency_ms=costs.saves_ms(c.name) if costs is not None else None,
        ))
    budget: dict[str, Any] = dataclasses.asdict(config)
    if search is None:  # the set search's own options, recorded where it ran
        budget = {k: v for k, v in budget.items() if k not in _SEARCH_OPTIONS}
    budget["reached"] = removed / total
    budget["skipped"] = skipped
    if search is not None:
        budget["search"] = {k: v for k, v in search.items() if k != "joint_score"}
    latency = None
    if costs is not None:
        predicted = costs.predicted_ms(c.name for c in picked)
        latency = {"dense_ms": costs.dense_ms, "predicted_ms": predicted,
                   "predicted_removed_fraction": 1 - predicted / costs.dense_ms, "basis": costs.basis()}
    return RemovalPlan(
        removals=tuple(chosen),
        model_class=model_class,
        granularity=granularity,
        total_params=total_params,
        total_macs=total_macs,
        budget=budget,
        latency=latency,
        joint=({"score": search["joint_score"], "sum_of_single_scores": sum(float(c.score) for c in picked)}
               if search is not None and search["joint_score"] is not None else None),
    )


_SEARCH_OPTIONS = ("shortlist", "search_cap")


def _reason(config: SelectionConfig, search: dict[str, Any] | None, index: int, reached: float) -> str:
    if search is not None and search["plan_of"] != "the search":
        how = f"rank {index + 1} of the {search['plan_of']} plan, the least damaged set the search measured"
    elif search is not None:
        how = (f"step {index + 1} of the set search" if index < search["steps"]
               else f"removal {index + 1}, finished by {search['finished_by']}")
    else:
        how = f"{'chosen by the knapsack' if config.order == 'knapsack' else 'rank'} {index + 1} by {config.order}"
    return f"{how}; cumulative {config.metric} removed {reached:.1%}"


@dataclasses.dataclass
class _Found:
    """A set that reaches the budget, as the search found it: its score, its removals, and the search's record up
    to it (the steps taken, the joint score after each, the candidates skipped) — what the plan reports."""

    score: float
    removals: list[Any]
    steps: int
    history: list[float]
    skipped: list[dict[str, Any]]
    plan_of: str = "the search"

    def better_than(self, other: _Found | None) -> bool:
        return other is None or (self.score, sorted(c.name for c in self.removals)) < (
            other.score, sorted(c.name for c in other.removals))


def _set_search(useful: list[Any], cost: Callable[[Any], float], target: float, shortlist: int | None,
                jointly_removed: Any, skipped: list[dict[str, Any]], score_sets: SetScorer,
                seeds: dict[str, tuple[list[Any], list[dict[str, Any]]]] | None = None
                ) -> tuple[list[Any], dict[str, Any]]:
    """The greedy set search (see the module's docstring): (the plan's removals, what the search did). ``seeds``:
    complete plans of other rules (with what they skipped), scored whole first, candidates like any set the search
    finds. Ties go to the
    names, so plans are reproducible; a candidate that would jointly remove shared modules with the set is skipped
    at that step, as the other rules skip it."""
    ranked = sorted(useful, key=lambda c: (c.score / cost(c), c.name))
    pool = ranked[:shortlist] if shortlist is not None else ranked
    picked: list[Any] = []
    removed, current, sets, capped = 0.0, 0.0, 0, False
    history: list[float] = []
    best: _Found | None = None

    def admissible(c: Any) -> bool:
        """``c`` may join the set: not in it, not skipped, removing no shared module with it (else skipped)."""
        if c in picked or any(s["name"] == c.name for s in skipped):
            return False
        problem = _joint_problem([p.name for p in picked] + [c.name], jointly_removed)
        if problem is not None:
            skipped.append({"name": c.name, "reason": problem})
        return problem is None

    unique: dict[tuple[str, ...], tuple[str, list[Any], list[dict[str, Any]]]] = {}
    for name, (plan, seed_skipped) in (seeds or {}).items():
        unique.setdefault(tuple(sorted(c.name for c in plan)), (name, plan, seed_skipped))
    seed_scores = score_sets([[c.name for c in plan] for _, plan, _ in unique.values()]) if unique else None
    if seed_scores is None and unique:
        capped = True
    elif seed_scores is not None:
        sets += len(unique)
        for (name, plan, seed_skipped), score in zip(unique.values(), seed_scores, strict=True):
            found = _Found(score, list(plan), 0, [], list(seed_skipped), plan_of=name)
            best = found if found.better_than(best) else best
    while not capped:
        options = [c for c in pool if admissible(c)]
        if not options:
            break  # the short list is spent
        scores = score_sets([[p.name for p in picked] + [c.name] for c in options])
        if scores is None:
            capped = True
            break
        sets += len(options)
        pairs = list(zip(options, scores, strict=True))
        # a set that reaches the budget is a plan: the least damaged of them all is kept (taken per unit of the metric,
        # the last removal would prefer a larger overshoot, which the plan then pays for in its score)
        for c, score in pairs:
            if removed + cost(c) >= target:
                found = _Found(score, [*picked, c], len(picked) + 1, [*history, score], list(skipped))
                best = found if found.better_than(best) else best
        growing = [pair for pair in pairs if removed + cost(pair[0]) < target]
        if not growing:
            break
        chosen, current = min(growing, key=lambda pair: ((pair[1] - current) / cost(pair[0]), pair[0].name))
        picked.append(chosen)
        removed += cost(chosen)
        history.append(current)
        if best is not None and current >= best.score:
            break  # a larger set scores no lower (removing more moves the latents more): the best plan is found
    if best is not None:  # the search found a plan (at its cap too: the best one so far)
        skipped[:] = best.skipped
        return best.removals, {"steps": best.steps, "sets_scored": sets, "capped": capped,
                               "joint_after_each_step": best.history, "joint_score": best.score,
                               "finished_by": None, "plan_of": best.plan_of}
    steps = len(picked)
    for c in ranked:  # at the cap, or past the short list, before any set reached the budget: as score-per-cost
        if removed >= target:
            break
        if admissible(c):
            picked.append(c)
            removed += cost(c)
    return picked, {"steps": steps, "sets_scored": sets, "capped": capped, "joint_after_each_step": history,
                    "joint_score": None, "plan_of": "the search",
                    "finished_by": "score-per-cost" + (" at the call cap" if capped else " past the short list")}


def _joint_problem(names: Sequence[str], jointly_removed: Callable[[Sequence[str]], dict[str, int]] | None
                   ) -> str | None:
    extra = jointly_removed(names) if jointly_removed is not None else {}
    if not extra:
        return None
    return "with the removals before it, it would also remove " + ", ".join(f"{m} ({p:,} params)"
                                                                           for m, p in extra.items())


def _greedy(useful: list[Any], cost: Callable[[Any], float], target: float, order: str,
            jointly_removed: Any, skipped: list[dict[str, Any]]) -> list[Any]:
    def rank(c: Any) -> tuple[float, str]:
        key = c.score if order == "score" else c.score / cost(c)
        return (key, c.name)  # name breaks ties, so plans are reproducible

    picked: list[Any] = []
    removed = 0.0
    for c in sorted(useful, key=rank):
        if removed >= target:
            break
        problem = _joint_problem([p.name for p in picked] + [c.name], jointly_removed)
        if problem is not None:
            skipped.append({"name": c.name, "reason": problem})
            continue
        removed += cost(c)
        picked.append(c)
    return picked


def _knapsack(items: list[Any], cost: Callable[[Any], float], target: float, total: float) -> list[Any]:
    """The subset of ``items`` with the least total score whose cost reaches ``target``, each cost rounded down to a
    unit of ``total / _KNAPSACK_UNITS`` (so the subset reaches the target in true costs too); [] when none does.

    ``table[i][j]``: the least score of a subset of the first i items reaching at least j units (j capped at the
    units needed); the subset is read back from the last row."""
    unit = total / _KNAPSACK_UNITS
    need = math.ceil(target / unit - 1e-9)
    weights = [math.floor(cost(c) / unit + 1e-9) for c in items]  # 12.0 / 0.05 is 239.99999999999997 in floats
    inf = math.inf
    table = [[0.0] + [inf] * need]
    for c, w in zip(items, weights, strict=True):
        row = table[-1]
        nxt = list(row)
        if w:
            for j in range(need + 1):
                if row[j] != inf:
                    k = min(need, j + w)
                    if row[j] + c.score < nxt[k]:
                        nxt[k] = row[j] + c.score
        table.append(nxt)
    if table[-1][need] == inf:
        return []
    picked, j = [], need
    for i in range(len(items), 0, -1):
        if table[i][j] == table[i - 1][j]:
            continue  # reached without item i-1
        w, score = weights[i - 1], items[i - 1].score
        j = next(p for p in range(max(0, j - w), j + 1)
                 if min(need, p + w) == j and table[i - 1][p] + score == table[i][j])
        picked.append(items[i - 1])
    return sorted(picked, key=lambda c: (c.score, c.name))


def _knapsack_avoiding(useful: list[Any], cost: Callable[[Any], float], target: float, total: float,
                       jointly_removed: Any, skipped: list[dict[str, Any]]) -> list[Any]:
    """The knapsack's subset; while it would jointly remove shared modules, the candidate whose dropping clears
    that at the least loss is skipped and the knapsack solved again."""
    items = sorted(useful, key=lambda c: c.name)
    while True:
        picked = _knapsack(items, cost, target, total)
        problem = _joint_problem([c.name for c in picked], jointly_removed)
        if problem is None or not picked:
            return picked
        # skip the chosen candidate with the most damage per unit of cost: the one the plan needs least
        worst = max(picked, key=lambda c: (c.score / max(cost(c), 1e-12), c.name))
        skipped.append({"name": worst.name, "reason": problem})
        items = [c for c in items if c is not worst]
