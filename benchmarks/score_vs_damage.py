"""Does a criterion's score predict the damage a removal does? For every single-operator removal of a zoo model:
the quality drop (FD increase over the dense model, same seeds and prompts) beside each criterion's score, and
Spearman's ρ between them per criterion.

    python -m benchmarks.score_vs_damage --model mnist-t2i --samples 100 --out build/bench-score-damage

Each candidate is applied in place with ``compiler.removal.swapped`` (what the rewrite computes) on one traced
graph and the model is sampled through it. FD is on EfficientNet-Lite0 features for images, on the spoken-digit
classifier's features for audio (``benchmarks/zoo_fd.py``): relative numbers, not comparable to published FID.
Writes report.json, report.md and scatter.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from .baselines import SCORED_CRITERIA, criterion_scores, spearman


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ldpruner import api
    from ldpruner.compiler.removal import swapped
    from ldpruner.runtime.graph_unet import GraphUNet

    from .zoo_fd import ZooFD

    zoo = ZooFD(args.model, args.samples, args.sample_steps)
    graph = api.inspect(zoo.spec)
    scores = criterion_scores(zoo.spec, graph, args.criteria, ld_samples=args.ld_samples, ld_steps=args.ld_steps,
                              random_seeds=[0])
    scores = {("random" if k == "random/0" else k): v for k, v in scores.items()}
    unet = GraphUNet.of(graph.traced)
    dense = zoo.quality(zoo.sample(unet))
    removals = []
    for op in graph.candidates:
        with swapped(graph.traced.gm, op):
            q = zoo.quality(zoo.sample(unet))
        removals.append({"name": op.name, "params": op.params, "quality": q, "fd_increase": q["fd"] - dense["fd"],
                         "scores": {c: s[op.name] for c, s in scores.items()}})
        print(json.dumps({"op": op.name, "fd_increase": removals[-1]["fd_increase"]}), file=sys.stderr)
    damage = [r["fd_increase"] for r in removals]
    correlation = {c: spearman([r["scores"][c] for r in removals], damage) for c in scores}
    return {"model": zoo.spec, "samples": args.samples, "sample_steps": args.sample_steps, "features": zoo.features,
            "ld_analysis": {"num_samples": args.ld_samples, "steps": args.ld_steps}, "dense": dense,
            "removals": removals, "spearman": correlation}


def _markdown(report: dict[str, Any]) -> str:
    d = report["dense"]
    lines = ["# Does the score predict damage?", "", f"Command: `{report['command']}`", "",
             (f"{report['model']}: {len(report['removals'])} single-operator removals, "
             f"{report['samples']} samples each "
             f"({report['sample_steps']} DDIM steps, same seeds), FD on `{report['features']}` (relative only). "
             f"Dense FD {d['fd']:.2f} (real vs real {d['fd_real_vs_real']:.2f})."), "",
             "| criterion | Spearman ρ (score vs FD increase) | p | n |", "|---|---:|---:|---:|"]
    for c, r in report["spearman"].items():
        rho = "undefined" if r["rho"] is None else f"{r['rho']:.3f}"
        p = "" if r["p"] is None else f"{r['p']:.3g}"
        lines.append(f"| {c} | {rho} | {p} | {r['n']} |")
    crit = list(report["spearman"])
    lines += ["", "| operator | params | FD increase | " + " | ".join(crit) + " |",
              "|---|---:|---:|" + "---:|" * len(crit)]
    for r in sorted(report["removals"], key=lambda r: r["fd_increase"]):
        lines.append(f"| `{r['name']}` | {r['params']:,} | {r['fd_increase']:.2f} | "
                     + " | ".join(f"{r['scores'][c]:.4g}" for c in crit) + " |")
    lines += ["", "![scatter](scatter.png)", ""]
    return "\n".join(lines)


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    crit = list(report["spearman"])
    fig, axes = plt.subplots(1, len(crit), figsize=(3.2 * len(crit), 3.2), squeeze=False)
    damage = [r["fd_increase"] for r in report["removals"]]
    for ax, c in zip(axes[0], crit):
        ax.scatter([r["scores"][c] for r in report["removals"]], damage, s=12)
        rho = report["spearman"][c]["rho"]
        ax.set_title(f"{c} (ρ={'n/a' if rho is None else f'{rho:.2f}'})", fontsize=9)
        ax.set_xlabel("score")
        if c in ("ld", "output_mse"):
            ax.set_xscale("log")
    axes[0][0].set_ylabel("FD increase over dense")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mnist-t2i")
    p.add_argument("--criteria", nargs="+", default=list(SCORED_CRITERIA), choices=SCORED_CRITERIA)
    p.add_argument("--samples", type=int, default=100)
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--ld-samples", type=int, default=20)
    p.add_argument("--ld-steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("build/bench-score-damage"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"command": "python -m benchmarks.score_vs_damage " + " ".join(argv if argv is not None else sys.argv[1:])}
    report.update(run(args))
    (args.out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (args.out / "report.md").write_text(_markdown(report))
    _plot(report, args.out / "scatter.png")
    print((args.out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
