"""Does a latency budget deliver its latency? Plans under a latency budget against parameter and MAC budgets.

    python -m benchmarks.latency_budget --model random:sd15 --height 32 --width 32 --budget 0.35 \\
        --out build/latency-sd15

For one model at one latent size: the per-operator latency costs on the target runtime (``ldpruner.api.costs``,
onnxruntime's CPU provider by default, batch 2 for a text-conditioned UNet), a (cheap) LD analysis, then plans at
``--budget`` under each metric — latency in score order and by the exact knapsack, parameters, MACs — each pruned,
exported to ONNX and timed against the dense ONNX model in one interleaved run per plan (the dense session is
shared). Per plan: the predicted and the measured latency ratio, the shortfall of the measured cut against the
predicted one, the total LD score removed. With random weights the scores say nothing about quality: this checks the
cost model and the rewrite. Writes ``report.json`` and ``report.md``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ._publish import command, publish

PLANS = (("latency", "score"), ("latency", "knapsack"), ("params", "score"), ("macs", "score"))


def run(model: str, *, height: int, width: int, budget: float, out: Path, repeats: int, warmup: int,
        threads: int | None, runtime: str, num_samples: int, steps: int, analysis_dtype: str,
        progress: bool) -> dict[str, Any]:
    import torch

    from ldpruner import api
    from ldpruner.passes.config import ExportConfig
    from ldpruner.passes.costs import timing_inputs
    from ldpruner.passes.onnx.export import export_onnx
    from ldpruner.runtime.timing import measure_interleaved, onnx_feeds, ort_session

    if threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    loaded = api.load(model)
    costs = api.costs(loaded, out=out, overwrite=True, height=height, width=width, runtime=runtime,
                      latency_repeats=repeats, latency_warmup=warmup, threads=threads, device="cpu",
                      progress=progress)
    cost_s = time.perf_counter() - started
    scores = api.analyze(loaded, out=out, overwrite=True, height=height, width=width, num_samples=num_samples,
                         steps=steps, batch_size=2, dtype=analysis_dtype, device="cpu", progress=progress)
    graph = api.inspect(loaded, height=height, width=width)
    batch = int(costs.placement["batch"])
    report: dict[str, Any] = {
        "model": model, "latent": [height, width], "budget": budget, "runtime": runtime, "batch": batch,
        "threads": threads, "repeats": repeats,
        "costs": {"dense_ms": costs.dense_ms, "attributed_share": costs.attributed_ms / costs.dense_ms,
                  "profiled_ms": costs.profiled_ms, "seconds": round(cost_s, 1),
                  "top": [{"name": c.name, "saves_share": c.saves_ms / costs.dense_ms,
                           "params": graph[c.name].params, "macs": graph[c.name].macs}
                          for c in sorted(costs.operators.values(), key=lambda c: -c.saves_ms)[:12]]},
        "totals": {"params": graph.total_params, "macs_per_sample": graph.total_macs},
        "plans": [],
    }
    with tempfile.TemporaryDirectory(prefix="latency-budget-") as tmp:
        dense_path = Path(tmp) / "dense" / "unet.onnx"
        export_onnx(graph.traced, dense_path, config=ExportConfig(validate=False))
        dense_session = ort_session(dense_path, threads=threads)
        dense_feeds = onnx_feeds(dense_session, timing_inputs(graph.traced, batch))
        for metric, order in PLANS:
            if progress:
                print(f"[latency_budget] {metric} / {order}", file=sys.stderr, flush=True)
            plan = api.select(scores, model=loaded, costs=costs, budget=budget, metric=metric, order=order)
            pruned = api.prune(loaded, plan)
            path = Path(tmp) / f"{metric}-{order}" / "unet.onnx"
            export_onnx(pruned.traced, path, config=ExportConfig(validate=False))
            del pruned
            session = ort_session(path, threads=threads)
            feeds = onnx_feeds(session, timing_inputs(graph.traced, batch))
            timed = measure_interleaved({"dense": lambda: dense_session.run(None, dense_feeds),
                                         "pruned": lambda s=session, f=feeds: s.run(None, f)},
                                        warmup=warmup, repeats=repeats)
            del session
            totals = plan.to_dict()["totals"]
            predicted_cut = plan.latency["predicted_removed_fraction"]
            measured_cut = 1 - timed.ratio("pruned", "dense")
            report["plans"].append({
                "metric": metric, "order": order, "removed": plan.names,
                "score_removed": sum(r.score for r in plan.removals),
                "params_ratio": 1 - totals["params_removed_fraction"],
                "macs_ratio": 1 - totals["macs_removed_fraction"],
                "predicted_ratio": 1 - predicted_cut, "measured_ratio": 1 - measured_cut,
                "shortfall": (predicted_cut - measured_cut) / predicted_cut if predicted_cut > 0 else 0.0,
                "latency": timed.to_dict(ratio=("pruned", "dense")),
            })
    report["wall_time_s"] = round(time.perf_counter() - started, 1)
    return report


def markdown(report: dict[str, Any]) -> str:
    c = report["costs"]
    lines = [f"# Latency budget on {report['model']} (latent {report['latent'][0]}×{report['latent'][1]}, "
             f"{report['runtime']}, batch {report['batch']}, {report['threads'] or 'default'} threads)", "",
             f"`{report['command']}` ({report['wall_time_s']:.0f} s)", "",
             f"Dense {c['dense_ms']:.1f} ms; the candidates account for {c['attributed_share']:.0%} of it; costs "
             f"measured in {c['seconds']:.0f} s. Budget {report['budget']:.0%} of each metric; latency measured "
             f"pruned vs dense, median of {report['repeats']} interleaved runs.", "",
             "| plan | removed | params | MACs | LD score removed | latency predicted | latency measured | "
             "shortfall of the cut |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for p in report["plans"]:
        lines.append(f"| {p['metric']} / {p['order']} | {len(p['removed'])} | {p['params_ratio']:.3f} | "
                     f"{p['macs_ratio']:.3f} | {p['score_removed']:.4g} | {p['predicted_ratio']:.3f} | "
                     f"**{p['measured_ratio']:.3f}** | {p['shortfall']:+.1%} |")
    lines += ["", "Largest savings (share of the dense latency, with the operator's share of the removable params "
                  "and MACs):", "", "| operator | latency | params | MACs/sample |", "|---|---:|---:|---:|"]
    totals = report["totals"]
    for t in c["top"]:
        lines.append(f"| `{t['name']}` | {t['saves_share']:.1%} | {t['params'] / totals['params']:.1%} | "
                     f"{t['macs'] / totals['macs_per_sample']:.1%} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.latency_budget", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="random:sd15")
    p.add_argument("--height", type=int, default=32)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--budget", type=float, default=0.35)
    p.add_argument("--runtime", default="onnxruntime", choices=("onnxruntime", "torch"))
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--num-samples", type=int, default=2, help="analysis samples (random weights: any)")
    p.add_argument("--steps", type=int, default=1, help="analysis steps")
    p.add_argument("--analysis-dtype", default="bfloat16")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    report = run(args.model, height=args.height, width=args.width, budget=args.budget, out=args.out,
                 repeats=args.repeats, warmup=args.warmup, threads=args.threads, runtime=args.runtime,
                 num_samples=args.num_samples, steps=args.steps, analysis_dtype=args.analysis_dtype,
                 progress=not args.no_progress)
    report["command"] = command("latency_budget", argv)
    return publish(args.out, report, markdown(report))


if __name__ == "__main__":
    sys.exit(main())
