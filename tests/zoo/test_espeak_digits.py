"""The committed zoo model espeak-digits loads and samples; its mel definition round-trips; data prep fails clearly."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch
from committed_parts import load_unet_and_vae

from ldpruner import zoo
from ldpruner.base.errors import ConfigError
from ldpruner.zoo import MissingPackageError, datasets
from ldpruner.zoo.audio import MelConfig, fit_clip, mel_to_waveform, waveform_to_mel
from ldpruner.zoo.recipes import espeak_digits as recipe

NAME = "espeak-digits"
HAS_ESPEAK = shutil.which("espeak-ng") is not None
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return zoo.load_unconditional(NAME, task="unconditional-audio")


def test_registry_lists_the_model_and_its_folder_is_complete():
    entry = zoo.get_entry(NAME)
    assert entry.task == "unconditional-audio"
    assert entry in zoo.list_models(task="unconditional-audio")
    assert entry not in zoo.list_models(task="text-to-image")
    folder = zoo.model_dir(NAME)
    for part in ("model_index.json", "mel.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                 "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
                 "training.json", "README.md", "samples.png"):
        assert (folder / part).is_file(), part
    index = json.loads((folder / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert json.loads((folder / "scheduler/scheduler_config.json").read_text())["_class_name"] == "DDIMScheduler"
    weights = sum((folder / p).stat().st_size for p in ("unet/diffusion_pytorch_model.safetensors",
                                                         "vae/diffusion_pytorch_model.safetensors"))
    assert weights < 10_000_000
    wavs = sorted((folder / "samples").glob("*.wav"))
    assert 1 <= len(wavs) <= 8
    assert all(w.stat().st_size < 40_000 for w in wavs)  # 16 kHz mono 16-bit, about 1 s
    assert MelConfig.from_folder(folder) == MelConfig()


def test_unet_and_vae_load_with_diffusers_from_safetensors_only():
    unet, vae = load_unet_and_vae(NAME)
    assert next(unet.parameters()).dtype == torch.float32
    assert len(unet.config.block_out_channels) == 3
    assert unet.config.down_block_types[0] == "DownBlock2D"
    assert all(t == "AttnDownBlock2D" for t in unet.config.down_block_types[1:])
    assert 2_000_000 < sum(p.numel() for p in unet.parameters()) < 4_000_000
    assert (vae.config.in_channels, vae.config.latent_channels) == (1, unet.config.in_channels)
    assert vae.config.scaling_factor != 1.0  # set from the latents' std by the recipe


def test_sampling_two_clips_gives_mels_and_audio(model):
    config = MelConfig.from_folder(model.folder)
    mels = model.sample(2, steps=2, seed=0)
    assert mels.shape == (2, 1, config.n_mels, config.n_frames)
    assert mels.dtype == torch.float32 and 0.0 <= float(mels.min()) and float(mels.max()) <= 1.0
    # a sample depends on its own seed only (up to batch-size-dependent rounding)
    assert torch.allclose(model.sample(1, steps=2, seed=1)[0], mels[1], atol=1e-4)
    audio = mel_to_waveform(mels, config, value_range=(0.0, 1.0), n_iter=4)
    assert audio.shape == (2, config.clip_samples) and config.sample_rate == 16_000
    assert np.isfinite(audio).all() and np.abs(audio).max() <= 1.0


@pytest.mark.skipif(not HAS_ESPEAK, reason="Debian espeak-ng is not installed (apt-get install espeak-ng)")
def test_mel_round_trip_of_a_real_espeak_clip_is_close():
    config = MelConfig()
    audio = datasets.espeak_clip({"digit": 7, "voice": "en-us+m3", "pitch": 50, "speed": 160}, config)
    assert audio.shape == (config.clip_samples,) and abs(np.abs(audio).max() - config.peak) < 1e-5
    mel = waveform_to_mel(audio, config)
    assert mel.shape == (1, 1, 64, 64) and mel.min() >= -1.0 and mel.max() <= 1.0
    assert mel.max() > 0.5 and (mel == -1.0).mean() > 0.05  # loud speech and clipped silence both present
    again = waveform_to_mel(mel_to_waveform(mel, config, n_iter=32), config)
    speech = mel > -0.5
    assert np.abs(again - mel)[speech].mean() < 0.1  # within ~4 dB where there is speech
    assert np.abs(again - mel).mean() < 0.15


def test_mel_config_validates_and_round_trips(tmp_path):
    config = MelConfig()
    assert config.clip_samples == 256 * 63 and abs(config.clip_seconds - 1.008) < 1e-9
    (tmp_path / "mel.json").write_text(json.dumps(config.to_json()))
    assert MelConfig.from_folder(tmp_path) == config
    with pytest.raises(ConfigError, match="db_min must be below db_max"):
        MelConfig(db_min=10.0, db_max=0.0)
    with pytest.raises(ConfigError, match="n_mels=0 must be >= 1"):
        MelConfig(n_mels=0)
    with pytest.raises(ConfigError, match="mel.json"):
        MelConfig.from_folder(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="clip_samples = 16128"):
        waveform_to_mel(np.zeros(1000, dtype=np.float32), config)
    with pytest.raises(ConfigError, match=r"mels must be \(N, 1, 64, 64\)"):
        mel_to_waveform(np.zeros((1, 1, 32, 64)), config)


def test_fit_clip_trims_normalises_and_pads():
    config = MelConfig()
    assert not fit_clip(np.zeros(500), config).any()
    tone = 0.3 * np.sin(np.arange(4000) / 5.0)
    clip = fit_clip(np.concatenate([np.zeros(3000), tone, np.zeros(3000)]), config)
    start = int(0.05 * config.sample_rate)
    assert clip.shape == (config.clip_samples,) and not clip[:start].any()
    assert abs(np.abs(clip).max() - config.peak) < 1e-6 and not clip[start + 4000:].any()
    long = fit_clip(np.ones(40_000) * 0.5, config)
    assert long.shape == (config.clip_samples,) and long[-1] == 0.0  # cut with a fade-out


def test_split_plans_are_seeded_balanced_and_disjoint():
    plans = {split: datasets.espeak_split_plan(split) for split in datasets.ESPEAK_SPLITS}
    assert datasets.espeak_split_plan("eval") == plans["eval"]
    for split, plan in plans.items():
        assert len(plan) == datasets.ESPEAK_SPLITS[split][1]
        assert np.bincount([c["digit"] for c in plan], minlength=10).tolist() == [len(plan) // 10] * 10
    keys = {split: {(c["digit"], c["voice"], c["pitch"], c["speed"]) for c in plan} for split, plan in plans.items()}
    assert len({c["voice"] for c in plans["ldm"]}) > 100  # accents x variants, well mixed
    # the same words with the same settings may recur by chance; the splits are mostly disjoint
    assert len(keys["ldm"] & keys["eval"]) < 0.02 * len(keys["eval"])
    with pytest.raises(ValueError, match="split must be one of"):
        datasets.espeak_split_plan("test")


def test_missing_espeak_is_a_typed_error_naming_the_package(tmp_path, capsys):
    bad = str(tmp_path / "no-espeak-ng")
    message = "install it with: apt-get install espeak-ng"
    with pytest.raises(datasets.MissingProgramError, match=message) as info:
        datasets.check_espeak(bad)
    assert isinstance(info.value, MissingPackageError) and isinstance(info.value, ImportError)
    with pytest.raises(datasets.MissingProgramError, match=message):
        datasets.load_espeak_split("eval", executable=bad)
    with pytest.raises(datasets.MissingProgramError, match=message):
        datasets.synthesize("seven", "en-us", 50, 160, executable=bad)
    assert recipe.main(["--out", str(tmp_path / "out"), "--espeak", bad]) == 2
    assert message in capsys.readouterr().err


def test_missing_librosa_is_a_typed_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "librosa", None)
    with pytest.raises(MissingPackageError, match="pip install librosa"):
        waveform_to_mel(np.zeros(MelConfig().clip_samples, dtype=np.float32), MelConfig())
    with pytest.raises(MissingPackageError, match="Griffin-Lim"):
        mel_to_waveform(np.zeros((1, 1, 64, 64)), MelConfig())
