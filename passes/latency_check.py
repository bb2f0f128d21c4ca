"""Predicted vs measured latency: time a pruned model beside its dense one on the runtime, batch and threads its
costs were measured at, and set the measured latency cut against the cut the costs predicted
(:meth:`~ldpruner.passes.cost_report.CostReport.predicted_ms`); flag one that falls short.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ldpruner.base import devices
from ldpruner.runtime.timing import measure_ratio, onnx_feeds, ort_session

from .config import CheckConfig
from .cost_report import CostReport
from .costs import _synchronizer, timing_inputs

__all__ = ["check_latency"]


def check_latency(dense: Any, pruned: Any, costs: CostReport, names: Any, *, repeats: int | None = None,
                  warmup: int | None = None, tolerance: float | None = None, precision: float | None = None,
                  device: Any = None) -> dict[str, Any]:
    """Time the pruned model (a traced graph) beside the dense one on the costs' runtime, batch and threads,
    interleaved, until the 95 % interval of their latency ratio lies within ± ``precision`` of it (at least
    ``repeats`` rounds; :func:`ldpruner.runtime.timing.measure_ratio`), and set the measured cut against the cut
    ``costs`` predict for removing ``names``. ``flagged`` when the measured cut falls short of the predicted one by
    more than ``tolerance`` of it."""
    config = costs.config
    repeats = repeats if repeats is not None else config.latency_repeats
    warmup = warmup if warmup is not None else config.latency_warmup
    tolerance = tolerance if tolerance is not None else CheckConfig.default("latency_tolerance")
    precision = precision if precision is not None else CheckConfig.default("latency_precision")
    batch = int(costs.placement["batch"])
    predicted_cut = 1 - costs.predicted_ms(names) / costs.dense_ms
    with devices.intra_op_threads(costs.placement.get("threads")) as threads:  # the threads the costs were timed at
        if config.runtime == "torch":
            ratio = _torch_pair(dense, pruned, batch, repeats, warmup, precision)
        else:
            ratio = _onnxruntime_pair(dense, pruned, batch, repeats, warmup, threads, device, precision)
    run = ratio.run
    measured_cut = 1 - ratio.ratio
    shortfall = (predicted_cut - measured_cut) / predicted_cut if predicted_cut > 0 else 0.0
    result = {"runtime": config.runtime, "batch": batch, "repeats": run.repeats, "threads": threads,
              "dense_ms": run.stats["dense"].median_s * 1e3, "pruned_ms": run.stats["pruned"].median_s * 1e3,
              "measured_ratio": ratio.ratio, "measured_cut": measured_cut,
              # the 95 % interval of the measured cut, and whether it is as narrow as asked
              "measured_cut_interval": [1 - ratio.high, 1 - ratio.low], "precision": precision,
              "converged": ratio.converged, "measured": ratio.describe(),
              "predicted_ratio": 1 - predicted_cut, "predicted_cut": predicted_cut, "shortfall": shortfall,
              "tolerance": tolerance, "flagged": shortfall > tolerance, "message": None}
    if result["flagged"]:
        result["message"] = (f"the measured latency cut {measured_cut:.1%} falls short of the predicted "
                             f"{predicted_cut:.1%} by {shortfall:.0%} of it (tolerance {tolerance:.0%}): the "
                             f"per-operator costs ({config.runtime}) overstate what these removals save")
    return result


def _torch_pair(dense: Any, pruned: Any, batch: int, repeats: int, warmup: int, precision: float) -> Any:
    device = next(pruned.gm.parameters()).device
    sync = _synchronizer(device)
    dense_args = [timing_inputs(dense, batch)[n] for n in dense.input_names]
    pruned_args = [timing_inputs(pruned, batch)[n] for n in pruned.input_names]

    def timed(gm: Any, args: list[Any]) -> Callable[[], None]:
        return lambda: (gm(*args), sync())

    with torch.inference_mode():
        return measure_ratio({"dense": timed(dense.gm.eval(), dense_args), "pruned": timed(pruned.gm.eval(),
                                                                                         pruned_args)},
                             "pruned", "dense", warmup=warmup, repeats=repeats, precision=precision)


def _onnxruntime_pair(dense: Any, pruned: Any, batch: int, repeats: int, warmup: int, threads: int | None,
                      device: Any, precision: float) -> Any:
    from ldpruner.passes.config import ExportConfig
    from ldpruner.passes.onnx.export import export_onnx

    with tempfile.TemporaryDirectory(prefix="ldpruner-latency-") as tmp:
        sessions, feeds = {}, {}
        for name, traced in (("dense", dense), ("pruned", pruned)):
            path = Path(tmp) / f"{name}.onnx"
            export_onnx(traced, path, config=ExportConfig(validate=False))
            sessions[name] = ort_session(path, threads=threads, device=device)
            feeds[name] = onnx_feeds(sessions[name], timing_inputs(traced, batch))
        return measure_ratio({n: (lambda n=n: sessions[n].run(None, feeds[n])) for n in sessions}, "pruned", "dense",
                             warmup=warmup, repeats=repeats, precision=precision)
