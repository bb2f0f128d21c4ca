"""The costs.json format: a :class:`CostReport` of what removing each operator saves (one :class:`OperatorCost`
each) on one runtime, the latency a plan is predicted to reach from it, and the reuse of a saved report under a
cache key.

The costs are measured by :func:`ldpruner.passes.costs.measure_costs`, which also computes the key; this module
needs no torch, so a plan or a report reads costs.json without loading it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

from ldpruner.base.artifact import ArtifactFile, JsonArtifact

from .config import CostConfig

__all__ = ["COSTS", "COSTS_FORMAT", "CostReport", "OperatorCost"]

COSTS = ArtifactFile("costs.json", "ldpruner.costs/1", "costs file")
COSTS_FORMAT = COSTS.format


@dataclasses.dataclass(frozen=True)
class OperatorCost:
    """The measured time of what removing one operator deletes, and of what it leaves in its place."""

    name: str
    ms: float  # median over the timed runs of the time of the nodes its removal deletes (in dense-latency ms)
    iqr_ms: float
    kept_ms: float  # the stand-in: the kept shortcut conv, a new 1×1 projection; ~0 for a bypass
    kept_basis: str  # "measured" | "macs-scaled" (a new projection under onnxruntime)

    @property
    def saves_ms(self) -> float:
        """What the removal saves; never negative (a stand-in timed slower than its operator saves nothing)."""
        return max(0.0, self.ms - self.kept_ms)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "saves_ms": self.saves_ms}


@dataclasses.dataclass(frozen=True)
class CostReport(JsonArtifact):
    """The latency costs of one traced UNet on one runtime: written as ``costs.json``, keyed like ``scores.json``."""

    FILE: ClassVar[ArtifactFile] = COSTS

    operators: Mapping[str, OperatorCost]
    dense_ms: float  # median latency of the dense model (no profiler, no interpreter)
    dense_iqr_ms: float
    attributed_ms: float  # Σ of the candidates' times: the share of a profiled run the operators account for
    profiled_ms: float  # the median profiled run (interpreter or profiler on): the base the attribution splits
    config: CostConfig
    placement: Mapping[str, Any]  # runtime, provider, device, accelerator, dtype, batch, sample shape, threads
    model_class: str
    granularity: str
    cache_key: str
    wall_time_s: float = 0.0

    def saves_ms(self, name: str) -> float:
        """What removing operator ``name`` saves (0 for an operator the costs do not know)."""
        cost = self.operators.get(name)
        return cost.saves_ms if cost is not None else 0.0

    def predicted_ms(self, names: Any) -> float:
        """The latency predicted after removing ``names``: the dense latency less what each removal saves."""
        return self.dense_ms - sum(self.saves_ms(n) for n in names)

    def basis(self) -> dict[str, Any]:
        """What a prediction from these costs rests on (for a plan to record)."""
        return {**self.placement, "repeats": self.config.latency_repeats, "dense_ms": self.dense_ms,
                "costs_key": self.cache_key}

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": COSTS_FORMAT,
            "cache_key": self.cache_key,
            "model_class": self.model_class,
            "granularity": self.granularity,
            "config": self.config.to_dict(),
            "placement": dict(self.placement),
            "dense_ms": self.dense_ms,
            "dense_iqr_ms": self.dense_iqr_ms,
            "profiled_ms": self.profiled_ms,
            "attributed_ms": self.attributed_ms,
            "wall_time_s": self.wall_time_s,
            "operators": [c.to_dict() for c in sorted(self.operators.values(), key=lambda c: -c.saves_ms)],
        }

    @classmethod
    def _from_dict(cls, data: Mapping[str, Any]) -> CostReport:
        fields = {f.name for f in dataclasses.fields(OperatorCost)}
        operators = {c["name"]: OperatorCost(**{k: v for k, v in c.items() if k in fields})
                     for c in data["operators"]}
        return cls(operators=operators, dense_ms=float(data["dense_ms"]),
                   dense_iqr_ms=float(data["dense_iqr_ms"]), attributed_ms=float(data["attributed_ms"]),
                   profiled_ms=float(data["profiled_ms"]),
                   # costs.json of earlier versions kept the threads (the placement has them) and the options
                   # that judge a plan (CheckConfig's) in the config
                   config=CostConfig.from_dict({k: v for k, v in data["config"].items()
                                                if k not in ("threads", *_JUDGING)}),
                   placement=dict(data["placement"]), model_class=data["model_class"],
                   granularity=data["granularity"], cache_key=data["cache_key"],
                   wall_time_s=float(data.get("wall_time_s", 0.0)))


# options of earlier costs.json files that judge a plan's latency (CheckConfig's now), not how costs are measured
_JUDGING = ("latency_tolerance", "latency_precision")
