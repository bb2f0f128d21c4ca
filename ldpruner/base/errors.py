"""Typed errors. Every message names the argument, the rule it broke, the value it had and the fix."""

from __future__ import annotations

__all__ = [
    "LdprunerError",
    "ModelLoadError",
    "TraceError",
    "PlanError",
    "BudgetError",
    "RewriteError",
    "VerificationError",
    "ExportError",
    "ExportValidationError",
    "ConfigError",
    "ArtifactError",
    "UnsupportedInputError",
    "TapError",
    "DistillError",
    "BenchError",
    "UnsupportedModelError",
]


class LdprunerError(Exception):
    """Base class of every error ldpruner raises on purpose."""


class ConfigError(LdprunerError, ValueError):
    """A configuration value is out of range or of the wrong type."""


class ModelLoadError(LdprunerError):
    """The model path is missing, is not a UNet, or its weights cannot be read."""


class TraceError(LdprunerError):
    """The model could not be traced into an fx graph."""


class PlanError(LdprunerError):
    """A removal plan does not fit the model it is applied to."""


class BudgetError(LdprunerError):
    """The requested pruning budget cannot be met by the removable operators."""


class RewriteError(LdprunerError):
    """A graph rewrite could not be applied."""


class VerificationError(LdprunerError):
    """A graph failed verification after a pass."""


class ExportError(LdprunerError):
    """ONNX export failed."""


class ExportValidationError(ExportError):
    """onnxruntime and torch disagree beyond tolerance on the exported model."""


class ArtifactError(LdprunerError):
    """An output artifact exists and may not be replaced, or an input artifact is unreadable."""


class UnsupportedInputError(LdprunerError, ValueError):
    """A runtime model was called with an input its exported graph cannot take (or without one it needs)."""


class TapError(LdprunerError):
    """A feature tap names an operator group the graph does not have."""


class DistillError(LdprunerError):
    """Distillation cannot start or go on: a bad checkpoint, a student that does not fit its teacher, a loss
    that is no longer finite."""


class BenchError(LdprunerError):
    """The bench stage cannot run: the benchmarks package or one of its dependencies is not importable."""


class UnsupportedModelError(LdprunerError):
    """A model whose configuration ldpruner cannot trace, drive or prune: the message names the config option,
    its value and why."""


class WeightsMismatchError(ArtifactError):
    """An artifact (scores, plan, student, checkpoint) was made for other weights than the model it is used with."""
