"""Export a traced (possibly pruned) UNet graph to ONNX, validated against torch (:mod:`.validate`) before it is
published.

``unet.onnx`` (+ ``unet.onnx.data`` for models over ~2 GB) with a dynamic batch, dynamic latent height/width
when the trace is valid for them, a float32 ``timestep`` of shape (batch,), and one output ``out_sample``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnx
import torch

from ldpruner.base.errors import ConfigError, ExportError
from ldpruner.base.unet_inputs import DOWN_RESIDUAL, INTRA_RESIDUAL, MID_RESIDUAL, TEXT_AXIS, TEXT_INPUT
from ldpruner.runtime.unet import CONFIG_FILENAME, EXPORT_METADATA_KEY

from ..config import PROTOBUF_LIMIT, ExportConfig, Tolerance
from .files import check_destination, publish_model, staging_dir
from .numeric_check import ValidationReport
from .validate import _compute_dtype, _eval_mode, _resolve_dynamic_spatial, _unpack, validate_onnx

__all__ = ["ExportConfig", "ExportResult", "export_onnx", "Tolerance", "ValidationReport"]

EXPORT_FORMAT = "ldpruner.onnx/1"
_TIMESTEP_DTYPES = {"float32": torch.float32, "int64": torch.int64}


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """What was written, how, and the validation numbers."""

    onnx_path: Path
    data_path: Path | None
    config_path: Path | None
    exporter: str
    opset: int
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    input_dtypes: Mapping[str, str]
    dynamic_axes: Mapping[str, Mapping[int, str]]  # read back from the written file
    dynamic_spatial: bool
    spatial_multiple: int | None
    external_data: bool
    weight_bytes: int
    export_seconds: float  # torch.onnx.export alone
    total_seconds: float  # export + layout + checker + validation
    validation: ValidationReport
    export_warnings: tuple[str, ...] = ()

    @property
    def paths(self) -> tuple[Path, ...]:
        return tuple(p for p in (self.onnx_path, self.data_path, self.config_path) if p is not None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": EXPORT_FORMAT,
            "onnx_path": str(self.onnx_path),
            "data_path": str(self.data_path) if self.data_path else None,
            "config_path": str(self.config_path) if self.config_path else None,
            "exporter": self.exporter,
            "opset": self.opset,
            "input_names": list(self.input_names),
            "output_names": list(self.output_names),
            "input_dtypes": dict(self.input_dtypes),
            "dynamic_axes": {k: {str(a): s for a, s in v.items()} for k, v in self.dynamic_axes.items()},
            "dynamic_spatial": self.dynamic_spatial,
            "spatial_multiple": self.spatial_multiple,
            "external_data": self.external_data,
            "weight_bytes": self.weight_bytes,
            "export_seconds": self.export_seconds,
            "total_seconds": self.total_seconds,
            "validation": self.validation.to_dict(),
            "export_warnings": list(self.export_warnings),
        }


def export_onnx(
    traced_or_gm: Any,
    out_path: str | os.PathLike[str],
    *,
    input_names: Sequence[str] | None = None,
    example_inputs: Mapping[str, torch.Tensor] | None = None,
    config: ExportConfig | None = None,
    spatial_multiple: int | None = None,
    unet_config: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Export ``traced_or_gm`` to ``out_path`` and validate it with onnxruntime.

    ``traced_or_gm``: a ``TracedUNet`` (then ``input_names`` / ``example_inputs`` / ``spatial_multiple`` may be
    None and are taken from it) or any ``torch.nn.Module`` / fx ``GraphModule`` called positionally with the
    inputs in ``input_names`` order and returning one tensor. The first input is the latent sample (NCHW).
    ``unet_config``: the original UNet's config; when given, ``config.json`` is written beside the model so
    ``ORTUNet.from_pretrained`` can load the folder. Files appear only when export, checker and validation all
    succeeded (staged in a temporary folder beside ``out_path``, then moved); on failure nothing is left.
    Raises ExportError (exporter or checker failed), ExportValidationError (numbers disagree; ``.report`` holds
    the ValidationReport), ArtifactError (``out_path`` exists and ``overwrite`` is False).
    """
    started = time.perf_counter()
    config = config if config is not None else ExportConfig()
    if not isinstance(config, ExportConfig):
        raise ConfigError(f"config must be an ExportConfig, got {type(config).__name__}")
    module, names, examples, multiple = _unpack(traced_or_gm, input_names, example_inputs, spatial_multiple)
    out_path = Path(out_path)
    check_destination(out_path, overwrite=overwrite)

    dynamic_spatial = _resolve_dynamic_spatial(config, multiple)
    weight_bytes = _weight_bytes(module)
    external = config.external_data == "always" or (
        config.external_data == "auto" and weight_bytes > config.external_data_threshold_bytes
    )
    if config.external_data == "never" and weight_bytes >= PROTOBUF_LIMIT:
        raise ExportError(
            f"external_data='never' but the weights take {weight_bytes / 2**30:.2f} GiB, over the 2 GiB protobuf "
            "limit of a single .onnx file; use external_data='auto'"
        )
    config_text = _config_json(unet_config) if unet_config is not None else None  # fail before exporting
    export_examples = _with_timestep_dtype(examples, config)
    axes = _dynamic_axes(names, config.output_name, dynamic_spatial)
    metadata = {
        "format": EXPORT_FORMAT,
        "input_names": list(names),
        "input_shapes": {n: list(export_examples[n].shape) for n in names},
        "spatial_input": names[0],
        "spatial_multiple": multiple,
        "dynamic_spatial": dynamic_spatial,
        "dynamic_text_length": TEXT_INPUT in names,
        "exporter": config.exporter,
    }

    with staging_dir(out_path) as stage:
        raw = stage / "raw"
        raw.mkdir()
        export_seconds, export_warnings = _run_exporter(
            module, names, export_examples, raw / out_path.name, config, axes, external
        )
        final_dir = stage / "final"
        final_dir.mkdir()
        staged = final_dir / out_path.name
        _write_layout(raw / out_path.name, staged, external=external, metadata=metadata,
                      interface=_interface(names, export_examples, axes))
        try:
            onnx.checker.check_model(str(staged), full_check=True)
        except Exception as exc:
            raise ExportError(f"onnx.checker rejected the exported model: {type(exc).__name__}: {exc}") from exc

        if config.validate:
            report = validate_onnx(
                staged, module, names, examples, config=config, spatial_multiple=multiple,
                dynamic_spatial=dynamic_spatial, raise_on_failure=True,
            )
        else:
            report = ValidationReport.not_run(
                "validation disabled (ExportConfig.validate=False)", reference="torch", candidate="onnxruntime",
                dtype=_compute_dtype(examples, names),
            )
        extra: tuple[str, ...] = ()
        if config_text is not None:
            (final_dir / CONFIG_FILENAME).write_text(config_text)
            extra = (CONFIG_FILENAME,)
        data_path = publish_model(staged, out_path, extra_files=extra)
    model = onnx.load(str(out_path), load_external_data=False)

    return ExportResult(
        onnx_path=out_path,
        data_path=data_path,
        config_path=out_path.with_name(CONFIG_FILENAME) if unet_config is not None else None,
        exporter=config.exporter,
        opset=_default_domain_opset(model),
        input_names=tuple(i.name for i in model.graph.input),
        output_names=tuple(o.name for o in model.graph.output),
        input_dtypes={
            i.name: onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type).name for i in model.graph.input
        },
        dynamic_axes=_read_dynamic_axes(model),
        dynamic_spatial=dynamic_spatial,
        spatial_multiple=multiple,
        external_data=external,
        weight_bytes=weight_bytes,
        export_seconds=export_seconds,
        total_seconds=time.perf_counter() - started,
        validation=report,
        export_warnings=export_warnings,
    )


# --- helpers ---------------------------------------------------------------------------------------------


def _weight_bytes(module: torch.nn.Module) -> int:
    seen: dict[tuple[int, int], int] = {}
    for tensor in list(module.parameters()) + list(module.buffers()):
        seen[(tensor.data_ptr(), tensor.numel())] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def _with_timestep_dtype(examples: Mapping[str, torch.Tensor], config: ExportConfig) -> dict[str, torch.Tensor]:
    out = dict(examples)
    if "timestep" in out:
        out["timestep"] = out["timestep"].to(_TIMESTEP_DTYPES[config.timestep_dtype])
    return out


def _dynamic_axes(names: Sequence[str], output_name: str, dynamic_spatial: bool) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {name: {0: "batch"} for name in names}
    if TEXT_INPUT in axes:  # prompts come in any number of tokens (CLIP's 77, a zoo encoder's 16, long prompts)
        axes[TEXT_INPUT][1] = TEXT_AXIS
    spatial = {2: "height", 3: "width"} if dynamic_spatial else {}
    axes[names[0]].update(spatial)
    if dynamic_spatial:  # Kandinsky's control image (8x the latent), ControlNet's residuals: their own symbols
        for name in names:
            if name == "hint" or name.startswith((DOWN_RESIDUAL, INTRA_RESIDUAL)) or name == MID_RESIDUAL:
                axes[name].update({2: f"{name}_height", 3: f"{name}_width"})
    axes[output_name] = {0: "batch", **spatial}
    return axes


def _run_exporter(
    module: torch.nn.Module,
    names: Sequence[str],
    examples: Mapping[str, torch.Tensor],
    path: Path,
    config: ExportConfig,
    axes: Mapping[str, Mapping[int, str]],
    external: bool,
) -> tuple[float, tuple[str, ...]]:
    # torch.export specializes a dimension of size 1 to a constant, so a batch-1 example is doubled
    args = tuple(examples[n] if examples[n].shape[0] > 1 else torch.cat([examples[n]] * 2) for n in names)
    kwargs: dict[str, Any] = dict(
        input_names=list(names),
        output_names=[config.output_name],
        opset_version=config.resolved_opset,
        verbose=False,
    )
    if config.exporter == "dynamo":
        dims: dict[str, Any] = {}
        shapes = tuple(
            {axis: dims.setdefault(symbol, torch.export.Dim(symbol)) for axis, symbol in axes[n].items()} for n in names
        )
        kwargs.update(dynamo=True, dynamic_shapes=shapes, external_data=external, optimize=True)
    else:
        kwargs.update(dynamo=False, dynamic_axes={k: dict(v) for k, v in axes.items()}, do_constant_folding=True)
    started = time.perf_counter()
    with _eval_mode(module), torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            torch.onnx.export(module, args, str(path), **kwargs)
        except Exception as exc:
            other = "dynamo" if config.exporter == "legacy" else "legacy"
            raise ExportError(
                f"torch.onnx.export (exporter={config.exporter!r}, opset {config.resolved_opset}) failed: "
                f"{type(exc).__name__}: {exc}. Try exporter={other!r}."
            ) from exc
    seconds = time.perf_counter() - started
    if not path.is_file():
        raise ExportError(f"torch.onnx.export (exporter={config.exporter!r}) returned without writing {path.name}")
    messages: list[str] = []
    for w in caught:
        line = f"{w.category.__name__}: {str(w.message).strip().splitlines()[0] if str(w.message).strip() else ''}"
        if line not in messages:
            messages.append(line[:300])
    return seconds, tuple(messages[:20])


_ONNX_TYPES = {torch.float32: onnx.TensorProto.FLOAT, torch.float16: onnx.TensorProto.FLOAT16,
               torch.bfloat16: onnx.TensorProto.BFLOAT16, torch.float64: onnx.TensorProto.DOUBLE,
               torch.int64: onnx.TensorProto.INT64, torch.int32: onnx.TensorProto.INT32}


def _interface(names: Sequence[str], examples: Mapping[str, torch.Tensor],
               axes: Mapping[str, Mapping[int, str]]) -> list[onnx.ValueInfoProto]:
    """The graph inputs the exported model must declare, in order: every input of the traced UNet, whether or not
    the graph still reads it (a plan that removes every cross-attention leaves ``encoder_hidden_states`` unread,
    and the exporters drop unread inputs; a pipeline still passes it)."""
    out = []
    for name in names:
        example = examples[name]
        elem = _ONNX_TYPES[example.dtype]
        shape = [axes.get(name, {}).get(i, int(d)) for i, d in enumerate(example.shape)]
        out.append(onnx.helper.make_tensor_value_info(name, elem, shape))
    return out


def _restore_inputs(model: onnx.ModelProto, interface: Sequence[onnx.ValueInfoProto]) -> None:
    present = {i.name: i for i in model.graph.input}
    if all(i.name in present for i in interface):
        return
    ordered = [present.get(i.name, i) for i in interface] + [i for i in model.graph.input
                                                              if i.name not in {v.name for v in interface}]
    del model.graph.input[:]
    model.graph.input.extend(ordered)


def _write_layout(raw: Path, final: Path, *, external: bool, metadata: Mapping[str, Any],
                  interface: Sequence[onnx.ValueInfoProto] = ()) -> None:
    """Write ``final`` with the metadata and the requested weight layout: one ``<name>.data`` file or none.

    The legacy exporter scatters a >2 GB model over one file per tensor and the dynamo exporter writes
    ``<name>.data``; both are normalized here so the artifact always has the same shape."""
    raw_files = sorted(p.name for p in raw.parent.iterdir())
    data_name = final.name + ".data"
    already = raw_files == sorted([raw.name, data_name]) if external else raw_files == [raw.name]
    if already:
        model = onnx.load(str(raw), load_external_data=False)
        _set_metadata(model, metadata)
        _restore_inputs(model, interface)
        onnx.save_model(model, str(final))
        if external:
            os.replace(raw.parent / data_name, final.parent / data_name)
        return
    model = onnx.load(str(raw), load_external_data=True)
    _set_metadata(model, metadata)
    _restore_inputs(model, interface)
    if external:
        onnx.save_model(model, str(final), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
    else:
        onnx.save_model(model, str(final))


def _set_metadata(model: onnx.ModelProto, metadata: Mapping[str, Any]) -> None:
    for prop in list(model.metadata_props):
        if prop.key == EXPORT_METADATA_KEY:
            model.metadata_props.remove(prop)
    entry = model.metadata_props.add()
    entry.key = EXPORT_METADATA_KEY
    entry.value = json.dumps(metadata, sort_keys=True)


def _config_json(unet_config: Mapping[str, Any]) -> str:
    if not isinstance(unet_config, Mapping):
        raise ExportError(f"unet_config must be a mapping (e.g. unet.config), got {type(unet_config).__name__}")
    try:
        return json.dumps(dict(unet_config), indent=2, sort_keys=True)
    except TypeError as exc:
        raise ExportError(f"unet_config is not JSON-serializable: {exc}") from exc


def _default_domain_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise ExportError("the exported model declares no default-domain opset")


def _read_dynamic_axes(model: onnx.ModelProto) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {}
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        named = {i: d.dim_param for i, d in enumerate(dims) if d.dim_param}
        if named:
            axes[value.name] = named
    return axes

