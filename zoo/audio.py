"""The one mel-spectrogram definition the audio zoo model, its recipe and its metrics share; mel ↔ waveform.

A clip is ``MelConfig.clip_samples`` samples of mono audio at ``sample_rate`` (peak-normalised to ``peak``).
Its mel image is the power mel spectrogram (librosa: Slaney mel filters, centred STFT with zero padding) in dB,
``db = 10·log10(max(mel, 1e-10))``, clipped to [``db_min``, ``db_max``] and mapped linearly onto [-1, 1]:

    x = 2 · (clip(db, db_min, db_max) − db_min) / (db_max − db_min) − 1,   shape (1, n_mels, n_frames)

Row 0 is the lowest mel band, column 0 the first frame. The constants are fixed (not fitted to data) so that any
model or metric that reads ``mel.json`` reads the same scale. Waveforms come back by Griffin-Lim
(``librosa.feature.inverse.mel_to_stft``: NNLS mel → linear magnitude, then ``librosa.griffinlim`` with a fixed
seed).

librosa is needed for the conversions only; sampling mel images from the model needs none. It is imported lazily
and its absence is a ``MissingPackageError`` naming the install command.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ldpruner.base.errors import ConfigError
from ldpruner.base.io import read_json
from ldpruner.base.options import Config, option

from ._packages import MissingPackageError

__all__ = ["MEL_CONFIG_FILE", "MelConfig", "fit_clip", "mel_to_waveform", "waveform_to_mel"]

MEL_CONFIG_FILE = "mel.json"


@dataclasses.dataclass(frozen=True)
class MelConfig(Config):
    """Log-mel settings; ``clip_samples = hop_length · (n_frames − 1)`` gives exactly ``n_frames`` centred frames."""

    sample_rate: int = option(16_000, "sample rate of a clip (Hz)", minimum=1)
    n_fft: int = option(1024, "STFT window length (samples)", minimum=1)
    hop_length: int = option(256, "STFT hop (samples)", minimum=1)
    n_mels: int = option(64, "mel bands: the image's height", minimum=1)
    n_frames: int = option(64, "STFT frames: the image's width", minimum=1)
    fmin: float = option(0.0, "lowest mel frequency (Hz)", minimum=0)
    fmax: float = option(8000.0, "highest mel frequency (Hz), at most sample_rate / 2")
    db_min: float = option(-60.0, "power in dB mapped to -1")
    db_max: float = option(25.0, "power in dB mapped to +1")
    peak: float = option(0.9, "clips are scaled so that their largest |sample| is this", minimum=0, maximum=1,
                         exclusive_minimum=True)

    def problems(self) -> Iterable[str]:
        if not self.db_min < self.db_max:
            yield f"db_min must be below db_max (got {self.db_min} and {self.db_max})"
        if not self.fmin < self.fmax <= self.sample_rate / 2:
            yield f"need fmin < fmax <= sample_rate/2 (got fmin {self.fmin}, fmax {self.fmax})"

    @property
    def clip_samples(self) -> int:
        return self.hop_length * (self.n_frames - 1)

    @property
    def clip_seconds(self) -> float:
        return self.clip_samples / self.sample_rate

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "clip_samples": self.clip_samples,
                "scale": "x = 2*(clip(10*log10(max(power_mel, 1e-10)), db_min, db_max) - db_min)/(db_max - db_min) - 1",
                "layout": "(1, n_mels, n_frames), row 0 = lowest mel band (librosa Slaney mel filters)"}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> MelConfig:
        return cls.from_json(read_json(Path(folder) / MEL_CONFIG_FILE, what="mel settings (an audio zoo model folder "
                                       "keeps them in mel.json)", error=ConfigError))


def _librosa(purpose: str) -> Any:
    try:
        import librosa
    except ImportError as exc:
        raise MissingPackageError(
            f"{purpose} needs the PyPI package 'librosa', which is not installed; install it with: pip install librosa "
            "(or pip install 'ldpruner[bench]')",
            name="librosa",
        ) from exc
    return librosa


def fit_clip(audio: np.ndarray, config: MelConfig, *, offset_seconds: float = 0.05,
             threshold: float = 0.01) -> np.ndarray:
    """A (T,) waveform → (clip_samples,) float32: silence trimmed at both ends (|a| < ``threshold`` of the peak),
    peak-normalised to ``config.peak``, placed ``offset_seconds`` from the start, zero-padded or cut (with a 10 ms
    fade-out) to the clip length. An all-silent input gives zeros."""
    a = np.asarray(audio, dtype=np.float64).reshape(-1)
    out = np.zeros(config.clip_samples, dtype=np.float32)
    peak = float(np.abs(a).max()) if a.size else 0.0
    if peak == 0.0:
        return out
    loud = np.flatnonzero(np.abs(a) >= threshold * peak)
    a = a[loud[0]:loud[-1] + 1] * (config.peak / peak)
    start = round(offset_seconds * config.sample_rate)
    n = min(len(a), config.clip_samples - start)
    a = a[:n].copy()
    if n < len(loud) and n > 0:
        fade = min(n, config.sample_rate // 100)
        a[n - fade:] *= np.linspace(1.0, 0.0, fade)
    out[start:start + n] = a
    return out


def waveform_to_mel(audio: Any, config: MelConfig) -> np.ndarray:
    """Waveforms (T,) or (N, T) of exactly ``clip_samples`` → float32 (N, 1, n_mels, n_frames) in [-1, 1]."""
    librosa = _librosa("turning audio into mel spectrograms")
    a = np.asarray(audio, dtype=np.float32)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2 or a.shape[1] != config.clip_samples:
        raise ConfigError(f"audio must be (T,) or (N, T) with T = clip_samples = {config.clip_samples}; "
                          f"got shape {a.shape} (pad or cut with fit_clip)")
    mel = librosa.feature.melspectrogram(
        y=a, sr=config.sample_rate, n_fft=config.n_fft, hop_length=config.hop_length, n_mels=config.n_mels,
        fmin=config.fmin, fmax=config.fmax, power=2.0, center=True, pad_mode="constant",
    )
    db = 10.0 * np.log10(np.maximum(mel, 1e-10))
    x = 2.0 * (np.clip(db, config.db_min, config.db_max) - config.db_min) / (config.db_max - config.db_min) - 1.0
    return x[:, None].astype(np.float32)


def mel_to_waveform(mels: Any, config: MelConfig, *, value_range: tuple[float, float] = (-1.0, 1.0),
                    n_iter: int = 32, seed: int = 0) -> np.ndarray:
    """Mel images (N, 1, n_mels, n_frames) (or (n_mels, n_frames)) in ``value_range`` → float32 (N, clip_samples)
    waveforms by Griffin-Lim, each scaled to peak ``config.peak`` (silence stays zero)."""
    librosa = _librosa("turning mel spectrograms back into audio (Griffin-Lim)")
    if hasattr(mels, "detach"):
        mels = mels.detach().cpu().float().numpy()
    x = np.asarray(mels, dtype=np.float64)
    if x.ndim == 2:
        x = x[None, None]
    if x.ndim != 4 or x.shape[1:] != (1, config.n_mels, config.n_frames):
        raise ConfigError(f"mels must be (N, 1, {config.n_mels}, {config.n_frames}); got shape {x.shape}")
    lo, hi = value_range
    unit = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    db = config.db_min + unit * (config.db_max - config.db_min)
    power = 10.0 ** (db / 10.0)
    out = np.zeros((x.shape[0], config.clip_samples), dtype=np.float32)
    for i in range(x.shape[0]):
        magnitude = librosa.feature.inverse.mel_to_stft(
            power[i, 0], sr=config.sample_rate, n_fft=config.n_fft, power=2.0, fmin=config.fmin, fmax=config.fmax)
        audio = librosa.griffinlim(
            magnitude, n_iter=n_iter, hop_length=config.hop_length, n_fft=config.n_fft, center=True,
            pad_mode="constant", length=config.clip_samples, random_state=seed)
        peak = float(np.abs(audio).max())
        out[i] = audio * (config.peak / peak) if peak > 0 else audio
    return out
