"""One command that checks a GPU machine end to end, in a few minutes:

    python -m benchmarks.gpu_check --out build/gpu-check

On CUDA: ``ldpruner build random:sd15`` at a 64×64 latent with a float16 analysis (small N and steps, micro-batches
of 2), a short distillation (gradient checkpointing), the export with onnxruntime's optimized and fp16 variants on
the CUDA provider; then dense vs pruned timed side by side, interleaved, on torch (float16, the diffusers SDPA
attention) and on onnxruntime CUDA (the fp16 variant, IO binding: tensors stay on the GPU) at batch 1 and 2, and one
table with the peak GPU memory of each phase. Without CUDA the same code runs on the CPU at a tiny size
(``random:sd-tiny``, 8×8, bfloat16 analysis, float32 timings and the fp32 optimized model) and says that no GPU was
found, so CI keeps the script working. Writes ``report.json`` and ``report.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

from ldpruner.base.io import write_json_atomic, write_text_atomic

GPU = {"model": "random:sd15", "size": 64, "analysis_dtype": "float16", "timing_dtype": "float16", "onnx": "fp16",
       "steps": 4, "distill_steps": 10}
CPU = {"model": "random:sd-tiny", "size": 8, "analysis_dtype": "bfloat16", "timing_dtype": "float32", "onnx": "opt",
       "steps": 2, "distill_steps": 3}


def _time(variants: dict[str, Any], device: Any, repeats: int) -> dict[str, Any]:
    import torch

    from ldpruner.bench.latency import measure_interleaved

    def synced(call: Any) -> Any:
        return (lambda: (call(), torch.cuda.synchronize(device))) if device.type == "cuda" else call

    run = measure_interleaved({k: synced(v) for k, v in variants.items()}, warmup=2, repeats=repeats)
    return run.to_dict(ratio=("pruned", "dense"))


def check(out: Path, *, repeats: int = 10, budget: float = 0.3, progress: bool = True) -> dict[str, Any]:
    """Build, export and time; returns the report (also written to ``out``)."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from ldpruner import api, stages
    from ldpruner.base import devices
    from ldpruner.compiler.tracer import call_diffusers_unet, unet_example_inputs
    from ldpruner.passes.onnx.export import export_onnx
    from ldpruner.passes.onnx.optimize import fusion_sites, fusion_table, optimize_onnx
    from ldpruner.passes.student import load_student
    from ldpruner.runtime.session import create_session

    device = devices.resolve_device("auto")
    cuda = device.type == "cuda"
    setting = GPU if cuda else CPU
    # onnxruntime's CUDA-only fusions and its fp16 kernels need onnxruntime-gpu, not only a GPU
    ort_cuda = cuda and "CUDAExecutionProvider" in ort.get_available_providers()
    if cuda and not ort_cuda:
        print("gpu_check: torch sees a GPU but onnxruntime has no CUDA provider (pip install 'ldpruner[gpu]', "
              "without the CPU onnxruntime package): onnxruntime runs the fp32 model on the CPU", file=sys.stderr)
        setting = {**setting, "onnx": "opt"}
    report: dict[str, Any] = {"gpu": cuda, "onnxruntime_cuda": ort_cuda, "device": str(device),
                              "accelerator": devices.accelerator_name(device), "setting": setting,
                              "torch": torch.__version__, "onnxruntime": ort.__version__, "phases": {}}
    if not cuda:
        print("gpu_check: no GPU found (torch.cuda.is_available() is False): running the same path on the CPU at a "
              "tiny size", file=sys.stderr)

    def phase(name: str, run: Any) -> Any:
        devices.reset_peak_memory(device)
        start = time.perf_counter()
        result = run()
        report["phases"][name] = {"seconds": round(time.perf_counter() - start, 1), **devices.peak_memory(device)}
        return result

    size = setting["size"]
    build_dir = out / "build"
    built = phase("build", lambda: api.build(
        setting["model"], out=build_dir, height=size, width=size, dtype=setting["analysis_dtype"], batch_size=2,
        num_samples=4, steps=setting["steps"], budget=budget, distill_steps=setting["distill_steps"],
        device=str(device), optimize=True, fp16=ort_cuda,
        distill_options={"batch_size": 2, "trajectories": 2, "trajectory_steps": 4, "gradient_checkpointing": True},
        overwrite=True, progress=progress))
    report["build"] = {k: built[k] for k in ("summary", "params", "macs_per_sample", "timings_s")}
    report["build"]["onnx_validation"] = built["export"]["export"]["validation"]["max_abs_diff"]

    loaded = api.load(setting["model"])
    timing_dtype = devices.torch_dtype(setting["timing_dtype"])
    dense = loaded.placed(device, timing_dtype)
    student = load_student(build_dir / "distill" / "student")
    student.gm.to(device=device, dtype=timing_dtype)
    names = student.traced.input_names

    # the dense model through the same exporter and optimizer, for onnxruntime's side of the comparison
    dense_onnx = out / "dense" / "unet.onnx"
    graph = phase("dense trace", lambda: api.inspect(loaded, height=size, width=size))
    phase("dense export", lambda: export_onnx(graph.traced, dense_onnx, overwrite=True))
    suffix = setting["onnx"]
    dense_variant = out / "dense" / f"unet.{suffix}.onnx"
    dense_result = phase("dense optimize", lambda: optimize_onnx(dense_onnx, dense_variant, use_gpu=ort_cuda,
                                                                 fp16=ort_cuda, overwrite=True))
    # onnxruntime's fusions, dense vs pruned: a fused operator the pruned model has fewer of than its sites is a loss
    exported = stages.EXPORT_SUMMARY.read(build_dir / stages.ONNX_DIR / stages.EXPORT_SUMMARY.name)
    variant = "fp16" if setting["onnx"] == "fp16" else "optimized"
    report["fusions"] = {"dense": fusion_table(dense_result, fusion_sites(graph.traced.gm))["kinds"],
                         "pruned": exported["fusions"][variant]["kinds"],
                         "warnings": exported["fusions"][variant]["warnings"]}
    pruned_variant = build_dir / "onnx" / f"unet.{suffix}.onnx"
    sessions = {"dense": create_session(dense_variant), "pruned": create_session(pruned_variant)}

    report["latency"] = {"torch": {}, "onnxruntime": {}}
    for batch in (1, 2):
        inputs = unet_example_inputs(dense, batch=batch, height=size, width=size)
        flat = [inputs[n] for n in names]
        torch_variants = {"dense": partial(call_diffusers_unet, dense, inputs), "pruned": partial(student.gm, *flat)}
        with torch.inference_mode():
            report["latency"]["torch"][f"batch_{batch}"] = phase(
                f"torch b{batch}", partial(_time, torch_variants, device, repeats))
        # the ONNX models keep float32 inputs and a float32 timestep (fp16 inside): feed what they declare
        declared = sessions["dense"].input_dtypes
        feeds = {n: inputs[n].to(torch.from_numpy(np.empty(0, dtype=declared[n])).dtype) for n in names}
        shapes = {sessions["dense"].output_names[0]: tuple(inputs["sample"].shape)}
        ort_variants = {k: partial(s.run_torch, feeds, shapes) for k, s in sessions.items()}
        report["latency"]["onnxruntime"][f"batch_{batch}"] = phase(
            f"onnxruntime b{batch}", partial(_time, ort_variants, device, repeats))
    report["onnxruntime_provider"] = sessions["dense"].provider
    return report


def markdown(report: dict[str, Any]) -> str:
    peak = "cuda_peak_allocated_mib" if report["gpu"] else "host_peak_rss_mib"
    lines = [f"# GPU check on {report['accelerator']}" + ("" if report["gpu"] else " (no GPU: the CPU fallback)"), "",
             report["build"]["summary"], "",
             f"Setting: {report['setting']}; onnxruntime provider {report.get('onnxruntime_provider')}; ONNX "
             f"validation max abs diff {report['build']['onnx_validation']:.2e}.", "",
             "| runtime | batch | dense ms | pruned ms | pruned / dense |", "|---|---:|---:|---:|---:|"]
    for runtime, rows in report["latency"].items():
        for batch, lat in rows.items():
            lines.append(f"| {runtime} | {batch.removeprefix('batch_')} | {lat['dense']['median_ms']:.2f} | "
                         f"{lat['pruned']['median_ms']:.2f} | {lat['ratio']:.3f} |")
    lines += ["", "| fusion | dense fused / sites | pruned fused / sites |", "|---|---:|---:|"]
    for kind, dense in report["fusions"]["dense"].items():
        pruned = report["fusions"]["pruned"][kind]
        on = "" if dense["enabled"] else " (off)"
        lines.append(f"| {kind}{on} | {dense['fused']} / {dense['sites']} | {pruned['fused']} / {pruned['sites']} |")
    lines += [f"\nwarning: {w}" for w in report["fusions"]["warnings"]]
    lines += ["", f"| phase | seconds | peak MiB ({'GPU allocated' if report['gpu'] else 'host RSS'}) |",
              "|---|---:|---:|"]
    lines += [f"| {name} | {p['seconds']} | {p.get(peak, float('nan')):,.0f} |" for name, p in report["phases"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--repeats", type=int, default=10, help="timed calls per variant and batch")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    report = check(args.out, repeats=args.repeats, progress=not args.no_progress)
    text = markdown(report)
    write_json_atomic(args.out / "report.json", report)
    write_text_atomic(args.out / "report.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
