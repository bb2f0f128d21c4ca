"""Side-by-side latency and peak memory of UNet variants measured in one run.

``measure_interleaved`` times several callables (dense, pruned, …) with warm-up, then R timed rounds; each round
calls every variant once, and the order rotates from round to round (dense, pruned / pruned, dense / …) so that
drift of the machine (other jobs, thermal, caches) hits every variant equally. Statistics are the median and the
inter-quartile range of the R times; the ratio of two variants is the ratio of their medians.

``onnx_peak_memory`` runs an ONNX model in a fresh Python process that imports only onnxruntime and numpy and
reports its resident set: after the imports (baseline), after the session is created (weights + initialisation),
the peak during session creation, and the peak while running (``VmHWM``, reset through ``/proc/self/clear_refs``
after the session is created, so it is the peak of inference alone; ``ru_maxrss`` where the reset is refused). A
fresh process is the only way to read a per-model peak on CPU: a process's high-water mark never goes down, and
tracemalloc does not see the allocations of torch or onnxruntime. The process runs without onnxruntime's CPU memory
arena: the arena grows in power-of-two steps, which would make the peak jump by 2× between models of nearly equal
need.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ldpruner.errors import ConfigError, LdprunerError

__all__ = ["LatencyStats", "InterleavedRun", "measure_interleaved", "ort_session", "onnx_feeds", "onnx_peak_memory"]


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
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            start = clock()
            variants[name]()
            times[name].append(clock() - start)
            order.append(name)
    return InterleavedRun(stats={n: LatencyStats(n, tuple(t)) for n, t in times.items()}, order=tuple(order),
                          warmup=warmup, repeats=repeats)


# --- onnxruntime ---------------------------------------------------------------------------------------------

_ORT_NUMPY = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
              "tensor(int64)": "int64", "tensor(int32)": "int32"}


def ort_session(path: str | os.PathLike, *, threads: int, device: Any = None):
    """An onnxruntime session for timing: ``threads`` intra-op threads, no spinning; on the CUDA provider (of the
    device's GPU) when ``device`` is a CUDA device and onnxruntime-gpu offers it, else the CPU provider.

    Spinning is off because the variants are timed alternately: a session whose pool keeps spinning after its
    call would take cores from the next variant's call (measured on 2 cores); off, each call gets the machine."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
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


_PEAK_SCRIPT = r"""
import json, resource, sys
def rss_mib(field="VmRSS:"):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
import numpy as np
import onnxruntime as ort
spec = json.loads(sys.argv[1])
base = rss_mib()
options = ort.SessionOptions()
options.intra_op_num_threads = spec["threads"]
options.enable_cpu_mem_arena = False
session = ort.InferenceSession(spec["path"], sess_options=options, providers=["CPUExecutionProvider"])
loaded = rss_mib()
creation_peak = rss_mib("VmHWM:")
try:  # reset the high-water mark (Linux >= 4.0) so the peak below is that of inference, not of session creation
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    reset = True
except OSError:
    reset = False
rng = np.random.default_rng(0)
feeds = {}
for name, (shape, dtype) in spec["inputs"].items():
    feeds[name] = (rng.integers(0, 999, size=shape) if dtype.startswith("int") else rng.standard_normal(shape)).astype(dtype)
for _ in range(spec["runs"]):
    session.run(None, feeds)
peak = rss_mib("VmHWM:") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"baseline_rss_mib": base, "after_load_rss_mib": loaded, "creation_peak_rss_mib": creation_peak,
                  "peak_rss_mib": peak, "peak_is_inference_only": reset}))
"""  # noqa: E501


def onnx_peak_memory(path: str | os.PathLike, inputs: Mapping[str, tuple[Sequence[int], str]], *, threads: int,
                     runs: int = 2, timeout_s: float = 600) -> dict[str, Any]:
    """Resident memory of a fresh process serving ``path`` (see the module docstring); ``inputs`` maps each
    input name to (shape, numpy dtype). Linux only (reads /proc); elsewhere returns ``{"available": False}``."""
    if not sys.platform.startswith("linux"):
        return {"available": False, "reason": f"reads /proc/self/status; not available on {sys.platform}"}
    spec = {"path": str(Path(path)), "threads": threads, "runs": runs,
            "inputs": {n: [list(s), d] for n, (s, d) in inputs.items()}}
    done = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, json.dumps(spec)], capture_output=True, text=True,
                          timeout=timeout_s)
    if done.returncode != 0:
        raise LdprunerError(f"measuring the peak memory of {Path(path).name} failed: "
                            f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["model_mib"] = result["after_load_rss_mib"] - result["baseline_rss_mib"]
    result["run_peak_mib"] = result["peak_rss_mib"] - result["baseline_rss_mib"]
    result.update(available=True, runs=runs, batch=next(iter(inputs.values()))[0][0] if inputs else None)
    return result
