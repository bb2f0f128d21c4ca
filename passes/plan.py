"""RemovalPlan: the reviewable, replayable list of operators to remove (written as plan.json)."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any, ClassVar

from ldpruner.base.artifact import ArtifactFile, JsonArtifact
from ldpruner.base.errors import PlanError, WeightsMismatchError

__all__ = ["PlannedRemoval", "RemovalPlan", "PLAN", "PLAN_FORMAT", "WeightsMismatchError", "check_weights_id",
           "is_weights_id", "short_id"]

PLAN = ArtifactFile("plan.json", "ldpruner.plan/1", "plan file", error=PlanError)
PLAN_FORMAT = PLAN.format


@dataclasses.dataclass(frozen=True)
class PlannedRemoval:
    """One operator to remove: its fx qualified name, the action, and why it was chosen."""

    name: str
    action: str  # identity | shortcut | conv1x1
    params: int  # parameters the removal drops
    macs: int  # MACs per sample it saves at the traced size
    score: float | None = None  # LD score (None for hand-written plans)
    reason: str = ""
    latency_ms: float | None = None  # the latency it saves on the costs' runtime (None without latency costs)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if self.latency_ms is None:
            del data["latency_ms"]  # plans without latency costs read as they always have
        return data


@dataclasses.dataclass(frozen=True)
class RemovalPlan(JsonArtifact):
    """Ordered removals plus the totals they predict. Pure data: apply it with ``RemoveOperators(plan)``."""

    FILE: ClassVar[ArtifactFile] = PLAN

    removals: tuple[PlannedRemoval, ...]
    model_class: str
    granularity: str
    total_params: int
    total_macs: int
    budget: dict[str, Any] = dataclasses.field(default_factory=dict)
    # with latency costs: dense_ms, predicted_ms, predicted_removed_fraction and the basis (runtime, device, batch…)
    latency: dict[str, Any] | None = None
    # the model's parameters outside the traced graph (params, modules, why): not in the totals, not in the student
    outside_graph: dict[str, Any] | None = None
    # the identity of the dense weights the plan is for (ldpruner.sources.weights_id): the scores' model, and once
    # applied, the model its student was pruned from; None: not recorded (a hand-written plan)
    model_weights: str | None = None
    # every use with other weights that was allowed (allow_other_weights / --allow-other-weights), in order:
    # {"stage", "made_for", "used_with"}
    other_weights: tuple[dict[str, Any], ...] = ()
    # the LD score of the whole removed set, measured with every removal made together ("score", its "mu_term" and
    # "sigma_term" where measured apart), beside "sum_of_single_scores" (what the one-shot scores add up to) and the
    # "unet_calls" it took; None: not measured (no model at selection)
    joint: dict[str, Any] | None = None

    def for_weights(self, weights: str, stage: str, *, allow: bool, made: str) -> RemovalPlan:
        """This plan used with the dense weights ``weights`` by ``stage``: itself when they are the weights it was
        made for; a :class:`WeightsMismatchError` when they are others — or, with ``allow``, a copy for ``weights``
        that records the mismatch. A plan that records no weights (written by hand, or by an ldpruner that did not
        record them) is taken to be for ``weights``, and the copy records that assumption (``made_for`` null).
        ``made`` says what was made for the weights, for the message ("the plan was made for")."""
        if self.model_weights == weights:
            return self
        if self.model_weights is not None and not allow:
            raise WeightsMismatchError(
                f"{made} the weights {short_id(self.model_weights)}, but the model given has {short_id(weights)}: "
                "pass the model with those weights, or --allow-other-weights (allow_other_weights=True) to use it "
                "anyway (the outputs record that you did)")
        if self.model_weights is None:
            import logging

            subject = re.split(r" (?:was|were) ", made)[0]
            logging.getLogger("ldpruner.plan").warning(
                "%s: no model weights recorded (written by hand, or by an earlier ldpruner); taken to be for %s",
                subject, short_id(weights))
        record = {"stage": stage, "made_for": self.model_weights, "used_with": weights}
        return dataclasses.replace(self, model_weights=weights, other_weights=(*self.other_weights, record))

    def target(self, *, tolerance: float, measured: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        """The budget asked for against what the plan achieves: the share of parameters or MACs it removes
        (counted), or for a latency budget the measured cut (``measured``: a latency check's record, with
        ``measured_cut`` and where it was timed; without one, the predicted cut). ``met`` when the achieved share is
        within ± ``tolerance`` × the budget of it: a plan that removes much more than asked (coarse operators, a
        cost model that understates savings) is flagged like one that removes too little. None for a plan that
        records no budget (written by hand)."""
        metric, asked = self.budget.get("metric"), self.budget.get("budget")
        if metric not in ("params", "macs", "latency") or not isinstance(asked, (int, float)) or asked <= 0:
            return None
        if metric == "params":
            achieved, basis = self.removed_params / self.total_params, "counted"
        elif metric == "macs":
            achieved, basis = self.removed_macs / self.total_macs, "counted at the traced latent size"
        elif measured is not None:
            achieved = float(measured["measured_cut"])
            basis = f"measured ({measured.get('runtime')}, batch {measured.get('batch')})"
        elif self.latency is not None:
            achieved, basis = float(self.latency["predicted_removed_fraction"]), "predicted (not measured)"
        else:
            return None
        low, high = asked * (1 - tolerance), asked * (1 + tolerance)
        status = "met" if low <= achieved <= high else "short" if achieved < low else "overshoot"
        what = {"params": "UNet parameters", "macs": "MACs per sample", "latency": "the dense latency"}[metric]
        verdict = {"met": "met", "short": f"MISSED: {asked - achieved:.1%} short",
                   "overshoot": f"MISSED: overshoot by {achieved - asked:.1%} (more removed than asked, which "
                                "costs quality the budget did not allow)"}[status]
        return {"metric": metric, "budget": asked, "achieved": achieved, "basis": basis, "tolerance": tolerance,
                "range": [low, high], "status": status, "met": status == "met",
                "line": f"target: remove {asked:.0%} of {what}; {basis}: {achieved:.1%} removed -> {verdict} "
                        f"(tolerance ±{tolerance:.0%} of the target: {low:.1%}–{high:.1%})"}

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.removals]

    @property
    def removed_params(self) -> int:
        return sum(r.params for r in self.removals)

    @property
    def removed_macs(self) -> int:
        return sum(r.macs for r in self.removals)

    @property
    def predicted_params(self) -> int:
        return self.total_params - self.removed_params

    @property
    def predicted_macs(self) -> int:
        return self.total_macs - self.removed_macs

    def to_dict(self) -> dict[str, Any]:
        data = {
            "format": PLAN_FORMAT,
            "model_class": self.model_class,
            "granularity": self.granularity,
            "budget": self.budget,
            "totals": {
                "params_before": self.total_params,
                "params_after": self.predicted_params,
                "params_removed_fraction": self.removed_params / self.total_params if self.total_params else 0.0,
                "macs_per_sample_before": self.total_macs,
                "macs_per_sample_after": self.predicted_macs,
                "macs_removed_fraction": self.removed_macs / self.total_macs if self.total_macs else 0.0,
            },
            "removals": [r.to_dict() for r in self.removals],
        }
        if self.latency is not None:
            data["latency"] = self.latency
        if self.outside_graph is not None:
            data["outside_graph"] = self.outside_graph
        if self.joint is not None:
            data["joint"] = self.joint
        data["model_weights"] = self.model_weights
        if self.other_weights:
            data["other_weights"] = list(self.other_weights)
        return data

    @classmethod
    def _from_dict(cls, data: Mapping[str, Any]) -> RemovalPlan:
        removals = tuple(PlannedRemoval(**r) for r in data["removals"])
        for r in removals:
            _check_removal(r)
        names = [r.name for r in removals]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise PlanError(f"plan removes {dupes} more than once; each operator may appear once")
        totals = data["totals"]
        plan = cls(
            removals=removals,
            model_class=data["model_class"],
            granularity=data["granularity"],
            total_params=int(totals["params_before"]),
            total_macs=int(totals["macs_per_sample_before"]),
            budget=dict(data.get("budget", {})),
            latency=dict(data["latency"]) if data.get("latency") is not None else None,
            outside_graph=dict(data["outside_graph"]) if data.get("outside_graph") is not None else None,
            model_weights=check_weights_id(data.get("model_weights")),
            other_weights=_other_weights(data.get("other_weights")),
            joint=_joint(data.get("joint")),
        )
        _check_totals(plan, totals)
        return plan

    def check(self) -> None:
        """PlanError when a removal's numbers are not numbers, or the totals do not add up (:meth:`from_dict`
        runs it on every plan read)."""
        try:
            for r in self.removals:
                _check_removal(r)
            _check_totals(self, self.to_dict()["totals"])
        except (TypeError, ValueError) as exc:
            raise PlanError(f"malformed plan: {type(exc).__name__}: {exc}") from exc


def short_id(weights: str) -> str:
    """A weights identity as messages print it: ``sha256:`` and the first 12 hex digits."""
    return weights[:len("sha256:") + 12]


def is_weights_id(value: Any) -> bool:
    """Whether ``value`` is a weights identity as :func:`ldpruner.sources.weights_id` writes it."""
    return isinstance(value, str) and re.fullmatch(r"sha256:[0-9a-f]{64}", value) is not None


def check_weights_id(value: Any, what: str = "model_weights") -> str | None:
    """``value`` when it is a weights identity or None; TypeError naming ``what`` otherwise."""
    if value is None or is_weights_id(value):
        return value
    raise TypeError(f"{what} must be 'sha256:' and 64 hex digits, or null; got {value!r}")


def _joint(value: Any) -> dict[str, Any] | None:
    """The plan's joint score record, checked: null, or {score, sum_of_single_scores, …} with numbers."""
    if value is None:
        return None
    if not (isinstance(value, dict) and all(_is_number(value.get(k), float) or value.get(k) == math.inf
                                            for k in ("score", "sum_of_single_scores"))):
        raise TypeError(f"joint must be null or {{score, sum_of_single_scores, ...}} with numbers, got {value!r}")
    return dict(value)


def _other_weights(value: Any) -> tuple[dict[str, Any], ...]:
    """The plan's record of uses with other weights, checked: a list of {stage, made_for, used_with}."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise TypeError(f"other_weights must be a list of {{stage, made_for, used_with}} records, got {value!r}")
    records = []
    for record in value:
        if not (isinstance(record, dict) and isinstance(record.get("stage"), str) and "used_with" in record):
            raise TypeError(f"other_weights must be a list of {{stage, made_for, used_with}} records, got {record!r}")
        check_weights_id(record.get("made_for"), "other_weights made_for")
        if check_weights_id(record["used_with"], "other_weights used_with") is None:
            raise TypeError(f"other_weights used_with must be a weights identity, got {record['used_with']!r}")
        records.append(dict(record))
    return tuple(records)


def _is_number(value: Any, kind: type) -> bool:
    return isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool) and (
        kind is not float or math.isfinite(value))


def _check_removal(r: PlannedRemoval) -> None:
    if not isinstance(r.name, str) or not r.name:
        raise TypeError(f"a removal's name must be an operator name, got {r.name!r}")
    for field, kind in (("params", int), ("macs", int)):
        value = getattr(r, field)
        if not _is_number(value, kind) or value < 0:
            raise TypeError(f"{r.name}: {field} must be a non-negative integer, got {value!r}")
    for field in ("score", "latency_ms"):
        value = getattr(r, field)
        if value is not None and not (_is_number(value, float) or value == math.inf):
            raise TypeError(f"{r.name}: {field} must be a number or null, got {value!r}")


def _check_totals(plan: RemovalPlan, totals: dict[str, Any]) -> None:
    """The totals a plan states must be the ones its removals give: an edited total is refused, not trusted."""
    for name, value in (("params_before", totals.get("params_before")),
                        ("macs_per_sample_before", totals.get("macs_per_sample_before"))):
        if not _is_number(value, int) or value < 0:
            raise TypeError(f"totals.{name} must be a non-negative integer, got {value!r}")
    removed_params, removed_macs = plan.removed_params, plan.removed_macs
    if removed_params > plan.total_params or removed_macs > plan.total_macs:
        raise ValueError(f"the removals drop {removed_params:,} params / {removed_macs:,} MACs, more than the "
                         f"{plan.total_params:,} / {plan.total_macs:,} the plan starts from")
    for name, stated, actual in (("params_after", totals.get("params_after"), plan.predicted_params),
                                 ("macs_per_sample_after", totals.get("macs_per_sample_after"), plan.predicted_macs)):
        if stated is not None and stated != actual:
            raise ValueError(f"totals.{name} is {stated!r}, but the totals before minus the removals give "
                             f"{actual:,}: the plan was edited; fix the totals or select again")
