"""What a loaded model says about its pipeline: the text length its prompts come in (the trace, the export's
validation and every latency measurement run at it)."""

from __future__ import annotations

import json

import pytest
from conftest import make_tiny_sd_unet

from ldpruner import api


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
