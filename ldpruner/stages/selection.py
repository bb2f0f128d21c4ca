"""The select stage: a plan from the scores under a SelectionConfig; with the model sampled as the analysis sampled
(:class:`Sampling`), the plan's joint LD score and the set search (``order="greedy"``,
:mod:`ldpruner.passes.search`)."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

from ldpruner.base.errors import ConfigError
from ldpruner.base.io import check_replaceable
from ldpruner.base.placement import Placement
from ldpruner.stages.layout import PLAN

__all__ = ["Sampling", "select"]


@dataclasses.dataclass(frozen=True)
class Sampling:
    """What the analysis sampled with (:func:`analysis_inputs`): the operator graph it scored (in its dtype), the
    AnalysisConfig, the conditioning source and the scheduler: the set search and a plan's joint score sample alike,
    so a singleton's set score is its one-shot score."""

    graph: Any
    config: Any
    calib: Any
    scheduler: Any


def select(report: Any, graph: Any, config: Any, *, out: str | os.PathLike | None, overwrite: bool,
           cost_report: Any = None, model_weights: str | None = None, allow_other_weights: bool = False,
           sampling: Sampling | None = None, placement: Placement | None = None, progress: bool = False) -> Any:
    """The :class:`~ldpruner.passes.plan.RemovalPlan` of ``report`` under ``config`` (a SelectionConfig). With
    ``graph`` (the analysed model's operator graph) candidates that would jointly remove shared modules are
    skipped; without it such a plan is refused at prune time instead. ``cost_report`` (a CostReport): the latency
    costs, needed for ``metric="latency"``; with them every plan records its predicted latency. The plan is for the
    weights the scores were made for; ``model_weights``, the identity of the model ``graph`` was traced from, must
    be those unless ``allow_other_weights`` (the plan then records it). With ``sampling`` (the model's, sampled as
    the analysis did) the plan records the joint LD score of its removed set, and ``order="greedy"`` (the set search)
    can run: its set scores are kept in ``out/search.json``, so a killed search resumes; under torchrun every rank
    calls this and the ranks share each step's sets (the placement's world); rank 0 writes."""
    from ldpruner.passes.select import select_removals

    if allow_other_weights and model_weights is None:
        raise ConfigError("--allow-other-weights (allow_other_weights=True) compares the scores with --model "
                          "(model=...); without a model there is nothing to allow: drop it, or pass the model")
    report.check_finite()

    if cost_report is not None and (cost_report.model_class, cost_report.granularity) != (
            report.model_class, report.granularity):
        raise ConfigError(f"the costs were measured on a {cost_report.model_class} at {cost_report.granularity} "
                          f"granularity, the scores on a {report.model_class} at {report.granularity}: measure "
                          "both on the same model and granularity")
    writes = out is not None and (placement is None or placement.world.is_main)
    if writes:  # before the (costly) search: an existing plan is replaced only when asked
        check_replaceable(Path(out) / PLAN.name, overwrite)
    options = dict(total_params=report.total_params, total_macs=report.total_macs, model_class=report.model_class,
                   granularity=report.granularity, jointly_removed=graph.jointly_removed if graph is not None else None,
                   costs=cost_report)
    if sampling is not None and config.order == "greedy":
        plan = _set_search(report, config, options, sampling, out, placement, progress)
    else:
        plan = select_removals(report, config=config, **options)
        if sampling is not None:
            from ldpruner.passes.search import joint_score

            plan = dataclasses.replace(plan, joint=joint_score(
                sampling.graph, sampling.calib, plan.names, config=sampling.config, scheduler=sampling.scheduler,
                singles=sum(r.score for r in plan.removals)))
    if graph is not None and graph.outside_graph() is not None:
        plan = dataclasses.replace(plan, outside_graph=graph.outside_graph())
    plan = dataclasses.replace(plan, model_weights=report.model_weights)
    if model_weights is not None:
        plan = plan.for_weights(model_weights, "select", allow=allow_other_weights, made="the scores were made for")
    if writes:
        plan.save(Path(out) / PLAN.name)
    return plan


def _set_search(report: Any, config: Any, options: dict[str, Any], sampling: Sampling,
                out: str | os.PathLike | None, placement: Placement | None, progress: bool) -> Any:
    """The set search's plan (select's ``order="greedy"``), its calls announced before it starts."""
    from ldpruner.passes.search import SEARCH, SetScores, record_joint
    from ldpruner.passes.select import select_removals

    scorer = SetScores(sampling.graph, sampling.calib, config=sampling.config, scheduler=sampling.scheduler,
                       key=report.cache_key, cap=config.search_cap,
                       cache=Path(out) / SEARCH.name if out is not None else None,
                       world=placement.world if placement is not None else None, progress=progress)
    candidates = [c for c in report if c.action != "not-removable"]
    # the search takes about as many steps as the score-per-cost plan has removals, often more (it tends to take
    # smaller ones): measured on the zoo models, half as many again covers it
    steps = math.ceil(1.5 * len(select_removals(report, config=dataclasses.replace(config, order="score-per-cost"),
                                                **options).removals))
    if config.shortlist is None:  # as many as let the search finish within its cap
        config = dataclasses.replace(config, shortlist=scorer.fitting_shortlist(len(candidates), steps))
    with scorer:
        planned = scorer.announce(min(config.shortlist, len(candidates)), steps)
        plan = select_removals(report, config=config, score_sets=scorer, **options)
        terms = scorer.terms(plan.names)
        if terms is None:  # finished past the search (its cap, its short list): the whole set measured once more
            terms = scorer.deviation.score([scorer.ops[name] for name in plan.names])
            scorer.calls += scorer.deviation.calls_per_generation * scorer.world.size  # every rank measures it
    # unet_calls: made by this run (every rank's); counted_unet_calls: what the cap counted (the dense generation
    # once and every set asked for, resumed ones too): the cost of the whole search in one process
    search = {**plan.budget["search"], "planned_unet_calls": planned, "unet_calls": scorer.calls,
              "counted_unet_calls": scorer.spent, "cap_unet_calls": scorer.cap_calls, "resumed_sets": scorer.resumed}
    if plan.budget["search"]["capped"] and progress and (placement is None or placement.world.is_main):
        import sys

        how = (f"finished by {plan.budget['search']['finished_by']}" if plan.budget["search"]["finished_by"]
               else "the least damaged set it found that reaches the budget")
        print(f"set search: stopped at its cap of {scorer.cap_calls:,} UNet calls after "
              f"{plan.budget['search']['steps']} steps; the plan is {how}", file=sys.stderr)
    joint = record_joint(sum(terms), sum(r.score for r in plan.removals), mu_term=terms[0], sigma_term=terms[1],
                         unet_calls=scorer.calls)
    return dataclasses.replace(plan, budget={**plan.budget, "search": search}, joint=joint)
