"""Every UNet family of diffusers' own pipelines, tiny and seeded (configs as in diffusers' pipeline tests, shrunk to
16x16 latents): each builds end to end — trace, analysis, selection, rewrite, distillation, ONNX export validated —
or is refused with a one-line error naming the config option and its value. The inspect table's parameter total,
plus what it names as outside the graph, equals diffusers' own count."""

from __future__ import annotations

import diffusers
import pytest
import torch
from family_sweep import BUILDS, NO_DROP_IN, REFUSED, make_pipeline, make_unet

from ldpruner import api
from ldpruner.base.errors import ConfigError, UnsupportedModelError
from ldpruner.cli import main
from ldpruner.compiler.tracer import trace_unet, unet_example_inputs

pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.mark.parametrize("family", BUILDS)
def test_family_builds_end_to_end_with_the_onnx_validated(family, tmp_path):
    folder = make_pipeline(family, tmp_path)
    report = api.build(str(folder), out=tmp_path / "out", budget=0.1, num_samples=2, steps=2, distill_steps=1,
                       distill_options={"batch_size": 2, "trajectories": 2, "trajectory_steps": 2}, progress=False)
    assert report["removed"], "the plan removes at least one operator"
    assert report["export"]["export"]["validation"]["passed"]
    assert report["distill"]["steps"] == 1
    # the graph's parameters plus what is named outside it are diffusers' own count
    outside = report["params"]["outside_graph"]
    counted = report["params"]["dense"] + (outside["params"] if outside else 0)
    assert counted == sum(p.numel() for p in make_unet(family).parameters())
    assert outside is None  # GLIGEN's fusers, the one family with modules outside the graph, are refused by export


@pytest.mark.parametrize("family", sorted(REFUSED) + sorted(NO_DROP_IN))
def test_refused_family_names_the_option_in_one_line(family, tmp_path, capsys):
    folder = make_pipeline(family, tmp_path)
    assert main(["inspect", str(folder)]) == 0  # the trace works
    capsys.readouterr()
    code = main(["build", str(folder), "--out", str(tmp_path / "out"), "--budget", "0.05", "--num-samples", "2",
                 "--steps", "2", "--distill-steps", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    assert err[0].startswith("error: UnsupportedModelError: " + {**REFUSED, **NO_DROP_IN}[family])


def test_inputs_follow_the_config():
    names = {f: trace_unet(make_unet(f), unet_example_inputs(make_unet(f))).input_names
             for f in ("lcm", "audioldm", "kandinsky-2.1", "kandinsky-2.2-controlnet", "stable-unclip",
                       "deepfloyd-if")}
    assert names["lcm"] == ("sample", "timestep", "encoder_hidden_states", "timestep_cond")
    assert names["audioldm"] == ("sample", "timestep", "class_labels")  # per-level widths = channels: no tokens
    assert names["kandinsky-2.1"] == ("sample", "timestep", "encoder_hidden_states", "text_embeds", "image_embeds")
    assert names["kandinsky-2.2-controlnet"] == ("sample", "timestep", "image_embeds", "hint")
    assert names["stable-unclip"] == ("sample", "timestep", "encoder_hidden_states", "class_labels")
    assert names["deepfloyd-if"] == ("sample", "timestep", "encoder_hidden_states")
    inputs = unet_example_inputs(make_unet("kandinsky-2.2-controlnet"), batch=3, height=8, width=16)
    assert inputs["sample"].shape == (3, 4, 8, 16) and inputs["hint"].shape == (3, 3, 64, 128)
    assert unet_example_inputs(make_unet("stable-unclip"))["class_labels"].shape == (2, 64)


def test_per_level_token_widths_that_differ_are_refused_by_name():
    model = make_unet("lcm", time_cond_proj_dim=None, cross_attention_dim=(16, 24),
                      down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    with pytest.raises(UnsupportedModelError, match=r"^cross_attention_dim=\[16, 24\] is not supported: its "
                                                    r"cross-attention levels read tokens of different widths"):
        unet_example_inputs(model)


def test_a_prediction_wider_than_the_input_is_refused_by_name(tmp_path):
    model = make_unet("ddpm-class-ids", num_class_embeds=None, out_channels=4)
    with pytest.raises(UnsupportedModelError, match=r"^out_channels=4 is not supported with in_channels=3"):
        api.analyze(model, num_samples=2, steps=1, progress=False)


def test_gligen_grounding_is_named_outside_the_graph_in_inspect_and_the_plan(tmp_path):
    model = make_unet("gligen")
    graph = api.inspect(model)
    assert graph.outside_graph()["modules"] == {"position_net": sum(
        p.numel() for p in model.position_net.parameters())}
    assert "outside the graph: " in graph.table().splitlines()[-1] and "gligen" in graph.table()
    # at sublayer granularity the gated fusers are outside too (their transformer blocks are opened)
    sub = api.inspect(model, granularity="sublayer").outside_graph()["modules"]
    assert "position_net" in sub and any(name.endswith(".fuser") for name in sub)
    scores = api.analyze(model, num_samples=2, steps=1, progress=False)
    plan = api.select(scores, model=model, budget=0.1)
    assert plan.outside_graph == graph.outside_graph()
    assert plan.to_dict()["outside_graph"]["params"] == graph.outside_graph()["params"]


def test_inpainting_defaults_are_masks_over_the_dense_models_own_samples():
    from ldpruner.compiler.graph import build_operator_graph
    from ldpruner.passes.inputs import default_extra_channels

    traced = build_operator_graph(trace_unet(make_unet("sd-inpainting"))).traced
    scheduler = diffusers.DDIMScheduler()
    noise = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    reference = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    seen = []

    def sample(noise_, extra):
        seen.append(extra.clone())
        return reference

    extra = default_extra_channels(traced, scheduler, noise=noise, sample=sample, seed=0)
    # the reference generation inpaints everything: mask 1, masked latents 0
    assert torch.equal(seen[0][:, :1], torch.ones(3, 1, 16, 16)) and not seen[0][:, 1:].any()
    mask, masked = extra[:, :1], extra[:, 1:]
    assert extra.shape == (3, 5, 16, 16) and set(mask.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(masked, reference * (1 - mask))  # the sample where it is kept, zeros where it is masked
    assert 0 < mask.mean() < 1


def test_calibration_file_gives_real_extra_channels_and_is_checked(tmp_path):
    from safetensors.torch import save_file

    folder = make_pipeline("sd-inpainting", tmp_path)
    extra = torch.zeros(2, 5, 16, 16)
    extra[:, 0, 4:12, 4:12] = 1.0
    save_file({"extra_channels": extra}, str(tmp_path / "calib.safetensors"))
    scores = api.analyze(str(folder), calibration=tmp_path / "calib.safetensors", num_samples=2, steps=2,
                         progress=False)
    assert "calibration file calib.safetensors (extra_channels)" in scores.conditioning
    assert "inpainting masks" not in scores.conditioning
    save_file({"extra_channels": extra[:, :4].contiguous()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ConfigError, match=r"extra_channels has 4 channels; UNet2DConditionModel takes 9 input "
                                          r"channels, 5 of them besides the latent"):
        api.analyze(str(folder), calibration=tmp_path / "bad.safetensors", num_samples=2, steps=2, progress=False)
    save_file({"mask": extra[:, :1].contiguous()}, str(tmp_path / "unknown.safetensors"))
    with pytest.raises(ConfigError, match=r"holds \['mask'\]; its tensors must be named from"):
        api.analyze(str(folder), calibration=tmp_path / "unknown.safetensors", progress=False)


def test_distilling_an_inpainting_unet_from_an_image_folder_is_refused(tmp_path):
    from PIL import Image

    folder = make_pipeline("sd-inpainting", tmp_path)
    pruned = api.prune(str(folder), api.select(api.analyze(str(folder), num_samples=2, steps=1, progress=False),
                                               budget=0.1))
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (32, 32)).save(images / "a.png")
    with pytest.raises(ConfigError, match=r"^distilling from an image folder .* is not supported for "
                                          r"in_channels=9: the UNet takes 5 channels besides the latent"):
        api.distill(str(folder), pruned, out=tmp_path / "d", data=images, steps=1, progress=False)


def test_an_input_the_pruned_graph_no_longer_reads_stays_an_onnx_input(tmp_path):
    """Removing every cross-attention leaves encoder_hidden_states unread; the ONNX keeps it, so a pipeline's call
    with the dense UNet's inputs still works."""
    from ldpruner.passes.plan import PlannedRemoval, RemovalPlan
    from ldpruner.runtime.unet import ORTUNet

    model = make_unet("lcm", time_cond_proj_dim=None)
    graph = api.inspect(model)
    attention = [op for op in graph.candidates if op.kind == "transformer"]
    assert attention
    plan = RemovalPlan(tuple(PlannedRemoval(op.name, op.action.value, op.params, op.macs, reason="test")
                             for op in attention), graph.traced.model_class, "block", graph.total_params,
                       graph.total_macs)
    pruned = api.prune(model, plan)
    assert not any(n.target == "encoder_hidden_states" and n.users for n in pruned.gm.graph.nodes)
    api.export(pruned, out=tmp_path, optimize=False)
    unet = ORTUNet.from_pretrained(tmp_path / "onnx")
    assert "encoder_hidden_states" in unet.session.input_names
    inputs = unet_example_inputs(model, batch=1)
    out = unet(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"]).sample
    expected = pruned.gm(*[inputs[n] for n in pruned.input_names])
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_unclip_scheduler_steps_to_the_next_timestep_as_the_pipeline_does():
    from ldpruner.runtime.sampling import sample_latents

    def unet(sample, timestep):
        return 0.1 * sample  # a stand-in prediction: the loop, not the model, is under test

    scheduler = diffusers.UnCLIPScheduler()
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    got = sample_latents(unet, scheduler, noise=noise, steps=4, seed=3)
    # UnCLIPPipeline's loop: step(..., prev_timestep=the next one in the schedule)
    reference = diffusers.UnCLIPScheduler()
    reference.set_timesteps(4)
    latents, schedule = noise * reference.init_noise_sigma, list(reference.timesteps)
    generator = torch.Generator().manual_seed(3)
    for i, t in enumerate(schedule):
        prev = schedule[i + 1] if i + 1 < len(schedule) else None
        latents = reference.step(unet(latents, t), t, latents, prev_timestep=prev, generator=generator).prev_sample
    torch.testing.assert_close(got, latents)


def test_kandinsky_hint_follows_the_analysed_latent_size_and_is_checked():
    from ldpruner.passes.conditioning import Conditioning
    from ldpruner.passes.config import AnalysisConfig
    from ldpruner.passes.importance import analyze_importance

    model = make_unet("kandinsky-2.2-controlnet")
    scores = api.analyze(model, height=8, width=8, num_samples=2, steps=1, progress=False)  # traced at 16x16
    assert list(scores.latent_shape) == [2, 4, 8, 8]
    graph = api.inspect(model)
    bad = Conditioning(image_embeds=torch.randn(2, 32), negative_image_embeds=torch.randn(1, 32),
                       hint=torch.rand(2, 1, 64, 64))

    with pytest.raises(ConfigError, match=r"hint rows have shape \(1, 64, 64\); at this latent size the UNet takes "
                                          r"\(3, 128, 128\)"):
        analyze_importance(graph, bad, config=AnalysisConfig(num_samples=2, steps=1), progress=False)


def test_if_super_resolution_without_its_learned_variance_scheduler_is_refused_by_name():
    with pytest.raises(UnsupportedModelError, match=r"^variance_type=None \(DDIMScheduler\) is not "
                                                    r"supported for this UNet: with class_embed_type='timestep'"):
        api.analyze(make_unet("deepfloyd-if-superres"), num_samples=2, steps=1, progress=False)


def test_per_level_widths_equal_to_the_channels_are_tokens_unless_audioldm():
    model = make_unet("lcm", time_cond_proj_dim=None, cross_attention_dim=(32, 64))
    assert unet_example_inputs(model)["encoder_hidden_states"].shape[-1] == 64  # one width at the attention level
    audio = make_unet("audioldm")
    assert "encoder_hidden_states" not in unet_example_inputs(audio)


def test_calibration_file_content_reaches_the_unet(tmp_path):
    from safetensors.torch import save_file

    folder = make_pipeline("sd-inpainting", tmp_path)
    scores = []
    for name, fill in (("a", 0.0), ("b", 1.0)):
        extra = torch.full((2, 5, 16, 16), fill)
        save_file({"extra_channels": extra}, str(tmp_path / f"{name}.safetensors"))
        scores.append(api.analyze(str(folder), calibration=tmp_path / f"{name}.safetensors", num_samples=2, steps=2,
                                  progress=False))
    assert scores[0].cache_key != scores[1].cache_key
    assert scores[0].scores != scores[1].scores


def test_distillation_rows_index_each_tensor_by_its_own_row_count():
    from ldpruner.passes.conditioning import Conditioning
    from ldpruner.passes.distill.data import _conditioning_inputs, negative

    tokens = torch.arange(3.0).reshape(3, 1, 1).expand(3, 2, 4)
    conditioning = Conditioning(encoder_hidden_states=tokens, class_labels=torch.tensor([10, 11]),
                                negative_encoder_hidden_states=torch.full((1, 2, 4), -1.0))
    ids = torch.tensor([0, 1, 2, 3, int(negative(torch.tensor(3)))])
    inputs = _conditioning_inputs(conditioning, ids, ("sample", "timestep", "encoder_hidden_states", "class_labels"),
                                  torch.float32)
    assert inputs["class_labels"].tolist() == [10, 11, 10, 11, 11]  # the unconditional row keeps row 3's label
    assert inputs["encoder_hidden_states"][:, 0, 0].tolist() == [0.0, 1.0, 2.0, 0.0, -1.0]


def test_k_diffusion_attention_whose_residual_add_is_reshaped_away_is_not_removable():
    """KAttentionBlock reshapes its attention's output before the residual add: removing the attention as a bypass
    would add the normalised features on (h + norm(h)), so at sublayer granularity it is not removable."""
    graph = api.inspect(make_unet("sd-latent-upscaler"), granularity="sublayer")
    attentions = [op for op in graph if op.kind in ("self-attention", "cross-attention")]
    assert attentions and all(op.action.value == "not-removable" for op in attentions)
    assert {op.reason for op in attentions} == {"attention branch whose residual add was not found"}


def test_distilling_an_image_conditioned_unet_on_a_folder_asks_for_no_captions(tmp_path):
    """Kandinsky 2.2's forward has encoder_hidden_states, but its config feeds it image embeddings: a dataset
    folder without captions is not refused for lacking captions."""
    from PIL import Image

    from ldpruner.stages.calibration import check_distill_inputs

    folder = make_pipeline("kandinsky-2.2", tmp_path)
    diffusers.AutoencoderKL(block_out_channels=(32,), norm_num_groups=8, latent_channels=4).save_pretrained(
        folder / "vae")
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (32, 32)).save(images / "a.png")
    check_distill_inputs(api.load(str(folder)), data=images, prompts_file=None)  # no "has no captions" refusal
