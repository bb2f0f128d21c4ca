"""Distillation: the trainer that fine-tunes a pruned student against its dense teacher (``trainer``), its
checkpoints (``checkpoint``), what it trains on — the teacher's own trajectories or real latents (``data``) — and
image folders encoded through the model's VAE (``datasets``)."""

from .checkpoint import CHECKPOINTS, latest_checkpoint
from .data import DistillBatch, DistillData, LatentData, TeacherTrajectories
from .trainer import DistillConfig, DistillResult, distill, feature_loss, lr_factor, plot_loss

__all__ = [
    "CHECKPOINTS",
    "DistillBatch",
    "DistillConfig",
    "DistillData",
    "DistillResult",
    "LatentData",
    "TeacherTrajectories",
    "distill",
    "feature_loss",
    "latest_checkpoint",
    "lr_factor",
    "plot_loss",
]
