"""What a bench run shows: per-model plots (params, MACs, latency and quality against the budget), sample grids
and audio clips of the variants, and ``report.md`` from ``report.json``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["audio_clips", "grids", "markdown", "plots", "slug"]


def slug(spec: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._]+", "-", spec).strip("-_.") or "model"


def plots(record: dict[str, Any], model_dir: Path) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = record["budgets"]
    x = [b["budget"] for b in budgets]
    paths: dict[str, str] = {}
    fig, ax = plt.subplots(figsize=(6, 4))
    for runtime, style in (("torch", "-o"), ("onnxruntime", "-s")):
        for key in budgets[0]["latency"][runtime]:
            ax.plot(x, [b["latency"][runtime][key]["ratio"] for b in budgets], style,
                    label=f"{runtime} {key.replace('_', ' ')}")
    ax.plot(x, [b["macs_per_sample"]["ratio"] for b in budgets], "k--", label="MACs ratio")
    ax.plot(x, [b["params"]["ratio"] for b in budgets], "k:", label="params ratio")
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set_xlabel(f"budget ({budgets[0]['metric']} removed)")
    ax.set_ylabel("pruned / dense")
    ax.set_title(f"{record['model']}: latency ratio (median) vs MACs")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(model_dir / "latency.png", dpi=100)
    plt.close(fig)
    paths["latency"] = str(model_dir / "latency.png")

    if record["quality"].get("available"):
        from .quality import primary

        dense_q = primary(record["quality"]["dense"])
        feature_name = {"efficientnet": "EfficientNet-Lite0", "spoken_digits": "spoken-digit classifier"}[
            record["quality"]["dense"]["primary"]]
        fig, ax = plt.subplots(figsize=(6, 4))
        for variant, style in (("pruned", "-o"), ("distilled", "-s")):
            if variant in budgets[0]["quality"]:
                ax.plot(x, [primary(b["quality"][variant])["fd"] for b in budgets], style, label=f"{variant} FD")
        ax.axhline(dense_q["fd"], color="k", ls="--", label="dense FD")
        ax.axhline(dense_q["fd_real_vs_real"], color="grey", ls=":", label="real vs real FD")
        ax.set_xlabel(f"budget ({budgets[0]['metric']} removed)")
        ax.set_ylabel(f"FD ({feature_name} features)")
        ax.set_title(f"{record['model']}: quality vs budget")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(model_dir / "quality.png", dpi=100)
        plt.close(fig)
        paths["quality"] = str(model_dir / "quality.png")
    return paths


def grids(grids: Mapping[str, Any], samples_dir: Path, model_dir: Path, shown: int = 16) -> dict[str, Any]:
    """One PNG grid (64 samples evenly spaced over the set) per variant, and one figure with ``shown`` evenly spaced
    samples of every variant side by side (same seeds, same prompts: cell by cell the same noise)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from .metrics import image_grid, save_image_grid

    def spread(images, k):  # evenly spaced over the set: T2I samples come in prompt order, one digit after another
        return images[torch.linspace(0, len(images) - 1, min(k, len(images))).round().long()]

    samples_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, images in grids.items():
        path = samples_dir / f"{name.replace(' ', '-').replace('%', 'pct')}.png"
        save_image_grid(spread(images, 64), path, 8, scale=2)
        files[name] = str(path)
    fig, axes = plt.subplots(1, len(grids), figsize=(2.6 * len(grids), 2.9), squeeze=False)
    for ax, (name, images) in zip(axes[0], grids.items()):
        grid = image_grid(spread(images, shown), 4, scale=2)
        ax.imshow(grid, cmap="gray" if grid.ndim == 2 else None, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(model_dir / "samples.png", dpi=100)
    plt.close(fig)
    return {"grids": files, "side_by_side": str(model_dir / "samples.png")}


def audio_models() -> tuple[str, ...]:
    from .quality import AUDIO_MODELS

    return AUDIO_MODELS


def audio_clips(grids: Mapping[str, Any], spec: str, samples_dir: Path, clips: int = 8) -> dict[str, list[str]]:
    """The first ``clips`` mel samples of every variant as WAVs (Griffin-Lim), same seeds across variants:
    ``samples/<variant>/clip-00.wav`` …, to listen to dense vs pruned side by side."""
    from ldpruner.zoo import model_dir as zoo_folder
    from ldpruner.zoo.audio import MelConfig, mel_to_waveform

    from .metrics import save_wav

    config = MelConfig.from_folder(zoo_folder(spec.removeprefix("zoo:")))
    files: dict[str, list[str]] = {}
    for name, mels in grids.items():
        folder = samples_dir / name.replace(" ", "-").replace("%", "pct")
        audio = mel_to_waveform(mels[:clips], config, value_range=(0.0, 1.0))
        files[name] = [str(save_wav(a, config.sample_rate, folder / f"clip-{i:02d}.wav")) for i, a in enumerate(audio)]
    return files


def _ms(stats: Mapping[str, Any]) -> str:
    return f"{stats['median_ms']:.2f} ± {stats['iqr_ms']:.2f}"


def _label(entry: Mapping[str, Any]) -> str:
    """A budget's row label: its share ("30%"), or "build (params 30%)" for a build measured as it ships."""
    share = f"{entry['budget']:.0%}" if isinstance(entry.get("budget"), (int, float)) else "?"
    return f"build ({entry.get('metric')} {share})" if entry.get("label") == "build" else share


def _ratio_text(latency: Mapping[str, Any]) -> str:
    interval = latency.get("interval")
    if not interval:
        return f"**{latency['ratio']:.3f}**"
    return (f"**{latency['ratio']:.3f}** [{interval[0]:.3f}, {interval[1]:.3f}]"
            f"{'' if latency.get('converged', True) else '*'}")


def markdown(report: Mapping[str, Any]) -> str:
    env = report["environment"]
    cfg = report["config"]
    precision = cfg.get("check", cfg).get("latency_precision", 0.02)  # a report of an earlier bench is flat
    lines = ["# ldpruner bench", "",
             f"torch {env['torch']}, onnxruntime {env['onnxruntime']}, {env['cpu_count']} CPUs, {env['threads']} "
             f"threads; load average at start {env.get('load_average_start')}, at end {env.get('load_average_end')}.",
             "",
             f"Latency: median ± IQR (ms) of at least {cfg['repeats']} timed rounds after {cfg['warmup']} warm-up "
             "calls, dense and pruned interleaved in one run (order rotated every round), more rounds until the 95 % "
             f"interval of the ratio is within ±{precision:.0%} of it (shown as [low, high]; "
             "a ratio marked * did not get there in the time allowed). **The pruned / dense ratios are the "
             "evidence; absolute times depend on the machine and its load.** Torch: the dense diffusers UNet vs the "
             "pruned fx graph, eager. ORT: both exported through `ldpruner.passes.onnx.export`, CPU provider, no "
             "spinning. Memory: peak RSS of a fresh process serving the ONNX model at the largest batch, minus its "
             "RSS after importing onnxruntime (weights + activations + runtime arenas).", ""]
    for rec in report["models"]:
        d = rec["dense"]
        lines += [f"## {rec['model']} ({rec['class']}, latent {'×'.join(map(str, rec['latent_shape']))})", ""]
        if rec["random_weights"]:
            lines += ["> Random weights: the numbers prove the pipeline, not pruning quality.", ""]
        lines += [f"Dense: {d['params']:,} UNet params, {d['macs_per_sample']:,} MACs/sample; ONNX validated: "
                  f"{d['onnx']['passed']} (max abs diff {d['onnx']['max_abs_diff']:.1e}).", ""]
        built = rec.get("build")
        if built:
            lines += [f"The build in `{built['path']}` as it ships: its plan ({built['metric']} budget "
                      f"{built['budget']:g}, order {built['order']}), its students and its ONNX model "
                      f"`{built['onnx']}`, measured beside `{built['model']}`.", ""]
            check = built.get("latency_check")
            if check:
                lines += [f"The build's own latency check measured the cut at {check['measured_cut']:.1%} "
                          f"({check['runtime']}, batch {check['batch']}, {check.get('repeats')} rounds).", ""]
        for e in rec["budgets"]:
            if e.get("target"):
                lines.append(f"- {_label(e)}: {e['target']['line']}{'' if e['target']['met'] else ' **MISSED**'}")
        lines.append("")
        batches = list(rec["budgets"][0]["latency"]["torch"])
        header = ["budget", "removed ops", "joint LD (Σ single)", "params (ratio)", "MACs ratio"]
        for runtime in ("torch", "ORT"):
            for b in batches:
                header += [f"{runtime} {b.replace('batch_', 'b')} dense ms", "pruned ms", "ratio"]
        header += ["ORT peak MiB (ratio)", "ONNX valid"]
        predicted = any(e.get("latency_prediction") for e in rec["budgets"])
        if predicted:
            header += ["latency cut predicted / measured"]
        lines += ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
        for e in rec["budgets"]:
            joint = e.get("joint_score")
            row = [_label(e), str(len(e["removed"])),
                   f"{joint['score']:.4g} ({joint['sum_of_single_scores']:.4g})" if joint else "n/a",
                   f"{e['params']['pruned']:,} ({e['params']['ratio']:.3f})", f"{e['macs_per_sample']['ratio']:.3f}"]
            for runtime in ("torch", "onnxruntime"):
                for b in batches:
                    lat = e["latency"][runtime][b]
                    row += [_ms(lat["dense"]), _ms(lat["pruned"]), _ratio_text(lat)]
            mem = e["peak_memory_onnx"]
            row.append(f"{mem['run_peak_mib']:.0f} ({mem.get('run_peak_ratio', float('nan')):.2f})"
                       if mem.get("available") else "n/a")
            row.append("yes" if e["onnx"]["passed"] else "NO")
            if predicted:
                lp = e["latency_prediction"]
                row.append(f"{lp['predicted_cut']:.1%} / {lp['measured_cut']:.1%} ({lp['runtime']} "
                           f"b{lp['batch']}){' **FLAGGED**' if lp['flagged'] else ''}")
            lines.append("| " + " | ".join(row) + " |")
        dense_mem = d["peak_memory_onnx"]
        if dense_mem.get("available"):
            lines += ["", f"Dense ONNX peak: {dense_mem['run_peak_mib']:.0f} MiB above baseline "
                          f"({dense_mem['peak_rss_mib']:.0f} MiB RSS)."]
        distilled = [e for e in rec["budgets"] if e.get("distill")]
        if distilled:
            lines += ["", "| budget | distill steps | loss first 10 % | loss last 10 % | wall s |",
                      "|---|---:|---:|---:|---:|"]
            for e in distilled:
                ds = e["distill"]
                lines.append(f"| {_label(e)} | {ds['steps']} | {ds['loss_first_10pct']:.4g} | "
                             f"{ds['loss_last_10pct']:.4g} | {ds['wall_time_s']:.0f} |")
        q = rec["quality"]
        lines.append("")
        if q.get("available"):
            from .quality import quality_table

            audio = "recognisability" in q["dense"]
            space = ("the spoken-digit classifier's features vs held-out real clips" if audio else
                     "EfficientNet-Lite0 features vs held-out real images")
            lines += [f"Quality: {cfg['samples']} samples per variant, {cfg['sample_steps']} steps, same seeds; "
                      f"FD/KID on {space} (relative numbers, not published FID).", ""]
            rows = [("dense", q["dense"])] + [(f"{v} {_label(e)}", qq) for e in rec["budgets"]
                                               for v, qq in e.get("quality", {}).items()]
            lines += quality_table(rows)
            folder = slug(rec["model"])
            lines += ["", f"![samples]({folder}/samples.png)", "", f"![quality]({folder}/quality.png)"]
        else:
            lines.append(f"Quality: not measured ({q.get('reason')}).")
        lines += ["", f"![latency]({slug(rec['model'])}/latency.png)", ""]
    return "\n".join(lines)
