"""The committed zoo model crawl-tiles loads (ldpruner, stock diffusers, the pruning loader) and samples."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from committed_parts import load_unet_and_vae

from ldpruner import zoo
from ldpruner.base.errors import ConfigError, ModelLoadError

NAME = "crawl-tiles"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return zoo.load_unconditional(NAME)


def test_registry_lists_the_model_and_its_folder_is_complete():
    entry = zoo.get_entry(NAME)
    assert entry.task == "unconditional-image"
    assert entry in zoo.list_models(task="unconditional-image") and entry not in zoo.list_models(task="text-to-image")
    folder = zoo.model_dir(NAME)
    for part in ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                 "vqvae/config.json", "vqvae/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
                 "training.json", "README.md", "samples.png"):
        assert (folder / part).is_file(), part
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "LDMPipeline"
    assert index["unet"] == ["diffusers", "UNet2DModel"] and index["vqvae"] == ["diffusers", "AutoencoderKL"]
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert not list(folder.rglob("*.bin"))  # safetensors only
    for weights in ("unet", "vqvae"):  # the committed fp16 weights stay small
        assert (folder / weights / "diffusion_pytorch_model.safetensors").stat().st_size < 10_000_000
    training = json.loads((folder / "training.json").read_text())
    assert training["data"]["heldout_tiles"] > 0 and training["metrics"]["quality"]["fd"] > 0


def test_parts_load_with_diffusers_from_safetensors_only():
    unet, vae = load_unet_and_vae(NAME, "vqvae")
    assert next(unet.parameters()).dtype == torch.float32
    assert len(unet.config.block_out_channels) == 3
    # self-attention in the lower-resolution levels only, so pruning sees varied operators
    assert tuple(unet.config.down_block_types) == ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    assert tuple(unet.config.up_block_types) == ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    assert 2_000_000 < sum(p.numel() for p in unet.parameters()) < 4_000_000
    assert (unet.config.in_channels, unet.config.sample_size, vae.config.latent_channels) == (4, 8, 4)
    assert vae.config.in_channels == 3 and vae.config.scaling_factor != 1.0


def test_stock_diffusers_loads_and_runs_the_folder_as_an_ldm_pipeline():
    import diffusers

    pipe = diffusers.DiffusionPipeline.from_pretrained(zoo.model_dir(NAME), local_files_only=True,
                                                       use_safetensors=True)
    assert isinstance(pipe, diffusers.LDMPipeline)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=2, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 32, 32, 3) and images.min() >= 0 and images.max() <= 1


def test_samples_are_images_in_range_and_seeded_per_sample(model):
    images = model.sample(2, steps=3, seed=0)
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32
    assert torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    assert not torch.allclose(images[0], images[1])
    # sample i uses seed + i, so it does not depend on the rest of the batch
    alone = model.sample(1, steps=3, seed=[1])
    torch.testing.assert_close(alone[0], images[1], atol=1e-4, rtol=0)
    torch.testing.assert_close(model.sample(2, steps=3, seed=0), images)


def test_sample_uses_a_replacement_unet_and_checks_its_arguments(model):
    import copy

    zeroed = copy.deepcopy(model.unet)
    with torch.no_grad():
        zeroed.conv_out.weight.zero_()
        zeroed.conv_out.bias.zero_()
    assert not torch.allclose(model.sample(1, steps=2), model.sample(1, steps=2, unet=zeroed))
    with pytest.raises(ConfigError, match="num must be a positive int"):
        model.sample(0)
    with pytest.raises(ConfigError, match="steps must be a positive int"):
        model.sample(1, steps=0)
    with pytest.raises(ConfigError, match="2 ints, one per image"):
        model.sample(2, steps=1, seed=[1])


def test_wrong_task_and_unknown_names_are_model_load_errors():
    with pytest.raises(ModelLoadError, match="zoo model 'mnist-t2i' is text-to-image, not unconditional-image or "
                                             "unconditional-audio"):
        zoo.load_unconditional("mnist-t2i")
    with pytest.raises(ModelLoadError, match="zoo model 'crawl-tiles' is unconditional-image, not "
                                             "unconditional-audio"):
        zoo.load_unconditional(NAME, task="unconditional-audio")
    with pytest.raises(ModelLoadError, match="zoo model 'crawl-tiles' is unconditional-image, not text-to-image"):
        zoo.load_text_to_image(NAME)
    with pytest.raises(ModelLoadError, match=r"'no-such-model' is neither a zoo unconditional-image model "
                                             r"\(known: crawl-tiles\) nor a folder"):
        zoo.load_unconditional("no-such-model", task="unconditional-image")
    with pytest.raises(ConfigError, match="task must be one of"):
        zoo.load_unconditional(NAME, task="text-to-image")


def test_missing_folder_parts_are_named(tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(zoo.model_dir(NAME), folder)
    shutil.rmtree(folder / "vqvae")
    with pytest.raises(ModelLoadError, match="neither vae/config.json nor vqvae/config.json exists"):
        zoo.load_unconditional(folder)
    (folder / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(ModelLoadError, match="not a zoo unconditional folder: scheduler/scheduler_config.json is "
                                             "missing"):
        zoo.load_unconditional(folder)
    shutil.rmtree(folder / "unet")
    with pytest.raises(ModelLoadError, match="unet/config.json is missing"):
        zoo.load_unconditional(folder)


def test_a_vae_folder_and_a_non_square_latent_are_supported(tmp_path):
    """Unconditional audio models keep the autoencoder in vae/ and may have (height, width) latents."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DModel

    from ldpruner.zoo.unconditional import latent_shape

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=(4, 8), in_channels=2, out_channels=2, block_out_channels=(8, 8),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       layers_per_block=1, norm_num_groups=4)
    vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                        latent_channels=2, norm_num_groups=4)
    unet.save_pretrained(tmp_path / "unet")
    vae.save_pretrained(tmp_path / "vae")
    DDIMScheduler().save_pretrained(tmp_path / "scheduler")
    model = zoo.load_unconditional(tmp_path)
    assert latent_shape(model.unet.config) == (2, 4, 8)
    assert model.sample_latents(2, steps=1).shape == (2, 2, 4, 8)
    assert model.sample(1, steps=1).shape == (1, 1, 8, 16)


def test_latent_shape_rejects_other_sample_sizes():
    from types import SimpleNamespace

    from ldpruner.zoo.unconditional import latent_shape

    with pytest.raises(ModelLoadError, match="sample_size must be an int or"):
        latent_shape(SimpleNamespace(sample_size=(1, 2, 3), in_channels=4))


def test_pruning_loader_takes_the_unet_and_scheduler_from_the_zoo_folder():
    from diffusers import DDIMScheduler, UNet2DModel

    from ldpruner.sources import load

    loaded = load("zoo:crawl-tiles")
    assert isinstance(loaded.unet, UNet2DModel) and isinstance(loaded.scheduler, DDIMScheduler)
    assert loaded.unet_dir == zoo.model_dir(NAME) / "unet" and loaded.source == "zoo:crawl-tiles"
    assert loaded.text_encoder_config is None and loaded.default_prompts is None


def test_cli_zoo_list_shows_the_model_ready(capsys):
    from ldpruner.cli import main

    assert main(["zoo", "list"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("zoo:crawl-tiles"))
    assert "unconditional-image" in line and "ready" in line
