"""Every UNet family of the sweep (tests/sources/test_diffusers_families.py) in its own stock diffusers pipeline, with
the pruned UNet in the dense one's place in PyTorch (StudentUNet) and in onnxruntime (ORTUNet), a few steps each. Each
UNet is pruned with a plan whose removed operators have their residual branch zeroed in the dense model, so the
student computes the dense function: the pipeline gives the dense output with the student (to float32 rounding,
:func:`rounding_tolerance`), and the student's output with the ONNX model within :func:`ort_tolerance`. A family
whose pipeline gives the UNet what neither drop-in has an input for is refused by name on export."""

from __future__ import annotations

from collections.abc import Callable

import diffusers
import pytest
import torch
from conftest import make_tiny_unet2d
from family_sweep import FAMILIES, NO_DROP_IN, make_unet

from ldpruner import api, stages
from ldpruner.base.errors import UnsupportedInputError, UnsupportedModelError
from ldpruner.compiler.graph import Action
from ldpruner.compiler.removal import output_scale
from ldpruner.passes.config import TraceConfig
from ldpruner.passes.plan import PlannedRemoval, RemovalPlan
from ldpruner.runtime.unet import ORTUNet
from ldpruner.unet import StudentUNet

pytestmark = pytest.mark.usefixtures("one_thread")


def ort_tolerance(reference: torch.Tensor) -> float:
    """|ORT − torch| allowed on a pipeline's output: the export's per-call tolerance (1e-4 + 1e-4 × max|ref|),
    doubled for the few scheduler steps and the guidance that amplify it."""
    return 2e-4 * (1.0 + reference.abs().max().item())


def rounding_tolerance(reference: torch.Tensor) -> float:
    """|student − dense| allowed on a pipeline's output: float32 rounding only. The student computes the dense
    function, but where the dense model adds a zeroed attention branch to its input the sum takes the branch's memory
    layout, and the next convolution, run on that layout, rounds differently (UNet2DModel's attention blocks)."""
    return 5e-5 * (1.0 + reference.abs().max().item())


def _last_layer(module: torch.nn.Module) -> torch.nn.Module | None:
    """The layer whose output is an operator's residual branch: zeroed, the branch adds 0."""
    for name in ("proj_out", "conv2", "to_out"):
        layer = getattr(module, name, None)
        if layer is not None:
            return layer[0] if isinstance(layer, torch.nn.ModuleList) else layer
    return None


def exact_plan(model: torch.nn.Module) -> tuple[torch.nn.Module, RemovalPlan]:
    """``model`` with the residual branch of operators zeroed, and the plan that removes them: the student computes
    the dense function. Taken: every branch (its removal adds 0 where the branch added 0) and every block whose
    removal is ``x / s`` (same shape in and out) with s = 1 and its input added back (a zeroed block gives ``x``)."""
    graph = api.inspect(model)
    chosen = []
    with torch.no_grad():
        for op in graph.candidates:
            module = model.get_submodule(op.name)
            last = _last_layer(module)
            if last is None or op.action is not Action.IDENTITY:
                continue
            if op.join is None and (op.in_shape != op.out_shape or output_scale(module) != 1
                                    or not getattr(module, "residual_connection", True)):
                continue
            last.weight.zero_()
            last.bias.zero_()
            chosen.append(op)
    assert chosen, "the plan removes at least one operator"
    plan = RemovalPlan(tuple(PlannedRemoval(op.name, op.action.value, op.params, op.macs, reason="zeroed branch")
                             for op in chosen), graph.traced.model_class, "block", graph.total_params,
                       graph.total_macs)
    return model, plan


# families with no removable operator: their dense graph (an empty plan, as `ldpruner export MODEL` exports the dense
# baseline) drives the pipeline
NO_CANDIDATES = {"sd-latent-upscaler": "K-diffusion blocks: their resnets are no operators, and their attentions' "
                                       "residual adds are reshaped out of reach (not removable)"}


# the TorchScript exporter cannot export KDownsample2D (a convolution whose kernel is made in forward); the dynamo
# exporter can, in about two minutes on 2 cores: that case is slow
EXPORT_OPTIONS = {"sd-latent-upscaler": {"exporter": "dynamo"}}


def drop_ins(dense: torch.nn.Module, out, plan: RemovalPlan, **options) -> tuple[StudentUNet, ORTUNet]:
    """The student of ``dense`` under ``plan`` in PyTorch and, exported to ``out`` (ExportConfig ``options``), in
    onnxruntime."""
    student = StudentUNet(api.prune(dense, plan))
    api.export(student.pruned, out=out, optimize=False, **options)
    return student, ORTUNet.from_pretrained(out / "onnx")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed))


def _scheduler(family: str, **overrides):
    _, _, name, config, _ = FAMILIES[family]
    return getattr(diffusers, name)(**{**config, **overrides})


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_vae(**overrides):
    torch.manual_seed(0)
    config = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=32)
    return diffusers.AutoencoderKL(**{**config, **overrides}).eval()


def tiny_movq(**overrides):
    """Kandinsky's MoVQ (and LDM's VQ-VAE) as in diffusers' tests: a latent half the image size."""
    torch.manual_seed(0)
    config = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
                  up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"), in_channels=3, out_channels=3,
                  latent_channels=4, layers_per_block=1, norm_num_groups=8, norm_type="spatial",
                  num_vq_embeddings=12, vq_embed_dim=4)
    return diffusers.VQModel(**{**config, **overrides}).eval()


def word_tokenizer(max_length: int = 77):
    """A word-level tokenizer built in code (no download): pipelines that tokenize a prompt themselves get one."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<s>", "<pad>", "</s>", "<unk>", "a", "red", "cat", "on", "mat", "photo", "of"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A </s>",
                                                           special_tokens=[("<s>", 0), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=max_length,
                                   model_input_names=["input_ids", "attention_mask"])


# --- one runner per family: its stock pipeline, built from tiny components, a few steps, the output as a tensor -----
RUNS: dict[str, tuple[str, Callable[[torch.nn.Module], torch.Tensor], tuple[int, ...]]] = {}


def runs(family: str, pipeline: str, shape: tuple[int, ...]):
    def register(run):
        RUNS[family] = (pipeline, run, shape)
        return run
    return register


def _prompt(tokens: int = 77, width: int = 32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(_randn(2, 1, tokens, width, seed=seed))


@runs("sd-inpainting", "StableDiffusionInpaintPipeline", (1, 4, 16, 16))
def _inpainting(unet):
    pipe = _quiet(diffusers.StableDiffusionInpaintPipeline(
        vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=unet,
        scheduler=_scheduler("sd-inpainting", steps_offset=1), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False))
    prompt, negative = _prompt()
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1.0
    return pipe(prompt_embeds=prompt, negative_prompt_embeds=negative,
                image=torch.rand(1, 3, 32, 32, generator=_gen(4)), mask_image=mask, height=32, width=32,
                guidance_scale=5.0, num_inference_steps=3, generator=_gen(0), output_type="latent").images


@runs("sd-x4-upscaler", "StableDiffusionUpscalePipeline", (1, 4, 16, 16))
def _upscaler(unet):
    pipe = _quiet(diffusers.StableDiffusionUpscalePipeline(
        vae=tiny_vae(scaling_factor=0.08333), text_encoder=None, tokenizer=None, unet=unet,
        low_res_scheduler=diffusers.DDPMScheduler(), scheduler=diffusers.DDIMScheduler(), safety_checker=None,
        feature_extractor=None, watermarker=None))
    prompt, negative = _prompt()
    return pipe(prompt_embeds=prompt, negative_prompt_embeds=negative,
                image=torch.rand(1, 3, 16, 16, generator=_gen(4)), guidance_scale=5.0, num_inference_steps=3,
                generator=_gen(0), output_type="latent").images


@runs("lcm", "LatentConsistencyModelPipeline", (1, 4, 16, 16))
def _lcm(unet):
    pipe = _quiet(diffusers.LatentConsistencyModelPipeline(
        vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=unet, scheduler=_scheduler("lcm"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False))
    prompt, _ = _prompt()
    return pipe(prompt_embeds=prompt, guidance_scale=6.0, num_inference_steps=3, height=32, width=32,
                generator=_gen(0), output_type="latent").images


@runs("audioldm", "AudioLDMPipeline", (1, 4, 16, 16))
def _audioldm(unet):
    from transformers import ClapTextConfig, ClapTextModelWithProjection, SpeechT5HifiGan, SpeechT5HifiGanConfig

    torch.manual_seed(0)
    text_encoder = ClapTextModelWithProjection(ClapTextConfig(
        hidden_size=16, intermediate_size=37, num_attention_heads=2, num_hidden_layers=1, vocab_size=100,
        projection_dim=8)).eval()  # only its dtype is read: the prompt comes as embeddings
    vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(
        model_in_dim=32, sampling_rate=16000, upsample_initial_channel=16, upsample_rates=[2, 2],
        upsample_kernel_sizes=[4, 4], resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]],
        normalize_before=False)).eval()
    pipe = _quiet(diffusers.AudioLDMPipeline(
        vae=tiny_vae(in_channels=1, out_channels=1), text_encoder=text_encoder, tokenizer=None, unet=unet,
        scheduler=_scheduler("audioldm"), vocoder=vocoder))
    prompt, negative = _randn(2, 1, 8, seed=1)
    latents = []  # the final latents: the random vocoder's waveform is too faint to compare
    # 16 latent rows: 32 mel frames of 4 samples each at 16 kHz
    pipe(prompt_embeds=prompt, negative_prompt_embeds=negative, audio_length_in_s=32 * 4 / 16000, guidance_scale=2.5,
         num_inference_steps=3, generator=_gen(0), callback=lambda step, t, x: latents.append(x))
    return latents[-1]


@runs("deepfloyd-if", "IFPipeline", (1, 3, 16, 16))
def _if(unet):
    pipe = _quiet(diffusers.IFPipeline(
        tokenizer=None, text_encoder=None, unet=unet, scheduler=_scheduler("deepfloyd-if"), safety_checker=None,
        feature_extractor=None, watermarker=None, requires_safety_checker=False))
    prompt, negative = _prompt()
    return pipe(prompt_embeds=prompt, negative_prompt_embeds=negative, guidance_scale=5.0, num_inference_steps=3,
                generator=_gen(0), output_type="pt").images


@runs("deepfloyd-if-superres", "IFSuperResolutionPipeline", (1, 3, 16, 16))
def _if_superres(unet):
    pipe = _quiet(diffusers.IFSuperResolutionPipeline(
        tokenizer=None, text_encoder=None, unet=unet, scheduler=_scheduler("deepfloyd-if-superres"),
        image_noising_scheduler=diffusers.DDPMScheduler(), safety_checker=None, feature_extractor=None,
        watermarker=None, requires_safety_checker=False))
    prompt, negative = _prompt()
    return pipe(image=torch.rand(1, 3, 8, 8, generator=_gen(4)) * 2 - 1, prompt_embeds=prompt,
                negative_prompt_embeds=negative, guidance_scale=5.0, num_inference_steps=3, generator=_gen(0),
                output_type="pt").images


@runs("stable-unclip", "StableUnCLIPImg2ImgPipeline (image_embeds given)", (1, 4, 16, 16))
def _stable_unclip(unet):
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=16, intermediate_size=37, num_attention_heads=2, num_hidden_layers=1, image_size=32,
        patch_size=16, projection_dim=32)).eval()  # only its dtype is read: the image comes as embeddings
    pipe = _quiet(diffusers.StableUnCLIPImg2ImgPipeline(
        feature_extractor=None, image_encoder=image_encoder, image_normalizer=StableUnCLIPImageNormalizer(32),
        image_noising_scheduler=diffusers.DDPMScheduler(), tokenizer=None, text_encoder=None, unet=unet,
        scheduler=_scheduler("stable-unclip"), vae=tiny_vae()))
    prompt, negative = _prompt()
    return pipe(image_embeds=_randn(1, 32, seed=2),
                prompt_embeds=prompt, negative_prompt_embeds=negative, noise_level=100, guidance_scale=5.0,
                num_inference_steps=3, height=32, width=32, generator=_gen(0), output_type="latent").images


@runs("kandinsky-2.1", "KandinskyPipeline", (1, 3, 32, 32))
def _kandinsky(unet):
    from diffusers.pipelines.kandinsky.text_encoder import MCLIPConfig, MultilingualCLIP

    torch.manual_seed(0)
    text_encoder = MultilingualCLIP(MCLIPConfig(
        transformerDimSize=32, imageDimSize=32, hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=1, vocab_size=11, max_position_embeddings=80)).eval()
    pipe = _quiet(diffusers.KandinskyPipeline(text_encoder=text_encoder, tokenizer=word_tokenizer(), unet=unet,
                                              scheduler=_scheduler("kandinsky-2.1"), movq=tiny_movq()))
    image, negative = _randn(2, 1, 32, seed=2)
    return pipe("a photo of a red cat", image_embeds=image, negative_image_embeds=negative, height=32, width=32,
                guidance_scale=4.0, num_inference_steps=3, generator=_gen(0), output_type="pt").images


@runs("kandinsky-2.2", "KandinskyV22Pipeline", (1, 3, 32, 32))
def _kandinsky22(unet):
    pipe = _quiet(diffusers.KandinskyV22Pipeline(unet=unet, scheduler=_scheduler("kandinsky-2.2"), movq=tiny_movq()))
    image, negative = _randn(2, 1, 32, seed=2)
    return pipe(image_embeds=image, negative_image_embeds=negative, height=32, width=32, guidance_scale=4.0,
                num_inference_steps=3, generator=_gen(0), output_type="pt").images


@runs("kandinsky-2.2-controlnet", "KandinskyV22ControlnetPipeline", (1, 3, 32, 32))
def _kandinsky22_controlnet(unet):
    pipe = _quiet(diffusers.KandinskyV22ControlnetPipeline(unet=unet, scheduler=_scheduler("kandinsky-2.2-controlnet"),
                                                           movq=tiny_movq()))
    image, negative = _randn(2, 1, 32, seed=2)
    # the hint is 8x the latent (MoVQ's factor in the real model; here the latent is 16x16)
    return pipe(image_embeds=image, negative_image_embeds=negative, hint=torch.rand(1, 3, 128, 128, generator=_gen(4)),
                height=32, width=32, guidance_scale=4.0, num_inference_steps=3, generator=_gen(0),
                output_type="pt").images


@runs("score-sde-ve", "ScoreSdeVePipeline", (1, 16, 16, 3))
def _score_sde(unet):
    # from sigma 1 rather than 1348: in two steps the image would stay noise that the output's clamp to [0, 1] saturates
    pipe = _quiet(diffusers.ScoreSdeVePipeline(unet=unet, scheduler=_scheduler("score-sde-ve", sigma_max=1.0)))
    return torch.from_numpy(pipe(num_inference_steps=2, generator=_gen(0), output_type="np").images)


@runs("unet2d-learned-variance", "DDPMPipeline (learned_range variance)", (1, 16, 16, 3))
def _ddpm_learned_variance(unet):
    pipe = _quiet(diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(variance_type="learned_range")))
    return torch.from_numpy(pipe(num_inference_steps=3, generator=_gen(0), output_type="np").images)


def _class_loop(unet, family: str, labels: torch.Tensor) -> torch.Tensor:
    """DDPMPipeline's loop with class labels: no stock pipeline passes them to a UNet2DModel."""
    scheduler = _scheduler(family)
    scheduler.set_timesteps(3)
    image = _randn(2, 3, 16, 16, seed=0)
    for t in scheduler.timesteps:
        image = scheduler.step(unet(image, t, class_labels=labels).sample, t, image, generator=_gen(1)).prev_sample
    return image


@runs("ddpm-class-ids", "DDPMPipeline's loop + class_labels (no stock pipeline)", (2, 3, 16, 16))
def _class_ids(unet):
    return _class_loop(unet, "ddpm-class-ids", torch.tensor([3, 7]))


@runs("unet2d-timestep-class", "DDPMPipeline's loop + class_labels (no stock pipeline)", (2, 3, 16, 16))
def _timestep_class(unet):
    return _class_loop(unet, "unet2d-timestep-class", torch.tensor([20, 250]))


@runs("sd-latent-upscaler", "StableDiffusionLatentUpscalePipeline", (1, 4, 16, 16))
def _latent_upscaler(unet):
    pipe = _quiet(diffusers.StableDiffusionLatentUpscalePipeline(
        vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=unet, scheduler=_scheduler("sd-latent-upscaler")))
    prompt, negative = _prompt()
    pooled, negative_pooled = _randn(2, 1, 32, seed=2)
    return pipe(image=_randn(1, 4, 8, 8, seed=4), prompt_embeds=prompt, negative_prompt_embeds=negative,
                pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=negative_pooled, guidance_scale=5.0,
                num_inference_steps=3, generator=_gen(0), output_type="latent").images


@runs("ldm", "LDMPipeline", (1, 32, 32, 3))
def _ldm(unet):
    pipe = _quiet(diffusers.LDMPipeline(vqvae=tiny_movq(latent_channels=3, vq_embed_dim=3), unet=unet,
                                        scheduler=diffusers.DDIMScheduler()))
    return torch.from_numpy(pipe(num_inference_steps=3, generator=_gen(0), output_type="np").images)


def unclip_pipeline(decoder: torch.nn.Module, super_res: torch.nn.Module):
    """UnCLIPPipeline as in diffusers' tests: a tiny prior and text projection, ``decoder`` and ``super_res`` (for
    both of its super-resolution stages); no text encoder (the text comes as encoder outputs)."""
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

    torch.manual_seed(0)
    prior = diffusers.PriorTransformer(num_attention_heads=2, attention_head_dim=12, embedding_dim=32,
                                       num_layers=1).eval()
    text_proj = UnCLIPTextProjModel(clip_extra_context_tokens=2, clip_embeddings_dim=32, time_embed_dim=128,
                                    cross_attention_dim=32).eval()
    return _quiet(diffusers.UnCLIPPipeline(
        prior=prior, decoder=decoder, text_proj=text_proj, text_encoder=None, tokenizer=None,
        super_res_first=super_res, super_res_last=super_res,
        prior_scheduler=diffusers.UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample",
                                                  clip_sample_range=5.0),
        decoder_scheduler=diffusers.UnCLIPScheduler(variance_type="learned_range"),
        super_res_scheduler=diffusers.UnCLIPScheduler(variance_type="fixed_small_log")))


def run_unclip(pipe) -> torch.Tensor:
    """A six-token prompt's text encoder outputs, padded to 77 tokens (the mask says which are the prompt's)."""
    from transformers.models.clip.modeling_clip import CLIPTextModelOutput

    text = CLIPTextModelOutput(text_embeds=_randn(1, 32, seed=1), last_hidden_state=_randn(1, 77, 32, seed=2))
    mask = torch.zeros(1, 77, dtype=torch.bool)
    mask[:, :6] = True
    return torch.from_numpy(pipe(text_model_output=text, text_attention_mask=mask, prior_guidance_scale=1.0,
                                 decoder_guidance_scale=1.0, prior_num_inference_steps=2, decoder_num_inference_steps=2,
                                 super_res_num_inference_steps=2, generator=_gen(0), output_type="np").images)


def unclip_super_res_unet() -> torch.nn.Module:
    """unCLIP's super-resolution UNet2DModel (as in diffusers' tests): the noisy image and the upscaled decoder image
    in, the prediction for the first out."""
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=32, layers_per_block=1, block_out_channels=(32, 64), in_channels=6,
                                 out_channels=3, down_block_types=("ResnetDownsampleBlock2D",) * 2,
                                 up_block_types=("ResnetUpsampleBlock2D",) * 2).eval()


@runs("unclip-super-res", "UnCLIPPipeline (super_res_first and super_res_last; the dense decoder)", (1, 32, 32, 3))
def _unclip_super_res(unet):
    return run_unclip(unclip_pipeline(make_unet("unclip-decoder"), unet))


# UNets of pipelines that the families sweep does not build
UNETS = {"ldm": make_tiny_unet2d, "unclip-super-res": unclip_super_res_unet}


@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.slow) if f in EXPORT_OPTIONS else f
                                    for f in sorted(RUNS)])
def test_the_familys_pipeline_drives_both_drop_ins(family, tmp_path):
    pipeline, run, shape = RUNS[family]
    make = UNETS.get(family) or (lambda: make_unet(family))
    if family in NO_CANDIDATES:
        dense = make()
        assert not api.inspect(dense).candidates
        student = StudentUNet(stages.dense_as_student(api.load(dense), TraceConfig()))
        api.export(student.pruned, out=tmp_path, optimize=False, **EXPORT_OPTIONS.get(family, {}))
        ort = ORTUNet.from_pretrained(tmp_path / "onnx")
    else:
        dense, plan = exact_plan(make())
        student, ort = drop_ins(dense, tmp_path, plan, **EXPORT_OPTIONS.get(family, {}))
    with torch.no_grad():
        out = {name: run(unet) for name, unet in (("dense", dense), ("torch", student), ("ort", ort),
                                                  ("untouched", make()))}
    assert tuple(out["dense"].shape) == shape, pipeline
    if family not in NO_CANDIDATES:
        # the output depends on the UNet: the removed operators, with their weights, change it beyond the tolerance
        assert (out["untouched"] - out["torch"]).abs().max() > 10 * ort_tolerance(out["torch"])
    torch.testing.assert_close(out["torch"], out["dense"], atol=rounding_tolerance(out["dense"]), rtol=0)
    torch.testing.assert_close(out["ort"], out["torch"], atol=ort_tolerance(out["torch"]), rtol=0)


def _gligen(unet):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(  # encodes the grounding phrases (the prompt comes as embeddings)
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=1, vocab_size=11,
        bos_token_id=0, pad_token_id=1, eos_token_id=2)).eval()
    pipe = _quiet(diffusers.StableDiffusionGLIGENPipeline(
        vae=tiny_vae(), text_encoder=text_encoder, tokenizer=word_tokenizer(), unet=unet,
        scheduler=_scheduler("gligen"), safety_checker=None, feature_extractor=None, requires_safety_checker=False))
    prompt, negative = _prompt()
    return pipe(prompt_embeds=prompt, negative_prompt_embeds=negative, gligen_phrases=["a red cat"],
                gligen_boxes=[[0.1, 0.1, 0.6, 0.6]], height=32, width=32, guidance_scale=5.0, num_inference_steps=2,
                generator=_gen(0), output_type="latent").images


def _unclip_decoder(unet):
    return run_unclip(unclip_pipeline(unet, unclip_super_res_unet()))


# family -> (what export says, its stock pipeline with a UNet in place, what that pipeline's call passes the UNet)
REFUSED_ON_EXPORT = {
    "gligen": ("attention_type='gated' is not supported by export: StableDiffusionGLIGENPipeline (and its text-image "
               "variant) passes its grounding to the UNet's gated fusers (cross_attention_kwargs['gligen']), which the "
               "pruned graph and its ONNX model do not have, so no drop-in can take this UNet's place (analyze, prune "
               "and distill work)", _gligen, "cross_attention_kwargs['gligen'] (GLIGEN's grounding:"),
    "unclip-decoder": ("class_embed_type='identity' is not supported by export: UnCLIPPipeline and "
                       "UnCLIPImageVariationPipeline pass the decoder the prompt's padding mask as attention_mask, for "
                       "which the pruned graph and its ONNX model have no input, so no drop-in can take this UNet's "
                       "place (analyze, prune and distill work)", _unclip_decoder, "attention_mask"),
}


@pytest.mark.parametrize("family", sorted(REFUSED_ON_EXPORT))
def test_a_family_whose_pipeline_no_drop_in_can_serve_is_refused_by_export(family, tmp_path):
    message, run, passed = REFUSED_ON_EXPORT[family]
    dense, plan = exact_plan(make_unet(family))
    student = StudentUNet(api.prune(dense, plan))
    for model in (dense, student):  # the dense baseline and the student alike, before any export work
        with pytest.raises(UnsupportedModelError) as info:
            api.export(model, out=tmp_path / "out")
        assert str(info.value) == message
    assert not (tmp_path / "out" / "onnx").exists()
    # the pipeline runs the dense UNet; given the PyTorch student, its first UNet call is refused in one line
    with torch.no_grad():
        assert run(dense).std() > 0
        with pytest.raises(UnsupportedInputError) as info:
            run(student)
    assert str(info.value).startswith(f"StudentUNet: {passed} ") and "\n" not in str(info.value)


def test_every_family_of_the_sweep_is_driven_or_refused():
    assert set(REFUSED_ON_EXPORT) == set(NO_DROP_IN)
    assert set(FAMILIES) == (set(RUNS) - set(UNETS)) | set(REFUSED_ON_EXPORT)
