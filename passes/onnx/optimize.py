"""onnxruntime transformer-optimizer fusions for an exported UNet, and an fp16 variant.

Rewrites subgraphs into fused onnxruntime operators (attention → Attention / MultiHeadAttention, LayerNorm,
residual + LayerNorm → SkipLayerNormalization, ...). NhwcConv, GroupNorm, SkipGroupNorm, BiasSplitGelu and
BiasAdd have CUDA kernels only, so on CPU they stay off. The optimized model is checked against the input
model in onnxruntime on the same seeded inputs; a variant that cannot run where it is checked is reported as
not validated, with the reason.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ldpruner.base.errors import ArtifactError, ExportError, ExportValidationError
from ldpruner.runtime.session import OrtSession, create_session
from ldpruner.runtime.unet import EXPORT_METADATA_KEY

from ..config import PROTOBUF_LIMIT
from .files import check_destination, publish_model, staging_dir
from .numeric_check import (
    DEFAULT_TOLERANCES,
    InputSpec,
    NumericCheck,
    Tolerance,
    ValidationReport,
    compare_outputs,
    make_inputs,
    run_failure,
)

__all__ = ["ATTENTION_FUSIONS", "CUDA_ONLY_FUSIONS", "FP32_OPS", "FUSION_SITES", "OptimizeResult", "fusion_options",
           "fusion_sites", "fusion_table", "optimize_onnx"]

logger = logging.getLogger("ldpruner.passes.onnx.optimize")

# FusionOptions("unet") flags whose fused operators exist only as CUDA kernels in onnxruntime.
CUDA_ONLY_FUSIONS = (
    "enable_nhwc_conv",
    "enable_group_norm",
    "enable_skip_group_norm",
    "enable_bias_splitgelu",
    "enable_bias_add",
)
# Packed QKV / KV attention has fp16 kernels only (onnxruntime's own SD optimizer turns them off for fp32).
_PACKED_ATTENTION = ("enable_packed_qkv", "enable_packed_kv")
# Operators the fp16 variant keeps in float32: layer norms reduce over wide rows whose sums overflow float16's range
# (onnxruntime's Stable Diffusion engine builder forces the same ones for its CUDA models).
FP32_OPS = ("LayerNormalization", "SkipLayerNormalization")
# fused operators that are an attention block
ATTENTION_FUSIONS = ("Attention", "MultiHeadAttention", "PackedAttention", "PackedMultiHeadAttention")



@dataclasses.dataclass(frozen=True)
class FusionSite:
    """A torch module kind whose exported pattern one onnxruntime fusion replaces by one fused operator."""

    modules: tuple[str, ...]  # torch module class names (one site each)
    operators: tuple[str, ...]  # the fused operator types that count as that site fused
    options: tuple[str, ...]  # FusionOptions flags that turn the fusion on (any of them)
    parents: tuple[str, ...] = ()  # the site's parent module must be one of these (empty: any)
    not_parents: tuple[str, ...] = ()  # ... and none of these


# the fusions a diffusers UNet can get, by the module kind they fuse (get_fused_operator_statistics names). The
# UNet attention fusion matches attention that starts from a LayerNorm: a transformer block's, not the
# GroupNorm-led attention of UNet2DModel, whose own GroupNorm does not fuse either.
FUSION_SITES: dict[str, FusionSite] = {
    "attention": FusionSite(("Attention",), ATTENTION_FUSIONS, ("enable_attention",),
                            parents=("BasicTransformerBlock",)),
    "layer_norm": FusionSite(("LayerNorm",), ("LayerNormalization", "SkipLayerNormalization"),
                             ("enable_layer_norm", "enable_skip_layer_norm")),
    "group_norm": FusionSite(("GroupNorm",), ("GroupNorm", "SkipGroupNorm"),
                             ("enable_group_norm", "enable_skip_group_norm"), not_parents=("Attention",)),
    "bias_split_gelu": FusionSite(("GEGLU",), ("BiasSplitGelu",), ("enable_bias_splitgelu",)),
}


def fusion_sites(module: Any) -> dict[str, int]:
    """How many sites of each FUSION_SITES kind ``module`` (a UNet, a traced or pruned graph) holds."""
    modules = dict(module.named_modules())
    counts = dict.fromkeys(FUSION_SITES, 0)
    for name, m in modules.items():
        parent = type(modules.get(name.rpartition(".")[0], module)).__name__
        for kind, site in FUSION_SITES.items():
            counts[kind] += (type(m).__name__ in site.modules and (not site.parents or parent in site.parents)
                             and parent not in site.not_parents)
    return counts


def fusion_table(result: OptimizeResult, pruned_sites: Mapping[str, int],
                 dense_sites: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Per fusion kind: the sites in the dense and the pruned UNet, how many the optimizer fused, and a warning
    for each enabled kind with sites left unfused. A removal can break the pattern a fusion matches around its
    neighbour, and some fusions only match at some shapes: either way the unfused sites run as separate nodes, so
    the table says so instead of a silent slowdown."""
    kinds: dict[str, Any] = {}
    warnings: list[str] = []
    for kind, site in FUSION_SITES.items():
        enabled = any(result.fusion_options.get(flag, False) for flag in site.options)
        fused = sum(int(result.fused_operators.get(op, 0)) for op in site.operators)
        sites = int(pruned_sites.get(kind, 0))
        kinds[kind] = {"enabled": enabled, "dense_sites": None if dense_sites is None else int(dense_sites[kind]),
                       "sites": sites, "fused": fused}
        if enabled and fused < sites:
            warnings.append(f"{result.onnx_path.name}: {sites - fused} of {sites} {kind} sites were not fused by "
                            "onnxruntime's optimizer (a removal next to them can break the pattern it matches, or it "
                            "does not match at these shapes): they run as separate nodes")
    for message in warnings:
        logger.warning(message)
    return {"kinds": kinds, "warnings": warnings}


@dataclasses.dataclass(frozen=True)
class OptimizeResult:
    onnx_path: Path
    data_path: Path | None
    precision: str  # "fp32" | "fp16"
    use_gpu: bool
    fusion_options: Mapping[str, bool]
    fused_operators: Mapping[str, int]  # get_fused_operator_statistics(), zeros included
    fp32_ops: tuple[str, ...]  # operator types the fp16 variant keeps in float32 (empty for fp32)
    nodes_before: int
    nodes_after: int
    optimize_seconds: float
    validation: ValidationReport

    def to_dict(self) -> dict[str, Any]:
        return {
            "onnx_path": str(self.onnx_path),
            "data_path": str(self.data_path) if self.data_path else None,
            "precision": self.precision,
            "use_gpu": self.use_gpu,
            "fusion_options": dict(self.fusion_options),
            "fused_operators": dict(self.fused_operators),
            "fp32_ops": list(self.fp32_ops),
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "optimize_seconds": self.optimize_seconds,
            "validation": self.validation.to_dict(),
        }


def fusion_options(*, use_gpu: bool, fp16: bool) -> Any:
    """FusionOptions("unet") with the CUDA-only fusions off on CPU and packed attention only for fp16 on GPU."""
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions("unet")
    if not use_gpu:
        for flag in CUDA_ONLY_FUSIONS:
            setattr(options, flag, False)
    if not (use_gpu and fp16):
        for flag in _PACKED_ATTENTION:
            setattr(options, flag, False)
    return options


def optimize_onnx(
    in_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    use_gpu: bool = False,
    fp16: bool = False,
    validate: bool = True,
    tolerance: Tolerance | None = None,
    validation_inputs: Sequence[Mapping[str, np.ndarray]] | None = None,
    seed: int = 0,
    fp32_ops: Sequence[str] = FP32_OPS,
    overwrite: bool = False,
) -> OptimizeResult:
    """Fuse ``in_path`` with onnxruntime's transformer optimizer (``model_type="unet"``) into ``out_path``.

    ``use_gpu``: the target is CUDA (all fusions on; the result only runs on CUDA). ``fp16``: convert to
    float16 after fusing, keeping float32 inputs/outputs and the operators in ``fp32_ops`` (numerically fragile
    reductions) in float32; the check compares it with the float32 model at the float16 tolerance.
    ``validate``: run ``in_path`` (reference) and the result on the same inputs — ``validation_inputs`` or, for
    models exported by ldpruner, seeded inputs at batch 1 and 2 (and a second latent size when it is dynamic) — and
    compare with ``tolerance`` (default: the fp32 or fp16 entry of DEFAULT_TOLERANCES). The check runs on CUDA
    when the target is CUDA and onnxruntime has it; otherwise on CPU. When the result cannot run there (CUDA-only
    fusions without CUDA; fp16 kernels missing on CPU) the result says ``validated: False`` with the reason instead
    of raising. A mismatch on a model that did run raises ExportValidationError listing every failing check. Files
    appear all or nothing.
    """
    in_path, out_path = Path(in_path), Path(out_path)
    if not in_path.is_file():
        raise ArtifactError(f"in_path {str(in_path)!r} does not exist")
    check_destination(out_path, overwrite=overwrite)
    if out_path.resolve() == in_path.resolve():
        raise ArtifactError(f"out_path must differ from in_path ({in_path}); the input is the validation reference")
    precision = "fp16" if fp16 else "fp32"
    tolerance = tolerance if tolerance is not None else DEFAULT_TOLERANCES["float16" if fp16 else "float32"]

    from onnxruntime.transformers.optimizer import optimize_model

    options = fusion_options(use_gpu=use_gpu, fp16=fp16)
    source = onnx.load(str(in_path), load_external_data=False)
    nodes_before = len(source.graph.node)
    metadata = {p.key: p.value for p in source.metadata_props}
    external = any(
        t.data_location == onnx.TensorProto.EXTERNAL for t in source.graph.initializer
    ) or source.ByteSize() >= PROTOBUF_LIMIT
    del source

    started = time.perf_counter()
    try:
        with warnings.catch_warnings():
            # fusion_attention_unet does int(ndarray); numpy 2.3 warns, >= 2.4 raises (hence numpy<2.4 in pyproject)
            warnings.filterwarnings("ignore", "Conversion of an array with ndim > 0", DeprecationWarning)
            optimizer = optimize_model(
                str(in_path), model_type="unet", optimization_options=options, opt_level=0, use_gpu=use_gpu
            )
        fused = dict(optimizer.get_fused_operator_statistics())
        if fp16:
            from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST

            optimizer.convert_float_to_float16(keep_io_types=True,
                                               op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(fp32_ops))
    except Exception as exc:
        raise ExportError(
            f"onnxruntime transformer optimizer failed on {in_path.name}: {type(exc).__name__}: {exc}"
        ) from exc
    seconds = time.perf_counter() - started
    model = optimizer.model
    _keep_metadata(model, metadata)

    with staging_dir(out_path) as stage:
        staged = stage / out_path.name
        optimizer.save_model_to_file(str(staged), use_external_data_format=external, all_tensors_to_one_file=True)
        nodes_after = len(model.graph.node)
        if validate:
            report = _validate(in_path, staged, use_gpu=use_gpu, precision=precision, tolerance=tolerance,
                               metadata=metadata, validation_inputs=validation_inputs, seed=seed)
        else:
            report = ValidationReport.not_run("validation disabled (validate=False)", reference=in_path.name,
                                              candidate=out_path.name, dtype="float16" if fp16 else "float32")
        if report.validated and not report.passed:
            error = ExportValidationError(report.failure_message())
            error.report = report  # type: ignore[attr-defined]
            raise error
        published_data = publish_model(staged, out_path)
    if not report.validated:
        logger.warning("%s was not validated: %s", out_path.name, report.reason)
    return OptimizeResult(
        onnx_path=out_path,
        data_path=published_data,
        precision=precision,
        use_gpu=use_gpu,
        fusion_options={k: bool(v) for k, v in vars(options).items() if k.startswith("enable_")},
        fused_operators=fused,
        fp32_ops=tuple(fp32_ops) if fp16 else (),
        nodes_before=nodes_before,
        nodes_after=nodes_after,
        optimize_seconds=seconds,
        validation=report,
    )


def _keep_metadata(model: onnx.ModelProto, metadata: Mapping[str, str]) -> None:
    present = {p.key for p in model.metadata_props}
    for key, value in metadata.items():
        if key not in present:
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value


def _validation_feeds(
    reference: OrtSession,
    metadata: Mapping[str, str],
    validation_inputs: Sequence[Mapping[str, np.ndarray]] | None,
    seed: int,
) -> list[dict[str, np.ndarray]]:
    if validation_inputs is not None:
        if not validation_inputs:
            raise ExportError("validation_inputs is empty; pass at least one {input name: array} mapping or None")
        return [dict(feeds) for feeds in validation_inputs]
    if EXPORT_METADATA_KEY not in metadata:
        raise ExportError(
            f"{reference.path.name} was not exported by ldpruner (no {EXPORT_METADATA_KEY!r} metadata), so its valid "
            "input sizes are unknown: pass validation_inputs=[{name: array}, ...] or validate=False"
        )
    info = json.loads(metadata[EXPORT_METADATA_KEY])
    shapes, spatial_input = info["input_shapes"], info["spatial_input"]
    specs = [InputSpec(n, tuple(shapes[n]), reference.input_dtypes[n]) for n in reference.input_names]
    size = tuple(shapes[spatial_input][-2:])
    plans = [(1, size), (2, size)]
    if info.get("dynamic_spatial") and info.get("spatial_multiple"):
        m = int(info["spatial_multiple"])
        plans.append((2, (size[0] + m, size[1] + 2 * m)))
    return [make_inputs(specs, batch=b, spatial=s, seed=seed + i, spatial_input=spatial_input)
            for i, (b, s) in enumerate(plans)]


def _validate(
    reference_path: Path,
    candidate_path: Path,
    *,
    use_gpu: bool,
    precision: str,
    tolerance: Tolerance,
    metadata: Mapping[str, str],
    validation_inputs: Sequence[Mapping[str, np.ndarray]] | None,
    seed: int,
) -> ValidationReport:
    import onnxruntime as ort

    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    provider = "CUDAExecutionProvider" if use_gpu and has_cuda else "CPUExecutionProvider"
    dtype = "float16" if precision == "fp16" else "float32"
    names = dict(reference=f"onnxruntime({reference_path.name})", candidate=f"onnxruntime(optimized {precision})")

    def not_run(reason: str) -> ValidationReport:
        return ValidationReport.not_run(reason, dtype=dtype, **names)

    if use_gpu and not has_cuda:
        return not_run(
            "the GPU variant uses CUDA-only fused operators (NhwcConv, GroupNorm, ...) and this onnxruntime build "
            f"has no CUDAExecutionProvider (available: {ort.get_available_providers()})"
        )
    reference = create_session(reference_path, providers=["CPUExecutionProvider"])
    feeds_list = _validation_feeds(reference, metadata, validation_inputs, seed)
    try:
        candidate = create_session(candidate_path, providers=[provider], exact_fp32=precision == "fp32")
    except Exception as exc:
        return not_run(f"onnxruntime cannot load the {precision} model on {provider}: {type(exc).__name__}: {exc}")
    # Only the fp16 variant on CPU may legitimately be unrunnable (missing fp16 kernels); anything else is a bug.
    may_be_unsupported = precision == "fp16" and provider == "CPUExecutionProvider"
    checks: list[NumericCheck] = []
    for feeds in feeds_list:
        shapes = {n: np.asarray(a).shape for n, a in feeds.items()}
        label = " ".join(f"{n}={list(s)}" for n, s in shapes.items() if n in ("sample",)) or f"set {len(checks)}"
        ref = reference.run(feeds)[0]
        try:
            out = candidate.run(feeds)[0]
        except Exception as exc:
            if may_be_unsupported:
                return not_run(f"onnxruntime on {provider} cannot run the fp16 model: {type(exc).__name__}: {exc}")
            checks.append(run_failure(label, shapes, "optimized model", exc))
            continue
        checks.append(compare_outputs(label, shapes, ref, out, tolerance))
    return ValidationReport(
        validated=True, provider=candidate.provider, dtype=dtype, tolerance=tolerance, checks=tuple(checks), **names
    )

