"""ORTUNet: a drop-in for diffusers UNets inside stock pipelines, matching the torch UNet."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_tiny_sd_unet, make_tiny_unet2d

from ldpruner.base.errors import ArtifactError, UnsupportedInputError
from ldpruner.compiler.tracer import trace_unet
from ldpruner.passes.onnx.export import ExportConfig, export_onnx
from ldpruner.runtime.session import create_session
from ldpruner.runtime.unet import ORTUNet

# torch vs onnxruntime fp32 (see ldpruner.passes.onnx.export DEFAULT_TOLERANCES); pipelines compound a few steps
ATOL = 1e-4


def _export(model, folder):
    export_onnx(trace_unet(model), folder / "unet.onnx", unet_config=model.config,
                config=ExportConfig(validate=False))  # validation has its own tests; here the pipeline checks
    return folder


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    model = make_tiny_sd_unet()
    return model, ORTUNet.from_pretrained(_export(model, tmp_path_factory.mktemp("sd")))


@pytest.fixture(scope="module")
def unet2d(tmp_path_factory):
    model = make_tiny_unet2d()
    return model, ORTUNet.from_pretrained(_export(model, tmp_path_factory.mktemp("u2d")))


def _sd_inputs(batch=2, size=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, size, size, generator=gen), torch.randn(batch, 77, 32, generator=gen)


def test_call_matches_torch_unet_and_returns_its_output_class(sd):
    model, ort_unet = sd
    sample, text = _sd_inputs(batch=2, size=24)
    with torch.no_grad():
        expected = model(sample, torch.tensor([10, 700]), text)
    got = ort_unet(sample, torch.tensor([10, 700]), text)
    assert type(got).__name__ == type(expected).__name__ == "UNet2DConditionOutput"
    assert got.sample.dtype == torch.float32 and got.sample.shape == expected.sample.shape
    torch.testing.assert_close(got.sample, expected.sample, atol=ATOL, rtol=0)
    (as_tuple,) = ort_unet(sample, torch.tensor([10, 700]), text, return_dict=False)
    torch.testing.assert_close(as_tuple, got.sample, atol=0, rtol=0)


@pytest.mark.parametrize("timestep", [321, 321.0, torch.tensor(321), torch.tensor([321]), torch.tensor([321.0, 321.0]),
                                      np.int64(321)])
def test_timestep_forms_broadcast_to_the_batch(sd, timestep):
    model, ort_unet = sd
    sample, text = _sd_inputs()
    with torch.no_grad():
        expected = model(sample, 321, text).sample
    torch.testing.assert_close(ort_unet(sample, timestep, text).sample, expected, atol=ATOL, rtol=0)


def test_fractional_timestep_is_not_truncated(sd):
    model, ort_unet = sd
    sample, text = _sd_inputs()
    with torch.no_grad():
        expected = model(sample, torch.tensor([499.5, 499.5]), text).sample
        truncated = model(sample, torch.tensor([499, 499]), text).sample
    got = ort_unet(sample, 499.5, text).sample
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert (got - truncated).abs().max() > 10 * ATOL


def test_unsupported_arguments_are_rejected_together(sd):
    _, ort_unet = sd
    sample, text = _sd_inputs()
    with pytest.raises(UnsupportedInputError) as info:
        ort_unet(sample, 5, text, cross_attention_kwargs={"scale": 0.5}, mid_block_additional_residual=torch.zeros(1),
                 added_cond_kwargs={"text_embeds": torch.zeros(2, 8), "image_embeds": torch.zeros(1),
                                    "bogus": torch.zeros(1)}, foo=1)
    message = str(info.value)
    for needle in ("mid_block_additional_residual", "foo", "cross_attention_kwargs ['scale']",
                   "added_cond_kwargs keys ['bogus']", "image_embeds was given but unet.onnx takes no such input",
                   "text_embeds was given but unet.onnx takes no such input"):
        assert needle in message
    with pytest.raises(UnsupportedInputError, match="encoder_hidden_states is required"):
        ort_unet(sample, 5)
    with pytest.raises(UnsupportedInputError, match=r"batch=2, got shape \[3\]"):
        ort_unet(sample, torch.tensor([1, 2, 3]), text)
    # None and {} mean "nothing extra", as in diffusers
    assert ort_unet(sample, 5, text, cross_attention_kwargs={}, attention_mask=None).sample.shape == sample.shape


def test_pipeline_facing_attributes(sd, unet2d):
    model, ort_unet = sd
    assert dict(ort_unet.config) == json.loads(json.dumps(dict(model.config)))  # tuples come back as lists
    assert type(ort_unet.config).__name__ == "FrozenDict"
    assert ort_unet.config.in_channels == ort_unet.in_channels == 4
    assert ort_unet.config.time_cond_proj_dim is None
    assert ort_unet.dtype == torch.float32
    assert ort_unet.device == torch.device("cuda" if ort_unet.provider == "CUDAExecutionProvider" else "cpu")
    with pytest.raises(AttributeError):
        ort_unet.not_a_config_key  # noqa: B018
    assert type(unet2d[1](torch.zeros(1, 3, 16, 16), 3)).__name__ == "UNet2DOutput"


def test_loading_errors(tmp_path, sd):
    with pytest.raises(ArtifactError, match="not a folder"):
        ORTUNet.from_pretrained(tmp_path / "nothing")
    folder = sd[1].session.path.parent
    (tmp_path / "unet.onnx").write_bytes((folder / "unet.onnx").read_bytes())
    with pytest.raises(ArtifactError, match="config.json.*does not exist"):
        ORTUNet.from_pretrained(tmp_path)
    # an explicit config needs no config.json; an OrtSession can be passed directly
    session = create_session(tmp_path / "unet.onnx")
    assert ORTUNet(session, dict(sd[0].config)).config.sample_size == 16
    (tmp_path / "config.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ArtifactError, match="JSON object"):
        ORTUNet.from_pretrained(tmp_path)


def test_ddim_pipeline_with_ort_unet_matches_torch(unet2d):
    from diffusers import DDIMPipeline, DDIMScheduler

    model, ort_unet = unet2d
    images = []
    for unet in (model, ort_unet):
        pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000))
        pipe.set_progress_bar_config(disable=True)
        out = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np")
        images.append(out.images)
    assert images[0].shape == images[1].shape == (2, 16, 16, 3)
    assert 0.05 < images[0].std()  # not a degenerate all-clamped image
    np.testing.assert_allclose(images[1], images[0], atol=ATOL, rtol=0)


def test_stable_diffusion_pipeline_with_ort_unet_matches_torch(sd):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline

    model, ort_unet = sd
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8, sample_size=32,
    ).eval()
    prompt_embeds, negative = torch.randn(2, 1, 77, 32, generator=torch.Generator().manual_seed(1))
    results = {}
    for name, unet in (("torch", model), ("ort", ort_unet)):
        # 3 Euler steps: timesteps 999, 499.5, 0 (fractional), classifier-free guidance doubles the batch
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=EulerDiscreteScheduler(steps_offset=1),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        final = {}

        def keep_latents(pipe, step, timestep, callback_kwargs, final=final):
            final["latents"] = callback_kwargs["latents"].clone()
            return {}

        images = pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative, guidance_scale=5.0,
                      num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np",
                      callback_on_step_end=keep_latents).images
        results[name] = (final["latents"], images, pipe.scheduler.timesteps.clone())
    assert results["ort"][2].tolist() == [999.0, 499.5, 0.0]
    assert results["ort"][0].shape == (1, 4, 16, 16) and results["ort"][1].shape == (1, 32, 32, 3)
    scale = results["torch"][0].abs().max().item()
    torch.testing.assert_close(results["ort"][0], results["torch"][0], atol=ATOL * max(1.0, scale), rtol=0)
    np.testing.assert_allclose(results["ort"][1], results["torch"][1], atol=ATOL, rtol=0)
