"""Does distillation bring an LD-pruned zoo model back to the dense model's quality? Dense, pruned and
pruned+distilled measured in one run, on the same seeds (and prompts).

    python -m benchmarks.distill_quality --models mnist-t2i crawl-tiles --budget 0.3 --distill-steps 600 \\
        --out build/bench-distill

Per model: LD-score analysis (N=20, 10 DDIM steps) → plan at ``--budget`` of UNet parameters → prune → distil
data-free (teacher trajectories; ``ldpruner.api.distill`` with its defaults unless flags say otherwise). Quality:
FD and KID on EfficientNet-Lite0 features against the held-out real images, with the real-vs-real baseline at the
same sample count; for mnist-t2i also prompt-digit accuracy and FD on the digit classifier's features. Writes
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

import numpy as np
import torch

WORDS = "zero one two three four five six seven eight nine".split()


class _GraphUNet:
    """A traced (pruned) fx graph behind the diffusers call signature the zoo samplers use."""

    def __init__(self, gm: torch.fx.GraphModule, input_names: tuple[str, ...]):
        self.gm, self.names = gm, input_names

    def __call__(self, sample, t, encoder_hidden_states=None):
        from diffusers.utils import BaseOutput

        t = torch.as_tensor(t).reshape(-1).expand(sample.shape[0])
        inputs = {"sample": sample, "timestep": t, "encoder_hidden_states": encoder_hidden_states}
        with torch.no_grad():
            out = self.gm(*[inputs[n] for n in self.names])
        return _Output(sample=out)


class _Output(dict):
    def __init__(self, sample):
        super().__init__(sample=sample)
        self.sample = sample


def _real_sets(name: str, n: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(held-out reference, real-vs-real baseline of n training images, extra) in [0, 1]."""
    if name == "mnist-t2i":
        from benchmarks.metrics import load_mnist_5k, mnist_to_model_range, split_mnist_rows

        images, labels = load_mnist_5k()
        train, held = split_mnist_rows(labels)
        per_digit = n // 10
        rng = np.random.default_rng(0)
        base = np.concatenate([rng.permutation(train[labels[train] == d])[:per_digit] for d in range(10)])
        return ((mnist_to_model_range(images[held]) + 1) / 2, (mnist_to_model_range(images[base]) + 1) / 2,
                {"held_labels": labels[held]})
    if name == "crawl-tiles":
        from ldpruner.zoo.recipes.crawl_tiles import load_tiles, split_tiles, to_model_range

        tiles, _ = load_tiles()
        train, held = split_tiles(tiles)
        base = np.random.default_rng(0).permutation(train)[:n]
        return (to_model_range(tiles[held]) + 1) / 2, (to_model_range(tiles[base]) + 1) / 2, {}
    raise SystemExit(f"no real reference set for {name!r}; supported: mnist-t2i, crawl-tiles")


def _sampler(name: str, n: int, steps: int):
    """sample(unet or None) -> (n, C, H, W) in [0, 1], same seeds every call; plus the digits for T2I."""
    seeds = [20_000 + i for i in range(n)]
    if name == "mnist-t2i":
        from ldpruner.zoo import load_text_to_image

        model = load_text_to_image(name)
        digits = [d for d in range(10) for _ in range(n // 10)]
        prompts = [f"a handwritten {WORDS[d]}" for d in digits]
        return (lambda unet: model.sample(prompts, steps=steps, guidance_scale=5.0, seed=seeds, unet=unet)), digits
    from ldpruner.zoo.unconditional import load_unconditional

    model = load_unconditional(name, task="unconditional-image")
    return (lambda unet: model.sample(n, steps=steps, seed=seeds, unet=unet)), None


def evaluate_model(name: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    from benchmarks import metrics
    from ldpruner import api

    spec = f"zoo:{name}"
    n = args.samples
    real_held, real_base, _ = _real_sets(name, n)
    sample, digits = _sampler(name, n, args.sample_steps)
    extractors = {"efficientnet": metrics.ImageFeatureExtractor()}
    if name == "mnist-t2i":
        extractors["digit_features"] = metrics.DigitFeatureExtractor(classifier=metrics.load_digit_classifier())
    held = {k: metrics.compute_features(e, real_held) for k, e in extractors.items()}

    def quality(images: torch.Tensor) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, extractor in extractors.items():
            q = metrics.image_quality(images, held[key], real_base, extractor=extractor)
            result[key] = {k: q[k] for k in ("fd", "fd_real_vs_real", "kid", "kid_real_vs_real")}
        if digits is not None:
            result["prompt_digit_accuracy"] = metrics.prompt_digit_accuracy(images, digits)
        return result

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
    variants["pruned"] = sample(_GraphUNet(pruned.gm, pruned.traced.input_names))
    t0 = time.perf_counter()
    options = {"steps": args.distill_steps}
    if args.lr is not None:
        options["lr"] = args.lr
    if args.batch_size is not None:
        options["batch_size"] = args.batch_size
    if name == "mnist-t2i":
        options["guidance_scale"] = 5.0
    result = api.distill(spec, pruned, out=out / name / "distill", overwrite=True, progress=args.progress,
                         **options)
    record["distill"] = {"steps": args.distill_steps, "wall_s": round(time.perf_counter() - t0, 1),
                         "options": options, "loss_first_10pct": result.summary["loss_first_10pct"],
                         "loss_last_10pct": result.summary["loss_last_10pct"]}
    variants["distilled"] = sample(_GraphUNet(result.student.gm, result.student.traced.input_names))

    record["quality"] = {}
    for key, images in variants.items():
        record["quality"][key] = quality(images)
        metrics.save_image_grid(images[:64], out / name / f"{key}.png", 8, scale=2)
    dense_fd = record["quality"]["dense"]["efficientnet"]["fd"]
    record["fd_ratio_to_dense"] = {k: v["efficientnet"]["fd"] / dense_fd for k, v in record["quality"].items()}
    return record


def _markdown(report: dict[str, Any]) -> str:
    lines = ["# Dense vs LD-pruned vs pruned + distilled zoo models", "",
             f"Command: `{report['command']}`", "", "Numbers are relative (EfficientNet-Lite0 features, "
             "not published FID). Same seeds and prompts for every variant.", ""]
    for rec in report["models"]:
        p = rec["plan"]
        lines += [f"## {rec['model']}: {len(p['removed'])} operators removed, UNet params "
                  f"{p['params_dense']:,} → {p['params_pruned']:,} (−{p['params_removed_fraction']:.1%}), "
                  f"MACs −{p['macs_removed_fraction']:.1%}", "",
                  f"Distillation: {rec['distill']['steps']} steps, {rec['distill']['wall_s']:.0f} s on this machine "
                  f"(loss {rec['distill']['loss_first_10pct']['loss']:.4g} → "
                  f"{rec['distill']['loss_last_10pct']['loss']:.4g}).", ""]
        digit = "prompt_digit_accuracy" in rec["quality"]["dense"]
        header = "| variant | FD (EffNet) | FD / dense FD | KID | real-vs-real FD |"
        header += " digit-feature FD | prompt-digit accuracy |" if digit else ""
        lines += [header, "|---" * (header.count("|") - 1) + "|"]
        for key, q in rec["quality"].items():
            e = q["efficientnet"]
            row = (f"| {key} | {e['fd']:.2f} | {rec['fd_ratio_to_dense'][key]:.3f} | {e['kid']['mean']:.4f} ± {e['kid']['std']:.4f} | "
                   f"{e['fd_real_vs_real']:.2f} |")
            if digit:
                row += f" {q['digit_features']['fd']:.2f} | {q['prompt_digit_accuracy']:.1%} |"
            lines.append(row)
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
