"""Does distillation bring an LD-pruned zoo model back to the dense model's quality? Dense, pruned and
pruned+distilled measured in one run, on the same seeds (and prompts).

    python -m benchmarks.distill_quality --models mnist-t2i crawl-tiles --budget 0.3 --distill-steps 600 \\
        --out build/bench-distill

Per model: LD-score analysis (N=20, 10 DDIM steps) → plan at ``--budget`` of UNet parameters → prune → distil
data-free (teacher trajectories; ``ldpruner.api.distill`` with its defaults unless flags say otherwise). Quality:
FD and KID against held-out real data with the real-vs-real baseline at the same sample count — EfficientNet-Lite0
features for the image models (for mnist-t2i also prompt-digit accuracy and FD on the digit classifier's
features), the spoken-digit classifier's features and the share of recognised clips for espeak-digits. Writes
``report.json``, ``report.md`` and one sample grid per model and variant. All numbers are relative (dense vs
pruned on one machine); none is comparable to a published FID.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ldpruner.bench.quality import QualityMeter, primary, quality_table, zoo_sampler
from ldpruner.runtime.graph_unet import GraphUNet

from .zoo_fd import distill_options


def evaluate_model(name: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from ldpruner import api
    from ldpruner.bench import metrics

    spec = f"zoo:{name}"
    n = args.samples
    sample, digits = zoo_sampler(name, n, args.sample_steps)
    meter = QualityMeter(name, n)

    record: dict[str, Any] = {"model": spec, "samples": n, "sample_steps": args.sample_steps}
    t0 = time.perf_counter()
    scores = api.analyze(spec, num_samples=20, steps=10, progress=False)
    plan = api.select(scores, model=spec, budget=args.budget)
    pruned = api.prune(spec, plan)
    record["analysis_s"] = round(time.perf_counter() - t0, 1)
    totals = plan.to_dict()["totals"]
    record["plan"] = {"removed": [r.name for r in plan.removals],
                      "params_removed_fraction": totals["params_removed_fraction"],
                      "macs_removed_fraction": totals["macs_removed_fraction"],
                      "params_dense": totals["params_before"], "params_pruned": totals["params_after"]}

    variants: dict[str, torch.Tensor] = {}
    variants["dense"] = sample(None)
    variants["pruned"] = sample(GraphUNet.of(pruned))
    t0 = time.perf_counter()
    options = {"steps": args.distill_steps}
    if args.lr is not None:
        options["lr"] = args.lr
    if args.batch_size is not None:
        options["batch_size"] = args.batch_size
    options.update(distill_options(name))
    result = api.distill(spec, pruned, out=out / name / "distill", overwrite=True, progress=args.progress,
                         data=args.data, **options)
    record["distill"] = {"steps": args.distill_steps, "wall_s": round(time.perf_counter() - t0, 1),
                         "options": options, "data": str(args.data) if args.data else "teacher trajectories",
                         "loss_first_10pct": result.summary["loss_first_10pct"],
                         "loss_last_10pct": result.summary["loss_last_10pct"]}
    variants["distilled"] = sample(GraphUNet.of(result.student))

    record["quality"] = {}
    for key, images in variants.items():
        record["quality"][key] = meter(images, digits)
        metrics.save_image_grid(images[:64], out / name / f"{key}.png", 8, scale=2)
    dense_fd = primary(record["quality"]["dense"])["fd"]
    record["fd_ratio_to_dense"] = {k: primary(v)["fd"] / dense_fd for k, v in record["quality"].items()}
    return record


def _markdown(report: dict[str, Any]) -> str:
    lines = ["# Dense vs LD-pruned vs pruned + distilled zoo models", "",
             f"Command: `{report['command']}`", "", "Numbers are relative (EfficientNet-Lite0 features for "
             "images, the spoken-digit classifier's for audio; not published FID). Same seeds and prompts for every "
             "variant.", ""]
    for rec in report["models"]:
        p = rec["plan"]
        lines += [f"## {rec['model']}: {len(p['removed'])} operators removed, UNet params "
                  f"{p['params_dense']:,} → {p['params_pruned']:,} (−{p['params_removed_fraction']:.1%}), "
                  f"MACs −{p['macs_removed_fraction']:.1%}", "",
                  f"Distillation: {rec['distill']['steps']} steps, {rec['distill']['wall_s']:.0f} s on this machine "
                  f"(loss {rec['distill']['loss_first_10pct']['loss']:.4g} → "
                  f"{rec['distill']['loss_last_10pct']['loss']:.4g}).", ""]
        lines += quality_table(list(rec["quality"].items()))
        short = rec["model"].removeprefix("zoo:")
        grids = ", ".join(f"`{short}/{k}.png`" for k in rec["quality"])
        lines += ["", f"Grids: {grids}", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["mnist-t2i", "crawl-tiles"])
    p.add_argument("--budget", type=float, default=0.3)
    p.add_argument("--distill-steps", type=int, default=600)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--samples", type=int, default=400, help="generated images per variant (a multiple of 10)")
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", type=Path, help="distil on this dataset folder (images, captions for T2I) through the "
                   "model's VAE, adding the denoising loss, instead of data-free (one model per run)")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--out", type=Path, default=Path("build/bench-distill"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"command": "python -m benchmarks.distill_quality " + " ".join(argv if argv is not None else sys.argv[1:]),
              "torch_threads": args.threads, "models": []}
    for name in args.models:
        rec = evaluate_model(name, args, args.out)
        report["models"].append(rec)
        print(json.dumps({"model": name, "fd_ratio_to_dense": rec["fd_ratio_to_dense"]}), file=sys.stderr)
        (args.out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        (args.out / "report.md").write_text(_markdown(report))
    print((args.out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
