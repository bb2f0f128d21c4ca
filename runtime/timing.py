"""Side-by-side timing of callables and onnxruntime sessions for timing.

``measure_interleaved`` times several callables (dense, pruned, …) with warm-up, then R timed rounds; each round
calls every variant once, and the order rotates from round to round (dense, pruned / pruned, dense / …) so that
drift of the machine (other jobs, thermal, caches) hits every variant equally. Statistics are the median and the
inter-quartile range of the R times; the ratio of two variants is the ratio of their medians. ``measure_ratio``
keeps adding rounds until the percentile-bootstrap interval of such a ratio (whole rounds resampled) is within a
stated precision of it, or the rounds or time allowed run out, and says which.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

from ldpruner.base.devices import stage_threads
from ldpruner.base.errors import ConfigError, LdprunerError

__all__ = ["InterleavedRun", "LatencyStats", "RatioMeasurement", "measure_interleaved", "measure_ratio",
           "onnx_feeds", "ort_session", "ratio_interval"]


@dataclasses.dataclass(frozen=True)
class LatencyStats:
    """R timed calls of one variant, in seconds."""

    name: str
    times_s: tuple[float, ...]

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def iqr_s(self) -> float:
        """Inter-quartile range (q75 − q25, inclusive method); 0 for fewer than two times."""
        if len(self.times_s) < 2:
            return 0.0
        q = statistics.quantiles(self.times_s, n=4, method="inclusive")
        return q[2] - q[0]

    def to_dict(self) -> dict[str, Any]:
        return {"median_ms": self.median_s * 1e3, "iqr_ms": self.iqr_s * 1e3, "min_ms": min(self.times_s) * 1e3,
                "repeats": len(self.times_s), "times_ms": [t * 1e3 for t in self.times_s]}


@dataclasses.dataclass(frozen=True)
class InterleavedRun:
    """The timings of every variant from one interleaved run, and the order the timed calls were made in."""

    stats: Mapping[str, LatencyStats]
    order: tuple[str, ...]  # every timed call, in the order it was made
    warmup: int
    repeats: int

    def ratio(self, numerator: str, denominator: str) -> float:
        """median(numerator) / median(denominator)."""
        return self.stats[numerator].median_s / self.stats[denominator].median_s

    def to_dict(self, *, ratio: tuple[str, str] | None = None) -> dict[str, Any]:
        result: dict[str, Any] = {name: s.to_dict() for name, s in self.stats.items()}
        if ratio is not None:
            result["ratio"] = self.ratio(*ratio)
            result["ratio_of"] = f"median({ratio[0]}) / median({ratio[1]})"
        result.update(warmup=self.warmup, repeats=self.repeats, order=list(self.order))
        return result


def measure_interleaved(
    variants: Mapping[str, Callable[[], Any]],
    *,
    warmup: int = 3,
    repeats: int = 10,
    clock: Callable[[], float] = time.perf_counter,
) -> InterleavedRun:
    """Time each callable ``repeats`` times after ``warmup`` untimed calls, interleaved round by round.

    Round r calls the variants in their given order rotated by r (for two variants: A B, B A, A B, …), so no
    variant always runs first or right after the other. ``clock`` is injectable for tests."""
    names = list(variants)
    problems = []
    if not names:
        problems.append("variants is empty; pass at least one callable")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        problems.append(f"warmup must be an int ≥ 0; got {warmup!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        problems.append(f"repeats must be an int ≥ 1; got {repeats!r}")
    if problems:
        raise ConfigError("measure_interleaved: " + "; ".join(problems))
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    order: list[str] = []
    _rounds(variants, names, range(repeats), times, order, clock)
    return InterleavedRun(stats={n: LatencyStats(n, tuple(t)) for n, t in times.items()}, order=tuple(order),
                          warmup=warmup, repeats=repeats)


def _rounds(variants: Mapping[str, Callable[[], Any]], names: list[str], rounds: range,
            times: dict[str, list[float]], order: list[str], clock: Callable[[], float],
            deadline: float | None = None) -> int:
    """Timed rounds ``rounds`` (their indices set the rotation), appended to ``times`` and ``order``; the rounds
    stop after the one that ends at or past ``deadline``. Returns how many ran."""
    ran = 0
    for r in rounds:
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            start = clock()
            variants[name]()
            times[name].append(clock() - start)
            order.append(name)
        ran += 1
        if deadline is not None and clock() >= deadline:
            break
    return ran


@dataclasses.dataclass(frozen=True)
class RatioMeasurement:
    """A latency ratio measured until it was known to a stated precision (or the time allowed ran out).

    ``low`` / ``high``: the ``confidence`` bootstrap interval of median(numerator) / median(denominator),
    resampling whole rounds (the calls made together face the same machine state); ``converged``: the interval is
    within ± ``precision`` × the ratio."""

    run: InterleavedRun
    numerator: str
    denominator: str
    ratio: float
    low: float
    high: float
    confidence: float
    precision: float
    converged: bool

    def describe(self) -> str:
        """"0.508 (95 % interval 0.497–0.519, 40 rounds)", with "not converged" when it is not."""
        text = (f"{self.ratio:.3f} ({self.confidence:.0%} interval {self.low:.3f}–{self.high:.3f}, "
                f"{self.run.repeats} rounds")
        return text + (")" if self.converged else f"; wider than ±{self.precision:.0%}: a noisy machine)")


def ratio_interval(run: InterleavedRun, numerator: str, denominator: str, *, confidence: float = 0.95,
                   resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """The percentile bootstrap interval of median(``numerator``) / median(``denominator``) over the rounds of
    ``run`` (each resample draws whole rounds, keeping the two calls of a round together)."""
    import numpy as np

    num = np.asarray(run.stats[numerator].times_s)
    den = np.asarray(run.stats[denominator].times_s)
    if len(num) < 2:  # one round says nothing about its spread
        return 0.0, float("inf")
    picks = np.random.default_rng(seed).integers(0, len(num), size=(resamples, len(num)))
    ratios = np.median(num[picks], axis=1) / np.median(den[picks], axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(ratios, [tail, 100 - tail])
    return float(low), float(high)


def measure_ratio(
    variants: Mapping[str, Callable[[], Any]],
    numerator: str,
    denominator: str,
    *,
    warmup: int = 3,
    repeats: int = 10,
    precision: float = 0.02,
    confidence: float = 0.95,
    max_repeats: int = 400,
    max_seconds: float = 60.0,
    clock: Callable[[], float] = time.perf_counter,
) -> RatioMeasurement:
    """Time ``variants`` interleaved (as :func:`measure_interleaved`) for ``repeats`` rounds, then keep adding rounds
    until the ``confidence`` interval of median(numerator) / median(denominator) lies within ± ``precision`` of the
    ratio, or ``max_repeats`` rounds ran, or the measurement (warm-up included) has taken ``max_seconds``: the
    first ``repeats`` rounds always run, no round starts after that. A ratio from a few rounds on a busy machine can
    be off by more than the effect it measures; the interval says how far."""
    problems = []
    if not (isinstance(precision, (int, float)) and 0 < precision < 1):
        problems.append(f"precision must be in (0, 1); got {precision!r}")
    if not (isinstance(confidence, (int, float)) and 0 < confidence < 1):
        problems.append(f"confidence must be in (0, 1); got {confidence!r}")
    if isinstance(max_repeats, bool) or not isinstance(max_repeats, int) or max_repeats < 1:
        problems.append(f"max_repeats must be an int ≥ 1; got {max_repeats!r}")
    if numerator not in variants or denominator not in variants:
        problems.append(f"the ratio {numerator!r} / {denominator!r} names variants not in {list(variants)}")
    if problems:
        raise ConfigError("measure_ratio: " + "; ".join(problems))
    started = clock()
    run = measure_interleaved(variants, warmup=warmup, repeats=repeats, clock=clock)
    names = list(variants)
    times = {n: list(run.stats[n].times_s) for n in names}
    order = list(run.order)
    done = repeats
    while True:
        current = InterleavedRun(stats={n: LatencyStats(n, tuple(t)) for n, t in times.items()}, order=tuple(order),
                                 warmup=warmup, repeats=done)
        ratio = current.ratio(numerator, denominator)
        low, high = ratio_interval(current, numerator, denominator, confidence=confidence)
        converged = max(ratio - low, high - ratio) <= precision * ratio
        if converged or done >= max_repeats or clock() - started >= max_seconds:
            return RatioMeasurement(current, numerator, denominator, ratio, low, high, confidence, precision,
                                    converged)
        more = min(max(repeats, done // 2), max_repeats - done)  # grow by half: a few interval checks in all
        done += _rounds(variants, names, range(done, done + more), times, order, clock, started + max_seconds)


# --- onnxruntime ---------------------------------------------------------------------------------------------

_ORT_NUMPY = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
              "tensor(int64)": "int64", "tensor(int32)": "int32"}


def ort_session(path: str | os.PathLike, *, threads: int | None, device: Any = None,
                profile_prefix: str | None = None) -> Any:
    """An onnxruntime session for timing: ``threads`` intra-op threads (None: those of the ldpruner stage this runs
    in, :func:`ldpruner.base.devices.stage_threads`; outside one, onnxruntime's default), no spinning;
    on the CUDA provider (of the device's GPU) when ``device`` is a CUDA device and onnxruntime-gpu offers it, else
    the CPU provider. ``profile_prefix``: onnxruntime's profiler on, its JSON written under that prefix.

    Spinning is off because the variants are timed alternately: a session whose pool keeps spinning after its
    call would take cores from the next variant's call (measured on 2 cores); off, each call gets the machine."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    threads = threads if threads is not None else stage_threads()
    if threads is not None:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    providers: list[Any] = ["CPUExecutionProvider"]
    if (device is not None and getattr(device, "type", None) == "cuda"
            and "CUDAExecutionProvider" in ort.get_available_providers()):
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
    return ort.InferenceSession(str(path), sess_options=options, providers=providers)


def onnx_feeds(session: Any, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """Torch (or numpy) inputs as numpy arrays of the dtypes the ONNX model declares."""
    import numpy as np

    feeds = {}
    for spec in session.get_inputs():
        if spec.name not in inputs:
            raise LdprunerError(f"the ONNX model takes {spec.name!r}, which the benchmark inputs lack "
                                f"({sorted(inputs)})")
        value = inputs[spec.name]
        array = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        feeds[spec.name] = array.astype(_ORT_NUMPY.get(spec.type, array.dtype.name), copy=False)
    return feeds
