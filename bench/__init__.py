"""ldpruner.bench: the shipped bench stage (``ldpruner bench``): dense vs pruned side by side, measured in one run.

- ``stage``: :func:`run_bench` — per model and budget: params, MACs, torch and onnxruntime latency, ONNX peak
  memory, quality; writes ``report.json``, ``report.md``, plots and sample grids.
- ``latency``: interleaved timing of several variants (a plan beside the dense model, torch and onnxruntime),
  onnxruntime sessions for timing, peak memory of a process.
- ``show``: plots, sample grids, audio clips and ``report.md``.
- ``quality``: sampling a zoo model with a dense / pruned / distilled UNet on fixed seeds and scoring the samples
  against the held-out real data of :mod:`ldpruner.zoo.datasets`.
- ``metrics``: offline quality metrics (FD/KID on pretrained features, digit and spoken-digit classifiers).

Needs the ``[bench]`` extra for the metrics (``pip install 'ldpruner[bench]'``); nothing here downloads.
"""

from .show import markdown
from .stage import BENCH_FORMAT, BenchConfig, run_bench

__all__ = ["BENCH_FORMAT", "BenchConfig", "markdown", "run_bench"]
