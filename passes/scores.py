"""The scores.json format: an :class:`ImportanceReport` of per-candidate LD scores (one :class:`CandidateScore`
each) keyed by fx qualified name, what produced them, and the reuse of a saved report under a cache key.

The scores themselves are computed by :func:`ldpruner.passes.importance.analyze_importance`; this module needs no
torch, so a plan or a report reads scores.json without loading it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

from ldpruner.base.artifact import ArtifactFile, JsonArtifact
from ldpruner.base.errors import ArtifactError

from .config import AnalysisConfig
from .plan import check_weights_id

__all__ = ["CandidateScore", "ImportanceReport", "SCORES", "SCORES_FORMAT"]

SCORES = ArtifactFile("scores.json", "ldpruner.scores/1", "scores file")
SCORES_FORMAT = SCORES.format


@dataclasses.dataclass(frozen=True)
class CandidateScore:
    """The score of one candidate, with its two terms and what removing it saves."""

    name: str  # fx qualified name of the operator's module
    score: float
    mu_term: float  # ‖μ_dense − μ_c‖₂
    sigma_term: float  # ‖σ_dense − σ_c‖₂
    params: int
    macs: int
    action: str
    kind: str
    module_class: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ImportanceReport(JsonArtifact):
    """Per-candidate scores keyed by fx qualified name, plus what produced them. Written as scores.json.

    ``entries`` keeps graph order; treat it as read-only. ``unet_calls`` is summed over ranks (each rank
    generates the dense latents once); ``wall_time_s`` is the slowest rank's."""

    FILE: ClassVar[ArtifactFile] = SCORES

    model_class: str
    granularity: str
    total_params: int
    total_macs: int
    config: AnalysisConfig
    scheduler: dict[str, Any]
    conditioning: str
    prompts: tuple[str, ...] | None
    classifier_free_guidance: bool
    latent_shape: tuple[int, ...]
    dense_mean_norm: float  # ‖μ_dense‖₂: the scale the μ-terms compare to
    dense_std_norm: float  # ‖σ_dense‖₂
    entries: dict[str, CandidateScore]
    unet_calls: int
    wall_time_s: float
    world_size: int
    cache_key: str
    placement: dict[str, str] = dataclasses.field(default_factory=dict)  # device, dtype, accelerator
    planned_unet_calls: int | None = None  # announced before the scoring started
    peak_memory: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # one entry per rank
    # the identity of the dense weights analysed (ldpruner.sources.weights_id); None: not recorded
    model_weights: str | None = None

    def __getitem__(self, name: str) -> CandidateScore:
        return self.entries[name]

    def __iter__(self) -> Iterator[CandidateScore]:
        return iter(self.entries.values())

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def scores(self) -> dict[str, float]:
        return {name: e.score for name, e in self.entries.items()}

    def ranked(self) -> list[CandidateScore]:
        """Least important first (the order LD-Pruner removes in); ties keep graph order."""
        return sorted(self.entries.values(), key=lambda e: e.score)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SCORES_FORMAT,
            "cache_key": self.cache_key,
            "model_class": self.model_class,
            "model_weights": self.model_weights,
            "granularity": self.granularity,
            "total_params": self.total_params,
            "total_macs_per_sample": self.total_macs,
            "config": self.config.to_dict(),
            "scheduler": self.scheduler,
            "conditioning": self.conditioning,
            "prompts": list(self.prompts) if self.prompts is not None else None,
            "classifier_free_guidance": self.classifier_free_guidance,
            "latent_shape": list(self.latent_shape),
            "score": "||mu_dense - mu_c||_2 + ||sigma_dense - sigma_c||_2; sigma: population std (unbiased=False)",
            "dense": {"mean_norm": self.dense_mean_norm, "std_norm": self.dense_std_norm},
            "placement": self.placement,
            "cost": {"unet_calls": self.unet_calls, "planned_unet_calls": self.planned_unet_calls,
                     "wall_time_s": self.wall_time_s, "world_size": self.world_size,
                     "peak_memory": self.peak_memory},
            "candidates": [e.to_dict() for e in self.entries.values()],
        }

    @classmethod
    def _from_dict(cls, data: Mapping[str, Any]) -> ImportanceReport:
        entries = [CandidateScore(**e) for e in data["candidates"]]
        cost = data["cost"]
        _check_finite_scores(entries, "scores.json")
        return cls(
            model_class=data["model_class"],
            granularity=data["granularity"],
            total_params=int(data["total_params"]),
            total_macs=int(data["total_macs_per_sample"]),
            config=AnalysisConfig.from_dict(data["config"]),
            scheduler=dict(data["scheduler"]),
            conditioning=data["conditioning"],
            prompts=tuple(data["prompts"]) if data["prompts"] is not None else None,
            classifier_free_guidance=bool(data["classifier_free_guidance"]),
            latent_shape=tuple(data["latent_shape"]),
            dense_mean_norm=float(data["dense"]["mean_norm"]),
            dense_std_norm=float(data["dense"]["std_norm"]),
            entries={e.name: e for e in entries},
            unet_calls=int(cost["unet_calls"]),
            wall_time_s=float(cost["wall_time_s"]),
            world_size=int(cost["world_size"]),
            cache_key=data["cache_key"],
            placement=dict(data.get("placement") or {}),
            planned_unet_calls=cost.get("planned_unet_calls"),
            peak_memory=list(cost.get("peak_memory") or []),
            model_weights=check_weights_id(data.get("model_weights"), "scores.json's model_weights"),
        )

    def check_finite(self, where: str = "the scores") -> None:
        """ArtifactError when a score or one of its terms is NaN, infinite or not a number: never ranked."""
        _check_finite_scores(list(self.entries.values()), where)


def _check_finite_scores(entries: list[CandidateScore], where: str) -> None:
    """A score is a finite number, or +inf (its removal makes the samples non-finite: never selected)."""
    bad = []
    for e in entries:
        values = (e.score, e.mu_term, e.sigma_term)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and (math.isfinite(v) or v == math.inf)
                   for v in values):
            bad.append(f"{e.name} ({e.score!r})")
    if bad:
        raise ArtifactError(f"{where} hold non-finite or non-numeric scores for {bad[:5]}"
                            f"{' …' if len(bad) > 5 else ''}; a NaN would rank first and be removed: re-run the "
                            "analysis (a model whose outputs are not finite is refused there)")
