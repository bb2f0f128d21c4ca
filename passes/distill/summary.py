"""distill.json: what a distillation run did, written beside its ``student/`` — the config, steps, data, feature
taps, the loss at the start and the end, wall time, threads and placement, the teachers it was resumed against.
Declared here once (file name, format) for the trainer that writes it and the report and bench that read it."""

from __future__ import annotations

from ldpruner.base.artifact import ArtifactFile

__all__ = ["SUMMARY"]

SUMMARY = ArtifactFile("distill.json", "ldpruner.distill/1", "distillation summary")
