"""What scoring every candidate costs: UNet calls and wall time of the LD-score analysis, one process vs two
(torchrun, gloo), on the same cores.

    python -m benchmarks.analysis_cost --models mnist-t2i crawl-tiles espeak-digits --num-samples 20 --steps 10 \\
        --out build/bench-analysis-cost

Per model, three runs of ``ldpruner analyze`` in fresh processes, one after the other:

- ``1 process × 1 thread``: the serial cost,
- ``1 process × 2 threads``: both cores through torch's intra-op threads,
- ``2 processes × 1 thread``: both cores through ldpruner's candidate sharding (``torchrun --nproc-per-node 2``).

Wall time is the analysis itself as ``scores.json`` records it (the slowest rank's, from the dense sampling to
the last candidate; process start-up and model loading are reported beside it as ``process_s``); UNet calls are
summed over ranks. The scores of every run are compared with the first (sharding must not change them). Speed-ups
are ratios measured in one run on one machine; absolute seconds depend on the machine and its load (recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ldpruner.base.io import write_json_atomic
from ldpruner.passes.scores import SCORES, ImportanceReport

RUNS = (("1 process × 1 thread", 1, 1), ("1 process × 2 threads", 1, 2), ("2 processes × 1 thread", 2, 1))


def _command(model: str, out: Path, processes: int, args: argparse.Namespace) -> list[str]:
    launcher = [sys.executable, "-m", "ldpruner"]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                    str(processes), "-m", "ldpruner"]
    return launcher + ["analyze", model, "--num-samples", str(args.num_samples), "--steps", str(args.steps),
                       "--out", str(out), "--overwrite"]


def measure(model: str, args: argparse.Namespace) -> dict[str, Any]:
    runs = []
    reference: dict[str, float] | None = None
    for label, processes, threads in RUNS:
        out = args.out / model.replace(":", "-") / f"p{processes}-t{threads}"
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        t0 = time.perf_counter()
        done = subprocess.run(_command(model, out, processes, args), env=env, capture_output=True, text=True)
        process_s = time.perf_counter() - t0
        if done.returncode != 0:
            raise SystemExit(f"{label} failed on {model}:\n{done.stderr[-3000:]}")
        scores = ImportanceReport.load(out / SCORES.name)
        values = scores.scores
        if reference is None:
            reference = values
        diff = max(abs(values[k] - reference[k]) / max(abs(reference[k]), 1e-12) for k in reference)
        runs.append({"label": label, "processes": processes, "threads_per_process": threads,
                     "world_size": scores.world_size, "unet_calls": scores.unet_calls,
                     "wall_time_s": scores.wall_time_s, "process_s": round(process_s, 2),
                     "candidates": len(values), "max_rel_score_diff_vs_first": diff,
                     "load_average_after": os.getloadavg()})
        print(json.dumps({"model": model, **{k: runs[-1][k] for k in ("label", "unet_calls", "wall_time_s")}}),
              file=sys.stderr)
    base = runs[0]["wall_time_s"]
    for r in runs:
        r["speedup_vs_serial"] = base / r["wall_time_s"]
    return {"model": model, "num_samples": args.num_samples, "steps": args.steps, "runs": runs}


def _markdown(report: dict[str, Any]) -> str:
    lines = ["# LD-score analysis cost: one process vs two", "", f"Command: `{report['command']}`", "",
             f"{report['cpu_count']} CPUs; load average at start {report['load_average_start']}. Wall time = the "
             "analysis as scores.json records it (slowest rank); process = the whole command incl. start-up and "
             "loading. Speed-up = serial wall time / this wall time, same machine, same run.", ""]
    for rec in report["models"]:
        lines += [f"## {rec['model']} ({rec['runs'][0]['candidates']} candidates, N = {rec['num_samples']}, "
                  f"{rec['steps']} steps)", "",
                  "| run | UNet calls | analysis wall s | speed-up | process s | max rel. score diff |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in rec["runs"]:
            lines.append(f"| {r['label']} | {r['unet_calls']:,} | {r['wall_time_s']:.1f} | "
                         f"{r['speedup_vs_serial']:.2f}× | {r['process_s']:.1f} | "
                         f"{r['max_rel_score_diff_vs_first']:.1e} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["mnist-t2i", "crawl-tiles", "espeak-digits"],
                   help="zoo names or any MODEL ldpruner accepts")
    p.add_argument("--num-samples", type=int, default=20)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", type=Path, default=Path("build/bench-analysis-cost"))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"command": "python -m benchmarks.analysis_cost " + " ".join(argv if argv is not None else sys.argv[1:]),
              "cpu_count": os.cpu_count(), "load_average_start": os.getloadavg(), "models": []}
    for name in args.models:
        model = name if ":" in name or os.sep in name else f"zoo:{name}"
        report["models"].append(measure(model, args))
        write_json_atomic(args.out / "report.json", report)
        (args.out / "report.md").write_text(_markdown(report))
    print((args.out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
