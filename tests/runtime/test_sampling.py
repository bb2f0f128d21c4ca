"""The sampling loop: equal to diffusers' own pipelines, deterministic, stateless, and its argument checks."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import make_tiny_sd_unet, make_tiny_unet2d
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, StableDiffusionPipeline

from ldpruner.base.errors import ConfigError
from ldpruner.runtime.sampling import sample_latents

pytestmark = pytest.mark.usefixtures("one_thread")


def text_unet_fn(unet, calls=None):
    def fn(**kw):
        if calls is not None:
            calls.append(kw["sample"].shape[0])
        return unet(kw["sample"], kw["timestep"], kw["encoder_hidden_states"]).sample

    return fn


def test_classifier_free_guidance_matches_stable_diffusion_pipeline():
    unet = make_tiny_sd_unet()
    # a config StableDiffusionPipeline accepts unchanged (it rewrites steps_offset / clip_sample otherwise)
    scheduler = DDIMScheduler(steps_offset=1, clip_sample=False)
    pipe = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(0)
    positive, negative = torch.randn(2, 77, 32, generator=gen), torch.randn(2, 77, 32, generator=gen)
    noise = torch.randn(2, 4, 8, 8, generator=gen)
    expected = pipe(prompt_embeds=positive, negative_prompt_embeds=negative, height=64, width=64,
                    num_inference_steps=3, guidance_scale=7.5, latents=noise.clone(), output_type="latent").images
    calls: list[int] = []
    with torch.no_grad():
        got = sample_latents(text_unet_fn(unet, calls), scheduler, noise=noise, steps=3,
                             encoder_hidden_states=positive, negative_encoder_hidden_states=negative,
                             guidance_scale=7.5)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert calls == [4, 4, 4]  # negative and positive halves in one batch


def test_stochastic_scheduler_matches_ddpm_pipeline_with_per_sample_generators():
    unet = make_tiny_unet2d()
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, generator=[torch.Generator().manual_seed(10 + i) for i in range(2)],
                  num_inference_steps=3, output_type="np").images
    # the pipeline draws the initial noise from the same generators before stepping with them
    generators = [torch.Generator().manual_seed(10 + i) for i in range(2)]
    noise = torch.cat([torch.randn(1, 3, 16, 16, generator=g) for g in generators])
    with torch.no_grad():
        latents = sample_latents(lambda **kw: unet(kw["sample"], kw["timestep"]).sample, DDPMScheduler(),
                                 noise=noise, steps=3, generator=generators)
    np.testing.assert_allclose((latents / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy(), images, atol=1e-6)


def test_deterministic_and_the_callers_scheduler_is_never_stepped(capsys):
    unet = make_tiny_unet2d()
    scheduler = DDPMScheduler()
    scheduler.set_timesteps(50)
    before = scheduler.timesteps.clone()
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))

    with torch.no_grad():
        first = sample_latents(lambda **kw: unet(kw["sample"], kw["timestep"]).sample, scheduler,
                               noise=noise, steps=4)
    with torch.no_grad():
        second = sample_latents(lambda **kw: unet(kw["sample"], kw["timestep"]).sample, scheduler,
                                noise=noise, steps=4, progress=True)
    assert "sampling" in capsys.readouterr().err
    assert torch.equal(first, second)  # DDPM draws noise in step: the default generator is seeded
    assert torch.equal(scheduler.timesteps, before)
    assert not torch.equal(first, noise)


def test_guidance_scale_at_most_one_runs_the_conditional_half_only():
    unet = make_tiny_sd_unet()
    gen = torch.Generator().manual_seed(0)
    positive = torch.randn(2, 77, 32, generator=gen)
    noise = torch.randn(2, 4, 8, 8, generator=gen)
    calls: list[int] = []
    with torch.no_grad():
        got = sample_latents(text_unet_fn(unet, calls), DDIMScheduler(), noise=noise, steps=2,
                             encoder_hidden_states=positive, guidance_scale=1.0)
        # guidance 1 is the conditional prediction exactly, so a run with negatives at scale 1 agrees
        with_negatives = sample_latents(text_unet_fn(unet), DDIMScheduler(), noise=noise, steps=2,
                                        encoder_hidden_states=positive,
                                        negative_encoder_hidden_states=torch.zeros(1, 77, 32), guidance_scale=1.0)
    assert calls == [2, 2]
    assert torch.equal(got, with_negatives)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(steps=0), "steps=0"),
        (dict(noise=torch.zeros(2, 4, 8)), "noise must be"),
        (dict(encoder_hidden_states=torch.zeros(3, 77, 32)), "encoder_hidden_states has 3 rows"),
        (dict(encoder_hidden_states=torch.zeros(2, 77, 32), guidance_scale=5.0), "negative_encoder_hidden_states"),
        (dict(encoder_hidden_states=torch.zeros(2, 77, 32), guidance_scale=5.0,
              negative_encoder_hidden_states=torch.zeros(3, 77, 32)), "negative_encoder_hidden_states has 3 rows"),
        (dict(encoder_hidden_states=torch.zeros(2, 77, 32), time_ids=torch.zeros(1, 6)), "need text_embeds"),
        (dict(image_embeds=torch.zeros(2, 8), guidance_scale=5.0), "needs negative_image_embeds"),
        (dict(extra_channels=torch.zeros(2, 5, 4, 4)), "extra_channels have spatial size"),
    ],
)
def test_bad_arguments_raise_config_error(kwargs, message):
    args = dict(noise=torch.zeros(2, 4, 8, 8), steps=2)
    args.update(kwargs)
    with pytest.raises(ConfigError, match=message):
        sample_latents(lambda **kw: kw["sample"], DDIMScheduler(), **args)


def test_runtime_does_not_import_compiler_or_passes():
    code = (
        "import sys, ldpruner.runtime.sampling\n"
        "bad = [m for m in sys.modules if m.startswith(('ldpruner.compiler', 'ldpruner.passes'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
