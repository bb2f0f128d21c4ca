"""The README's own recipe, as a user runs it: build the embedded text-to-image model, then put the pruned ONNX
model (and the dense baseline's, and a ControlNet export's) into the zoo's stock diffusers pipeline in place of its
UNet. The zoo's text encoder gives 16 tokens, not CLIP's 77: the export keeps the text length free, and validates
and times at the model's own length. onnxruntime must give the torch model's latents within 1e-4."""

from __future__ import annotations

import json

import pytest
import torch

from ldpruner import api
from ldpruner.runtime.unet import ORTUNet
from ldpruner.unet import StudentUNet

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a handwritten digit seven"
ATOL = 1e-4  # latents after three guided steps; measured ~1.2e-5


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    """zoo:mnist-t2i exported as a complete pipeline folder and loaded with no arguments (``zoo export``)."""
    from diffusers import DiffusionPipeline

    from ldpruner.zoo import export_pipeline

    folder = export_pipeline("mnist-t2i", tmp_path_factory.mktemp("zoo") / "mnist-t2i").path
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latents(pipe, unet) -> torch.Tensor:
    dense = pipe.unet
    pipe.unet = unet
    try:
        return pipe([PROMPT], num_inference_steps=3, guidance_scale=5.0, output_type="latent",
                    generator=[torch.Generator().manual_seed(0)]).images
    finally:
        pipe.unet = dense


def test_the_built_onnx_model_runs_in_the_zoo_pipeline_like_the_student(pipe, tmp_path):
    out = tmp_path / "demo"
    api.build("zoo:mnist-t2i", out=out, num_samples=2, steps=1, distill_steps=2, samples=False, progress=False,
              distill_options={"batch_size": 2, "trajectories": 2, "trajectory_steps": 2})
    export = json.loads((out / "onnx" / "export.json").read_text())["export"]
    assert export["dynamic_axes"]["encoder_hidden_states"] == {"0": "batch", "1": "sequence_length"}
    # validated at the model's own 16 tokens, and at CLIP's 77 for the free axis
    assert [c["input_shapes"]["encoder_hidden_states"][1] for c in export["validation"]["checks"]] == [16, 16, 16, 77]
    student = StudentUNet.from_pretrained(out / "distill" / "student")
    ort = ORTUNet.from_pretrained(out / "onnx")
    torch_latents, ort_latents = latents(pipe, student), latents(pipe, ort)
    assert torch_latents.shape == (1, 4, 8, 8) and torch_latents.std() > 0.1
    torch.testing.assert_close(ort_latents, torch_latents, atol=ATOL, rtol=0)


@pytest.mark.parametrize("controlnet", [False, True], ids=["plain", "controlnet"])
def test_the_exported_dense_model_runs_in_the_zoo_pipeline(pipe, tmp_path, controlnet):
    api.export("zoo:mnist-t2i", out=tmp_path, controlnet=controlnet)
    ort = ORTUNet.from_pretrained(tmp_path / "onnx")
    assert ("mid_block_additional_residual" in ort.session.input_names) == controlnet
    torch.testing.assert_close(latents(pipe, ort), latents(pipe, pipe.unet), atol=ATOL, rtol=0)


def test_a_controlnet_export_runs_in_the_controlnet_pipeline(pipe, tmp_path):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    api.export("zoo:mnist-t2i", out=tmp_path, controlnet=True)
    ort = ORTUNet.from_pretrained(tmp_path / "onnx")
    torch.manual_seed(0)
    # the zoo's VAE downsamples 4x: the control image's embedding must too
    controlnet = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(16, 32, 64)).eval()
    with torch.no_grad():  # from_unet zeroes the residual convolutions: give the residuals something to say
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            conv.weight.normal_(0, 0.05)
    control = StableDiffusionControlNetPipeline(**pipe.components, controlnet=controlnet)
    control.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    plain = latents(pipe, pipe.unet)

    def run(unet):
        control.unet = unet
        return control([PROMPT], image=image, num_inference_steps=3, guidance_scale=5.0, output_type="latent",
                       generator=[torch.Generator().manual_seed(0)]).images

    with_dense, with_ort = run(pipe.unet), run(ort)
    assert (with_dense - plain).abs().max() > 0.01  # the residuals change the latents
    torch.testing.assert_close(with_ort, with_dense, atol=ATOL, rtol=0)
