"""Distillation: the trainer that fine-tunes a pruned student against its dense teacher (``trainer``), its
checkpoints (``checkpoint``), the summary a run leaves beside its student (``summary``: distill.json), what it trains
on — the teacher's own trajectories or real latents (``data``) — and image folders encoded through the model's VAE
(``datasets``). The names below resolve lazily, so reading a summary loads no torch."""

from __future__ import annotations

from ldpruner.base.lazy import lazy_exports

__all__ = [
    "CHECKPOINTS",
    "DistillBatch",
    "DistillConfig",
    "DistillData",
    "DistillResult",
    "LatentData",
    "SUMMARY",
    "TeacherTrajectories",
    "distill",
    "feature_loss",
    "latest_checkpoint",
    "lr_factor",
    "plot_loss",
]

_WHERE = {
    "CHECKPOINTS": "checkpoint", "latest_checkpoint": "checkpoint", "SUMMARY": "summary",
    "DistillBatch": "data", "DistillData": "data", "LatentData": "data", "TeacherTrajectories": "data",
    "DistillConfig": "trainer", "DistillResult": "trainer", "distill": "trainer", "feature_loss": "trainer",
    "lr_factor": "trainer", "plot_loss": "trainer",
}

__getattr__ = lazy_exports(__name__, _WHERE)
