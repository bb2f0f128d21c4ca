"""``ldpruner``: a thin shell over :mod:`ldpruner.api`. One subcommand per stage; every flag is an API keyword.

The flags, their types, choices, defaults and help come from the stage configs (:mod:`ldpruner.passes.config`,
:mod:`ldpruner.stages.config`) through :func:`ldpruner.base.flags.add_flags`; a flag the user does not give is not
passed, so the config's default applies. Errors print one line (``error: <Type>: <message>``; an error ldpruner did not
raise on purpose says ``unexpected``) and exit 1; ``--debug`` shows the traceback instead. Heavy imports (torch,
diffusers, onnx) happen inside the commands, so ``ldpruner --help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["build_parser", "main"]

# the positional arguments and I/O flags: not options of a stage
_NOT_OPTIONS = {"command", "debug", "model", "models", "scores", "student", "plan", "json_path", "zoo_command", "out",
                "config", "costs", "name"}


def _add_allow_other_weights(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--allow-other-weights", action="store_true", default=argparse.SUPPRESS,
                   help=f"use {what} with a model whose weights differ from the ones it was made for (a fine-tune of "
                        "the same architecture, say); the outputs record that you did")


def _add_out(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    from ldpruner.base.flags import add_flags
    from ldpruner.stages.config import BuildConfig

    if required:
        p.add_argument("--out", required=True, help="output folder")
        add_flags(p, BuildConfig, ["overwrite"], help={"overwrite": "replace outputs that exist"})
    else:  # build: the folder may come from --config; only outputs whose inputs changed are ever replaced
        p.add_argument("--out", help=BuildConfig.spec("out").help + " (required here or as `out` in --config)")
        add_flags(p, BuildConfig, ["overwrite"])


class _Parser(argparse.ArgumentParser):
    """argparse with ldpruner's one-line errors: argparse prints the whole usage (1–2 KB for ``build``) above its
    message, which buries it. Each parser keeps its flags, so an unknown one gets a "did you mean"."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.flags: list[str] = []  # before argparse adds --help
        super().__init__(*args, **kwargs)

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        self.flags.extend(o for o in action.option_strings if o.startswith("--"))
        return action

    def unknown(self, extra: Sequence[str], top: Sequence[str] = ()) -> None:
        """Refuse arguments this command does not take, naming the closest flag: its own, or one of ``top`` (the
        flags that come before the command, such as --debug)."""
        import difflib

        flag = next((a.split("=", 1)[0] for a in extra if a.startswith("--")), None)
        close = difflib.get_close_matches(flag, [*self.flags, *top], n=1, cutoff=0.6) if flag else []
        hint = ""
        if close and close[0] in self.flags:
            hint = f"; did you mean {close[0]}?"
        elif close:
            hint = (f"; did you mean {close[0]}? (it comes before the command: ldpruner {close[0]} "
                    f"{self.prog.removeprefix('ldpruner ')} …)")
        self.error(f"unrecognized arguments: {' '.join(extra)}{hint}")

    def error(self, message: str) -> Any:
        self.exit(2, f"error: {self.prog}: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from ldpruner import __version__
    from ldpruner.base.devices import DEVICE_HELP
    from ldpruner.base.flags import add_flags
    from ldpruner.passes.config import InputsConfig
    from ldpruner.stages.config import (
        MODEL_HELP,
        AnalyzeOptions,
        BenchConfig,
        BuildConfig,
        CostsOptions,
        DistillOptions,
        ExportOptions,
        InspectOptions,
        PruneOptions,
        SelectOptions,
    )

    parser = _Parser(
        prog="ldpruner",
        description="Prune latent diffusion UNets by latent-deviation importance (LD-Pruner) and export them to ONNX.",
    )
    parser.add_argument("--version", action="version", version=f"ldpruner {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.commands = sub.choices  # type: ignore[attr-defined]  # command name -> its parser

    p = sub.add_parser("inspect", help="print the operator table")
    p.add_argument("model", help=MODEL_HELP)
    add_flags(p, InspectOptions)
    p.add_argument("--json", dest="json_path", help="also write the operator graph as JSON to this file")
    p.add_argument("--overwrite", action="store_true", default=argparse.SUPPRESS,
                   help="replace the --json file when it exists")

    p = sub.add_parser("analyze", help="score every removable operator (writes scores.json)")
    p.add_argument("model", help=MODEL_HELP)
    add_flags(p, AnalyzeOptions)
    add_flags(p, InputsConfig)
    _add_out(p)

    p = sub.add_parser("costs", help="measure the latency each removal saves on the target runtime (writes "
                                     "costs.json, for select --metric latency)")
    p.add_argument("model", help=MODEL_HELP)
    add_flags(p, CostsOptions, help={"device": "where the latency is measured (onnxruntime: its CUDA provider on a "
                                               "GPU): " + DEVICE_HELP})
    _add_out(p)

    p = sub.add_parser("select", help="choose removals under a budget (writes plan.json)")
    p.add_argument("scores", help="scores.json from `ldpruner analyze`")
    p.add_argument("--model", help="the analysed model: lets selection skip removals that would jointly remove "
                                    "shared modules (else prune refuses such a plan), measures the plan's joint LD "
                                    "score, and runs --order greedy (the set search)")
    p.add_argument("--costs", help="costs.json from `ldpruner costs`: needed for --metric latency; with it any plan "
                                   "records the latency it predicts")
    add_flags(p, SelectOptions)
    _add_allow_other_weights(p, "the scores")
    _add_out(p)

    p = sub.add_parser("prune", help="apply a plan (writes student/)")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--plan", required=True, help="plan.json from `ldpruner select`")
    add_flags(p, PruneOptions)
    _add_allow_other_weights(p, "the plan")
    _add_out(p)

    p = sub.add_parser("distill", help="fine-tune a pruned student against the dense model (writes student/, "
                                       "checkpoints/, loss log)")
    p.add_argument("model", help="the dense model the student was pruned from: " + MODEL_HELP)
    p.add_argument("student", help="student/ folder from `ldpruner prune`")
    add_flags(p, DistillOptions, help={"device": "where the student trains: " + DEVICE_HELP})
    add_flags(p, InputsConfig,
              help={"prompts": "data-free: prompt file for the teacher's trajectories",
                    "calibration": "data-free: safetensors file of the teacher's conditioning inputs (as for analyze)",
                    "scheduler": "data-free: the scheduler the teacher's trajectories sample with, in place of the "
                                 "model's own (as for analyze)"})
    p.add_argument("--data", help="folder of images (+ captions in metadata.jsonl or <image>.txt) to distill on, "
                                  "encoded by the model's VAE (default: data-free, on the teacher's trajectories)")
    p.add_argument("--resume", action="store_true", default=argparse.SUPPRESS,
                   help="continue from the newest checkpoint in --out")
    _add_allow_other_weights(p, "the student (and its checkpoints)")
    _add_out(p)

    p = sub.add_parser("lora", help="fuse a LoRA trained for the dense UNet into a pruned student (writes student/ "
                                    "and lora.json: what was fused, what was dropped with the removed operators)")
    p.add_argument("student", help="student/ folder from `ldpruner prune` or `ldpruner distill`")
    p.add_argument("--lora", required=True, help="the LoRA: a .safetensors file in diffusers, PEFT or kohya format")
    p.add_argument("--scale", type=float, default=argparse.SUPPRESS, help="LoRA strength (default: 1.0)")
    _add_out(p)

    p = sub.add_parser("export", help="export a pruned student, or a dense MODEL as the baseline, to ONNX and "
                                      "validate it (writes onnx/)")
    p.add_argument("model", help="student/ folder from `ldpruner prune` or `ldpruner distill`, or any MODEL (the "
                                 "dense baseline): " + MODEL_HELP)
    export_help = {"height": "dense MODEL: latent height to trace at (default: its sample_size; the ONNX model keeps "
                             "height and width dynamic)",
                   "width": "dense MODEL: latent width to trace at (default: its sample_size)",
                   "device": "where the numeric checks run (CUDA: onnxruntime's CUDA provider, and the optimizer's "
                             "CUDA-only fusions): " + DEVICE_HELP}
    p.add_argument("--controlnet", action="store_true", default=argparse.SUPPRESS,
                   help="the ONNX model also takes ControlNet's residuals (down_block_additional_residual_<i>, "
                        "mid_block_additional_residual)")
    p.add_argument("--adapter", action="store_true", default=argparse.SUPPRESS,
                   help="the ONNX model also takes T2I-Adapter's features (down_intrablock_additional_residual_<i>)")
    add_flags(p, ExportOptions, help=export_help)
    _add_out(p)

    p = sub.add_parser("bench", help="dense vs pruned side by side: params, MACs, torch/ORT latency, memory, quality "
                                     "(writes report.json, report.md, plots, sample grids)")
    p.add_argument("models", nargs="+", help=BenchConfig.spec("models").help)
    add_flags(p, BenchConfig, skip=("overwrite",),
              help={"device": "where the analysis, distillation and timings run: " + DEVICE_HELP,
                    "distill_guidance_scale": "distillation: guidance of the teacher's trajectories (zoo:mnist-t2i: 5, "
                                              "as it samples)"})
    _add_out(p)

    p = sub.add_parser("zoo", help="the embedded models (use them as MODEL: zoo:<name>)")
    zoo_sub = p.add_subparsers(dest="zoo_command", required=True, metavar="{list,export}")
    p.commands = zoo_sub.choices  # type: ignore[attr-defined]
    zoo_sub.add_parser("list", help="name, task, status and description of each model")
    p = zoo_sub.add_parser("export", help="write a model as a complete diffusers pipeline folder, which "
                                          "DiffusionPipeline.from_pretrained(DIR) loads with no other arguments "
                                          "(mnist-t2i: its text encoder and tokenizer included)")
    p.add_argument("name", help="the zoo model's name, as `ldpruner zoo list` shows it without 'zoo:' (mnist-t2i)")
    _add_out(p)

    p = sub.add_parser("build", help="run every stage into --out, reusing unchanged artifacts")
    p.add_argument("model", nargs="?", help=MODEL_HELP + f" (default: {BuildConfig.default('model')}, the embedded "
                                                         "text-to-image model)")
    p.add_argument("--config", help="TOML file with build options (flags override it)")
    add_flags(p, BuildConfig, skip=("overwrite",))
    _add_out(p, required=False)
    return parser


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """The options the user actually typed (absent flags are absent: the API's defaults apply)."""
    return {k: v for k, v in vars(args).items() if k not in _NOT_OPTIONS}


def _run(args: argparse.Namespace) -> int:
    from ldpruner import api, stages

    options = _options(args)
    if args.command == "inspect":
        overwrite = options.pop("overwrite", False)
        if args.json_path:
            from ldpruner.base.io import check_replaceable

            check_replaceable(args.json_path, overwrite)  # before the trace, which may take minutes
        graph = api.inspect(args.model, **options)
        print(graph.table())
        if args.json_path:
            from ldpruner.base.io import write_text_atomic

            write_text_atomic(args.json_path, graph.to_json() + "\n")
        return 0
    if args.command == "analyze":
        report = api.analyze(args.model, out=args.out, **options)
        for e in report.ranked():
            print(f"{e.score:12.6f}  {e.action:9s}  {e.name}")
        print(f"wrote {args.out}/{stages.SCORES.name} ({len(report)} candidates, {report.unet_calls} UNet calls, "
              f"{report.wall_time_s:.1f} s)")
        return 0
    if args.command == "costs":
        report = api.costs(args.model, out=args.out, **options)
        p = report.placement
        print(f"dense {report.dense_ms:.2f} ms on {p['runtime']} ({p.get('provider') or p['device']}, batch "
              f"{p['batch']}, {p['dtype']}); the candidates account for {report.attributed_ms / report.dense_ms:.0%}")
        for cost in sorted(report.operators.values(), key=lambda c: -c.saves_ms):
            print(f"{cost.saves_ms:10.3f} ms  {cost.saves_ms / report.dense_ms:6.1%}  {cost.name}")
        print(f"wrote {args.out}/{stages.COSTS.name} ({report.wall_time_s:.1f} s)")
        return 0
    if args.command == "select":
        plan = api.select(args.scores, model=args.model, costs=args.costs, out=args.out, **options)
        t = plan.to_dict()["totals"]
        latency = (f"; latency {plan.latency['dense_ms']:.2f} -> {plan.latency['predicted_ms']:.2f} ms predicted "
                   f"(-{plan.latency['predicted_removed_fraction']:.1%})" if plan.latency else "")
        print(f"{len(plan.removals)} removals; params {t['params_before']:,} -> {t['params_after']:,} "
              f"(-{t['params_removed_fraction']:.1%}); MACs/sample -{t['macs_removed_fraction']:.1%}{latency}")
        if plan.joint is not None:
            print(f"joint LD score of the removed set {plan.joint['score']:.4g} (the sum of its single scores "
                  f"{plan.joint['sum_of_single_scores']:.4g})")
        print(f"wrote {args.out}/{stages.PLAN.name}")
        return 0
    if args.command == "prune":
        student = api.prune(args.model, args.plan, out=args.out, **options)
        print(json.dumps(student.summary, indent=2, default=str))
        print(f"wrote {args.out}/{stages.STUDENT}/")
        return 0
    if args.command == "distill":
        result = api.distill(args.model, args.student, out=args.out, **options)
        s = result.summary
        first, last = s["loss_first_10pct"]["loss"], s["loss_last_10pct"]["loss"]
        print(f"distilled {s['steps']} steps ({s['data']['kind']}, {s['world_size']} process(es)): loss "
              f"{first:.4g} -> {last:.4g}; {s['wall_time_s_this_run']:.1f} s")
        print(f"wrote {args.out}/{stages.STUDENT}/, {args.out}/{stages.DISTILL_SUMMARY.name}, {args.out}/loss.csv, "
              f"{args.out}/loss.png, {args.out}/checkpoints/")
        return 0
    if args.command == "lora":
        _, report = api.lora(args.student, options.pop("lora"), out=args.out, **options)
        print(f"fused {report['fused']} of {report['pairs']} LoRA pairs; dropped {report['dropped']} inside removed "
              f"operators ({report['dropped_fraction']:.1%} of the LoRA's parameters); wrote "
              f"{args.out}/{stages.STUDENT}/ and {args.out}/{stages.LORA.name}")
        return 0
    if args.command == "export":
        print(json.dumps(api.export(args.model, out=args.out, **options), indent=2, default=str))
        return 0
    if args.command == "bench":
        report = api.bench(args.models, out=args.out, **options)
        for rec in report["models"]:
            for e in rec["budgets"]:
                lat = e["latency"]
                ratios = ", ".join(f"{rt} {b.replace('batch_', 'b')} {v['ratio']:.2f}"
                                   for rt in ("torch", "onnxruntime") for b, v in lat[rt].items())
                target = e.get("target")
                verdict = "" if not target else "; target met" if target["met"] else (
                    f"; TARGET MISSED ({target['status']}: {target['achieved']:.1%} removed, asked "
                    f"{target['budget']:.0%})")
                what = "build" if e.get("label") == "build" else "budget"
                print(f"{rec['model']} {what} {e['metric']} {e['budget']:.0%}: params x{e['params']['ratio']:.3f}, "
                      f"MACs x{e['macs_per_sample']['ratio']:.3f}, latency pruned/dense: {ratios}{verdict}")
        from ldpruner.bench.stage import REPORT

        print(f"wrote {args.out}/{REPORT.name}, {args.out}/report.md")
        return 0
    if args.command == "zoo":
        from ldpruner import zoo

        if args.zoo_command == "export":
            print(zoo.export_pipeline(args.name, args.out, overwrite=options.get("overwrite", False)).summary())
            return 0
        for entry in zoo.list_models():
            ready = (entry.path / "model_index.json").is_file()
            print(f"zoo:{entry.name:16s} {entry.task:20s} {'ready' if ready else 'not built'}  {entry.description}")
        return 0
    if args.command == "build":
        report = api.build(args.model, out=args.out, config=args.config, **options)
        print(report["summary"])
        for name, path in report.get("artifacts", {}).items():
            print(f"  {name:18s} {path}")
        return 0
    raise AssertionError(args.command)


class _TorchvisionNotice(logging.Filter):
    """transformers' notice that an image processor falls back to its PIL version without torchvision: diffusers'
    pipeline modules import those processors, and no ldpruner command uses them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


def _end_progress_bars() -> None:
    """Close the progress bars an error interrupted (innermost first): a bar is drawn without its newline, so the
    error line would otherwise continue the bar's line."""
    std = sys.modules.get("tqdm.std")
    if std is None:  # no bar was ever made
        return
    for bar in sorted(list(getattr(std.tqdm, "_instances", ())), key=lambda b: -abs(getattr(b, "pos", 0))):
        try:
            bar.close()  # a bar that stays ends its line; one that goes clears it
        except Exception:  # a bar whose stream is gone: nothing to end
            pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # named by the (innermost) command that was given, whose flags are the ones a typo meant
        command = parser
        for dest in ("command", "zoo_command"):
            inner = getattr(command, "commands", {}).get(getattr(args, dest, None))
            if inner is None:
                break
            command = inner
        command.unknown(extra, top=parser.flags if command is not parser else ())
    from ldpruner.base.errors import LdprunerError

    # the logger transformers makes for its import machinery; the filter stays on it, so install it once
    notices = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, _TorchvisionNotice) for f in notices.filters):
        notices.addFilter(_TorchvisionNotice())
    try:
        return _run(args)
    except LdprunerError as exc:
        _end_progress_bars()
        if args.debug:
            raise
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        _end_progress_bars()
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # not raised on purpose: still one line, the traceback on request
        _end_progress_bars()
        if args.debug:
            raise
        message = " ".join(str(exc).split()) or "(no message)"
        message = message if len(message) <= 300 else message[:300] + " …"
        print(f"error: unexpected {type(exc).__name__}: {message} (a model ldpruner does not handle, or a bug; "
              "--debug shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
