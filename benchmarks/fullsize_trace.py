"""Cost of tracing a full-size published UNet: build, trace and operator-graph time, operator counts, peak RSS.

    python benchmarks/fullsize_trace.py                      # SD 1.5 (860 M params), 16x16 latent, batch 1
    python benchmarks/fullsize_trace.py --latent 32 --output fullsize.json

Weights are seeded random (no hub access); cost does not depend on their values. The trace copies the model
(the product default), so peak memory includes two copies of the weights. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import sys
import time
from collections.abc import Sequence
from typing import Any


def _peak_rss_gib() -> float:
    # ru_maxrss is in KiB on Linux, bytes on macOS
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30


def measure(family: str, latent: int, batch: int, seq_len: int, granularities: Sequence[str],
            check_numerics: bool) -> dict[str, Any]:
    import torch

    from ldpruner.compiler.graph import build_operator_graph
    from ldpruner.compiler.tracer import call_diffusers_unet, trace_unet, unet_example_inputs
    from ldpruner.sources.families import build_unet, spatial_multiple

    report: dict[str, Any] = {
        "family": family,
        "latent": [latent, latent],
        "batch": batch,
        "seq_len": seq_len,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "rss_before_gib": round(_peak_rss_gib(), 3),
    }
    t = time.perf_counter()
    model = build_unet(family, seed=0)
    report["build_s"] = round(time.perf_counter() - t, 2)
    report["params"] = sum(p.numel() for p in model.parameters())
    report["spatial_multiple"] = spatial_multiple(model.config)
    report["peak_rss_after_build_gib"] = round(_peak_rss_gib(), 3)
    inputs = unet_example_inputs(model, batch=batch, height=latent, width=latent, seq_len=seq_len)

    eager = None
    if check_numerics:
        t = time.perf_counter()
        eager = call_diffusers_unet(model, inputs)
        report["eager_forward_s"] = round(time.perf_counter() - t, 2)

    for granularity in granularities:
        entry: dict[str, Any] = {}
        t = time.perf_counter()
        traced = trace_unet(model, inputs, granularity=granularity)
        entry["trace_s"] = round(time.perf_counter() - t, 2)
        entry["decisions"] = len(traced.decisions)
        entry["fx_nodes"] = len(traced.gm.graph.nodes)
        t = time.perf_counter()
        graph = build_operator_graph(traced)
        entry["operator_graph_s"] = round(time.perf_counter() - t, 2)
        entry["operators"] = len(graph.operators)
        entry["candidates"] = len(graph.candidates)
        entry["removable_params"] = sum(op.params for op in graph.candidates)
        entry["macs_per_sample"] = graph.total_macs
        if eager is not None:
            with torch.no_grad():
                out = traced.gm(*[inputs[n] for n in traced.input_names])
            entry["max_abs_diff_vs_diffusers"] = float((out - eager).abs().max())
        entry["peak_rss_gib"] = round(_peak_rss_gib(), 3)
        report[granularity] = entry
        del traced, graph
        gc.collect()

    report["peak_rss_gib"] = round(_peak_rss_gib(), 3)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="sd15", help="a name from ldpruner.sources.families.FAMILIES")
    parser.add_argument("--latent", type=int, default=16, help="latent height = width (a multiple of 8 for SD)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=77)
    parser.add_argument("--granularity", nargs="+", default=["block", "sublayer"], choices=["block", "sublayer"])
    parser.add_argument("--no-numerics", action="store_true", help="skip the traced-vs-diffusers comparison")
    parser.add_argument("--output", help="also write the JSON here")
    args = parser.parse_args(argv)

    report = measure(args.family, args.latent, args.batch, args.seq_len, args.granularity, not args.no_numerics)
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        from ldpruner.base.io import write_text_atomic

        write_text_atomic(args.output, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
