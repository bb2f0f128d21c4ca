"""What a loaded model says about its pipeline: the text length its prompts come in (the trace, the export's
validation and every latency measurement run at it); the identity of its weights."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch
from conftest import make_tiny_sd_unet

from ldpruner import api
from ldpruner.sources import load, weights_id


@pytest.mark.parametrize("pipeline, tokenizer, tokens", [
    ("StableDiffusionPipeline", 64, 64),  # the tokenizer's model_max_length
    ("StableDiffusionPipeline", 10**30, 77),  # transformers' "no limit": CLIP's length
    ("StableDiffusionPipeline", None, 77),  # no tokenizer
    ("IFPipeline", 512, 77),  # IF and Kandinsky pad to 77 whatever their tokenizer declares
    ("KandinskyPipeline", 512, 77),
])
def test_the_text_length_is_what_the_pipeline_pads_prompts_to(tmp_path, pipeline, tokenizer, tokens):
    folder = tmp_path / "pipe"
    make_tiny_sd_unet().save_pretrained(folder / "unet")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline, "unet": ["diffusers",
                                                                                          "UNet2DConditionModel"]}))
    if tokenizer is not None:
        (folder / "tokenizer").mkdir()
        (folder / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": tokenizer}))
    loaded = api.load(str(folder), scheduler="DDIMScheduler")
    assert loaded.text_length == tokens and loaded.describe()["text_length"] == tokens
    assert api.inspect(loaded).traced.example_inputs["encoder_hidden_states"].shape[1] == tokens


def test_the_zoo_text_to_image_model_is_traced_at_its_encoders_sixteen_tokens():
    loaded = api.load("zoo:mnist-t2i")
    assert loaded.text_length == 16
    assert api.inspect(loaded).traced.example_inputs["encoder_hidden_states"].shape[1:] == (16, 384)
    assert api.load(make_tiny_sd_unet()).text_length == 77  # an in-memory UNet: CLIP's length


def test_weights_id_hashes_each_tensor_by_name_dtype_shape_and_bytes():
    """The bytes every recorded identity (plans, scores.json, checkpoints) and the analysis cache key hash: changing
    them orphans every artifact made so far."""
    linear = torch.nn.Linear(2, 1)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0, 2.0]]))
        linear.bias.fill_(0.5)
    expected = hashlib.sha256(b"bias:torch.float32:[1];" + struct.pack("<f", 0.5)
                              + b"weight:torch.float32:[1, 2];" + struct.pack("<2f", 1.0, 2.0))
    assert weights_id(linear) == "sha256:" + expected.hexdigest()


def test_weights_id_tells_other_weights_and_dtypes_apart():
    unet = make_tiny_sd_unet()
    same = weights_id(unet)
    assert weights_id(make_tiny_sd_unet()) == same == load(unet).weights_id
    assert weights_id(make_tiny_sd_unet(seed=1)) != same
    assert weights_id(make_tiny_sd_unet().to(torch.bfloat16)) != same
