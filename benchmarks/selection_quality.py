"""Selection criteria at equal removed parameters: LD-Pruner vs magnitude, output MSE (LAPTOP-Diff), random and
BK-SDM's fixed removal, on one zoo model — quality before distillation (selection alone) and after the same
distillation, dense alongside, every model sampled on the same seeds (and prompts).

    python -m benchmarks.selection_quality --model mnist-t2i --budgets 0.1 0.2 0.3 0.4 0.5 --samples 200 \\
        --distill-steps 200 --out build/bench-selection

Every criterion's plan comes from ``baselines.plan_for`` (same candidates, same budget and joint-removal rule as
``ldpruner select``); random is reported as mean ± std over ``--random-seeds`` seeds. Distillation is
``ldpruner.api.distill`` with ``--distill-steps`` (data-free, teacher trajectories). FD on EfficientNet-Lite0
features (spoken-digit classifier features for audio): relative, not comparable to published FID.
Writes report.json, report.md and quality.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .baselines import CRITERIA, criterion_scores, plan_for


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ldpruner import api
    from ldpruner.runtime.graph_unet import GraphUNet

    from .zoo_fd import ZooFD, distill_options

    zoo = ZooFD(args.model, args.samples, args.sample_steps)
    graph = api.inspect(zoo.spec)
    scores = criterion_scores(zoo.spec, graph, args.criteria, ld_samples=args.ld_samples, ld_steps=args.ld_steps,
                              random_seeds=range(args.random_seeds))
    dense = zoo.quality(zoo.sample(None))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for budget in args.budgets:
            for key, s in scores.items():
                plan = plan_for(graph, s, budget=budget, criterion=key)
                pruned = api.prune(zoo.spec, plan)
                row = {"budget": budget, "criterion": key.split("/")[0], "key": key, "removed": plan.names,
                       "params_removed_fraction": plan.removed_params / plan.total_params,
                       "macs_removed_fraction": plan.removed_macs / plan.total_macs,
                       "before": zoo.quality(zoo.sample(GraphUNet.of(pruned))),
                       "after": None}
                seed = int(key.split("/")[1]) if "/" in key else 0
                if args.distill_steps and seed < args.distill_random_seeds:
                    result = api.distill(zoo.spec, pruned, out=Path(tmp) / f"{budget}-{key.replace('/', '-')}",
                                         steps=args.distill_steps, progress=False, overwrite=True,
                                         **distill_options(args.model))
                    student = result.student
                    row["after"] = zoo.quality(zoo.sample(GraphUNet.of(student)))
                rows.append(row)
                print(json.dumps({k: row[k] for k in ("budget", "key")} | {"fd_before": row["before"]["fd"],
                      "fd_after": row["after"] and row["after"]["fd"]}), file=sys.stderr)
    return {"model": zoo.spec, "samples": args.samples, "sample_steps": args.sample_steps, "features": zoo.features,
            "distill_steps": args.distill_steps,
            "ld_analysis": {"num_samples": args.ld_samples, "steps": args.ld_steps},
            "dense": dense, "rows": rows, "summary": summarise(rows, args.budgets)}


def summarise(rows: list[dict[str, Any]], budgets: list[float]) -> dict[str, Any]:
    """Per budget and criterion: FD before/after (mean, std, n over random seeds), and the best criterion."""
    out: dict[str, Any] = {}
    for budget in budgets:
        per: dict[str, Any] = {}
        for crit in dict.fromkeys(r["criterion"] for r in rows):
            mine = [r for r in rows if r["budget"] == budget and r["criterion"] == crit]
            entry = {"params_removed_fraction": float(np.mean([r["params_removed_fraction"] for r in mine]))}
            for stage in ("before", "after"):
                fds = [r[stage]["fd"] for r in mine if r[stage] is not None]
                entry[stage] = ({"fd": float(np.mean(fds)), "std": float(np.std(fds)), "n": len(fds)} if fds else None)
            per[crit] = entry
        best = {stage: min((c for c in per if per[c][stage]), key=lambda c: per[c][stage]["fd"], default=None)
                for stage in ("before", "after")}
        pareto = {stage: _pareto(per, stage) for stage in ("before", "after")}
        out[str(budget)] = {"criteria": per, "best": best, "pareto": pareto}
    return out


def _pareto(per: dict[str, Any], stage: str) -> list[str]:
    """Criteria no other criterion beats on both counts at this budget: lower (or equal) FD *and* more (or equal)
    parameters removed, one of them strictly. Operators are coarse in small UNets, so the same budget can end at
    quite different removed fractions; the lowest FD alone would favour whoever removed least."""
    have = {c: e for c, e in per.items() if e[stage] is not None}

    def beats(a: dict[str, Any], b: dict[str, Any]) -> bool:
        fa, fb = a[stage]["fd"], b[stage]["fd"]
        ra, rb = a["params_removed_fraction"], b["params_removed_fraction"]
        return fa <= fb and ra >= rb and (fa < fb or ra > rb)

    return [c for c, e in have.items() if not any(beats(o, e) for k, o in have.items() if k != c)]


def _fmt(e: dict[str, Any] | None) -> str:
    if e is None:
        return "—"
    return f"{e['fd']:.2f} ± {e['std']:.2f} (n={e['n']})" if e["n"] > 1 else f"{e['fd']:.2f}"


def _markdown(report: dict[str, Any]) -> str:
    d = report["dense"]
    lines = ["# Selection criteria at equal removed parameters", "", f"Command: `{report['command']}`", "",
             (f"{report['model']}: {report['samples']} samples per model ({report['sample_steps']} DDIM steps, same "
             f"seeds), FD on `{report['features']}` (lower is better; relative only). Dense FD {d['fd']:.2f}, "
             f"real vs real {d['fd_real_vs_real']:.2f}. Distillation: {report['distill_steps']} steps per model."), ""]
    for budget, s in report["summary"].items():
        lines += [f"## budget {budget} of UNet parameters", "",
                  "| criterion | params removed | FD before distillation | FD after distillation |",
                  "|---|---:|---:|---:|"]
        for c, e in s["criteria"].items():
            lines.append(f"| {c} | {e['params_removed_fraction']:.1%} | {_fmt(e['before'])} | {_fmt(e['after'])} |")
        lines += ["", f"Lowest FD before distillation: **{s['best']['before']}**; after: **{s['best']['after']}**. "
                      f"Not beaten on both FD and params removed: before {', '.join(s['pareto']['before'])}; after "
                      f"{', '.join(s['pareto']['after']) or '—'}.", ""]
    lines += ["![quality vs params removed](quality.png)", ""]
    return "\n".join(lines)


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    crits = list(dict.fromkeys(r["criterion"] for r in report["rows"]))
    markers = dict(zip(crits, "osD^vP*X"))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, stage in zip(axes, ("before", "after")):
        for c in crits:  # every plan at the fraction it really removed (random: one point per seed)
            pts = sorted((r["params_removed_fraction"], r[stage]["fd"]) for r in report["rows"]
                         if r["criterion"] == c and r[stage] is not None)
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker=markers[c], ls="-" if c != "random" else "",
                        label=c, alpha=0.8)
        ax.axhline(report["dense"]["fd"], color="k", ls="--", lw=1, label="dense")
        ax.set_title(f"{stage} distillation")
        ax.set_xlabel("fraction of UNet params removed (actual)")
    axes[0].set_ylabel(f"FD ({report['features']})")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mnist-t2i")
    p.add_argument("--criteria", nargs="+", default=list(CRITERIA), choices=CRITERIA)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5])
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--distill-steps", type=int, default=100, help="0 skips distillation")
    p.add_argument("--random-seeds", type=int, default=3)
    p.add_argument("--distill-random-seeds", type=int, default=3, help="how many random seeds are also distilled")
    p.add_argument("--ld-samples", type=int, default=20)
    p.add_argument("--ld-steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("build/bench-selection"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"command": "python -m benchmarks.selection_quality "
                         + " ".join(argv if argv is not None else sys.argv[1:])}
    report.update(run(args))
    (args.out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (args.out / "report.md").write_text(_markdown(report))
    _plot(report, args.out / "quality.png")
    print((args.out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
