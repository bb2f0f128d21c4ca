"""Peak memory of a process serving an ONNX model, and (from :mod:`ldpruner.runtime.timing`) the interleaved
timing the benchmark measures latency with.

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

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ldpruner.base.errors import LdprunerError
from ldpruner.runtime.timing import (
    InterleavedRun,
    LatencyStats,
    measure_interleaved,
    measure_ratio,
    onnx_feeds,
    ort_session,
)

__all__ = ["LatencyStats", "InterleavedRun", "measure_interleaved", "measure_ratio", "ort_session", "onnx_feeds",
           "onnx_peak_memory", "ort_latency", "peak_memory", "plan_inputs", "ratio", "torch_latency", "zero_residuals"]


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


# --- a plan beside the dense model (``config``: the run's BenchConfig) ------------------------------------------

def plan_inputs(traced: Any, batch: int) -> dict[str, Any]:
    """Seeded inputs at ``batch`` shaped like the trace's examples (the cost model's own, so a latency it predicts
    and one measured here run on the same inputs)."""
    from ldpruner.passes.costs import timing_inputs

    return timing_inputs(traced, batch)


def torch_latency(dense_unet: Any, pruned_gm: Any, traced: Any, batch: int, config: Any,
                   device: Any) -> dict[str, Any]:
    import torch

    inputs = {n: t.to(device) for n, t in plan_inputs(traced, batch).items()}
    args = [inputs[n] for n in traced.input_names]
    dense_unet.eval()
    pruned_gm.eval()

    def timed(call: Any) -> Any:  # a CUDA call returns before the GPU is done: wait for it inside the timing
        return (lambda: (call(), torch.cuda.synchronize(device))) if device.type == "cuda" else call

    with torch.inference_mode():
        return ratio({"dense": timed(lambda: dense_unet(**inputs)), "pruned": timed(lambda: pruned_gm(*args))},
                      config)


def ort_latency(dense_session: Any, pruned_session: Any, traced: Any, batch: int,
                 config: Any) -> dict[str, Any]:
    inputs = plan_inputs(traced, batch)
    dense_feeds = onnx_feeds(dense_session, inputs)
    pruned_feeds = onnx_feeds(pruned_session, {**zero_residuals(pruned_session, batch), **inputs})
    return ratio({"dense": lambda: dense_session.run(None, dense_feeds),
                   "pruned": lambda: pruned_session.run(None, pruned_feeds)}, config)


def zero_residuals(session: Any, batch: int) -> dict[str, Any]:
    """Zeros for the ControlNet / T2I-Adapter inputs an exported model takes (a build with --controlnet or
    --adapter), shaped as the export recorded them at ``batch``: the call without a ControlNet, as a pipeline makes
    it."""
    import json

    import numpy as np

    from ldpruner.base.unet_inputs import FLAT_INPUTS
    from ldpruner.runtime.unet import EXPORT_METADATA_KEY

    raw = session.get_modelmeta().custom_metadata_map.get(EXPORT_METADATA_KEY)
    shapes = json.loads(raw).get("input_shapes", {}) if raw else {}
    return {name: np.zeros((batch, *shape[1:]), dtype=np.float32) for name, shape in shapes.items()
            if name not in FLAT_INPUTS}


def ratio(variants: Mapping[str, Any], config: Any) -> dict[str, Any]:
    """Dense and pruned interleaved, at least ``repeats`` rounds and more until the ratio is known to
    ``latency_precision`` (its 95 % interval recorded), as the build's latency check times them."""
    measured = measure_ratio(variants, "pruned", "dense", warmup=config.warmup, repeats=config.repeats,
                             precision=config.check.latency_precision)
    return {**measured.run.to_dict(ratio=("pruned", "dense")), "interval": [measured.low, measured.high],
            "converged": measured.converged, "precision": measured.precision}


def peak_memory(path: Path, session: Any, traced: Any, threads: int, config: Any) -> dict[str, Any]:
    if not config.memory:
        return {"available": False, "reason": "memory=False"}
    batch = max(config.batch_sizes)
    feeds = onnx_feeds(session, {**zero_residuals(session, batch), **plan_inputs(traced, batch)})
    return onnx_peak_memory(path, {n: (a.shape, a.dtype.name) for n, a in feeds.items()}, threads=threads)
