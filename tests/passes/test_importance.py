"""Importance analysis: purity, the exact LD-Pruner score, conditioning paths, scores.json + cache, sharding."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_sd_unet, make_tiny_unet2d, rank_environment, run_ranks
from diffusers import DDIMScheduler, DDPMScheduler

from ldpruner.base.errors import ArtifactError, ConfigError
from ldpruner.compiler.graph import build_operator_graph
from ldpruner.compiler.removal import swapped
from ldpruner.compiler.tracer import trace_unet
from ldpruner.passes.conditioning import Conditioning, encode_prompts
from ldpruner.passes.config import AnalysisConfig
from ldpruner.passes.importance import analyze_importance, cache_key
from ldpruner.passes.scores import ImportanceReport
from ldpruner.runtime.sampling import sample_latents

FAST = AnalysisConfig(num_samples=4, steps=3, height=8, width=8)


def graph_of(model, granularity="block"):
    return build_operator_graph(trace_unet(model, granularity=granularity))


@pytest.fixture(scope="module")
def sd_graph():
    return graph_of(make_tiny_sd_unet())


@pytest.fixture(scope="module")
def unet2d_graph():
    return graph_of(make_tiny_unet2d())


pytestmark = pytest.mark.usefixtures("one_thread")


def analyze(graph, calib=None, save_to=None, **overrides):
    config = dataclasses.replace(FAST, **overrides)
    return analyze_importance(graph, calib, config=config, progress=False, save_to=save_to)


# --- purity and determinism ------------------------------------------------------------------------------------

def test_analysis_leaves_graph_weights_modules_and_rng_unchanged(sd_graph):
    gm = sd_graph.traced.gm
    code = gm.code
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    modules = {name: id(m) for name, m in gm.named_modules()}
    gm.train()  # the analysis must sample in eval mode and hand the modes back as it found them
    rng = torch.get_rng_state()
    try:
        analyze(sd_graph)
        assert gm.code == code
        after = gm.state_dict()
        assert after.keys() == state.keys()
        assert all(torch.equal(after[k], v) for k, v in state.items())
        assert {name: id(m) for name, m in gm.named_modules()} == modules
        assert all(m.training for m in gm.modules())
        assert torch.equal(torch.get_rng_state(), rng)
    finally:
        gm.eval()


def test_scores_are_deterministic_nonnegative_and_sum_their_terms(sd_graph):
    first, second = analyze(sd_graph), analyze(sd_graph)
    assert first.entries == second.entries
    assert list(first.entries) == [op.name for op in sd_graph.candidates]
    for e in first:
        assert e.score >= 0 and e.mu_term >= 0 and e.sigma_term >= 0
        assert e.score == e.mu_term + e.sigma_term
        op = sd_graph[e.name]
        assert (e.params, e.macs, e.action, e.kind) == (op.params, op.macs, op.action.value, op.kind)
    ranked = first.ranked()
    assert [e.score for e in ranked] == sorted(e.score for e in first)


@pytest.mark.parametrize(
    "make, operator, zeroed",
    [
        (make_tiny_unet2d, "down_blocks.0.resnets.0", "conv2"),  # ResnetBlock2D: out = x + conv2(...)
        (make_tiny_sd_unet, "down_blocks.0.attentions.0", "proj_out"),  # Transformer2DModel: out = x + proj_out(...)
    ],
)
def test_operator_whose_residual_branch_is_zero_scores_zero(make, operator, zeroed):
    model = make()
    with torch.no_grad():
        layer = model.get_submodule(f"{operator}.{zeroed}")
        layer.weight.zero_()
        layer.bias.zero_()
    report = analyze(graph_of(model))
    assert report[operator].score < 1e-6
    others = [e.score for e in report if e.name != operator]
    assert others and min(others) > 1e-3


@pytest.mark.parametrize("kind", ["conditional", "unconditional"])
def test_score_equals_an_independent_computation(kind, sd_graph, unet2d_graph):
    graph = sd_graph if kind == "conditional" else unet2d_graph
    traced, gm = graph.traced, graph.traced.gm
    name = "mid_block.resnets.0"
    config = dataclasses.replace(FAST, seed=3)
    gen = torch.Generator().manual_seed(0)
    # two prompts for four samples: sample i uses prompt i % 2
    calib = Conditioning(encoder_hidden_states=torch.randn(2, 77, 32, generator=gen),
                         negative_encoder_hidden_states=torch.randn(1, 77, 32, generator=gen)) \
        if kind == "conditional" else None
    report = analyze_importance(graph, calib, config=config, progress=False)

    channels = traced.example_inputs["sample"].shape[1]
    noise = torch.randn((4, channels, 8, 8), generator=torch.Generator().manual_seed(3))
    cond = {}
    if calib is not None:
        cond = dict(encoder_hidden_states=calib.encoder_hidden_states[[0, 1, 0, 1]],
                    negative_encoder_hidden_states=calib.negative_encoder_hidden_states.expand(4, 77, 32),
                    guidance_scale=7.5)

    def unet(**kw):
        return gm(*[kw[n] for n in traced.input_names])

    def final():
        with torch.no_grad():
            return sample_latents(unet, DDIMScheduler(), noise=noise, steps=3, **cond).double()

    dense = final()
    with swapped(gm, graph[name]):
        removed = final()
    mu_term = torch.linalg.vector_norm(dense.mean(0) - removed.mean(0)).item()
    sigma_term = torch.linalg.vector_norm(dense.std(0, unbiased=False) - removed.std(0, unbiased=False)).item()
    entry = report[name]
    assert entry.mu_term == pytest.approx(mu_term, rel=1e-9)
    assert entry.sigma_term == pytest.approx(sigma_term, rel=1e-9)
    assert entry.score == pytest.approx(mu_term + sigma_term, rel=1e-9)
    assert mu_term > 0 and sigma_term > 0


def test_unconditional_and_conditional_paths(sd_graph, unet2d_graph, capsys):
    plain = analyze_importance(unet2d_graph, config=FAST)  # progress bar on by default, on stderr
    assert "importance" in capsys.readouterr().err
    assert plain.conditioning == "unconditional" and not plain.classifier_free_guidance
    assert plain.latent_shape == (4, 3, 8, 8)
    # one dense generation plus one per candidate, `steps` UNet calls each (all samples in one batch)
    assert plain.unet_calls == (1 + len(unet2d_graph.candidates)) * 3

    guided = analyze(sd_graph)
    assert guided.conditioning == "random-embeddings" and guided.classifier_free_guidance
    assert guided.scheduler["class"] == "DDIMScheduler" and guided.scheduler["source"].startswith("default")
    unguided = analyze(sd_graph, guidance_scale=1.0)
    assert not unguided.classifier_free_guidance
    assert unguided.scores != guided.scores


@pytest.mark.parametrize(
    "make, overrides, conditioning, guided",
    [
        (make_tiny_sd_unet, dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                                 projection_class_embeddings_input_dim=32 + 6 * 8), "random-embeddings", True),
        (make_tiny_unet2d, dict(num_class_embeds=10), "random-class-labels", False),
    ],
    ids=["sdxl-added-conditioning", "class-conditional"],
)
def test_added_conditioning_gets_a_seeded_fallback(make, overrides, conditioning, guided):
    report = analyze(graph_of(make(**overrides)), steps=2)
    assert report.conditioning == conditioning and report.classifier_free_guidance is guided
    assert len(report) == 12 and min(report.scores.values()) > 0


def test_batching_does_not_change_scores_with_a_stochastic_scheduler(unet2d_graph):
    # DDPM draws noise in every step; per-sample generators make each trajectory independent of batching
    whole = analyze_importance(unet2d_graph, config=FAST, scheduler=DDPMScheduler(), progress=False)
    halves = analyze_importance(unet2d_graph, config=dataclasses.replace(FAST, batch_size=2),
                                scheduler=DDPMScheduler(), progress=False)
    assert whole.scheduler["source"] == "given" and whole.scheduler["class"] == "DDPMScheduler"
    assert halves.unet_calls == 2 * whole.unet_calls
    for name, score in whole.scores.items():
        assert halves[name].score == pytest.approx(score, rel=1e-5)
    deterministic = analyze_importance(unet2d_graph, config=FAST, progress=False)
    assert deterministic.scores != whole.scores


def test_micro_batches_stream_the_same_statistics_as_one_batch(sd_graph):
    """Guided (the UNet sees 2 x the micro-batch), uneven micro-batches (3 + 1): μ and σ stream in float64 and
    equal the one-batch statistics up to summation order; the announced cost is the cost paid."""
    whole = analyze(sd_graph)
    streamed = analyze(sd_graph, batch_size=3)
    assert streamed.classifier_free_guidance and streamed.config.batch_size == 3
    assert whole.planned_unet_calls == whole.unet_calls == (1 + len(whole)) * FAST.steps
    assert streamed.planned_unet_calls == streamed.unet_calls == 2 * whole.unet_calls
    for name, score in whole.scores.items():
        assert streamed[name].score == pytest.approx(score, rel=1e-5, abs=1e-9)
    assert streamed.placement["device"] == "cpu" and streamed.placement["dtype"] == "float32"
    assert streamed.peak_memory[0]["host_peak_rss_mib"] > 0


def test_latent_moments_equal_the_one_pass_statistics():
    from ldpruner.passes.importance import LatentMoments, latent_stats

    latents = torch.randn(11, 4, 5, 5, generator=torch.Generator().manual_seed(0)) * 3 + 1
    moments = LatentMoments()
    for chunk in (latents[:1], latents[1:5], latents[5:6], latents[6:]):
        moments.update(chunk)
    mean, std = moments.stats()
    reference = latent_stats(latents)
    assert mean.dtype == std.dtype == torch.float64 and moments.count == 11
    torch.testing.assert_close(mean, reference[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(std, reference[1], rtol=1e-12, atol=1e-12)


def test_bfloat16_analysis_on_cpu_scores_a_cast_copy(tmp_path):
    from ldpruner import api

    model = make_tiny_sd_unet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = api.analyze(model, device="cpu", dtype="bfloat16", num_samples=2, steps=2, height=8, width=8,
                         batch_size=1, progress=False, out=tmp_path)
    assert report.config.dtype == "bfloat16" and report.placement["dtype"] == "bfloat16"
    assert report.placement["device"] == "cpu" and report.placement["accelerator"]
    assert all(torch.isfinite(torch.tensor(e.score)) for e in report)
    # the caller's model is untouched: the analysis ran on a cast copy
    assert all(v.dtype == torch.float32 and torch.equal(v, before[k]) for k, v in model.state_dict().items())
    saved = json.loads((tmp_path / "scores.json").read_text())
    assert saved["placement"]["dtype"] == "bfloat16" and saved["cost"]["planned_unet_calls"] == report.unet_calls
    float32 = api.analyze(model, device="cpu", num_samples=2, steps=2, height=8, width=8, progress=False)
    assert float32.cache_key != report.cache_key  # cast weights are other weights


def test_device_and_dtype_mismatches_are_config_errors(sd_graph):
    from ldpruner import api

    with pytest.raises(ConfigError, match=r"configured for dtype='bfloat16' but the traced UNet is in float32"):
        analyze(sd_graph, dtype="bfloat16")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"device='cuda', but torch sees no CUDA device"):
            api.analyze(make_tiny_sd_unet(), device="cuda", num_samples=2, steps=1)
    with pytest.raises(ConfigError, match=r"device='gpu' is not one of auto, cpu, cuda, cuda:N"):
        api.analyze(make_tiny_sd_unet(), device="gpu")


def test_one_named_gpu_under_torchrun_is_refused(monkeypatch):
    from ldpruner.base import devices

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"device='cuda:1' names one GPU, but torchrun started 2 processes"):
        devices.resolve_device("cuda:1")
    assert devices.resolve_device("cpu").type == "cpu"


# --- conditioning ---------------------------------------------------------------------------------------------

def make_text_pipeline(folder: Path, hidden: int = 32) -> None:
    """A pipeline folder with a tiny BERT text encoder and a word-level tokenizer, built offline."""
    from transformers import BertConfig, BertModel, BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat", "dog", "red", "digit"]
    vocab = folder / "vocab.txt"
    folder.mkdir(parents=True)
    vocab.write_text("\n".join(words) + "\n")
    BertTokenizer(str(vocab), model_max_length=77).save_pretrained(folder / "tokenizer")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(words), hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=80)
    BertModel(config).eval().save_pretrained(folder / "text_encoder")


def test_text_encoder_path_encodes_prompts_from_a_local_pipeline_folder(tmp_path, sd_graph):
    make_text_pipeline(tmp_path / "pipe")
    prompts = ("a photo of a cat", "a red dog", "a digit")
    cond = encode_prompts(tmp_path / "pipe", prompts)
    assert cond.encoder_hidden_states.shape == (3, 77, 32)
    assert cond.negative_encoder_hidden_states.shape == (1, 77, 32)
    assert not torch.equal(cond.encoder_hidden_states[0], cond.encoder_hidden_states[1])
    # on an explicit device, a prompt at a time: the same embeddings (padding makes every prompt 77 tokens)
    one_by_one = encode_prompts(tmp_path / "pipe", prompts, device="cpu", batch_size=1)
    assert torch.allclose(one_by_one.encoder_hidden_states, cond.encoder_hidden_states, atol=1e-6)
    assert one_by_one.encoder_hidden_states.device.type == "cpu"

    report = analyze(sd_graph, tmp_path / "pipe", prompts=prompts)
    assert report.conditioning == "text-encoder" and report.prompts == prompts
    direct = analyze(sd_graph, cond, prompts=prompts)
    assert direct.scores == report.scores


def test_conditioning_that_does_not_fit_the_unet_is_rejected(tmp_path, sd_graph, unet2d_graph):
    with pytest.raises(ConfigError, match="dim 16, the UNet expects 32"):
        analyze(sd_graph, Conditioning(encoder_hidden_states=torch.zeros(4, 77, 16),
                                       negative_encoder_hidden_states=torch.zeros(1, 77, 16)))
    with pytest.raises(ConfigError, match="guidance_scale=7.5"):
        analyze(sd_graph, Conditioning(encoder_hidden_states=torch.zeros(4, 77, 32)))
    with pytest.raises(ConfigError, match="takes no encoder_hidden_states"):
        analyze(unet2d_graph, Conditioning(encoder_hidden_states=torch.zeros(4, 77, 32)))
    with pytest.raises(ConfigError, match="needs encoder_hidden_states"):
        analyze(sd_graph, Conditioning(source="unconditional"))
    make_text_pipeline(tmp_path / "wide", hidden=16)
    with pytest.raises(ConfigError, match="dim 16"):
        analyze(sd_graph, tmp_path / "wide")


# --- scores.json and the cache ----------------------------------------------------------------------------------

def test_scores_json_round_trip(tmp_path, unet2d_graph):
    report = analyze(unet2d_graph)
    written = report.save(tmp_path)
    assert written == tmp_path / "scores.json"
    data = json.loads(written.read_text())
    assert data["format"] == "ldpruner.scores/1"
    assert data["conditioning"] == "unconditional"
    assert [c["name"] for c in data["candidates"]] == list(report.entries)
    assert {"score", "mu_term", "sigma_term", "params", "macs", "action", "kind"} <= set(data["candidates"][0])
    assert ImportanceReport.load(written) == report
    assert ImportanceReport.from_dict(report.to_dict()) == report
    assert [p.name for p in tmp_path.iterdir()] == ["scores.json"]  # atomic write leaves no temp file
    with pytest.raises(ArtifactError, match="format"):
        ImportanceReport.from_dict({"format": "something else"})


def test_cache_key_follows_weights_config_granularity_and_scheduler(tmp_path, unet2d_graph):
    report = analyze(unet2d_graph, save_to=tmp_path / "scores.json")
    key = cache_key(unet2d_graph, config=FAST)
    assert report.cache_key == key
    assert ImportanceReport.load_cached(tmp_path / "scores.json", key) == report
    assert ImportanceReport.load_cached(tmp_path, key) == report
    assert ImportanceReport.load_cached(tmp_path / "absent.json", key) is None

    other_keys = {
        "config": cache_key(unet2d_graph, config=dataclasses.replace(FAST, steps=2)),
        "seed": cache_key(unet2d_graph, config=dataclasses.replace(FAST, seed=1)),
        "scheduler": cache_key(unet2d_graph, config=FAST, scheduler=DDPMScheduler()),
    }
    model = make_tiny_unet2d()
    assert cache_key(graph_of(model), config=FAST) == key  # same seeded weights, new trace: same key
    with torch.no_grad():
        model.conv_in.weight[0, 0, 0, 0] += 1e-3
    other_keys["weights"] = cache_key(graph_of(model), config=FAST)
    other_keys["granularity"] = cache_key(graph_of(make_tiny_unet2d(), "sublayer"), config=FAST)
    for what, other in other_keys.items():
        assert other != key, what
        assert ImportanceReport.load_cached(tmp_path / "scores.json", other) is None, what
    # the same analysis spelled differently: the default scheduler given explicitly, the traced size named,
    # a guidance scale the unconditional UNet ignores
    assert cache_key(unet2d_graph, config=FAST, scheduler=DDIMScheduler()) == key
    traced_size = dataclasses.replace(FAST, height=None, width=None)
    assert cache_key(unet2d_graph, config=traced_size) == \
        cache_key(unet2d_graph, config=dataclasses.replace(FAST, height=16, width=16)) != key
    assert cache_key(unet2d_graph, config=dataclasses.replace(FAST, guidance_scale=3.0)) == key

    (tmp_path / "junk.json").write_text("not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        ImportanceReport.load_cached(tmp_path / "junk.json", key)


# --- configuration errors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "field, value",
    [
        ("num_samples", 1),
        ("num_samples", 2.5),
        ("steps", 0),
        ("seed", -1),
        ("height", 0),
        ("width", "8"),
        ("guidance_scale", float("nan")),
        ("guidance_scale", -1.0),
        ("batch_size", 0),
        ("prompts", ()),
        ("prompts", "a cat"),
        ("prompts", ("a cat", "")),
    ],
)
def test_bad_config_values_raise_config_error_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=f"{field}="):
        AnalysisConfig(**{field: value})


def test_config_errors_are_collected_and_dicts_round_trip():
    with pytest.raises(ConfigError, match="num_samples=0.*steps=0"):
        AnalysisConfig(num_samples=0, steps=0)
    config = AnalysisConfig(prompts=["a", "b"])
    assert config.prompts == ("a", "b")
    assert AnalysisConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match=r"^unknown AnalysisConfig option 'sample_count'; the options are "):
        AnalysisConfig.from_dict({"sample_count": 4})


def test_config_values_that_do_not_fit_the_model_raise(sd_graph):
    with pytest.raises(ConfigError, match="height=7 is not a multiple of 2"):
        analyze(sd_graph, height=7)
    with pytest.raises(ConfigError, match="steps=2000 exceeds"):
        analyze(sd_graph, steps=2000)


def test_samples_that_are_not_finite_get_the_advice_that_fits_the_settings():
    """A score-SDE UNet (Fourier time embedding: the log of the timestep) sampled by the default DDIM reaches t=0 and
    gives NaN: in float32 the scheduler is named as the likely cause, in half precision the dtype."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    sde = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                      norm_num_groups=8, down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D"),
                      up_block_types=("AttnSkipUpBlock2D", "SkipUpBlock2D"), time_embedding_type="fourier").eval()
    config = AnalysisConfig(num_samples=2, steps=2, height=8, width=8)
    start = "the dense model's samples are not finite (NaN or Inf) in"
    cases = [
        (graph_of(sde), config, None, None,
         f"{start} float32 with DDIMScheduler() at diffusers' defaults (the model brings no scheduler); the analysis "
         "would score nothing: the default scheduler is the likely cause, pass the model's own with --scheduler "
         "(scheduler=: a scheduler folder, or a class such as ScoreSdeVeScheduler) or check the model"),
        (graph_of(sde), config, DDPMScheduler(), "asked",
         f"{start} float32 with DDPMScheduler (asked for with --scheduler); the analysis would score nothing: check "
         "that the scheduler is the one the model was trained with (--scheduler picks another) and that the model's "
         "outputs are finite"),
        (graph_of(sde.to(torch.bfloat16)), dataclasses.replace(config, dtype="bfloat16"), None, None,
         f"{start} bfloat16 at these settings; the analysis would score nothing: analyse in float32 "
         "(dtype='float32') or check the model"),
    ]
    for graph, settings, scheduler, source, message in cases:
        with pytest.raises(ConfigError) as info:
            analyze_importance(graph, config=settings, scheduler=scheduler, scheduler_source=source, progress=False)
        assert str(info.value) == message


# --- sharding -------------------------------------------------------------------------------------------------

def _rank_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    rank_environment(rank, world, port)
    import torch.distributed as dist

    from ldpruner.base.placement import place

    try:
        # the command's placement joins the gloo group from the launcher's environment; the analysis is handed its
        # place in it
        with place("cpu", 1) as placement:
            report = analyze_importance(graph_of(make_tiny_sd_unet()), config=FAST, progress=False,
                                        save_to=Path(out_dir) / f"saved-by-rank{rank}" / "scores.json",
                                        world=placement.world)
        report.save(Path(out_dir, f"rank{rank}.json"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_two_gloo_ranks_give_the_same_report_as_one_process(tmp_path, sd_graph):

    assert torch.get_num_threads() == 1  # as in the ranks: same kernels, same numbers
    single = analyze(sd_graph)

    run_ranks(_rank_worker, 2, str(tmp_path))

    reports = [ImportanceReport.load(tmp_path / f"rank{r}.json") for r in range(2)]
    assert reports[0] == reports[1]  # every rank returns the full report
    assert reports[0].world_size == 2
    assert list(reports[0].entries) == list(single.entries)
    for name, score in single.scores.items():
        assert reports[0][name].score == pytest.approx(score, rel=1e-6, abs=1e-9)
    assert reports[0].cache_key == single.cache_key
    # each rank generates the dense latents once; the candidates are split between them
    assert reports[0].unet_calls == single.unet_calls + FAST.steps
    assert (tmp_path / "saved-by-rank0" / "scores.json").is_file()
    assert not (tmp_path / "saved-by-rank1").exists()
