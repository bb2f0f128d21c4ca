"""The published UNet families, reduced: they trace at both granularities, the traced graph computes what diffusers
computes, and the operator graph finds the candidates the architecture implies."""

from __future__ import annotations

import collections
import gc
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldpruner.base.errors import ConfigError
from ldpruner.compiler.graph import Action, build_operator_graph
from ldpruner.compiler.removal import swapped
from ldpruner.compiler.tracer import call_diffusers_unet, trace_unet, unet_example_inputs
from ldpruner.sources.families import FAMILIES, build_unet, family_config, reduced, spatial_multiple

FAMILY_NAMES = ("sd15", "sd21", "sdxl", "ldm-celebahq-256", "audio-diffusion-256", "sd-tiny")
GRANULARITIES = ("block", "sublayer")
SEQ_LEN = 7  # short text context: sequence length is free in the graph, so any length exercises it


def _build(name: str):
    # sd-tiny is already test-sized and is what the demo runs: test it as it is
    return build_unet(name, reduced=name != "sd-tiny", seed=0)


def _eager(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The diffusers model called eagerly on the same flat inputs."""
    return call_diffusers_unet(model, inputs)


def _call(traced, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return traced.gm(*[inputs[n] for n in traced.input_names])


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def unet(family):
    return _build(family)


@pytest.fixture(scope="module", params=GRANULARITIES)
def granularity(request):
    return request.param


@pytest.fixture(scope="module")
def traced(unet, granularity):
    return trace_unet(unet, unet_example_inputs(unet, batch=2, seq_len=SEQ_LEN), granularity=granularity)


@pytest.fixture(scope="module")
def opgraph(traced):
    return build_operator_graph(traced)


# --- configs -----------------------------------------------------------------------------------------------------

# Parameter counts of the published UNets, from the architecture alone (meta device: nothing allocated).
# SD 1.5 (859.52 M), SD 2.1 (865.91 M) and SDXL base (2.567 B) are the published figures; CelebA-HQ LDM-4 is
# the 274 M of the LDM paper.
FULL_PARAMS = {
    "sd15": 859_520_964,
    "sd21": 865_910_724,
    "sdxl": 2_567_463_684,
    "ldm-celebahq-256": 274_056_163,
    "audio-diffusion-256": 113_668_609,
    "sd-tiny": 2_547_428,
    # SD 1.5 with 5 more input channels (inpainting), or with a 256-dim guidance embedding (LCM)
    "sd15-inpainting": 859_535_364,
    "lcm-sd15": 859_602_884,
}
# families whose topology is SD 1.5's: checked for their counts and inputs (tests/sources/test_diffusers_families.py
# builds their kinds end to end)
SD15_VARIANTS = ("sd15-inpainting", "lcm-sd15")


@pytest.mark.parametrize("name", SD15_VARIANTS)
def test_sd15_variants_trace_with_their_own_inputs(name):
    model = _build(name)
    inputs = unet_example_inputs(model, batch=2, seq_len=SEQ_LEN)
    traced = trace_unet(model, inputs)
    expected = {"sd15-inpainting": ("sample", "timestep", "encoder_hidden_states"),
                "lcm-sd15": ("sample", "timestep", "encoder_hidden_states", "timestep_cond")}[name]
    assert traced.input_names == expected
    assert inputs["sample"].shape[1] == (9 if name == "sd15-inpainting" else 4)
    torch.testing.assert_close(_call(traced, inputs), _eager(model, inputs))


@pytest.mark.parametrize("name", FAMILY_NAMES + SD15_VARIANTS)
def test_full_size_parameter_counts(name):
    model = build_unet(name, device="meta")
    assert sum(p.numel() for p in model.parameters()) == FULL_PARAMS[name]


def test_sd_tiny_is_demo_sized():
    config = family_config("sd-tiny")
    assert 1_000_000 <= FULL_PARAMS["sd-tiny"] <= 5_000_000
    assert config["down_block_types"] == ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
    assert config["sample_size"] % spatial_multiple(config) == 0


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_reduced_keeps_topology(name):
    full, small = family_config(name), family_config(name, reduced=True)
    assert small == reduced(full)
    keep = ("_class_name", "down_block_types", "up_block_types", "layers_per_block", "use_linear_projection",
            "upcast_attention", "addition_embed_type", "time_embedding_type", "mid_block_type")
    for key in keep:
        assert small.get(key) == full.get(key), key
    channels = small["block_out_channels"]
    assert len(channels) == len(full["block_out_channels"])
    assert max(channels) <= 64
    assert all(c % small["norm_num_groups"] == 0 for c in channels)
    assert ([c * full["block_out_channels"][0] for c in channels]
            == [c * channels[0] for c in full["block_out_channels"]])
    heads = small.get("attention_head_dim")
    assert isinstance(heads, list) == isinstance(full.get("attention_head_dim"), list)
    size = small["sample_size"]
    assert (size[0] if isinstance(size, list) else size) == 2 * spatial_multiple(small)


def test_reduced_heads_keep_their_pattern():
    # SD 1.5: the same head count at every level; SD 2 / SDXL: the same head dim at every level
    sd15, sd21, sdxl = (family_config(n, reduced=True) for n in ("sd15", "sd21", "sdxl"))
    assert sd15["attention_head_dim"] == 2
    assert [c // h for c, h in zip(sd21["block_out_channels"], sd21["attention_head_dim"])] == [8, 8, 8, 8]
    assert [c // h for c, h in zip(sdxl["block_out_channels"], sdxl["attention_head_dim"])] == [8, 8, 8]
    assert sdxl["transformer_layers_per_block"] == [1, 2, 3]
    pooled = sdxl["projection_class_embeddings_input_dim"] - 6 * sdxl["addition_time_embed_dim"]
    assert pooled > 0 and sdxl["addition_time_embed_dim"] % 2 == 0


def test_reduced_rejects_inconsistent_sizes():
    with pytest.raises(ConfigError, match="width must be a positive multiple of heads"):
        reduced(FAMILIES["sd15"], width=10, heads=4)
    with pytest.raises(ConfigError, match="integer multiples"):
        reduced({**FAMILIES["sd15"], "block_out_channels": [320, 330]}, width=16)
    with pytest.raises(ConfigError, match="not all multiples of norm_groups=4"):
        reduced({**FAMILIES["sd15"], "block_out_channels": [320, 360]}, width=16)
    with pytest.raises(ConfigError, match="addition_embed_type='image'"):
        reduced({**FAMILIES["sd15"], "addition_embed_type": "image"})


def test_unknown_family_names_the_known_ones():
    with pytest.raises(ConfigError, match="'sd14' is unknown; known families: .*'sd15'"):
        build_unet("sd14")


def test_build_unet_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b, c = (build_unet("sd-tiny", reduced=True, seed=s) for s in (0, 0, 1))
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a.conv_in.weight, b.conv_in.weight)
    assert not torch.equal(a.conv_in.weight, c.conv_in.weight)
    assert not a.training


def test_family_configs_are_read_only():
    with pytest.raises(TypeError):
        FAMILIES["sd15"]["sample_size"] = 8  # type: ignore[index]
    assert FAMILIES["sd15"]["block_out_channels"] == (320, 640, 1280, 1280)
    config = family_config("sd15")  # the published config.json, as mutable lists
    assert config["block_out_channels"] == [320, 640, 1280, 1280]
    config["block_out_channels"].append(1)
    assert family_config("sd15")["block_out_channels"] == [320, 640, 1280, 1280]


# --- tracing -----------------------------------------------------------------------------------------------------


def test_traced_output_equals_diffusers(unet, traced):
    inputs = traced.example_inputs
    assert inputs["sample"].shape[0] == 2
    torch.testing.assert_close(_call(traced, inputs), _eager(unet, inputs), atol=1e-5, rtol=0)

    # another batch, a non-square latent at a multiple of the spatial multiple, another context length
    m = traced.spatial_multiple
    assert m == spatial_multiple(unet.config)
    other = unet_example_inputs(unet, batch=3, height=m, width=3 * m, seq_len=SEQ_LEN + 4, seed=1)
    out = _call(traced, other)
    assert out.shape == (3, unet.config.out_channels, m, 3 * m)
    torch.testing.assert_close(out, _eager(unet, other), atol=1e-5, rtol=0)


def test_trace_does_not_touch_the_model(unet, traced):
    traced_modules = {id(m) for m in traced.gm.modules()}
    assert not traced_modules & {id(m) for m in unet.modules()}


# --- operator graph ----------------------------------------------------------------------------------------------


def _resnets(model):
    from diffusers.models.resnet import ResnetBlock2D

    return {n: m for n, m in model.named_modules() if isinstance(m, ResnetBlock2D)}


def test_resnet_actions_follow_their_channels(unet, opgraph):
    resnets = _resnets(unet)
    assert resnets
    for name, module in resnets.items():
        op = opgraph[name]
        if module.conv_shortcut is not None:  # channels change: every up-block resnet (skip concat), widenings
            assert op.action is Action.SHORTCUT, (name, op.reason)
        else:
            assert op.action is Action.IDENTITY, (name, op.reason)
        if name.startswith("up_blocks."):
            assert op.action is Action.SHORTCUT, name
        assert op.params > 0 and op.macs > 0


def test_sampling_operators_are_not_removable(opgraph):
    for op in opgraph:
        if op.kind in ("downsample", "upsample"):
            assert not op.removable and "spatial size" in op.reason


def test_attention_operators_are_identity(unet, granularity, opgraph):
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    transformers = [n for n, m in unet.named_modules() if isinstance(m, Transformer2DModel)]
    blocks = [n for n, m in unet.named_modules() if isinstance(m, BasicTransformerBlock)]
    if granularity == "block":
        for name in transformers:
            assert opgraph[name].kind == "transformer" and opgraph[name].action is Action.IDENTITY
        assert not [n for n in opgraph.operators if ".transformer_blocks." in n]
    else:
        assert not [n for n in transformers if n in opgraph]
        for block in blocks:
            for sub, kind in (("attn1", "self-attention"), ("attn2", "cross-attention"), ("ff", "feed-forward")):
                op = opgraph[f"{block}.{sub}"]
                assert op.kind == kind and op.action is Action.IDENTITY, op
                assert op.join is not None  # a residual branch: its add keeps the other operand
    # UNet2DModel attention blocks carry their residual inside the module: bypassed whole at both granularities
    for op in opgraph:
        if op.kind == "attention":
            assert op.action is Action.IDENTITY and op.join is None and op.in_shape == op.out_shape


# (operators, candidates, {kind/action: count}) per family and granularity, checked against the architectures:
#  sd15/sd21 (4 levels, 2 layers): 22 resnets = 8 down + 2 mid + 12 up; shortcut = 2 widening + 12 up;
#    16 transformers = 6 down + 1 mid + 9 up (one BasicTransformerBlock each); 3 down- + 3 upsamplers.
#  sdxl (3 levels, no attention outside, depth 1/2/3 reduced from 1/2/10): 17 resnets (shortcut 2 + 9 up);
#    11 transformers = 4 down + 1 mid + 6 up holding 2*2 + 2*3 + 3 + 3*3 + 3*2 = 28 BasicTransformerBlocks.
#  ldm-celebahq-256 (attention in levels 2-4): 22 resnets (shortcut 3 + 12 up); 16 attention = 6 + 1 + 9.
#  audio-diffusion-256 (6 levels, attention at the 5th): 32 resnets (shortcut 2 + 18 up); 6 attention = 2 + 1 + 3.
#  sd-tiny (3 levels 32/64/64, attention in the outer two): 17 resnets (shortcut: the 32→64 widening + 9 up);
#    11 transformers = 4 down + 1 mid + 6 up.
_SD4 = {"resnet/identity": 8, "resnet/shortcut": 14, "downsample/not-removable": 3, "upsample/not-removable": 3}
_SD4_BLOCK = {**_SD4, "transformer/identity": 16}
_SD4_SUB = {**_SD4, "self-attention/identity": 16, "cross-attention/identity": 16, "feed-forward/identity": 16}
_SD3 = {"resnet/identity": 6, "resnet/shortcut": 11, "downsample/not-removable": 2, "upsample/not-removable": 2}
_TINY = {"resnet/identity": 7, "resnet/shortcut": 10, "downsample/not-removable": 2, "upsample/not-removable": 2}
_LDM = {"resnet/identity": 7, "resnet/shortcut": 15, "attention/identity": 16,
        "downsample/not-removable": 3, "upsample/not-removable": 3}
_AUDIO = {"resnet/identity": 12, "resnet/shortcut": 20, "attention/identity": 6,
          "downsample/not-removable": 5, "upsample/not-removable": 5}
EXPECTED_COUNTS = {
    ("sd15", "block"): (44, 38, _SD4_BLOCK),
    ("sd15", "sublayer"): (76, 70, _SD4_SUB),
    ("sd21", "block"): (44, 38, _SD4_BLOCK),
    ("sd21", "sublayer"): (76, 70, _SD4_SUB),
    ("sdxl", "block"): (32, 28, {**_SD3, "transformer/identity": 11}),
    ("sdxl", "sublayer"): (105, 101, {**_SD3, "self-attention/identity": 28, "cross-attention/identity": 28,
                                      "feed-forward/identity": 28}),
    ("ldm-celebahq-256", "block"): (44, 38, _LDM),
    ("ldm-celebahq-256", "sublayer"): (44, 38, _LDM),
    ("audio-diffusion-256", "block"): (48, 38, _AUDIO),
    ("audio-diffusion-256", "sublayer"): (48, 38, _AUDIO),
    ("sd-tiny", "block"): (32, 28, {**_TINY, "transformer/identity": 11}),
    ("sd-tiny", "sublayer"): (54, 50, {**_TINY, "self-attention/identity": 11, "cross-attention/identity": 11,
                                       "feed-forward/identity": 11}),
}


def test_candidate_counts(family, granularity, opgraph):
    operators, candidates, by_kind = EXPECTED_COUNTS[(family, granularity)]
    counts = collections.Counter(f"{op.kind}/{op.action.value}" for op in opgraph)
    assert dict(counts) == by_kind
    assert (len(opgraph.operators), len(opgraph.candidates)) == (operators, candidates)


def test_candidate_costs_fit_the_model(opgraph):
    for op in opgraph.candidates:
        assert 0 < op.params < opgraph.total_params, op
        assert 0 < op.macs < opgraph.total_macs, op
    assert sum(op.params for op in opgraph.candidates) < opgraph.total_params


def test_attention_macs_count_scores_and_mixing():
    # s tokens of c channels, context of L tokens of d dims: projections s*c*c each (4 in self-attention,
    # 2 + 2 on the context in cross-attention) plus Q·Kᵀ and A·V, s*s*c each (s*L*c against the context);
    # the fused CPU attention kernel has no stock flop formula, so the last term used to count as zero
    model = build_unet("sd15", reduced=True)
    traced = trace_unet(model, unet_example_inputs(model, seq_len=SEQ_LEN), granularity="sublayer")
    graph = build_operator_graph(traced)
    block = "down_blocks.0.attentions.0.transformer_blocks.0"
    c = model.config.block_out_channels[0]
    s = model.config.sample_size ** 2
    d, L = model.config.cross_attention_dim, SEQ_LEN
    assert graph[f"{block}.attn1"].macs == 4 * s * c * c + 2 * s * s * c
    assert graph[f"{block}.attn2"].macs == 2 * s * c * c + 2 * L * d * c + 2 * s * L * c
    assert graph[f"{block}.ff"].macs == s * c * 8 * c + s * 4 * c * c  # GEGLU: c -> 2*4c, then 4c -> c


def test_skip_edges_join_down_to_up(unet, opgraph):
    skips = opgraph.skip_edges()
    for src, dst in skips:
        assert dst.startswith("up_blocks.") and ".resnets." in dst, (src, dst)
    # every up-block resnet concatenates a tensor saved on the down path; only that operand is a skip (the up
    # path's own input is the newest operand of the concatenation, so it is a data edge)
    up_resnets = {n for n in _resnets(unet) if n.startswith("up_blocks.")}
    assert {dst for src, dst in skips} == up_resnets
    assert not [src for src, dst in skips if src.startswith(("up_blocks.", "mid_block."))]


def test_swapping_each_candidate_keeps_the_output_shape(traced, opgraph):
    inputs = traced.example_inputs
    dense = _call(traced, inputs)
    for op in opgraph.candidates:
        with swapped(traced.gm, op):
            out = _call(traced, inputs)
        assert out.shape == dense.shape, op.name
        assert torch.isfinite(out).all(), op.name
        assert not torch.equal(out, dense), f"removing {op.name} changed nothing"
    torch.testing.assert_close(_call(traced, inputs), dense, atol=0, rtol=0)


# --- full size ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_full_size_sd15_traces_and_builds_its_operator_graph():
    model = build_unet("sd15", seed=0)
    try:
        # the spatial multiple is 8 (three upsamplers): 16x16 is the second-smallest latent SD 1.5 accepts
        inputs = unet_example_inputs(model, batch=1, height=16, width=16)
        for granularity, (n_ops, n_cand) in (("block", (44, 38)), ("sublayer", (76, 70))):
            traced = trace_unet(model, inputs, granularity=granularity, copy_model=False)
            graph = build_operator_graph(traced)
            assert (len(graph.operators), len(graph.candidates)) == (n_ops, n_cand)
            assert graph.total_params == 859_520_964
            torch.testing.assert_close(_call(traced, inputs), _eager(model, inputs), atol=1e-4, rtol=0)
            del traced, graph
            gc.collect()
    finally:
        del model
        gc.collect()


@pytest.mark.slow
def test_fullsize_trace_benchmark_runs(tmp_path):
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "fullsize_trace.py"
    out = tmp_path / "fullsize.json"
    subprocess.run([sys.executable, str(script), "--latent", "16", "--output", str(out)], check=True,
                   cwd=tmp_path, timeout=1800)
    report = json.loads(out.read_text())
    assert report["params"] == 859_520_964
    assert report["peak_rss_gib"] < 24
    assert report["block"]["candidates"] == 38 and report["sublayer"]["candidates"] == 70
