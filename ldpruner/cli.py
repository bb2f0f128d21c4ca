"""``ldpruner``: a thin shell over :mod:`ldpruner.api`. One subcommand per stage; every flag is an API keyword.

Errors print one line (``error: <Type>: <message>``) and exit 1; ``--debug`` shows the traceback instead.
Heavy imports (torch, diffusers, onnx) happen inside the commands, so ``ldpruner --help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main", "build_parser"]


def _add_trace_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--granularity", choices=["block", "sublayer"], help="operator granularity (default: block)")
    p.add_argument("--height", type=int, help="latent height to trace and sample at (default: the UNet's sample_size)")
    p.add_argument("--width", type=int, help="latent width (default: the UNet's sample_size)")


def _add_analysis_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-samples", type=int, help="N samples per model for mu/sigma (default: 8)")
    p.add_argument("--steps", type=int, help="scheduler steps per sample (default: 10)")
    p.add_argument("--seed", type=int, help="seed of the initial noise (default: 0)")
    p.add_argument("--guidance-scale", type=float, help="classifier-free guidance for text-to-image (default: 7.5)")
    p.add_argument("--prompts", help="text file with one prompt per line (default: the built-in prompt set)")


def _add_selection_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--budget", type=float, help="fraction of the metric to remove, in (0, 1) (default: 0.3)")
    p.add_argument("--metric", choices=["params", "macs"], help="what the budget counts (default: params)")
    p.add_argument("--order", choices=["score", "score-per-cost"], help="ranking rule (default: score)")


def _add_distill_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, help="distillation steps (default: 200)")


def _add_build_distill_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--distill-steps", type=int,
                   help="distillation steps after pruning, data-free on the teacher's trajectories (default: 200; "
                        "0 exports the pruned student undistilled)")


def _add_export_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--exporter", choices=["legacy", "dynamo"], help="torch ONNX exporter (default: legacy)")
    p.add_argument("--opset", type=int, help="ONNX opset (default: 17)")
    p.add_argument("--optimize", action="store_true", default=None, help="also write onnxruntime-optimized variants")
    p.add_argument("--fp16", action="store_true", default=None, help="also write an fp16 variant (with --optimize)")


def _add_out(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--out", required=required, help="output folder")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace existing outputs")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="ldpruner",
        description="Prune latent diffusion UNets by latent-deviation importance (LD-Pruner) and export them to ONNX.",
    )
    parser.add_argument("--version", action="version", version=f"ldpruner {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    model_help = "local diffusers pipeline folder, UNet folder, zoo:<name> (see `ldpruner zoo list`) or random:<family>"

    p = sub.add_parser("inspect", help="print the operator table")
    p.add_argument("model", help=model_help)
    _add_trace_flags(p)
    p.add_argument("--json", dest="json_path", help="also write the operator graph as JSON to this file")

    p = sub.add_parser("analyze", help="score every removable operator (writes scores.json)")
    p.add_argument("model", help=model_help)
    _add_trace_flags(p)
    _add_analysis_flags(p)
    _add_out(p)

    p = sub.add_parser("select", help="choose removals under a budget (writes plan.json)")
    p.add_argument("scores", help="scores.json from `ldpruner analyze`")
    p.add_argument("--model", help="the analysed model: lets selection skip removals that would jointly remove "
                                    "shared modules (else prune refuses such a plan)")
    _add_selection_flags(p)
    _add_out(p)

    p = sub.add_parser("prune", help="apply a plan (writes student/)")
    p.add_argument("model", help=model_help)
    p.add_argument("--plan", required=True, help="plan.json from `ldpruner select`")
    p.add_argument("--height", type=int, help="latent height to trace at (default: the UNet's sample_size)")
    p.add_argument("--width", type=int, help="latent width to trace at")
    _add_out(p)

    p = sub.add_parser("distill", help="fine-tune a pruned student against the dense model (writes student/, "
                                       "checkpoints/, loss log)")
    p.add_argument("model", help="the dense model the student was pruned from: " + model_help)
    p.add_argument("student", help="student/ folder from `ldpruner prune`")
    _add_distill_flags(p)
    p.add_argument("--batch-size", type=int, help="global batch, split over processes (default: 16)")
    p.add_argument("--lr", type=float, help="peak AdamW learning rate (default: 5e-4)")
    p.add_argument("--lr-schedule", choices=["cosine", "linear", "constant"], help="decay after warm-up (default: cosine)")
    p.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default: 20)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay (default: 0)")
    p.add_argument("--grad-clip", type=float, help="clip the gradient norm to this (default: 1.0)")
    p.add_argument("--w-task", type=float, help="weight of the denoising loss (default: 1 with --data, else 0)")
    p.add_argument("--w-out", type=float, help="weight of the output distillation loss (default: 1)")
    p.add_argument("--w-feat", type=float, help="weight of the feature distillation loss (default: 1)")
    p.add_argument("--feature-loss", choices=["normalized", "mse"], help="per-block feature loss (default: normalized)")
    p.add_argument("--ema-decay", type=float, help="keep an EMA of the weights with this decay (default: off)")
    p.add_argument("--precision", choices=["fp32", "bf16"], help="training precision (default: fp32)")
    p.add_argument("--checkpoint-every", type=int, help="write a checkpoint every K steps (default: 50)")
    p.add_argument("--trajectories", type=int, help="data-free: teacher sampling trajectories (default: 32)")
    p.add_argument("--trajectory-steps", type=int, help="data-free: scheduler steps per trajectory (default: 25)")
    p.add_argument("--seed", type=int, help="seed of trajectories and batches (default: 0)")
    p.add_argument("--guidance-scale", type=float, help="guidance of the teacher's trajectories (default: 7.5)")
    p.add_argument("--prompts", help="data-free: prompt file for the teacher's trajectories (default: the model's)")
    p.add_argument("--data", help="folder of images (+ captions) to distill on, encoded by the model's VAE")
    p.add_argument("--resume", action="store_true", default=None, help="continue from the newest checkpoint in --out")
    _add_out(p)

    p = sub.add_parser("export", help="export a pruned student to ONNX and validate it (writes onnx/)")
    p.add_argument("student", help="student/ folder from `ldpruner prune`")
    _add_export_flags(p)
    _add_out(p)

    p = sub.add_parser("bench", help="dense vs pruned side by side: params, MACs, torch/ORT latency, memory, quality "
                                     "(writes report.json, report.md, plots, sample grids)")
    p.add_argument("models", nargs="+", help=model_help + " (several: one section each)")
    p.add_argument("--budgets", type=float, nargs="+", help="fractions to remove (default: 0.1 0.2 0.3 0.4 0.5)")
    p.add_argument("--metric", choices=["params", "macs"], help="what the budgets count (default: params)")
    p.add_argument("--distill-steps", type=int, help="also distil each pruned model this many steps (default: 0)")
    p.add_argument("--distill-data", help="distil on this dataset folder (images; captions for T2I) through the "
                                          "model's VAE instead of data-free (one model per run)")
    p.add_argument("--repeats", type=int, help="timed calls per variant (default: 10)")
    p.add_argument("--warmup", type=int, help="untimed calls per variant first (default: 3)")
    p.add_argument("--batch-sizes", type=int, nargs="+", help="latency batch sizes (default: 1 2; 2 = guidance)")
    p.add_argument("--quality", action=argparse.BooleanOptionalAction, default=None,
                   help="sample and score on the same seeds (zoo models with held-out real data: mnist-t2i, "
                        "crawl-tiles, espeak-digits; default: on)")
    p.add_argument("--samples", type=int, help="samples per variant for quality (default: 100)")
    p.add_argument("--sample-steps", type=int, help="scheduler steps per sample for quality (default: 25)")
    p.add_argument("--num-samples", type=int, help="analysis: N samples for the LD score (default: 8)")
    p.add_argument("--steps", type=int, help="analysis: scheduler steps (default: 10)")
    p.add_argument("--threads", type=int, help="torch and onnxruntime threads (default: torch's current setting)")
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                   help="measure ONNX peak memory in a fresh process per model (default: on)")
    _add_out(p)

    p = sub.add_parser("zoo", help="the embedded models (use them as MODEL: zoo:<name>)")
    p.add_argument("zoo_command", choices=["list"], help="list: name, task, status and description of each model")

    p = sub.add_parser("build", help="run every stage into --out, reusing unchanged artifacts")
    p.add_argument("model", nargs="?", help=model_help + " (default: zoo:mnist-t2i, the embedded text-to-image model)")
    p.add_argument("--config", help="TOML file with build options (flags override it)")
    _add_trace_flags(p)
    _add_analysis_flags(p)
    _add_selection_flags(p)
    _add_build_distill_flags(p)
    _add_export_flags(p)
    _add_out(p, required=False)
    return parser


def _options(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The flags the user actually gave (None means: use the API default)."""
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


_TRACE = ("granularity", "height", "width")
_ANALYSIS = ("num_samples", "steps", "seed", "guidance_scale", "prompts")
_SELECTION = ("budget", "metric", "order")
_EXPORT = ("exporter", "opset", "optimize", "fp16")
_DISTILL = ("steps", "batch_size", "lr", "lr_schedule", "warmup_steps", "weight_decay", "grad_clip", "w_task", "w_out",
            "w_feat", "feature_loss", "ema_decay", "precision", "checkpoint_every", "trajectories", "trajectory_steps",
            "seed", "guidance_scale")


def _run(args: argparse.Namespace) -> int:
    from . import api

    if args.command == "inspect":
        graph = api.inspect(args.model, **_options(args, *_TRACE))
        print(graph.table())
        if args.json_path:
            from ldpruner.io import write_text_atomic
            from pathlib import Path

            write_text_atomic(Path(args.json_path), graph.to_json() + "\n")
        return 0
    if args.command == "analyze":
        report = api.analyze(args.model, out=args.out, **_options(args, *_TRACE, *_ANALYSIS, "overwrite"))
        for e in report.ranked():
            print(f"{e.score:12.6f}  {e.action:9s}  {e.name}")
        print(f"wrote {args.out}/scores.json ({len(report)} candidates, {report.unet_calls} UNet calls, "
              f"{report.wall_time_s:.1f} s)")
        return 0
    if args.command == "select":
        plan = api.select(args.scores, out=args.out, **_options(args, "model", *_SELECTION, "overwrite"))
        t = plan.to_dict()["totals"]
        print(f"{len(plan.removals)} removals; params {t['params_before']:,} -> {t['params_after']:,} "
              f"(-{t['params_removed_fraction']:.1%}); MACs/sample -{t['macs_removed_fraction']:.1%}")
        print(f"wrote {args.out}/plan.json")
        return 0
    if args.command == "prune":
        student = api.prune(args.model, args.plan, out=args.out, **_options(args, "height", "width", "overwrite"))
        print(json.dumps(student.summary, indent=2, default=str))
        print(f"wrote {args.out}/student/")
        return 0
    if args.command == "distill":
        result = api.distill(args.model, args.student, out=args.out,
                             **_options(args, *_DISTILL, "data", "prompts", "resume", "overwrite"))
        s = result.summary
        first, last = s["loss_first_10pct"]["loss"], s["loss_last_10pct"]["loss"]
        print(f"distilled {s['steps']} steps ({s['data']['kind']}, {s['world_size']} process(es)): loss "
              f"{first:.4g} -> {last:.4g}; {s['wall_time_s_this_run']:.1f} s")
        print(f"wrote {args.out}/student/, {args.out}/loss.csv, {args.out}/loss.png, {args.out}/checkpoints/")
        return 0
    if args.command == "export":
        result = api.export(args.student, out=args.out, **_options(args, *_EXPORT, "overwrite"))
        print(json.dumps(result, indent=2, default=str))
        return 0
    if args.command == "bench":
        report = api.bench(args.models, out=args.out,
                           **_options(args, "budgets", "metric", "distill_steps", "distill_data", "repeats", "warmup",
                                      "batch_sizes", "quality", "samples", "sample_steps", "num_samples", "steps", "threads",
                                      "memory", "overwrite"))
        for rec in report["models"]:
            for e in rec["budgets"]:
                lat = e["latency"]
                ratios = ", ".join(f"{rt} {b.replace('batch_', 'b')} {v['ratio']:.2f}"
                                   for rt in ("torch", "onnxruntime") for b, v in lat[rt].items())
                print(f"{rec['model']} budget {e['budget']:.0%}: params x{e['params']['ratio']:.3f}, "
                      f"MACs x{e['macs_per_sample']['ratio']:.3f}, latency pruned/dense: {ratios}")
        print(f"wrote {args.out}/report.json, {args.out}/report.md")
        return 0
    if args.command == "zoo":
        from ldpruner import zoo

        for entry in zoo.list_models():
            ready = (entry.path / "model_index.json").is_file()
            print(f"zoo:{entry.name:16s} {entry.task:20s} {'ready' if ready else 'not built'}  {entry.description}")
        return 0
    if args.command == "build":
        options = _options(args, *_TRACE, *_ANALYSIS, *_SELECTION, "distill_steps", *_EXPORT, "overwrite", "out",
                           "config")
        report = api.build(args.model, **options)
        print(report["summary"])
        for name, path in report.get("artifacts", {}).items():
            print(f"  {name:18s} {path}")
        return 0
    raise AssertionError(args.command)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .errors import LdprunerError

    try:
        return _run(args)
    except LdprunerError as exc:
        if args.debug:
            raise
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
