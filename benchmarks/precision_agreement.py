"""Does the analysis dtype change the answer? LD scores of the zoo models in bfloat16 and float16 against float32.

    python -m benchmarks.precision_agreement --models mnist-t2i crawl-tiles espeak-digits --num-samples 20 \\
        --steps 10 --out build/bench-precision

Per model: the analysis (``ldpruner.api.analyze``, same seeds, prompts and scheduler) once per dtype on the same
device; Spearman's ρ of every dtype's scores against float32's, the largest relative score difference, whether
the ranking's lowest third is the same set, and whether the plan at a 30 % parameter budget removes the same
operators (and picks them in the same order). A dtype the device cannot run is reported with the error.
Writes ``report.json`` and ``report.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from ._publish import command, publish
from .baselines import spearman

DTYPES = ("float32", "bfloat16", "float16")


def agreement(model: str, *, num_samples: int, steps: int, device: str, budget: float,
              dtypes: tuple[str, ...] = DTYPES) -> dict[str, Any]:
    """Scores and plans of ``model`` per dtype, compared with the first dtype's (float32)."""
    from ldpruner import api

    loaded = api.load(f"zoo:{model}")
    runs: dict[str, Any] = {}
    for dtype in dtypes:
        start = time.perf_counter()
        try:
            report = api.analyze(loaded, num_samples=num_samples, steps=steps, dtype=dtype, device=device,
                                 progress=False)
        except Exception as exc:  # a dtype the device has no kernels for: say so and go on
            runs[dtype] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        plan = api.select(report, model=loaded, budget=budget)
        runs[dtype] = {"scores": report.scores, "plan": plan.names, "seconds": round(time.perf_counter() - start, 1),
                       "placement": report.placement}
    reference = runs[dtypes[0]]
    names = list(reference["scores"])
    third = max(1, len(names) // 3)
    lowest = set(sorted(names, key=reference["scores"].__getitem__)[:third])
    for dtype, run in runs.items():
        if "error" in run or dtype == dtypes[0]:
            continue
        a = [reference["scores"][n] for n in names]
        b = [run["scores"][n] for n in names]
        run["spearman_vs_float32"] = spearman(a, b)
        run["max_relative_difference"] = max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b, strict=True))
        run["same_lowest_third"] = set(sorted(names, key=run["scores"].__getitem__)[:third]) == lowest
        run["same_plan"] = set(run["plan"]) == set(reference["plan"])  # the operators removed
        run["same_plan_order"] = run["plan"] == reference["plan"]  # and the rank order they were picked in
    return {"model": model, "candidates": len(names), "budget": budget, "runs": runs}


def markdown(report: dict[str, Any]) -> str:
    lines = ["# Analysis dtype vs float32", "", f"`{report['command']}`", "",
             "| model | dtype | Spearman ρ vs float32 | max rel. score diff | same lowest third | 30 % plan: same "
             "removals (same order) | analysis s |", "|---|---|---:|---:|---|---|---:|"]
    for rec in report["models"]:
        for dtype, run in rec["runs"].items():
            if "error" in run:
                lines.append(f"| {rec['model']} | {dtype} | — | — | — | — | {run['error'][:80]} |")
            elif dtype == "float32":
                lines.append(f"| {rec['model']} | float32 | (reference) | | | | {run['seconds']} |")
            else:
                rho = run["spearman_vs_float32"]["rho"]
                lines.append(f"| {rec['model']} | {dtype} | {rho:.4f} | {run['max_relative_difference']:.3g} | "
                             f"{'yes' if run['same_lowest_third'] else 'NO'} | {'yes' if run['same_plan'] else 'NO'} "
                             f"({'yes' if run['same_plan_order'] else 'no'}) | "
                             f"{run['seconds']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.precision_agreement", description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["mnist-t2i", "crawl-tiles", "espeak-digits"])
    p.add_argument("--num-samples", type=int, default=20)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--budget", type=float, default=0.3)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's setting)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    report = {"command": command("precision_agreement", argv),
              "models": [agreement(m, num_samples=args.num_samples, steps=args.steps, device=args.device,
                                   budget=args.budget) for m in args.models]}
    return publish(args.out, report, markdown(report))


if __name__ == "__main__":
    sys.exit(main())
