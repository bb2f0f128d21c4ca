"""RemovalPlan: the reviewable, replayable list of operators to remove (written as plan.json)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ldpruner.errors import PlanError
from ldpruner.io import read_json, write_json_atomic

__all__ = ["PlannedRemoval", "RemovalPlan", "PLAN_FORMAT"]

PLAN_FORMAT = "ldpruner.plan/1"


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
class RemovalPlan:
    """Ordered removals plus the totals they predict. Pure data: apply it with ``RemoveOperators(plan)``."""

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
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RemovalPlan:
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise PlanError(
                f"not an ldpruner plan: expected format {PLAN_FORMAT!r}, "
                f"got {data.get('format') if isinstance(data, dict) else type(data).__name__!r}"
            )
        try:
            removals = tuple(PlannedRemoval(**r) for r in data["removals"])
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
            )
        except (KeyError, TypeError) as exc:
            raise PlanError(f"malformed plan: {type(exc).__name__}: {exc}") from exc
        names = plan.names
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise PlanError(f"plan removes {dupes} more than once; each operator may appear once")
        return plan

    def save(self, path: str | Path) -> None:
        write_json_atomic(Path(path), self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> RemovalPlan:
        return cls.from_dict(read_json(path, what="plan file", error=PlanError))
