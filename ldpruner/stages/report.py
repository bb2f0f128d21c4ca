"""The build report: what ``ldpruner build`` did, read back from the artifacts on disk — ``report.json`` (every
number) and ``report.md`` (the same for a reader: removals, params and MACs before/after, the distillation, the
samples, the export's validation, the scheduler the analysis sampled with, stage timings, threads and reuse)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ldpruner.base import devices
from ldpruner.base.artifact import ArtifactFile
from ldpruner.base.io import read_json
from ldpruner.stages.layout import (
    COSTS,
    DISTILL_DIR,
    DISTILL_SUMMARY,
    EXPORT_SUMMARY,
    LATENCY,
    ONNX_DIR,
    PLAN,
    SCORES,
    STUDENT,
)

__all__ = ["REPORT", "REPORT_MD", "SAMPLES", "build_report", "report_markdown", "threads_record"]

# 2: the config in sections (cfg.analysis …); 1: flat, still read
REPORT = ArtifactFile("report.json", "ldpruner.report/2", "build report", reads=("ldpruner.report/1",))
REPORT_MD = "report.md"
SAMPLES = "samples.png"


def threads_record(asked: int | None, threads: int, stages: list[str], ran_with: dict[str, int], out_dir: Path,
                   load: float | None) -> dict[str, Any]:
    """The threads of a build's ``stages`` (in order): asked for (``--threads``; None: the default), used by the
    stages this build ran (``ran_with``), and — for the stages it reused — the number their artifact recorded when an
    earlier build made it (None where the artifact does not record one); with the CPUs this process may use and the
    1-minute load average when the build started (``load``)."""
    recorded = {"analyze": (SCORES, SCORES.name, ("placement", "threads")),
                "costs": (COSTS, COSTS.name, ("placement", "threads")),
                "latency": (LATENCY, LATENCY.name, ("threads",)),
                "distill": (DISTILL_SUMMARY, f"{DISTILL_DIR}/{DISTILL_SUMMARY.name}", ("threads",)),
                "export": (EXPORT_SUMMARY, f"{ONNX_DIR}/{EXPORT_SUMMARY.name}", ("threads",))}
    per_stage: dict[str, int | None] = {}
    for name in stages:
        value: Any = ran_with.get(name)
        if value is None and name in recorded and (out_dir / recorded[name][1]).is_file():
            artifact, path, keys = recorded[name]
            value = artifact.read(out_dir / path)
            for key in keys:
                value = value.get(key) if isinstance(value, dict) else None
        per_stage[name] = value if isinstance(value, int) and not isinstance(value, bool) else None
    cpus = devices.available_cpus()
    return {"asked": asked, "used": threads, "available_cpus": cpus, "load_average_at_start": load,
            "busy": load is not None and load > cpus, "stages": per_stage}


def build_report(cfg: Any, model: dict[str, Any], plan: Any, out_dir: Path, timings: dict[str, float],
                 reused: list[str], sample_rows: list[str], files: dict[str, str] | None = None,
                 threads: dict[str, Any] | None = None) -> dict[str, Any]:
    """report.json's content for a finished build into ``out_dir`` (``model``: the LoadedModel's description). The
    operator table, the scores, export and distillation summaries are read from the files there, so the report
    describes what is on disk; ``files``: the sha256 of every file the stages wrote (made or verified by this
    build); ``threads``: :func:`threads_record`."""
    from ldpruner.passes.scores import ImportanceReport

    operators = read_json(out_dir / "operators.json", what="operator table")
    kinds = {op["name"]: op["kind"] for op in operators["operators"]}
    candidates = [op for op in operators["operators"] if op["action"] != "not-removable"]
    trace = operators["trace"]
    scores = ImportanceReport.load(out_dir / SCORES.name)
    export_summary = EXPORT_SUMMARY.fields(out_dir / ONNX_DIR / EXPORT_SUMMARY.name)
    validation = export_summary["export"]["validation"]
    totals = plan.to_dict()["totals"]
    removed = [dict(r.to_dict(), kind=kinds[r.name]) for r in plan.removals]
    latency = _latency_report(plan, out_dir)
    timed = ""
    if latency is not None:
        m = latency["measured"]
        timed = (f", latency -{m['predicted_cut']:.1%} predicted / -{m['measured_cut']:.1%} measured "
                 f"({m['runtime']}, batch {m['batch']}){' FLAGGED' if m['flagged'] else ''}")
    target = plan.target(tolerance=cfg.check.target_tolerance, measured=latency["measured"] if latency else None)
    met = "" if target is None else "; target met" if target["met"] else f"; TARGET MISSED ({target['status']})"
    summary = (
        f"{cfg.model}: removed {len(plan.removals)} of {len(candidates)} candidate operators{met}; "
        f"UNet params {totals['params_before']:,} -> {totals['params_after']:,} "
        f"(-{totals['params_removed_fraction']:.1%}), MACs/sample -{totals['macs_removed_fraction']:.1%}{timed}; "
        f"ONNX {'validated' if validation.get('passed') else 'NOT validated'} "
        f"(max abs diff {validation.get('max_abs_diff', float('nan')):.2e}); report: {out_dir / 'report.md'}"
    )
    return {
        "format": REPORT.format,
        "summary": summary,
        "config": _absolute_paths(cfg),
        "model": model,
        "trace": trace,
        "operators": {"total": len(operators["operators"]), "candidates": len(candidates)},
        "params": {"dense": totals["params_before"], "pruned": totals["params_after"],
                   "removed_fraction": totals["params_removed_fraction"],
                   "outside_graph": plan.outside_graph},
        "macs_per_sample": {"dense": totals["macs_per_sample_before"], "pruned": totals["macs_per_sample_after"],
                            "removed_fraction": totals["macs_removed_fraction"],
                            "at_latent_shape": trace["traced_sample_shape"][1:]},
        "analysis": {"conditioning": scores.conditioning, "unet_calls": scores.unet_calls,
                     "wall_time_s": scores.wall_time_s, "scheduler": _this_build(scores.scheduler, model),
                     "placement": scores.placement, "batch_size": scores.config.batch_size,
                     "peak_memory": scores.peak_memory},
        # the budget asked for (metric, share) against what the plan removed; None for a plan without a budget
        "target": target,
        "latency": latency,
        # the LD score of the whole removed set, measured, beside the sum of its single scores; and the set search's
        # record where it chose the plan (steps, UNet calls, cap)
        "joint_score": plan.joint,
        "search": plan.budget.get("search"),
        "removed": removed,
        "distill": _distill_report(out_dir / DISTILL_DIR) if cfg.distill.steps else None,
        "samples": ({"path": str(out_dir / SAMPLES), "rows": sample_rows} if sample_rows
                    else {"path": None, "rows": [], "skipped": "--no-samples (samples=False)"} if not cfg.samples
                    else None),
        "export": export_summary,
        "timings_s": timings,
        "threads": threads,
        "reused_stages": reused,
        # the weights every artifact was made for (the model's), and any use with other weights that was allowed
        "model_weights": plan.model_weights,
        "other_weights": list(plan.other_weights),
        "files": {"sha256": dict(sorted((files or {}).items()))},
        "artifacts": {name: str(out_dir / name) for name in
                      (*([COSTS.name, LATENCY.name] if latency is not None else []), SCORES.name, PLAN.name, STUDENT,
                       *([f"{DISTILL_DIR}/{STUDENT}"] if cfg.distill.steps else []),
                       f"{ONNX_DIR}/unet.onnx", "operators.txt", REPORT.name, REPORT_MD,
                       *([SAMPLES] if sample_rows else []))},
    }


def _absolute_paths(cfg: Any) -> dict[str, Any]:
    """``cfg.to_dict()`` with every option that names an existing file or folder (declared ``path``) made absolute,
    so the build can be read again from any folder (bench BUILD_DIR)."""
    def fix(config: Any, table: dict[str, Any]) -> dict[str, Any]:
        for name in config.options():
            value = table.get(name)
            if config.spec(name).path and isinstance(value, str) and Path(value).exists():
                table[name] = str(Path(value).resolve())
        for name in config.sections():
            fix(getattr(config, name), table[name])
        return table

    return fix(cfg, cfg.to_dict())


def _latency_report(plan: Any, out_dir: Path) -> dict[str, Any] | None:
    """The plan's latency prediction and the measurement that checks it (builds with a latency budget)."""
    if plan.latency is None or not (out_dir / LATENCY.name).is_file():
        return None
    return {"predicted": plan.latency, "measured": LATENCY.fields(out_dir / LATENCY.name)}


def _distill_report(folder: Path) -> dict[str, Any]:
    summary = DISTILL_SUMMARY.read(folder / DISTILL_SUMMARY.name)
    return {"steps": summary["steps"], "wall_time_s": summary["wall_time_s_this_run"],
            "data": summary["data"]["kind"], "feature_taps": summary["feature_taps"]["groups"],
            "loss_first_10pct": summary["loss_first_10pct"], "loss_last_10pct": summary["loss_last_10pct"],
            "student": str(folder / STUDENT), "loss_plot": str(folder / "loss.png"),
            "loss_log": str(folder / "loss.csv")}


def _joint_lines(joint: dict[str, Any] | None, search: dict[str, Any] | None) -> list[str]:
    """The removed set's joint LD score beside the sum of its single scores, and how the set search chose it."""
    if joint is None:
        return []
    lines = ["", f"Joint LD score of the removed set (all removed together, sampled as the analysis sampled): "
                 f"**{joint['score']:.4g}**; the sum of its single scores: {joint['sum_of_single_scores']:.4g}."]
    if joint.get("compounding"):
        lines.append(f"> **The removals compound**: together they score {joint['compounding']:.1f}x the sum of their "
                     "single scores; `--order greedy` scores the set itself.")
    if search:
        capped = (f"; stopped at its cap of {search['cap_unet_calls']:,.0f} UNet calls, the plan finished by "
                  f"{search['finished_by']}" if search["capped"] else
                  f"; finished by {search['finished_by']}" if search["finished_by"] else "")
        lines.append(f"Chosen by the set search: {search['steps']} steps, {search['sets_scored']} sets scored, "
                     f"{search['unet_calls']:,} UNet calls ({search['planned_unet_calls']:,} planned){capped}.")
    return lines


def _outside_lines(outside: dict[str, Any] | None) -> list[str]:
    if not outside:
        return []
    modules = ", ".join(f"`{name}` ({count:,})" for name, count in outside["modules"].items())
    return [f"**Outside the graph:** {outside['params']:,} parameters are not counted above, in {modules}: "
            f"{outside['why']}.", ""]


def report_markdown(report: dict[str, Any]) -> str:
    """report.md: the report for a reader."""
    p, m = report["params"], report["macs_per_sample"]
    val = report["export"]["export"]["validation"]
    lines = [
        "# ldpruner build report",
        "",
        report["summary"],
        "",
    ]
    target = report.get("target")
    if target is not None:
        lines += [f"**{'Target met' if target['met'] else 'Target MISSED'}.** {target['line'][0].upper()}"
                  f"{target['line'][1:]}.", ""]
    if report["model"].get("random_weights"):
        lines += ["> **Random weights.** This model was created from a config with random weights: the numbers",
                  "> below prove the pipeline, not pruning quality.", ""]
    lines += [
        "| | dense | pruned | removed |",
        "|---|---:|---:|---:|",
        f"| UNet parameters | {p['dense']:,} | {p['pruned']:,} | {p['removed_fraction']:.1%} |",
        f"| MACs / sample at latent {'x'.join(map(str, m['at_latent_shape']))} | {m['dense']:,} | {m['pruned']:,} "
        f"| {m['removed_fraction']:.1%} |",
        *_latency_rows(report.get("latency")),
        "",
        *_outside_lines(p.get("outside_graph")),
        f"## Removed operators ({len(report['removed'])})",
        "",
        "| operator | kind | action | LD score | params |",
        "|---|---|---|---:|---:|",
    ]
    for r in report["removed"]:
        lines.append(f"| `{r['name']}` | {r['kind']} | {r['action']} | {r['score']:.4g} | {r['params']:,} |")
    lines += _joint_lines(report.get("joint_score"), report.get("search"))
    if report.get("latency") and report["latency"]["measured"]["flagged"]:
        lines += ["", f"> **Latency prediction flagged.** {report['latency']['measured']['message']}"]
    d = report.get("distill")
    if d:
        first, last = d["loss_first_10pct"], d["loss_last_10pct"]
        lines += [
            "",
            f"## Distillation ({d['steps']} steps, {d['data']}, {d['wall_time_s']:.0f} s)",
            "",
            "| loss term | first 10 % of steps | last 10 % of steps |",
            "|---|---:|---:|",
            *[f"| {k} | {first[k]:.4g} | {last[k]:.4g} |" for k in ("loss", "out", "feat", "task")
              if first[k] or last[k]],
            "",
            f"Feature taps: {', '.join(f'`{g}`' for g in d['feature_taps'])}. Distilled student: `{d['student']}`; "
            f"loss log `{d['loss_log']}`.",
            "",
            f"![distillation loss]({DISTILL_DIR}/loss.png)",
        ]
    if report.get("samples") and report["samples"].get("skipped"):
        lines += ["", "## Samples", "", f"Not drawn: {report['samples']['skipped']}."]
    elif report.get("samples"):
        lines += ["", "## Samples", "",
                  f"Rows: {', '.join(report['samples']['rows'])} — the same seeds (and prompts) in every row; quality "
                  "numbers come from `ldpruner bench`.", "", f"![samples]({SAMPLES})"]
    lines += [
        "",
        "## Export",
        "",
        f"- ONNX: `{report['artifacts']['onnx/unet.onnx']}`; validation against torch: "
        f"{'passed' if val.get('passed') else 'FAILED'}, max abs diff {val.get('max_abs_diff', float('nan')):.2e}",
        f"- trace validity: {report['trace']['note']}",
        f"- analysis: {report['analysis']['unet_calls']} UNet calls in {report['analysis']['wall_time_s']:.1f} s"
        f"{_placement(report['analysis'])}, conditioning: {report['analysis']['conditioning']}",
        f"- scheduler: {_scheduler(report['analysis'].get('scheduler'))}",
        f"- stage timings (s): {json.dumps(report['timings_s'])}; reused: {report['reused_stages'] or 'none'} "
        f"(a stage is reused only when every file it wrote is on disk unchanged: "
        f"{len(report.get('files', {}).get('sha256', {}))} files, their sha256 in report.json)",
        *_threads_lines(report.get("threads")),
        f"- dense weights: `{report.get('model_weights') or 'not recorded'}`",
        *[f"- **used with other weights** ({o.get('stage')}): made for `{o.get('made_for')}`, used with "
          f"`{o.get('used_with')}`" for o in report.get("other_weights") or []],
        "",
    ]
    return "\n".join(lines)


def _this_build(scheduler: dict[str, Any] | None, model: dict[str, Any]) -> dict[str, Any] | None:
    """The scores' scheduler record with the source of this build: reused scores were made with the same scheduler
    (its class and config are in their key) but may have been asked for otherwise (the default DDIMScheduler() and
    --scheduler DDIMScheduler give the same scores)."""
    if not scheduler or not model.get("scheduler_source"):
        return scheduler
    return {**scheduler, "source": model["scheduler_source"]}


def _scheduler(record: dict[str, Any] | None) -> str:
    """"DDIMScheduler (the model's own)", or the default said as such, for the report's scheduler line."""
    from ldpruner.passes.inputs import SCHEDULER_SOURCES

    if not record:
        return "not recorded"
    source = record.get("source")
    where = SCHEDULER_SOURCES.get(source, source)
    hint = ", at diffusers' defaults; --scheduler picks one" if source == "default" else ""
    return f"{record.get('class')} ({where}{hint})"


def _threads_lines(threads: dict[str, Any] | None) -> list[str]:
    """The report's threads line: each stage's threads, what was asked, the CPUs available, a busy machine."""
    if not threads:
        return []
    stages = ", ".join(f"{name} {n if n is not None else 'not recorded'}" for name, n in threads["stages"].items())
    asked = (f"--threads {threads['asked']}" if threads["asked"] is not None
             else f"the default: the {threads['available_cpus']} CPUs this process may use, at most torch's setting")
    line = f"- threads per stage: {stages} ({asked}; reused stages: as recorded when made)"
    if threads.get("busy") and threads["used"] > 1:
        line += (f"; the machine was busy (load average {threads['load_average_at_start']:g} over "
                 f"{threads['available_cpus']} CPUs at the start): --threads 1 may be faster")
    return [line]


def _latency_rows(latency: dict[str, Any] | None) -> list[str]:
    """The latency rows of the report's table: the plan's prediction, and the measurement beside the dense model."""
    if latency is None:
        return []
    p, m = latency["predicted"], latency["measured"]
    where = f"{m['runtime']}, {p['basis'].get('provider') or p['basis']['device']}, batch {m['batch']}"
    interval = m.get("measured_cut_interval")
    spread = (f" (95 % interval {interval[0]:.1%}–{interval[1]:.1%}"
              f"{'' if m.get('converged', True) else ', wider than asked: a busy machine'})" if interval else "")
    return [f"| latency predicted ({where}; ms) | {p['dense_ms']:.2f} | {p['predicted_ms']:.2f} | "
            f"{m['predicted_cut']:.1%} |",
            f"| latency measured (median of {m['repeats']} interleaved rounds; ms) | {m['dense_ms']:.2f} | "
            f"{m['pruned_ms']:.2f} | {m['measured_cut']:.1%}{spread} |"]


def _placement(analysis: dict[str, Any]) -> str:
    """" on <accelerator> (<dtype>, micro-batches of B), peak ... MiB" for the analysis line (empty for scores
    written before these were recorded)."""
    where = analysis.get("placement") or {}
    if not where:
        return ""
    text = f" on {where.get('accelerator', where.get('device'))} ({where.get('dtype')}"
    text += f", micro-batches of {analysis['batch_size']})" if analysis.get("batch_size") else ")"
    peaks = analysis.get("peak_memory") or []
    if peaks:
        peak = peaks[0]
        text += (f", peak {peak['cuda_peak_allocated_mib']:,.0f} MiB on the GPU" if "cuda_peak_allocated_mib" in peak
                 else f", peak RSS {peak['host_peak_rss_mib']:,.0f} MiB")
    return text

