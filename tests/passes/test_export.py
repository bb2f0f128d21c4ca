"""ONNX export: torch vs onnxruntime agreement, file layout, validation failures, all-or-nothing writes."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from conftest import make_tiny_sd_unet, make_tiny_unet2d
from onnx import numpy_helper

from ldpruner.base.errors import (
    ArtifactError,
    ConfigError,
    ExportError,
    ExportValidationError,
)
from ldpruner.compiler.tracer import trace_unet
from ldpruner.passes.onnx.export import ExportConfig, Tolerance, export_onnx
from ldpruner.passes.onnx.validate import validate_onnx
from ldpruner.runtime.session import create_session

FP32 = ExportConfig().tolerances["float32"]


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    model = make_tiny_sd_unet()
    traced = trace_unet(model)
    out = tmp_path_factory.mktemp("sd") / "unet.onnx"
    result = export_onnx(traced, out, unet_config=model.config)
    return model, traced, result


@pytest.fixture(scope="module")
def traced2d():
    return trace_unet(make_tiny_unet2d())


@pytest.fixture(scope="module")
def unet2d(tmp_path_factory, traced2d):
    model = make_tiny_unet2d()
    traced = traced2d
    out = tmp_path_factory.mktemp("u2d") / "unet.onnx"
    result = export_onnx(traced, out, unet_config=model.config)
    return model, traced, result


def _independent_check(traced, path, *, batch, size, seed):
    """ORT vs torch on inputs the export's own validation never saw (batch 3, own seed)."""
    gen = torch.Generator().manual_seed(seed)
    inputs = {}
    for name in traced.input_names:
        example = traced.example_inputs[name]
        if name == "sample":
            inputs[name] = torch.randn(batch, example.shape[1], *size, generator=gen)
        elif name == "timestep":
            inputs[name] = torch.tensor([17.0, 503.0, 998.0][:batch])
        else:
            inputs[name] = torch.randn(batch, *example.shape[1:], generator=gen)
    with torch.no_grad():
        ref = traced.gm(*[inputs[n] for n in traced.input_names]).numpy()
    out = create_session(path).run({n: t.numpy() for n, t in inputs.items()})[0]
    return float(np.abs(out - ref).max()), float(np.abs(ref).max())


@pytest.mark.parametrize("which", ["sd", "unet2d"])
def test_legacy_export_matches_torch(which, request):
    model, traced, result = request.getfixturevalue(which)
    report = result.validation
    assert report.validated and report.passed
    assert report.provider == "CPUExecutionProvider"
    tokens = " tokens=77" if which == "sd" else ""  # the token axis is free: checked at a second length too
    assert [c.name for c in report.checks] == [
        f"batch=1 latent=16x16{tokens}", f"batch=2 latent=16x16{tokens}", f"batch=2 latent=18x20{tokens}",
    ] + (["batch=2 latent=16x16 tokens=39"] if which == "sd" else [])
    for check in report.checks:
        assert check.max_abs_diff <= FP32.atol + FP32.rtol * check.max_abs_ref
        assert check.max_abs_diff < 2e-5  # measured ~1.3e-6: the bound is not hiding a drift
    diff, scale = _independent_check(traced, result.onnx_path, batch=3, size=(24, 20), seed=7)
    assert diff <= FP32.atol + FP32.rtol * scale

    assert result.exporter == "legacy" and result.opset == 17
    assert result.output_names == ("out_sample",)
    assert result.input_names == traced.input_names
    assert result.input_dtypes["timestep"] == "float32"
    assert result.dynamic_axes["sample"] == {0: "batch", 2: "height", 3: "width"}
    assert result.dynamic_axes["out_sample"] == {0: "batch", 2: "height", 3: "width"}
    assert all(result.dynamic_axes[n][0] == "batch" for n in traced.input_names)
    if which == "sd":
        assert result.dynamic_axes["encoder_hidden_states"] == {0: "batch", 1: "sequence_length"}
    assert result.data_path is None and not result.external_data
    assert sorted(p.name for p in result.onnx_path.parent.iterdir()) == ["config.json", "unet.onnx"]
    assert json.loads(result.config_path.read_text())["in_channels"] == model.config.in_channels
    as_json = json.loads(json.dumps(result.to_dict()))
    assert as_json["validation"]["checks"][2]["max_abs_diff"] == report.checks[2].max_abs_diff
    assert as_json["validation"]["tolerance"] == {"atol": FP32.atol, "rtol": FP32.rtol}


def test_export_leaves_the_traced_graph_usable(sd):
    _, traced, _ = sd
    assert not traced.gm.training
    with torch.no_grad():
        out = traced.gm(*[traced.example_inputs[n] for n in traced.input_names])
    assert out.shape == traced.example_inputs["sample"].shape


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_external_data_layout(exporter, tmp_path, traced2d):
    traced = traced2d
    config = ExportConfig(exporter=exporter, external_data="always", validate=False)  # checked below instead
    result = export_onnx(traced, tmp_path / "unet.onnx", config=config)
    assert result.external_data and result.data_path == tmp_path / "unet.onnx.data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet.onnx", "unet.onnx.data"]
    weights = result.weight_bytes
    assert result.data_path.stat().st_size >= 0.95 * weights
    assert result.onnx_path.stat().st_size < 0.2 * weights
    assert result.opset == (17 if exporter == "legacy" else 18)
    # dynamic spatial dims keep their names through both exporters
    assert result.dynamic_axes["out_sample"] == {0: "batch", 2: "height", 3: "width"}
    diff, scale = _independent_check(traced, result.onnx_path, batch=3, size=(12, 20), seed=3)
    assert diff <= FP32.atol + FP32.rtol * scale


def test_tampered_initializer_fails_validation_on_every_check(sd, tmp_path):
    _, traced, result = sd
    model = onnx.load(str(result.onnx_path))
    (weight,) = [t for t in model.graph.initializer if t.name == "conv_out.weight"]
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.5, weight.name))
    tampered = tmp_path / "unet.onnx"
    onnx.save(model, str(tampered))

    with pytest.raises(ExportValidationError) as info:
        validate_onnx(tampered, traced, None, None)
    message = str(info.value)
    assert "4 of 4 checks" in message
    for label in ("batch=1 latent=16x16 tokens=77", "batch=2 latent=16x16 tokens=77", "batch=2 latent=18x20",
                  "batch=2 latent=16x16 tokens=39"):
        assert label in message
    report = info.value.report
    assert len(report.failures) == 4
    assert all(c.max_abs_diff > c.bound for c in report.failures)


def test_every_mismatch_is_listed_not_just_the_first(sd):
    _, traced, result = sd

    class WrongAtBatchTwo(torch.nn.Module):
        def __init__(self, gm):
            super().__init__()
            self.gm = gm

        def forward(self, *args):
            out = self.gm(*args)
            return out + 1.0 if out.shape[0] == 2 else out

    with pytest.raises(ExportValidationError) as info:
        validate_onnx(result.onnx_path, WrongAtBatchTwo(traced.gm), traced.input_names, traced.example_inputs,
                      spatial_multiple=traced.spatial_multiple)
    report = info.value.report
    assert [c.passed for c in report.checks] == [True, False, False, False]
    assert "3 of 4 checks" in str(info.value)
    assert "batch=2 latent=16x16" in str(info.value) and "batch=2 latent=18x20" in str(info.value)
    assert "batch=1" not in str(info.value).split("\n", 1)[1]
    assert all(0.9 < c.max_abs_diff < 1.1 for c in report.failures)


def test_validation_failure_writes_nothing(tmp_path, traced2d):
    traced = traced2d
    config = ExportConfig(tolerances={"float32": Tolerance(atol=0.0, rtol=0.0)})
    with pytest.raises(ExportValidationError) as info:
        export_onnx(traced, tmp_path / "unet.onnx", config=config)
    assert "max_abs_diff" in str(info.value) and "> bound 0" in str(info.value)
    assert list(tmp_path.iterdir()) == []  # no .onnx, no .data, no staging folder


def test_exporter_crash_after_partial_write_leaves_nothing(tmp_path, monkeypatch, traced2d):
    traced = traced2d

    def half_written(model, args, f, **kwargs):
        with open(f, "wb") as handle:
            handle.write(b"\x08\x07partial")
        with open(f + ".data", "wb") as handle:
            handle.write(b"\0" * 100)
        raise RuntimeError("simulated exporter crash")

    monkeypatch.setattr(torch.onnx, "export", half_written)
    out = tmp_path / "models" / "unet.onnx"
    with pytest.raises(ExportError, match="simulated exporter crash.*Try exporter='dynamo'"):
        export_onnx(traced, out, config=ExportConfig(external_data="always"))
    assert list(out.parent.iterdir()) == []


def test_existing_output_needs_overwrite(sd, tmp_path):
    model, traced, result = sd
    target = tmp_path / "unet.onnx"
    shutil.copy(result.onnx_path, target)
    before = target.read_bytes()
    with pytest.raises(ArtifactError, match="overwrite=True"):
        export_onnx(traced, target)
    assert target.read_bytes() == before


def test_overwrite_with_inline_weights_removes_stale_data_file(tmp_path, traced2d):
    traced = traced2d
    out = tmp_path / "unet.onnx"
    export_onnx(traced, out, config=ExportConfig(external_data="always", validate=False))
    assert (tmp_path / "unet.onnx.data").exists()
    result = export_onnx(traced, out, config=ExportConfig(validate=False), overwrite=True)
    assert not result.validation.validated and "validate=False" in result.validation.reason
    assert result.data_path is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet.onnx"]
    assert create_session(result.onnx_path).input_names == ("sample", "timestep")


def test_static_spatial_export_rejects_other_sizes(tmp_path, traced2d):
    traced = traced2d
    result = export_onnx(traced, tmp_path / "unet.onnx", config=ExportConfig(dynamic_spatial=False))
    assert [c.name for c in result.validation.checks] == ["batch=1 latent=16x16", "batch=2 latent=16x16"]
    assert result.dynamic_axes["sample"] == {0: "batch"}
    session = create_session(result.onnx_path)
    assert session.input_shapes["sample"] == ["batch", 3, 16, 16]


def test_bare_graph_module_with_int64_timestep(tmp_path, traced2d):
    traced = traced2d
    config = ExportConfig(timestep_dtype="int64")
    result = export_onnx(traced.gm, tmp_path / "unet.onnx", input_names=traced.input_names,
                         example_inputs=traced.example_inputs, config=config)
    assert result.input_dtypes["timestep"] == "int64"
    assert not result.dynamic_spatial  # a bare module gives no spatial_multiple: only the traced size
    assert result.validation.passed


def test_dynamic_spatial_demanded_without_a_multiple(tmp_path, traced2d):
    traced = traced2d
    with pytest.raises(ConfigError, match="spatial_multiple is None"):
        export_onnx(traced.gm, tmp_path / "unet.onnx", input_names=traced.input_names,
                    example_inputs=traced.example_inputs,
                    config=ExportConfig(dynamic_spatial=True))
    assert list(tmp_path.iterdir()) == []


def test_config_collects_every_problem():
    with pytest.raises(ConfigError) as info:
        ExportConfig(exporter="tvm", external_data="sometimes", validation_batch_sizes=(0,),
                     tolerances={"float32": (-1.0, 0.0), "int8": (0.1, 0.1)})
    message = str(info.value)
    for needle in ("exporter='tvm' is not one of", "external_data='sometimes' is not one of", "validation_batch_sizes",
                   "atol=-1.0 must be >= 0", "unknown dtype 'int8'"):
        assert needle in message
    with pytest.raises(ConfigError, match=r"opset 21 is outside what the legacy exporter writes \(14..20\)"):
        ExportConfig(opset=21)
    config = ExportConfig.from_dict({"exporter": "dynamo", "validation_batch_sizes": [1, 3]})
    assert config.resolved_opset == 18 and config.validation_batch_sizes == (1, 3)
    assert ExportConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match=r"^unknown ExportConfig option 'atol'; the options are "):
        ExportConfig.from_dict({"exporter": "legacy", "atol": 1e-3})
