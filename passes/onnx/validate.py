"""Prove onnxruntime computes what torch computes: run an exported model and its torch reference on seeded inputs.

For every input set S (each validation batch at the traced size, plus a second latent size when it is dynamic and
a second text length when the token axis is), ``max|ORT(S) - torch(S)| <= atol + rtol * max|torch(S)|``; every
failing set is listed. Also what a reference is (a ``TracedUNet``, or a module with its input names and example
inputs), which :func:`~ldpruner.passes.onnx.export.export_onnx` takes too.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ldpruner.base.errors import ConfigError, ExportError, ExportValidationError
from ldpruner.base.unet_inputs import DOWN_RESIDUAL, INTRA_RESIDUAL, MID_RESIDUAL, TEXT_AXIS, TEXT_INPUT
from ldpruner.compiler.tracer import TracedUNet
from ldpruner.runtime.session import create_session

from ..config import ExportConfig
from .numeric_check import (
    InputSpec,
    NumericCheck,
    ValidationReport,
    compare_outputs,
    make_inputs,
    run_failure,
)

__all__ = ["ValidationReport", "validate_onnx"]

_TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def validate_onnx(
    onnx_path: str | os.PathLike[str],
    reference: Any,
    input_names: Sequence[str] | None,
    example_inputs: Mapping[str, torch.Tensor] | None,
    *,
    config: ExportConfig | None = None,
    spatial_multiple: int | None = None,
    dynamic_spatial: bool | None = None,
    raise_on_failure: bool = True,
) -> ValidationReport:
    """Compare onnxruntime on ``onnx_path`` with the torch ``reference`` (a TracedUNet or a module called
    positionally) on seeded inputs: each of ``config.validation_batch_sizes`` at the example's latent size and,
    when spatial is dynamic, the largest batch at a second size. Every check runs; with ``raise_on_failure``
    an ExportValidationError lists every failing one (its ``.report`` holds all numbers)."""
    config = config if config is not None else ExportConfig()
    module, names, examples, multiple = _unpack(reference, input_names, example_inputs, spatial_multiple)
    if dynamic_spatial is None:
        dynamic_spatial = _resolve_dynamic_spatial(config, multiple)
    dtype_name = _compute_dtype(examples, names)
    tolerance = config.tolerances[dtype_name]
    session = create_session(onnx_path, providers=config.validation_providers, exact_fp32=True)
    missing = [n for n in names if n not in session.input_names]
    extra = [n for n in session.input_names if n not in names]
    if missing or extra:
        raise ExportValidationError(
            f"{Path(onnx_path).name} takes inputs {list(session.input_names)} but the reference takes {list(names)} "
            f"(missing in ONNX: {missing}, unknown to the reference: {extra})"
        )
    specs = [InputSpec(n, tuple(examples[n].shape), session.input_dtypes[n]) for n in names]
    traced_size = tuple(examples[names[0]].shape[-2:])
    largest = max(config.validation_batch_sizes)
    # (batch, latent size, text length): every batch at the traced shapes, then each dynamic axis moved on its own
    plans: list[tuple[int, tuple[int, int], int | None]] = [(b, traced_size, None)
                                                            for b in config.validation_batch_sizes]
    if dynamic_spatial:
        second = config.validation_spatial_size or (traced_size[0] + multiple, traced_size[1] + 2 * multiple)
        plans.append((largest, tuple(second), None))
    if TEXT_INPUT in names and TEXT_AXIS in session.input_shapes.get(TEXT_INPUT, ())[1:2]:
        plans.append((largest, traced_size, _other_text_length(config, int(examples[TEXT_INPUT].shape[1]))))

    # All torch runs first, then all onnxruntime runs: ORT's spinning thread pool would otherwise compete
    # with torch's OpenMP threads between alternating calls (measured 5x slower on 2 cores).
    cases = []
    with _eval_mode(module), torch.no_grad():
        for index, (batch, size, text) in enumerate(plans):
            feeds = make_inputs(specs, batch=batch, spatial=size, seed=config.validation_seed + index,
                                spatial_input=names[0], scaled=_spatial_ratios(names, examples), text_length=text)
            label = f"batch={batch} latent={size[0]}x{size[1]}"
            if TEXT_INPUT in feeds:
                label += f" tokens={feeds[TEXT_INPUT].shape[1]}"
            try:
                ref: np.ndarray | BaseException = _call_reference(module, names, examples, feeds)
            except Exception as exc:  # a reference that cannot run at this size is itself a finding
                ref = exc
            cases.append((label, feeds, ref))
    checks: list[NumericCheck] = []
    for label, feeds, ref in cases:
        shapes = {n: a.shape for n, a in feeds.items()}
        if isinstance(ref, BaseException):
            checks.append(run_failure(label, shapes, "torch reference", ref))
            continue
        try:
            out = session.run(feeds)[0]
        except Exception as exc:
            checks.append(run_failure(label, shapes, "onnxruntime", exc))
            continue
        checks.append(compare_outputs(label, shapes, ref, out, tolerance))
    report = ValidationReport(
        validated=True, reference="torch", candidate=f"onnxruntime({Path(onnx_path).name})",
        provider=session.provider, dtype=dtype_name, tolerance=tolerance, checks=tuple(checks),
    )
    if raise_on_failure and not report.passed:
        error = ExportValidationError(report.failure_message())
        error.report = report  # type: ignore[attr-defined]
        raise error
    return report


# --- the reference: what export and validation take ----------------------------------------------------

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _unpack(
    traced_or_gm: Any,
    input_names: Sequence[str] | None,
    example_inputs: Mapping[str, torch.Tensor] | None,
    spatial_multiple: int | None,
) -> tuple[torch.nn.Module, tuple[str, ...], dict[str, torch.Tensor], int | None]:
    if isinstance(traced_or_gm, TracedUNet):
        gm = traced_or_gm.gm
        names = tuple(input_names) if input_names is not None else tuple(traced_or_gm.input_names)
        examples = dict(example_inputs) if example_inputs is not None else dict(traced_or_gm.example_inputs)
        multiple = spatial_multiple if spatial_multiple is not None else traced_or_gm.spatial_multiple
        module = gm
    elif isinstance(traced_or_gm, torch.nn.Module):
        if input_names is None or example_inputs is None:
            raise ExportError(
                f"exporting a bare {type(traced_or_gm).__name__} needs input_names and example_inputs "
                "(a TracedUNet carries both)"
            )
        module, names, examples, multiple = traced_or_gm, tuple(input_names), dict(example_inputs), spatial_multiple
    else:
        raise ExportError(f"traced_or_gm must be a TracedUNet or a torch.nn.Module, got {type(traced_or_gm).__name__}")
    problems = []
    if not names:
        problems.append("input_names is empty")
    missing = [n for n in names if n not in examples]
    if missing:
        problems.append(f"example_inputs lacks {missing} (input_names: {list(names)})")
    not_tensors = [n for n in names if n in examples and not isinstance(examples[n], torch.Tensor)]
    if not_tensors:
        problems.append(f"example_inputs {not_tensors} are not tensors")
    if not problems and examples[names[0]].dim() != 4:
        shape = list(examples[names[0]].shape)
        problems.append(f"the first input {names[0]!r} must be the NCHW latent, got shape {shape}")
    if not problems:
        batch = examples[names[0]].shape[0]
        bad = [n for n in names if examples[n].dim() == 0 or examples[n].shape[0] != batch]
        if bad:
            problems.append(f"inputs {bad} do not have the sample's batch size {batch} as their first dimension")
        if _compute_dtype(examples, names, strict=False) == "bfloat16":
            problems.append(
                "bfloat16 graphs cannot be validated in onnxruntime; export float32 (gm.float()) or float16"
            )
    if spatial_multiple is not None and (not _is_int(spatial_multiple) or spatial_multiple < 1):
        problems.append(f"spatial_multiple must be None or an int >= 1, got {spatial_multiple!r}")
    if problems:
        raise ExportError("export inputs: " + "; ".join(problems))
    return module, names, examples, multiple


def _compute_dtype(examples: Mapping[str, torch.Tensor], names: Sequence[str], strict: bool = True) -> str:
    dtype = examples[names[0]].dtype
    if dtype not in _TORCH_DTYPE_NAMES:
        if not strict:
            return str(dtype)
        raise ExportError(f"the sample input has dtype {dtype}; supported: {list(_TORCH_DTYPE_NAMES.values())}")
    return _TORCH_DTYPE_NAMES[dtype]


def _resolve_dynamic_spatial(config: ExportConfig, multiple: int | None) -> bool:
    if config.dynamic_spatial is None:
        return multiple is not None
    if config.dynamic_spatial and multiple is None:
        raise ConfigError(
            "ExportConfig.dynamic_spatial=True but the trace is valid only for its traced latent size "
            "(spatial_multiple is None); pass spatial_multiple= when you know the graph handles other sizes, "
            "or use dynamic_spatial=None"
        )
    return config.dynamic_spatial


def _other_text_length(config: ExportConfig, traced: int) -> int:
    """The text length of the validation's token-axis check: ``validation_text_length``, else CLIP's 77 when the
    trace has another length (a zoo encoder's 16 checks SD's length), else half of it."""
    if config.validation_text_length is not None:
        return config.validation_text_length
    return 77 if traced != 77 else (traced + 1) // 2


def _spatial_ratios(names: Sequence[str], examples: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """How the spatial size of each image-like input follows the latent's (hint: 8, residuals: 1 to 1/2^k)."""
    latent = examples[names[0]].shape[-1]
    return {n: examples[n].shape[-1] / latent for n in names[1:]
            if n == "hint" or n.startswith((DOWN_RESIDUAL, INTRA_RESIDUAL)) or n == MID_RESIDUAL}


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Export and validate in eval mode without leaving the caller's module changed."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


def _call_reference(
    module: torch.nn.Module,
    names: Sequence[str],
    examples: Mapping[str, torch.Tensor],
    feeds: Mapping[str, np.ndarray],
) -> np.ndarray:
    tensors = []
    for name in names:
        example = examples[name]
        value = torch.from_numpy(np.ascontiguousarray(feeds[name]))
        # the timestep keeps the exported dtype (the graph casts it itself); everything else the model's dtype
        dtype = value.dtype if name == "timestep" else example.dtype
        tensors.append(value.to(device=example.device, dtype=dtype))
    out = module(*tensors)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise ExportError(f"the reference returned {type(out).__name__}, expected a tensor")
    return out.detach().float().cpu().numpy()
