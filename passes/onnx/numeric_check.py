"""Numeric agreement checks shared by export and optimize: seeded UNet inputs, tolerances, reports.

A check passes when ``max|out - ref| <= atol + rtol * max|ref|`` (one scalar bound per output, so a few
large activations do not hide an error in the small ones the way an elementwise rtol would), the shapes
agree and neither side has a NaN/Inf. Every check runs; failures are collected, never short-circuited.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ldpruner.base.unet_inputs import TEXT_INPUT

from ..config import DEFAULT_TOLERANCES, Tolerance

__all__ = [
    "Tolerance",
    "DEFAULT_TOLERANCES",
    "NumericCheck",
    "ValidationReport",
    "InputSpec",
    "make_inputs",
    "compare_outputs",
    "run_failure",
]


@dataclasses.dataclass(frozen=True)
class NumericCheck:
    """One comparison of a model output against its reference on one input set."""

    name: str
    input_shapes: Mapping[str, tuple[int, ...]]
    max_abs_diff: float | None  # None when the output could not be produced or compared
    max_abs_ref: float | None
    bound: float | None
    passed: bool
    problem: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "input_shapes": {k: list(v) for k, v in self.input_shapes.items()},
            "max_abs_diff": self.max_abs_diff,
            "max_abs_ref": self.max_abs_ref,
            "bound": self.bound,
            "passed": self.passed,
            "problem": self.problem,
        }

    def describe(self) -> str:
        if self.max_abs_diff is not None and self.problem == "":
            return f"{self.name}: max_abs_diff {self.max_abs_diff:.3g} <= bound {self.bound:.3g}"
        return f"{self.name}: {self.problem}"


@dataclasses.dataclass(frozen=True)
class ValidationReport:
    """What was compared against what, with which tolerance, and every check's numbers.

    ``validated`` is False when no comparison ran (``reason`` says why); ``passed`` is then False too, so a
    report never claims agreement it did not measure.
    """

    validated: bool
    reference: str
    candidate: str
    provider: str | None
    dtype: str
    tolerance: Tolerance | None
    checks: tuple[NumericCheck, ...] = ()
    reason: str = ""

    @property
    def passed(self) -> bool:
        return self.validated and bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def max_abs_diff(self) -> float | None:
        diffs = [c.max_abs_diff for c in self.checks if c.max_abs_diff is not None]
        return max(diffs) if diffs else None

    @property
    def failures(self) -> tuple[NumericCheck, ...]:
        return tuple(c for c in self.checks if not c.passed)

    @classmethod
    def not_run(cls, reason: str, *, reference: str, candidate: str, dtype: str) -> ValidationReport:
        return cls(False, reference, candidate, None, dtype, None, (), reason)

    def to_dict(self) -> dict[str, Any]:
        return {
            "validated": self.validated,
            "passed": self.passed,
            "reason": self.reason,
            "reference": self.reference,
            "candidate": self.candidate,
            "provider": self.provider,
            "dtype": self.dtype,
            "tolerance": self.tolerance.to_dict() if self.tolerance else None,
            "rule": "max_abs_diff <= atol + rtol * max_abs_ref",
            "max_abs_diff": self.max_abs_diff,
            "checks": [c.to_dict() for c in self.checks],
        }

    def failure_message(self) -> str:
        lines = [f"{self.candidate} disagrees with {self.reference} on {len(self.failures)} of {len(self.checks)} "
                 "checks "
                 f"(rule max_abs_diff <= atol + rtol * max_abs_ref, {self.dtype} tolerance "
                 f"atol={self.tolerance.atol:g}, rtol={self.tolerance.rtol:g}, provider {self.provider}):"]
        lines += [f"  - {c.describe()}" for c in self.failures]
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """A model input: its name, the shape it has in the example (batch first) and its numpy dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype


def make_inputs(
    specs: Sequence[InputSpec],
    *,
    batch: int,
    spatial: tuple[int, int] | None,
    seed: int,
    spatial_input: str = "sample",
    scaled: Mapping[str, float] | None = None,
    text_length: int | None = None,
) -> dict[str, np.ndarray]:
    """Seeded inputs for a UNet: ``spatial_input`` (the NCHW latent) gets the batch and (when given) the spatial
    size, ``scaled`` inputs that size times their factor (Kandinsky's hint: 8, ControlNet residuals: 1 to 1/2^k),
    ``encoder_hidden_states`` ``text_length`` tokens (when given), every other input keeps its example shape with
    the new batch. Timesteps differ per batch element (so a timestep broadcast baked in at trace time would show),
    integer inputs (class labels) are 0."""
    rng = np.random.default_rng(seed)
    inputs: dict[str, np.ndarray] = {}
    factors = {spatial_input: 1, **(scaled or {})}
    for spec in specs:
        dtype = np.dtype(spec.dtype)
        shape = (batch, *spec.shape[1:])
        if spec.name in factors and spatial is not None:
            shape = (batch, *spec.shape[1:-2], *(round(d * factors[spec.name]) for d in spatial))
        if spec.name == TEXT_INPUT and text_length is not None:
            shape = (batch, text_length, *spec.shape[2:])
        if spec.name == "timestep":
            value = rng.integers(0, 1000, size=shape)
        elif spec.name == "time_ids":
            value = rng.integers(0, 1024, size=shape)
        elif np.issubdtype(dtype, np.integer):
            value = np.zeros(shape)
        else:
            value = rng.standard_normal(shape)
        inputs[spec.name] = value.astype(dtype)
    return inputs


def compare_outputs(
    name: str,
    input_shapes: Mapping[str, tuple[int, ...]],
    reference: np.ndarray,
    candidate: np.ndarray,
    tolerance: Tolerance,
) -> NumericCheck:
    shapes = {k: tuple(int(d) for d in v) for k, v in input_shapes.items()}
    reference = np.asarray(reference, dtype=np.float64)
    candidate = np.asarray(candidate, dtype=np.float64)
    if reference.shape != candidate.shape:
        return NumericCheck(name, shapes, None, None, None, False,
                            f"output shape {list(candidate.shape)} != reference shape {list(reference.shape)}")
    if not np.isfinite(reference).all():
        return NumericCheck(name, shapes, None, None, None, False, "the reference output has NaN/Inf")
    max_abs_ref = float(np.abs(reference).max()) if reference.size else 0.0
    bound = tolerance.bound(max_abs_ref)
    if not np.isfinite(candidate).all():
        bad = int((~np.isfinite(candidate)).sum())
        return NumericCheck(name, shapes, None, max_abs_ref, bound, False, f"the output has {bad} NaN/Inf values")
    diff = float(np.abs(candidate - reference).max()) if reference.size else 0.0
    if diff > bound:
        where = np.unravel_index(int(np.abs(candidate - reference).argmax()), reference.shape)
        return NumericCheck(
            name, shapes, diff, max_abs_ref, bound, False,
            f"max_abs_diff {diff:.3g} > bound {bound:.3g} (atol {tolerance.atol:g} + rtol {tolerance.rtol:g} * "
            f"max_abs_ref {max_abs_ref:.3g}), worst at index {list(map(int, where))}",
        )
    return NumericCheck(name, shapes, diff, max_abs_ref, bound, True)


def run_failure(name: str, input_shapes: Mapping[str, tuple[int, ...]], side: str, exc: BaseException) -> NumericCheck:
    """A check whose model could not even run: recorded like a mismatch, so every failure is reported."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    shapes = {k: tuple(int(d) for d in v) for k, v in input_shapes.items()}
    return NumericCheck(name, shapes, None, None, None, False, f"{side} failed: {type(exc).__name__}: {message[:300]}")
