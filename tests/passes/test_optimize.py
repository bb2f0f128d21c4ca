"""onnxruntime transformer-optimizer fusions: what fuses on CPU, agreement with the unfused model, fp16."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import make_tiny_sd_unet

from ldpruner.base.errors import ExportError, ExportValidationError
from ldpruner.compiler.tracer import trace_unet
from ldpruner.passes.onnx import optimize as optimize_module
from ldpruner.passes.onnx.export import ExportConfig, export_onnx
from ldpruner.passes.onnx.optimize import CUDA_ONLY_FUSIONS, Tolerance, optimize_onnx
from ldpruner.runtime.session import create_session

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()
CUDA_ONLY_OPS = ("NhwcConv", "GroupNorm", "SkipGroupNorm", "BiasSplitGelu", "BiasAdd")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    traced = trace_unet(make_tiny_sd_unet())
    out = tmp_path_factory.mktemp("sd") / "unet.onnx"
    export_onnx(traced, out, config=ExportConfig(validate=False))
    return out


def _feeds(batch, size, seed):
    rng = np.random.default_rng(seed)
    return {
        "sample": rng.standard_normal((batch, 4, *size), dtype=np.float32),
        "timestep": np.linspace(3.0, 977.5, batch, dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal((batch, 77, 32), dtype=np.float32),
    }


def _op_counts(path):
    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def test_cpu_fusions_match_the_unfused_model(exported, tmp_path):
    result = optimize_onnx(exported, tmp_path / "unet.onnx")
    # tiny SD UNet: 4 transformer blocks, each self-attention (→ Attention) and cross-attention (→ MHA)
    assert result.fused_operators["Attention"] == 4
    assert result.fused_operators["MultiHeadAttention"] == 4
    assert result.fused_operators["LayerNormalization"] == 4
    assert result.fused_operators["SkipLayerNormalization"] == 8
    assert all(result.fused_operators[op] == 0 for op in CUDA_ONLY_OPS)
    assert all(result.fusion_options[flag] is False for flag in CUDA_ONLY_FUSIONS)
    assert result.nodes_after < result.nodes_before / 1.5
    counts = _op_counts(result.onnx_path)
    assert counts["Attention"] == 4 and counts["MultiHeadAttention"] == 4
    assert not any(op in counts for op in CUDA_ONLY_OPS)

    report = result.validation
    assert report.validated and report.passed and report.provider == "CPUExecutionProvider"
    assert len(report.checks) == 3  # batch 1, batch 2, a second latent size (from the export metadata)
    assert report.max_abs_diff < 1e-5
    # and on inputs the pass never saw
    feeds = _feeds(3, (20, 12), seed=11)
    ref = create_session(exported).run(feeds)[0]
    out = create_session(result.onnx_path).run(feeds)[0]
    assert np.abs(out - ref).max() <= 1e-4 + 1e-4 * np.abs(ref).max()


def test_gpu_variant_is_not_claimed_validated_without_cuda(exported, tmp_path):
    result = optimize_onnx(exported, tmp_path / "unet.onnx", use_gpu=True)
    assert result.fused_operators["NhwcConv"] == 33 and result.fused_operators["GroupNorm"] > 0
    if HAS_CUDA:
        assert result.validation.validated and result.validation.passed
    else:
        assert not result.validation.validated and not result.validation.passed
        assert "CUDAExecutionProvider" in result.validation.reason
        assert result.validation.checks == ()
        with pytest.raises(Exception, match="NhwcConv"):  # it really cannot run on CPU
            create_session(result.onnx_path, providers=["CPUExecutionProvider"])


def test_fp16_keeps_float32_io_and_is_checked(exported, tmp_path):
    result = optimize_onnx(exported, tmp_path / "unet.onnx", fp16=True)
    session = create_session(result.onnx_path)
    assert {str(d) for d in session.input_dtypes.values()} == {"float32"}
    assert str(session.output_dtypes["out_sample"]) == "float32"
    initializers = onnx.load(str(result.onnx_path)).graph.initializer
    assert sum(t.data_type == onnx.TensorProto.FLOAT16 for t in initializers) > 0.5 * len(initializers)
    # onnxruntime 1.32 CPU runs it; it must then agree within the fp16 tolerance, against the fp32 model
    report = result.validation
    assert report.validated and report.passed and report.dtype == "float16"
    assert 1e-5 < report.max_abs_diff < 1e-2  # really half precision, really close


def test_fp16_that_cpu_cannot_run_is_reported_not_validated(exported, tmp_path, monkeypatch):
    real = optimize_module.create_session

    class NoFp16Kernels:
        def __init__(self, session):
            self._session = session
            self.provider = session.provider

        def run(self, feeds):
            raise RuntimeError("NOT_IMPLEMENTED : Could not find an implementation for Conv(11) float16")

    def fake_create_session(path, **kwargs):
        session = real(path, **kwargs)
        return NoFp16Kernels(session) if path.parent != exported.parent else session

    monkeypatch.setattr(optimize_module, "create_session", fake_create_session)
    result = optimize_onnx(exported, tmp_path / "unet.onnx", fp16=True)
    assert not result.validation.validated and not result.validation.passed
    assert "cannot run the fp16 model" in result.validation.reason
    assert "NOT_IMPLEMENTED" in result.validation.reason
    assert result.validation.to_dict()["checks"] == []


def test_mismatch_raises_and_writes_nothing(exported, tmp_path):
    with pytest.raises(ExportValidationError, match="3 of 3 checks") as info:
        optimize_onnx(exported, tmp_path / "unet.onnx", fp16=True, tolerance=Tolerance(atol=1e-6, rtol=0.0))
    assert all(c.max_abs_diff > 1e-6 for c in info.value.report.failures)
    assert list(tmp_path.iterdir()) == []


def test_foreign_model_needs_validation_inputs(exported, tmp_path):
    model = onnx.load(str(exported))
    del model.metadata_props[:]
    foreign = tmp_path / "foreign.onnx"
    onnx.save(model, str(foreign))
    with pytest.raises(ExportError, match="validation_inputs"):
        optimize_onnx(foreign, tmp_path / "out" / "unet.onnx")
    assert not (tmp_path / "out" / "unet.onnx").exists()
    result = optimize_onnx(foreign, tmp_path / "out" / "unet.onnx", validation_inputs=[_feeds(2, (16, 16), seed=0)])
    assert result.validation.passed and len(result.validation.checks) == 1


def test_export_stage_counts_the_fused_attention_blocks_and_keeps_norms_in_fp32(tmp_path):
    """api.export with optimize and fp16: every attention block of the pruned student fused (or a warning), and
    the fp16 variant records the operators it keeps in float32."""
    from test_remove import plan_for

    from ldpruner import api
    from ldpruner.compiler.graph import build_operator_graph
    from ldpruner.passes.onnx.optimize import FP32_OPS
    from ldpruner.passes.remove import prune

    model = make_tiny_sd_unet()
    traced = trace_unet(model)
    graph = build_operator_graph(traced)
    student = prune(traced, plan_for(graph, ["down_blocks.0.resnets.0", "up_blocks.1.attentions.1"]),
                    operator_graph=graph, config=model.config)
    summary = api.export(student, out=tmp_path, optimize=True, fp16=True, device="cpu")
    table = summary["fusions"]["optimized"]
    # 4 transformer blocks less the removed one: 3 × (self-attention + cross-attention), 3 × 3 layer norms, all
    # fused; the CUDA-only fusions (group norm, bias-split-gelu) are off on CPU, so their unfused sites are no loss
    assert table["kinds"]["attention"] == {"enabled": True, "dense_sites": 8, "sites": 6, "fused": 6}
    assert table["kinds"]["layer_norm"] == {"enabled": True, "dense_sites": 12, "sites": 9, "fused": 9}
    # a resnet (2 group norms) and a transformer (1) removed
    assert table["kinds"]["group_norm"] == {"enabled": False, "dense_sites": 21, "sites": 18, "fused": 0}
    assert table["warnings"] == [] and summary["fusions"]["fp16"]["kinds"]["attention"]["fused"] == 6
    assert summary["fp16"]["fp32_ops"] == list(FP32_OPS) and summary["optimized"]["fp32_ops"] == []
    assert (tmp_path / "onnx" / "unet.fp16.onnx").is_file()


def test_fusion_table_warns_about_each_enabled_kind_left_unfused(tmp_path, caplog):
    import dataclasses

    from ldpruner.passes.onnx.optimize import FUSION_SITES, OptimizeResult, fusion_table

    result = OptimizeResult(onnx_path=tmp_path / "unet.opt.onnx", data_path=None, precision="fp32", use_gpu=False,
                            fusion_options={"enable_attention": True, "enable_group_norm": False},
                            fused_operators={"Attention": 2, "MultiHeadAttention": 1}, fp32_ops=(), nodes_before=1,
                            nodes_after=1, optimize_seconds=0.0, validation=None)
    sites = dict.fromkeys(FUSION_SITES, 0) | {"attention": 4, "group_norm": 5}
    table = fusion_table(result, sites)
    assert table["kinds"]["attention"] == {"enabled": True, "dense_sites": None, "sites": 4, "fused": 3}
    assert table["warnings"] == ["unet.opt.onnx: 1 of 4 attention sites were not fused by onnxruntime's optimizer "
                                 "(a removal next to them can break the pattern it matches, or it does not match at "
                                 "these shapes): they run as separate nodes"]
    assert table["warnings"][0] in caplog.text
    full = dataclasses.replace(result, fused_operators={"Attention": 4})
    assert fusion_table(full, sites)["warnings"] == []  # group norm is off: its 5 unfused sites are no loss


def test_fusion_sites_count_only_what_onnxruntime_can_fuse():
    """Transformer-block attention and the group norms outside attention: UNet2DModel's GroupNorm-led attention
    never fuses (not in the dense model either), so it is no site and can raise no warning."""
    from conftest import make_tiny_unet2d

    from ldpruner.passes.onnx.optimize import fusion_sites

    sd = fusion_sites(make_tiny_sd_unet())
    assert sd["attention"] == 8 and sd["layer_norm"] == 12 and sd["bias_split_gelu"] == 4
    unet2d = make_tiny_unet2d()
    plain = sum(type(m).__name__ == "GroupNorm" for m in unet2d.modules())
    in_attention = sum(type(m).__name__ == "Attention" and m.group_norm is not None for m in unet2d.modules())
    assert fusion_sites(unet2d) == {"attention": 0, "layer_norm": 0, "group_norm": plain - in_attention,
                                    "bias_split_gelu": 0}
    assert in_attention > 0
