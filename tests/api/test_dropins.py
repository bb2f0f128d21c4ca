"""The pruned UNet inside stock diffusers pipelines: the PyTorch drop-in (StudentUNet) and the onnxruntime one
(ORTUNet), for StableDiffusionPipeline and StableDiffusionXLPipeline. A plan that removes operators whose residual
branches are zeroed in the dense model computes the dense function, so the pipelines must give the dense output
(exactly in PyTorch, within the export tolerance in onnxruntime)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_tiny_sd_unet

from ldpruner import api
from ldpruner.base.errors import UnsupportedInputError
from ldpruner.passes.plan import PlannedRemoval, RemovalPlan
from ldpruner.runtime.unet import ORTUNet
from ldpruner.sources.families import build_unet
from ldpruner.unet import StudentUNet

pytestmark = pytest.mark.usefixtures("one_thread")
ATOL = 2e-4


def zero_effect(model: torch.nn.Module) -> tuple[torch.nn.Module, RemovalPlan]:
    """``model`` with the residual branch of every transformer and same-shape resnet zeroed (each adds 0 to its
    input), and the plan that removes them: the pruned graph computes the same function as the dense one."""
    graph = api.inspect(model)
    chosen = [op for op in graph.candidates if op.kind == "transformer" or (
        op.kind == "resnet" and op.in_shape == op.out_shape)]
    with torch.no_grad():
        for op in chosen:
            module = model.get_submodule(op.name)
            last = module.proj_out if op.kind == "transformer" else module.conv2
            last.weight.zero_()
            last.bias.zero_()
    plan = RemovalPlan(tuple(PlannedRemoval(op.name, op.action.value, op.params, op.macs, reason="zeroed branch")
                             for op in chosen), graph.traced.model_class, "block", graph.total_params,
                       graph.total_macs)
    assert len(chosen) >= 4
    return model, plan


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                         sample_size=32).eval()


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    dense, plan = zero_effect(make_tiny_sd_unet())
    student = StudentUNet(api.prune(dense, plan))
    out = tmp_path_factory.mktemp("sd")
    api.export(student.pruned, out=out, optimize=False)
    return dense, student, ORTUNet.from_pretrained(out / "onnx")


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    dense, plan = zero_effect(build_unet("sdxl", reduced=True, seed=0))
    student = StudentUNet(api.prune(dense, plan))
    out = tmp_path_factory.mktemp("sdxl")
    api.export(student.pruned, out=out, optimize=False)
    return dense, student, ORTUNet.from_pretrained(out / "onnx")


def _run_sd(unet, vae):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet,
                                   scheduler=EulerDiscreteScheduler(steps_offset=1), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    prompt, negative = torch.randn(2, 1, 77, 32, generator=torch.Generator().manual_seed(1))
    return pipe(prompt_embeds=prompt, negative_prompt_embeds=negative, guidance_scale=5.0, num_inference_steps=3,
                height=32, width=32, generator=torch.Generator().manual_seed(0), output_type="np").images


def test_stable_diffusion_pipeline_takes_both_drop_ins_and_gives_the_dense_output(sd):
    dense, student, ort = sd
    vae = tiny_vae()
    images = {name: _run_sd(unet, vae) for name, unet in (("dense", dense), ("torch", student), ("ort", ort))}
    assert images["dense"].shape == (1, 32, 32, 3) and images["dense"].std() > 0.05
    np.testing.assert_array_equal(images["torch"], images["dense"])  # zeroed branches: the same function
    np.testing.assert_allclose(images["ort"], images["dense"], atol=ATOL, rtol=0)


def test_stable_diffusion_xl_pipeline_takes_both_drop_ins(sdxl):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    dense, student, ort = sdxl
    cross = dense.config.cross_attention_dim
    pooled = dense.config.projection_class_embeddings_input_dim - 6 * dense.config.addition_time_embed_dim
    gen = torch.Generator().manual_seed(2)
    embeds = dict(prompt_embeds=torch.randn(1, 77, cross, generator=gen),
                  negative_prompt_embeds=torch.randn(1, 77, cross, generator=gen),
                  pooled_prompt_embeds=torch.randn(1, pooled, generator=gen),
                  negative_pooled_prompt_embeds=torch.randn(1, pooled, generator=gen))
    latents = {}
    for name, unet in (("dense", dense), ("torch", student), ("ort", ort)):
        pipe = StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=None, text_encoder_2=None, tokenizer=None,
                                         tokenizer_2=None, unet=unet, scheduler=EulerDiscreteScheduler(),
                                         force_zeros_for_empty_prompt=False)
        pipe.set_progress_bar_config(disable=True)
        latents[name] = pipe(**embeds, guidance_scale=5.0, num_inference_steps=2, height=16, width=16,
                             generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert latents["dense"].shape == (1, 4, 8, 8)
    torch.testing.assert_close(latents["torch"], latents["dense"], atol=0, rtol=0)
    torch.testing.assert_close(latents["ort"], latents["dense"], atol=ATOL * latents["dense"].abs().max().item(),
                               rtol=0)


def test_drop_in_behaves_like_the_dense_module(sd, tmp_path):
    dense, student, _ = sd
    assert student.config["_class_name"] == "UNet2DConditionModel"
    assert student.in_channels == dense.config.in_channels == 4  # config entries as attributes, like diffusers
    assert student.dtype == torch.float32 and student.device == torch.device("cpu")
    assert student.conv_in is student.graph.conv_in  # the graph's submodules, as pipelines look them up
    sample = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    text = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = dense(sample, 500, text).sample
        got = student(sample, 500, text)  # a scalar timestep is broadcast, as diffusers does
        (as_tuple,) = student(sample, torch.tensor([500, 500]), encoder_hidden_states=text, return_dict=False)
    assert type(got).__name__ == "UNet2DConditionOutput"
    torch.testing.assert_close(got.sample, expected, atol=0, rtol=0)
    torch.testing.assert_close(as_tuple, expected, atol=0, rtol=0)
    # save_pretrained / from_pretrained round trip (safetensors), in another dtype
    student.save_pretrained(tmp_path / "student")
    loaded = StudentUNet.from_pretrained(tmp_path / "student", torch_dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16 and dict(loaded.config) == dict(student.config)
    with torch.no_grad():
        low = loaded(sample.bfloat16(), 500, text.bfloat16()).sample
    torch.testing.assert_close(low.float(), expected, atol=0.1, rtol=0.05)
    with pytest.raises(UnsupportedInputError,
                       match=r"encoder_hidden_states is required by the traced graph but was not given"):
        student(sample, 500)
    with pytest.raises(UnsupportedInputError, match=r"cross_attention_kwargs \['scale'\]"):
        student(sample, 500, text, cross_attention_kwargs={"scale": 0.5})


def test_drop_in_runs_under_torch_compile(sd):
    dense, student, _ = sd
    compiled = torch.compile(student, dynamic=False)
    sample = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = compiled(sample, torch.tensor([10]), text).sample
        expected = student(sample, torch.tensor([10]), text).sample
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_export_takes_a_dense_model_for_a_validated_baseline(tmp_path, capsys):
    from conftest import make_tiny_sd_unet as make

    from ldpruner.cli import main

    folder = tmp_path / "unet"
    make().save_pretrained(folder, safe_serialization=True)
    assert main(["export", str(folder), "--out", str(tmp_path / "dense"), "--height", "8", "--width", "8",
                 "--no-optimize"]) == 0
    summary = __import__("json").loads(capsys.readouterr().out)
    assert summary["export"]["validation"]["passed"]
    dense_onnx = ORTUNet.from_pretrained(tmp_path / "dense" / "onnx")
    sample = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))  # dynamic: not the traced 8x8
    text = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = make()(sample, 7, text).sample
    torch.testing.assert_close(dense_onnx(sample, 7, text).sample, expected, atol=ATOL, rtol=0)
    # a student exports at its own traced size: height/width are refused for it
    student_dir = tmp_path / "student"
    StudentUNet(api.prune(*zero_effect(make()))).save_pretrained(student_dir)
    assert main(["export", str(student_dir), "--out", str(tmp_path / "s"), "--height", "8"]) == 1
    assert "height/width ({'height': 8}) apply to a dense model" in capsys.readouterr().err


def _peft_lora(model: torch.nn.Module, folder, targets=("to_q", "to_k", "to_v", "to_out.0", "conv1"), alpha=8):
    """A PEFT LoRA on ``model`` (non-zero weights), saved the way diffusers saves one; returns the model with the
    adapter active (the dense+LoRA reference) and the file."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(3)
    config = LoraConfig(r=4, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False)
    model.add_adapter(config)
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(model),
                                              unet_lora_adapter_metadata=config.to_dict(), safe_serialization=True)
    return model, folder / "pytorch_lora_weights.safetensors"


def test_a_peft_lora_of_the_dense_unet_fuses_into_the_student(tmp_path, capsys):
    import copy

    from ldpruner.cli import main

    dense, plan = zero_effect(make_tiny_sd_unet())
    resnets = [r.name for r in plan.removals if "resnets" in r.name]
    plan = RemovalPlan(tuple(r for r in plan.removals if r.name in resnets), plan.model_class, plan.granularity,
                       plan.total_params, plan.total_macs)  # keep the attention, where most of the LoRA lives
    student = StudentUNet(api.prune(dense, plan))
    reference, path = _peft_lora(copy.deepcopy(dense), tmp_path)
    fused, report = api.lora(student, path)
    # the conv1 pairs of the removed resnets are dropped: inside a zeroed branch they changed nothing in the dense
    assert report["dropped"] == len(resnets) and set(report["dropped_modules"].values()) == set(resnets)
    assert report["fused"] == report["pairs"] - len(resnets) > 0 and 0 < report["dropped_fraction"] < 1
    sample = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    text = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(sample, 300, text).sample
        plain = dense(sample, 300, text).sample
        got = fused(sample, 300, text).sample
    assert (expected - plain).abs().max() > 1e-2  # the LoRA does something
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # the caller's student is unchanged
        torch.testing.assert_close(student(sample, 300, text).sample, plain, atol=0, rtol=0)
    # the CLI writes the fused student and the report
    student.save_pretrained(tmp_path / "student")
    assert main(["lora", str(tmp_path / "student"), "--lora", str(path), "--out", str(tmp_path / "out")]) == 0
    assert f"dropped {len(resnets)} inside removed operators" in capsys.readouterr().out
    again = StudentUNet.from_pretrained(tmp_path / "out" / "student")
    with torch.no_grad():
        torch.testing.assert_close(again(sample, 300, text).sample, got, atol=0, rtol=0)


def test_a_lora_for_another_architecture_is_refused(tmp_path):
    from ldpruner.base.errors import ConfigError

    other = make_tiny_sd_unet(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                              up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))  # attention one level deeper
    _, path = _peft_lora(other, tmp_path, targets=("to_q",))
    student = StudentUNet(api.prune(*zero_effect(make_tiny_sd_unet())))
    with pytest.raises(ConfigError, match=r"the LoRA targets modules the UNet does not have: "
                                          r"\['down_blocks\.1\.attentions"):
        api.lora(student, path)
    (tmp_path / "x.bin").write_bytes(b"not a lora")
    with pytest.raises(ConfigError, match=r"is not a \.safetensors file \(ldpruner never loads pickled LoRAs\)"):
        api.lora(student, tmp_path / "x.bin")


def test_kohya_keys_read_like_the_peft_file(tmp_path):
    from safetensors.torch import save_file

    from ldpruner.passes.lora import read_lora

    _, path = _peft_lora(make_tiny_sd_unet(), tmp_path)
    peft = read_lora(path)
    kohya = {}
    for pair in peft.pairs:
        base = "lora_unet_" + pair.module.replace(".", "_")
        kohya.update({f"{base}.lora_down.weight": pair.down.contiguous(),
                      f"{base}.lora_up.weight": pair.up.contiguous(), f"{base}.alpha": torch.tensor(8.0)})
    save_file(kohya, str(tmp_path / "kohya.safetensors"))
    read = {p.module: p for p in read_lora(tmp_path / "kohya.safetensors").pairs}
    assert set(read) == {p.module for p in peft.pairs}
    for pair in peft.pairs:
        assert torch.equal(read[pair.module].down, pair.down) and torch.equal(read[pair.module].up, pair.up)
        assert read[pair.module].scale == pair.scale == 2.0  # alpha 8 / rank 4, from the metadata or the alphas


def _controlnet(dense, *, zero: bool):
    from diffusers import ControlNetModel

    torch.manual_seed(5)
    controlnet = ControlNetModel.from_unet(dense, conditioning_embedding_out_channels=(16, 32)).eval()
    if not zero:  # ControlNet's zero convolutions start at zero: give them weights so the residuals matter
        with torch.no_grad():
            for block in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
                block.weight.normal_(0, 0.05)
    return controlnet


def _run_controlnet(unet, controlnet, vae):
    from diffusers import EulerDiscreteScheduler, StableDiffusionControlNetPipeline

    pipe = StableDiffusionControlNetPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet,
                                             controlnet=controlnet, scheduler=EulerDiscreteScheduler(steps_offset=1),
                                             safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    prompt, negative = torch.randn(2, 1, 77, 32, generator=torch.Generator().manual_seed(1))
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    return pipe(prompt_embeds=prompt, negative_prompt_embeds=negative, image=image, guidance_scale=5.0,
                num_inference_steps=3, height=32, width=32, generator=torch.Generator().manual_seed(0),
                output_type="np").images


def test_controlnet_pipeline_drives_the_pruned_unet_in_torch_and_onnx(sd, tmp_path):
    dense, student, _ = sd
    with_residuals = student.with_controlnet()
    assert with_residuals.input_names[-1] == "mid_block_additional_residual"
    api.export(with_residuals, out=tmp_path, optimize=False)
    ort = ORTUNet.from_pretrained(tmp_path / "onnx")
    vae, controlnet = tiny_vae(), _controlnet(dense, zero=False)
    images = {name: _run_controlnet(unet, controlnet, vae)
              for name, unet in (("dense", dense), ("torch", with_residuals), ("ort", ort))}
    assert np.abs(images["dense"] - _run_sd(dense, vae)).max() > 1e-3  # the ControlNet changes the image
    # zeroed branches: the pruned UNet is the dense function, residuals included
    np.testing.assert_allclose(images["torch"], images["dense"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(images["ort"], images["dense"], atol=ATOL, rtol=0)


def test_zero_controlnet_residuals_give_the_plain_output(sd):
    dense, student, _ = sd
    with_residuals = student.with_controlnet()
    vae = tiny_vae()
    plain = _run_sd(student, vae)
    np.testing.assert_allclose(_run_controlnet(with_residuals, _controlnet(dense, zero=True), vae), plain, atol=1e-6,
                               rtol=0)
    # called without residuals, the ControlNet graph adds zeros; the plain graph refuses residuals and says why
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))  # not the traced 16x16
    text = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(with_residuals(sample, 3, text).sample, student(sample, 3, text).sample,
                                   atol=0, rtol=0)
    with pytest.raises(UnsupportedInputError, match=r"load or export the student with controlnet=True"):
        student(sample, 3, text, down_block_additional_residuals=[sample], mid_block_additional_residual=sample)


def test_t2i_adapter_pipeline_drives_the_pruned_unet_in_torch_and_onnx(sd, tmp_path):
    from diffusers import EulerDiscreteScheduler, StableDiffusionAdapterPipeline, T2IAdapter

    dense, student, _ = sd
    with_features = student.with_adapter()
    # one feature per down block, and one for the mid block (SDXL adapters give it; this one does not: zero)
    assert with_features.input_names[-3:] == ("down_intrablock_additional_residual_0",
                                               "down_intrablock_additional_residual_1",
                                               "down_intrablock_additional_residual_2")
    api.export(with_features, out=tmp_path, optimize=False)
    ort = ORTUNet.from_pretrained(tmp_path / "onnx")
    torch.manual_seed(6)  # features (32, 16x16) and (64, 8x8): what the tiny UNet's two down blocks take
    adapter = T2IAdapter(in_channels=3, channels=[32, 64], num_res_blocks=1, downscale_factor=2,
                         adapter_type="full_adapter").eval()
    vae = tiny_vae()
    images = {}
    for name, unet in (("dense", dense), ("torch", with_features), ("ort", ort)):
        pipe = StableDiffusionAdapterPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, adapter=adapter,
                                              scheduler=EulerDiscreteScheduler(steps_offset=1), safety_checker=None,
                                              feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        prompt, negative = torch.randn(2, 1, 77, 32, generator=torch.Generator().manual_seed(1))
        images[name] = pipe(prompt_embeds=prompt, negative_prompt_embeds=negative, guidance_scale=5.0,
                            image=torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(4)),
                            num_inference_steps=3, height=32, width=32, generator=torch.Generator().manual_seed(0),
                            output_type="np").images
    assert np.abs(images["dense"] - _run_sd(dense, vae)).max() > 1e-3  # the adapter changes the image
    np.testing.assert_allclose(images["torch"], images["dense"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(images["ort"], images["dense"], atol=ATOL, rtol=0)
    with pytest.raises(UnsupportedInputError, match=r"load or export the student with adapter=True"):
        student(torch.zeros(1, 4, 16, 16), 3, torch.zeros(1, 77, 32),
                down_intrablock_additional_residuals=[torch.zeros(1)])


def test_a_student_cast_to_half_precision_saves_loads_and_takes_residuals(sd, tmp_path):
    import copy

    _, student, _ = sd
    half = StudentUNet(copy.deepcopy(student.pruned)).to(torch.bfloat16)  # as pipe.to(torch_dtype) casts it
    half.save_pretrained(tmp_path / "student")
    loaded = StudentUNet.from_pretrained(tmp_path / "student", controlnet=True)
    assert loaded.dtype == torch.bfloat16 and loaded.input_names[-1] == "mid_block_additional_residual"
    assert half.with_adapter().input_names[-1] == "down_intrablock_additional_residual_2"


def test_lora_patterns_follow_peft():
    from ldpruner.passes.lora import _scale

    config = {"lora_alpha": 8, "r": 4, "alpha_pattern": {"attn1.to_k": 32, "down_blocks.*to_q": 16, "to_k": 8}}
    assert _scale("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k", 4, config, {}) == 8.0
    assert _scale("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", 4, config, {}) == 4.0
    assert _scale("up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v", 4, config, {}) == 2.0
    assert _scale("x.to_q", 4, {**config, "use_rslora": True}, {}) == 4.0  # 8 / sqrt(4)


def test_residual_inputs_of_a_unet2dmodel_are_refused_by_name():
    from conftest import make_tiny_unet2d

    from ldpruner.base.errors import UnsupportedModelError
    from ldpruner.compiler.signature import controlnet_residuals, unet_example_inputs

    model = make_tiny_unet2d()
    with pytest.raises(UnsupportedModelError, match=r"^controlnet=True is not supported for a UNet2DModel"):
        controlnet_residuals(model, unet_example_inputs(model))


def test_both_drop_ins_take_any_text_length_in_a_stock_pipeline(sd):
    """The trace and the ONNX export keep the token axis free: prompt embeddings of 16 tokens (the zoo encoder's) or
    100 give the dense output, as 77 (CLIP's) do."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    dense, student, ort = sd
    assert ort.session.input_shapes["encoder_hidden_states"] == ["batch", "sequence_length", 32]
    for tokens in (16, 100):
        images = {}
        for name, unet in (("dense", dense), ("torch", student), ("ort", ort)):
            pipe = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=unet,
                                           scheduler=EulerDiscreteScheduler(steps_offset=1), safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False)
            pipe.set_progress_bar_config(disable=True)
            prompt, negative = torch.randn(2, 1, tokens, 32, generator=torch.Generator().manual_seed(tokens))
            images[name] = pipe(prompt_embeds=prompt, negative_prompt_embeds=negative, guidance_scale=5.0,
                                num_inference_steps=2, height=32, width=32, generator=torch.Generator().manual_seed(0),
                                output_type="latent").images
        torch.testing.assert_close(images["torch"], images["dense"], atol=0, rtol=0)
        torch.testing.assert_close(images["ort"], images["dense"], atol=ATOL * images["dense"].abs().max().item(),
                                   rtol=0)


def test_both_drop_ins_refuse_a_latent_off_the_unets_multiple_in_one_line(sd):
    dense, student, ort = sd
    tokens = torch.randn(1, 77, 32)
    assert dense(torch.randn(1, 4, 9, 9), 10, encoder_hidden_states=tokens).sample.shape == (1, 4, 9, 9)
    for unet, caller, what in ((student, "StudentUNet", "the traced graph"), (ort, "ORTUNet.forward", "unet.onnx")):
        with pytest.raises(UnsupportedInputError) as info:
            unet(torch.randn(1, 4, 9, 10), 10, encoder_hidden_states=tokens)
        assert str(info.value) == (
            f"{caller}: the latent is 9x10, but {what} takes latent sizes that are multiples of 2 (the UNet has 1 "
            "upsampler; the dense diffusers UNet interpolates other sizes, its trace does not): pass a height and "
            "width whose latent is a multiple of 2 (the image size is the latent's times pipe.vae_scale_factor: "
            "multiples of 16 pixels for Stable Diffusion)")
        with pytest.raises(UnsupportedInputError, match=r"encoder_hidden_states has shape \[1, 77, 24\]: dimension 2 "
                                                        r"is 24, but .* takes \[any, any, 32\]; pass the "
                                                        "encoder_hidden_states of the model it was made from"):
            unet(torch.randn(1, 4, 8, 8), 10, encoder_hidden_states=torch.randn(1, 77, 24))
        with pytest.raises(UnsupportedInputError, match="encoder_hidden_states has batch 2 .*the sample 1: give "
                                                        "every input the sample's batch"):
            unet(torch.randn(1, 4, 8, 8), 10, encoder_hidden_states=torch.randn(2, 77, 32))


def test_an_onnx_model_exported_with_a_fixed_text_length_is_refused_naming_the_tokens(sd, tmp_path):
    """ONNX files of earlier exports fix the text at 77 tokens: a pipeline giving 16 gets one line, not
    onnxruntime's INVALID_ARGUMENT."""
    import shutil

    import onnx

    _, _, ort = sd
    folder = tmp_path / "fixed"
    shutil.copytree(ort.session.path.parent, folder)
    model = onnx.load(str(folder / "unet.onnx"))
    dim = next(i for i in model.graph.input if i.name == "encoder_hidden_states").type.tensor_type.shape.dim[1]
    dim.ClearField("dim_param")
    dim.dim_value = 77
    onnx.save(model, str(folder / "unet.onnx"))
    fixed = ORTUNet.from_pretrained(folder)
    assert fixed(torch.randn(1, 4, 8, 8), 10, encoder_hidden_states=torch.randn(1, 77, 32)).sample.shape == (1, 4, 8, 8)
    with pytest.raises(UnsupportedInputError) as info:
        fixed(torch.randn(1, 4, 8, 8), 10, encoder_hidden_states=torch.randn(1, 16, 32))
    assert str(info.value) == ("ORTUNet.forward: encoder_hidden_states has 16 tokens, but unet.onnx takes exactly 77 "
                               "(it was exported with a fixed text length): export it again with this ldpruner, whose "
                               "exports take any number of tokens")
