"""Tracer: exact numerics, dynamic batch/spatial size, recorded decisions, no mutation, readable errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ldpruner.base.errors import ConfigError, TraceError
from ldpruner.compiler.tracer import trace_unet


def run(traced, inputs):
    return traced.gm(*[inputs[n] for n in traced.input_names])


@pytest.mark.parametrize("granularity", ["block", "sublayer"])
def test_traced_graph_matches_diffusers_at_other_batch_and_size(tiny_sd_unet, granularity):
    traced = trace_unet(tiny_sd_unet, granularity=granularity)
    assert traced.input_names == ("sample", "timestep", "encoder_hidden_states")
    gen = torch.Generator().manual_seed(1)
    # batch 3 and a non-square size that is a multiple of 2 (one upsampler): both were not traced
    inputs = {
        "sample": torch.randn(3, 4, 8, 24, generator=gen),
        "timestep": torch.tensor(37),  # 0-d, as diffusers pipelines pass it
        "encoder_hidden_states": torch.randn(3, 5, 32, generator=gen),
    }
    with torch.no_grad():
        ref = tiny_sd_unet(**inputs).sample
        out = run(traced, inputs)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_operators_are_leaves_per_granularity(tiny_sd_unet):
    block = trace_unet(tiny_sd_unet, granularity="block")
    sub = trace_unet(tiny_sd_unet, granularity="sublayer")
    block_targets = {n.target for n in block.gm.graph.nodes if n.op == "call_module"}
    sub_targets = {n.target for n in sub.gm.graph.nodes if n.op == "call_module"}
    assert "down_blocks.0.attentions.0" in block_targets
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1" not in block_targets
    assert {"down_blocks.0.attentions.0.transformer_blocks.0.attn1",
            "down_blocks.0.attentions.0.transformer_blocks.0.attn2",
            "down_blocks.0.attentions.0.transformer_blocks.0.ff"} <= sub_targets
    assert "down_blocks.0.resnets.0" in block_targets & sub_targets


def test_decisions_recorded_with_source_lines(tiny_sd_unet):
    traced = trace_unet(tiny_sd_unet)
    sources = [d.source for d in traced.decisions]
    assert any("default_overall_up_factor" in s for s in sources)
    assert any("len(timesteps.shape)" in s for s in sources)
    validity = traced.validity()
    assert validity["spatial_multiple"] == 2
    assert validity["traced_sample_shape"] == [2, 4, 16, 16]
    assert all(d["location"].startswith("diffusers/") for d in validity["decisions"])


def test_tracing_never_mutates_or_shares_the_user_model(tiny_sd_unet):
    before = {k: v.clone() for k, v in tiny_sd_unet.state_dict().items()}
    cls = type(tiny_sd_unet)
    traced = trace_unet(tiny_sd_unet)
    assert type(tiny_sd_unet) is cls
    user_modules = {id(m) for m in tiny_sd_unet.modules()}
    assert not user_modules & {id(m) for m in traced.gm.modules()}
    # deleting from the graph must not strip the user's model
    traced.gm.delete_all_unused_submodules()
    for k, v in tiny_sd_unet.state_dict().items():
        assert torch.equal(v, before[k])


def test_unconditional_unet2d(tiny_unet2d):
    traced = trace_unet(tiny_unet2d)
    assert traced.input_names == ("sample", "timestep")
    inputs = {"sample": torch.randn(1, 3, 32, 32), "timestep": torch.tensor([3])}
    with torch.no_grad():
        torch.testing.assert_close(run(traced, inputs), tiny_unet2d(**inputs).sample, rtol=0, atol=1e-6)


class _Generic(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 2, 3, padding=1)
        self.b = nn.Conv2d(2, 2, 3, padding=1)

    def forward(self, x, scale=None):
        if x.shape[-1] > 4:  # shape control flow: resolved on the example and recorded
            x = self.a(x)
        return self.b(x) * (1.0 if scale is None else scale)


def test_generic_module_with_shape_control_flow():
    model = _Generic().eval()
    x = torch.randn(2, 2, 8, 8)
    traced = trace_unet(model, {"x": x})
    assert traced.input_names == ("x",)
    assert [n.op for n in traced.gm.graph.nodes].count("placeholder") == 1
    assert traced.decisions[0].value is True
    other = torch.randn(3, 2, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(traced.gm(other), model(other), rtol=0, atol=0)


class _DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # depends on values, not shapes: cannot be traced
            return x * 2
        return x


def test_data_dependent_control_flow_is_a_trace_error_naming_the_line():
    with pytest.raises(TraceError, match=r"test_tracer.py:\d+ \(`if x.sum\(\) > 0:"):
        trace_unet(_DataDependent(), {"x": torch.randn(2, 3)})


def test_bad_inputs():
    with pytest.raises(TraceError, match="must be a torch.nn.Module"):
        trace_unet("not a model")  # type: ignore[arg-type]
    with pytest.raises(TraceError, match="pass example_inputs"):
        trace_unet(_Generic())
    with pytest.raises(TraceError, match="does not take"):
        trace_unet(_Generic(), {"y": torch.randn(1)})
    with pytest.raises(ConfigError, match="granularity='layer'"):
        trace_unet(_Generic(), {"x": torch.randn(1, 2, 8, 8)}, granularity="layer")
