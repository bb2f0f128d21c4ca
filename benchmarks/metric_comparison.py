"""Quality at matched measured latency: bench runs of the same models under different budget metrics, side by side.

    ldpruner bench zoo:mnist-t2i zoo:crawl-tiles zoo:espeak-digits --out build/bench-METRIC --metric METRIC \\
        --budgets 0.3 0.5 --distill-steps 600 --samples 200 --sample-steps 25 --num-samples 20 --steps 10 \\
        --repeats 10 --threads 1            # for METRIC in latency params macs
    python -m benchmarks.metric_comparison build/bench-latency build/bench-params build/bench-macs \\
        --out build/metric-comparison

Per model, every plan of every run (a latency run with ``--order knapsack`` is one more curve) with its measured
onnxruntime latency ratio (at the batch the costs were measured at: 2 for a text-conditioned UNet, else 1) and its
FD ratio (pruned, distilled); then, for each latency-budget plan, the FD the parameter and MAC plans reach at the
same measured latency, interpolated linearly between their two nearest plans ("outside" when the latency lies
beyond them). Writes ``report.json`` and ``report.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ._publish import command, publish


def points(report: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """model → its plans: metric, budget, removed, measured latency ratio, FD ratios."""
    result: dict[str, list[dict[str, Any]]] = {}
    for rec in report["models"]:
        batch = "batch_2" if rec["class"] == "UNet2DConditionModel" else "batch_1"
        dense_fd = _fd(rec["quality"]["dense"]) if rec["quality"].get("available") else None
        for e in rec["budgets"]:
            q = e.get("quality", {})
            order = e.get("order", "score")
            result.setdefault(rec["model"], []).append({
                "metric": e["metric"] if order == "score" else f"{e['metric']} ({order})",
                "budget": e["budget"], "removed": len(e["removed"]),
                "params_ratio": e["params"]["ratio"], "macs_ratio": e["macs_per_sample"]["ratio"],
                "latency_ratio": e["latency"]["onnxruntime"][batch]["ratio"], "batch": batch,
                "fd_pruned": _fd(q["pruned"]) / dense_fd if "pruned" in q else None,
                "fd_distilled": _fd(q["distilled"]) / dense_fd if "distilled" in q else None,
                "prediction": e.get("latency_prediction"),
            })
    return result


def _fd(quality: dict[str, Any]) -> float:
    """The FD a variant is ranked by (EfficientNet-Lite0 for images, the spoken-digit features for audio)."""
    from ldpruner.bench.quality import primary

    return float(primary(quality)["fd"])


def interpolate(curve: list[dict[str, Any]], latency: float, key: str) -> float | None:
    """``key`` of ``curve`` (plans of one metric) at ``latency``, linear between the two plans around it."""
    pts = sorted((p["latency_ratio"], p[key]) for p in curve if p[key] is not None)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
        if x0 <= latency <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (latency - x0) / (x1 - x0)
    return None


def compare(runs: list[dict[str, Any]]) -> dict[str, Any]:
    models: dict[str, list[dict[str, Any]]] = {}
    for report in runs:
        for model, plans in points(report).items():
            models.setdefault(model, []).extend(plans)
    matched: dict[str, list[dict[str, Any]]] = {}
    for model, plans in models.items():
        for p in (p for p in plans if p["metric"].startswith("latency")):
            row = {"plan": p["metric"], "budget": p["budget"], "latency_ratio": p["latency_ratio"],
                   "fd_distilled": p["fd_distilled"], "fd_pruned": p["fd_pruned"]}
            for other in ("params", "macs"):
                curve = [q for q in plans if q["metric"] == other]
                row[other] = {key: interpolate(curve, p["latency_ratio"], key) for key in ("fd_pruned", "fd_distilled")}
            matched.setdefault(model, []).append(row)
    return {"models": models, "matched": matched}


def _fmt(value: float | None) -> str:
    return "outside" if value is None else f"{value:.3f}"


def markdown(result: dict[str, Any], command: str) -> str:
    lines = ["# Quality at matched measured latency", "", f"`{command}`", ""]
    for model, plans in result["models"].items():
        lines += [f"## {model}", "", "| metric | budget | removed ops | params | MACs | ORT latency (measured) | "
                  "latency cut predicted / measured | FD pruned | FD distilled |",
                  "|---|---:|---:|---:|---:|---:|---|---:|---:|"]
        for p in sorted(plans, key=lambda p: -p["latency_ratio"]):
            pred = p["prediction"]
            cut = f"{pred['predicted_cut']:.1%} / {pred['measured_cut']:.1%}" if pred else "—"
            lines.append(f"| {p['metric']} | {p['budget']:.0%} | {p['removed']} | {p['params_ratio']:.3f} | "
                         f"{p['macs_ratio']:.3f} | {p['latency_ratio']:.3f} ({p['batch'].replace('batch_', 'b')}) | "
                         f"{cut} | {_fmt(p['fd_pruned'])} | {_fmt(p['fd_distilled'])} |")
        lines += ["", "At the latency plans' measured latency, the FD ratio (distilled; pruned in brackets) the other "
                      "metrics' plans reach, interpolated:", "",
                  "| latency plan | measured latency | its FD | params plans | MACs plans |",
                  "|---|---:|---:|---:|---:|"]
        for row in result["matched"].get(model, []):
            lines.append(f"| {row['plan']} {row['budget']:.0%} | {row['latency_ratio']:.3f} | "
                         f"{_fmt(row['fd_distilled'])} "
                         f"({_fmt(row['fd_pruned'])}) | {_fmt(row['params']['fd_distilled'])} "
                         f"({_fmt(row['params']['fd_pruned'])}) | {_fmt(row['macs']['fd_distilled'])} "
                         f"({_fmt(row['macs']['fd_pruned'])}) |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.metric_comparison", description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="bench output folders (each holds report.json)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    runs = [json.loads((folder / "report.json").read_text()) for folder in args.runs]
    result = compare(runs)
    line = command("metric_comparison", argv)
    return publish(args.out, {"command": line, **result}, markdown(result, line))


if __name__ == "__main__":
    sys.exit(main())
