"""`ldpruner zoo export`: a zoo model as a complete diffusers folder that DiffusionPipeline loads with no arguments
and that samples exactly what the zoo's own pipeline and samplers give; its refusals, and atomic writes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from ldpruner import zoo
from ldpruner.base.errors import ArtifactError
from ldpruner.cli import main

KNOWN = "mnist-t2i (text-to-image), crawl-tiles (unconditional-image), espeak-digits (unconditional-audio)"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """mnist-t2i exported once (loading and saving the 90 MB MiniLM takes a few seconds)."""
    return zoo.export_pipeline("mnist-t2i", tmp_path_factory.mktemp("export") / "mnist-t2i")


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def seeded(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_exported_text_to_image_folder_loads_with_no_arguments_and_samples_as_the_zoo_pipeline(exported):
    from diffusers import DiffusionPipeline, StableDiffusionPipeline
    from transformers import BertModel

    pipe = DiffusionPipeline.from_pretrained(exported.path)
    assert type(pipe) is StableDiffusionPipeline and type(pipe.text_encoder) is BertModel
    assert pipe.tokenizer.model_max_length == 16 and pipe.text_encoder.config.use_attention_mask is True
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a handwritten three", "a handwritten seven"]
    images = pipe(prompts, num_inference_steps=3, guidance_scale=5.0, output_type="pt", generator=seeded(0, 1)).images
    reference = zoo.diffusers_pipeline("mnist-t2i")(prompts, num_inference_steps=3, guidance_scale=5.0,
                                                    output_type="pt", generator=seeded(0, 1)).images
    assert images.shape == (2, 1, 32, 32)
    torch.testing.assert_close(images, reference, atol=0, rtol=0)
    assert not torch.equal(images[0], images[1])
    # the concrete class loads it with no arguments too
    again = StableDiffusionPipeline.from_pretrained(exported.path)
    assert type(again.text_encoder) is BertModel and again.tokenizer.model_max_length == 16


def test_exported_text_to_image_folder_holds_the_shipped_files_and_the_encoder_as_safetensors(exported):
    folder, shipped = exported.path, zoo.model_dir("mnist-t2i")
    assert exported.pipeline_class == "StableDiffusionPipeline"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["text_encoder"] == ["transformers", "BertModel"]
    assert index["tokenizer"][0] == "transformers" and index["tokenizer"][1].startswith("BertTokenizer")
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["vae"] == ["diffusers", "AutoencoderKL"]
    assert "use_attention_mask" in index["_text_encoder"]
    assert json.loads((folder / "text_encoder/config.json").read_text())["use_attention_mask"] is True
    assert json.loads((folder / "tokenizer/tokenizer_config.json").read_text())["model_max_length"] == 16
    assert (folder / "text_encoder/model.safetensors").stat().st_size > 80_000_000
    assert not [p for p in folder.rglob("*") if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".ckpt"}]
    for part in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "scheduler/scheduler_config.json", "text_encoder.json", "prompts.txt"):
        assert (folder / part).read_bytes() == (shipped / part).read_bytes(), part
    # the card, with a note on what differs from the shipped folder
    card = (folder / "README.md").read_text()
    assert card.startswith("> Exported with `ldpruner zoo export`: this folder holds the text encoder")
    assert card.endswith((shipped / "README.md").read_text())
    weights = (folder / "text_encoder/model.safetensors").stat().st_mode & 0o777
    assert weights == (folder / "unet/diffusion_pytorch_model.safetensors").stat().st_mode & 0o777  # not owner-only
    assert not (shipped / "text_encoder").exists() and not (shipped / "tokenizer").exists()
    assert exported.summary() == (
        f"wrote {str(folder)!r}: zoo:mnist-t2i as a diffusers StableDiffusionPipeline folder (text encoder and "
        "tokenizer included: frozen all-MiniLM-L6-v2, 16 tokens); load it with "
        f"DiffusionPipeline.from_pretrained({str(folder)!r})")


@pytest.mark.parametrize("name", ["crawl-tiles", "espeak-digits"])
def test_cli_exports_an_unconditional_model_as_an_ldm_pipeline_sampling_as_the_zoo_sampler(name, capsys, tmp_path):
    from diffusers import DiffusionPipeline, LDMPipeline

    out = tmp_path / name
    code, stdout, err = run(capsys, "zoo", "export", name, "--out", out)
    assert code == 0, err
    assert stdout.startswith(f"wrote {str(out)!r}: zoo:{name} as a diffusers LDMPipeline folder (")
    assert stdout.endswith(f"load it with DiffusionPipeline.from_pretrained({str(out)!r})\n")
    pipe = DiffusionPipeline.from_pretrained(out)
    assert type(pipe) is LDMPipeline
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=2, generator=seeded(0, 1), output_type="np").images
    expected = zoo.load_unconditional(name).sample(2, steps=2, seed=[0, 1]).permute(0, 2, 3, 1).numpy()
    assert images.shape == expected.shape == ((2, 32, 32, 3) if name == "crawl-tiles" else (2, 64, 64, 1))
    assert abs(images - expected).max() == 0.0
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "LDMPipeline" and index["vqvae"] == ["diffusers", "AutoencoderKL"]
    assert not (out / "vae").exists()


def test_exported_audio_pipeline_images_are_the_mels_its_note_describes(tmp_path):
    from diffusers import DiffusionPipeline

    from ldpruner.zoo.audio import MelConfig

    out = zoo.export_pipeline("espeak-digits", tmp_path / "audio").path
    assert "mel_to_waveform(images.transpose(0, 3, 1, 2)" in json.loads((out / "model_index.json").read_text())["_mel"]
    pipe = DiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=1, num_inference_steps=2, generator=seeded(0), output_type="np").images
    config = MelConfig.from_folder(out)  # mel.json travels with the folder
    # the shape mel_to_waveform takes, (N, 1, n_mels, n_frames), with values in the range the note names
    assert images.transpose(0, 3, 1, 2).shape == (1, 1, config.n_mels, config.n_frames)
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0.05


def test_cli_refuses_a_non_empty_out_without_overwrite_and_replaces_it_with(capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, stdout, err = run(capsys, "zoo", "export", "crawl-tiles", "--out", out)
    assert (code, stdout) == (1, "")
    assert err == f"error: ArtifactError: {str(out)!r} exists; pass --overwrite (overwrite=True) to replace it\n"
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left beside it
    code, stdout, err = run(capsys, "zoo", "export", "crawl-tiles", "--out", out, "--overwrite")
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "unet/diffusion_pytorch_model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_empty_out_folder_needs_no_overwrite(tmp_path):
    (tmp_path / "empty").mkdir()
    result = zoo.export_pipeline("crawl-tiles", tmp_path / "empty")
    assert result.path == tmp_path / "empty" and (result.path / "model_index.json").is_file()


@pytest.mark.parametrize(("name", "hint"), [("nope", ""),
                                            ("zoo:mnist-t2i", " (pass the bare name, without the 'zoo:' prefix)")])
def test_cli_refuses_an_unknown_name_listing_the_known_ones(name, hint, capsys, tmp_path):
    code, stdout, err = run(capsys, "zoo", "export", name, "--out", tmp_path / "out")
    assert (code, stdout) == (1, "")
    assert err == f"error: ModelLoadError: unknown zoo model {name!r}{hint}; known: {KNOWN}\n"
    assert not list(tmp_path.iterdir())


def test_cli_zoo_list_still_lists_the_models(capsys):
    code, stdout, err = run(capsys, "zoo", "list")
    assert code == 0, err
    assert [line.split()[0] for line in stdout.splitlines()] == ["zoo:mnist-t2i", "zoo:crawl-tiles",
                                                                 "zoo:espeak-digits"]


@pytest.mark.parametrize("where", ["inside", "itself", "around"])
def test_refuses_an_out_that_is_holds_or_lies_inside_the_shipped_folder(where):
    shipped = zoo.model_dir("crawl-tiles")
    out = {"inside": shipped / "copy", "itself": shipped, "around": shipped.parent}[where]
    with pytest.raises(ArtifactError) as info:
        zoo.export_pipeline("crawl-tiles", out, overwrite=True)
    assert str(info.value) == (f"--out {str(out)!r} is, holds or lies inside the shipped folder of zoo model "
                               f"'crawl-tiles' ({str(shipped.resolve())!r}); choose a folder outside it")
    assert not (shipped / "copy").exists() and (shipped / "unet/diffusion_pytorch_model.safetensors").is_file()


def test_a_failure_leaves_nothing_and_keeps_what_was_there(monkeypatch, tmp_path):
    copytree, depth = shutil.copytree, [0]

    def copy_then_fail(*args, **kwargs):  # the disk fills up once the files are in the staging folder
        depth[0] += 1
        try:
            copytree(*args, **kwargs)  # which calls shutil.copytree (this function) for each subfolder
        finally:
            depth[0] -= 1
        if depth[0] == 0:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copytree", copy_then_fail)
    message = ("cannot write zoo model 'crawl-tiles' to {!r}: OSError: [Errno 28] No space left on device; free some "
               "space or choose another --out")
    with pytest.raises(ArtifactError) as info:
        zoo.export_pipeline("crawl-tiles", tmp_path / "new")
    assert str(info.value) == message.format(str(tmp_path / "new"))
    assert not list(tmp_path.iterdir())
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "keep.txt").write_text("mine")
    with pytest.raises(ArtifactError) as info:
        zoo.export_pipeline("crawl-tiles", tmp_path / "old", overwrite=True)
    assert str(info.value) == message.format(str(tmp_path / "old"))
    assert [p.name for p in tmp_path.iterdir()] == ["old"] and (tmp_path / "old" / "keep.txt").read_text() == "mine"
