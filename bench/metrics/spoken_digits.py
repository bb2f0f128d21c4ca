"""Audio quality for the unconditional spoken-digit model: a small CNN that hears which digit a mel image says.

The model (``zoo:espeak-digits``) has no prompt, so there is no label to check against. Instead:
- **recognisability**: the share of clips the classifier gives some digit with probability ≥ 0.5 (and ≥ 0.9),
  always read beside real held-out clips (the ceiling) and noise (the floor);
- **coverage**: the histogram of recognised digits and its entropy in bits (log2 10 ≈ 3.32 = all ten equally);
- **FD / KID** on the classifier's 64-d penultimate features (``SpokenDigitFeatureExtractor``), generated vs real
  held-out clips, beside the real-vs-real baseline at the same count (``spoken_digit_quality``).

Inputs are mel images (N, 1, 64, 64) as ``ldpruner.zoo.audio`` defines them, in ``value_range`` ((0, 1) as the
sampler returns them by default; the recipe's [-1, 1] with ``value_range=(-1, 1)``).

Data: the espeak-ng splits of ``ldpruner.zoo.datasets`` — the classifier trains on the
``classifier`` split (3,000 clips, never seen by the LDM) and is scored on the ``eval`` split (1,000 clips, held out
from both). The committed weights (``bench/assets/spoken_digit_classifier.safetensors``) are reproduced by

    python -m ldpruner.bench.metrics.spoken_digits --train --seed 0

(needs Debian espeak-ng and librosa; one thread; identical weights need the same torch version and CPU kernels).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ._classifier import (
    PenultimateClassifier,
    load_classifier,
    save_classifier,
    train_classifier,
)
from ._images import check_value_range
from .errors import MetricInputError, MissingMetricPackageError
from .quality import image_quality

__all__ = [
    "ARCHITECTURE",
    "MEL_SHAPE",
    "SPOKEN_DIGIT_CLASSIFIER_PATH",
    "SpokenDigitClassifier",
    "SpokenDigitFeatureExtractor",
    "load_spoken_digit_classifier",
    "noise_mels",
    "recognisability",
    "save_spoken_digit_classifier",
    "spoken_digit_probabilities",
    "spoken_digit_quality",
    "train_spoken_digit_classifier",
]

SPOKEN_DIGIT_CLASSIFIER_PATH = Path(__file__).resolve().parent.parent / "assets" / "spoken_digit_classifier.safetensors"
ARCHITECTURE = "SpokenDigitClassifier-v1"
MEL_SHAPE = (1, 64, 64)
THRESHOLDS = (0.5, 0.9)


class SpokenDigitClassifier(PenultimateClassifier):
    """CNN on (N, 1, 64, 64) mel images in [-1, 1]: four conv–BN–ReLU–maxpool stages (16, 32, 64, 64 channels),
    a 64-d penultimate layer (ReLU) and a 10-way linear head. About 120 k parameters."""

    def __init__(self) -> None:
        layers: list[nn.Module] = []
        channels = (1, 16, 32, 64, 64)
        for c_in, c_out in itertools.pairwise(channels):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]
        super().__init__(
            nn.Sequential(*layers, nn.Flatten(), nn.Linear(64 * 4 * 4, self.penultimate_dim), nn.ReLU())
        )


def _mel_batch(mels: Any, value_range: tuple[float, float], argument: str = "mels") -> torch.Tensor:
    """Mel images (N, 1, 64, 64) in ``value_range`` → float32 in [-1, 1] (clamped); typed errors otherwise."""
    if isinstance(mels, np.ndarray):
        mels = torch.from_numpy(mels)
    if not isinstance(mels, torch.Tensor):
        raise MetricInputError(f"{argument} must be a torch.Tensor (N, 1, 64, 64); got {type(mels).__name__}")
    if mels.ndim != 4 or tuple(mels.shape[1:]) != MEL_SHAPE or mels.shape[0] == 0:
        raise MetricInputError(
            f"{argument} must be mel images of shape (N, 1, 64, 64) (ldpruner.zoo.audio.MelConfig); "
            f"got {tuple(mels.shape)}"
        )
    if not mels.is_floating_point():
        raise MetricInputError(f"{argument} must be floating point in value_range; got dtype {mels.dtype}")
    low, high = check_value_range(value_range)
    x = mels.detach().float()
    if not torch.isfinite(x).all():
        raise MetricInputError(f"{argument} contains NaN or infinite values")
    slack = 0.25 * (high - low)
    if float(x.min()) < low - slack or float(x.max()) > high + slack:
        raise MetricInputError(
            f"{argument} spans [{float(x.min()):.3g}, {float(x.max()):.3g}], outside value_range=({low:g}, {high:g}); "
            f"pass the range the mels are in (the sampler gives (0, 1), the recipe's arrays (-1, 1))"
        )
    return ((x - low) / (high - low)).clamp(0.0, 1.0) * 2.0 - 1.0


def _augment(x: torch.Tensor) -> torch.Tensor:
    """Random time shift (±6 frames), mel shift (±2 bands), gain (±4 dB) and one time and one mel mask."""
    n, _, bands, frames = x.shape
    out = torch.full_like(x, -1.0)
    shifts_t = torch.randint(-6, 7, (n,))
    shifts_f = torch.randint(-2, 3, (n,))
    gain = (torch.rand(n, 1, 1, 1) * 2 - 1) * (4.0 / 85.0 * 2.0)  # 4 dB on the 85-dB range mapped onto [-1, 1]
    for i in range(n):
        st, sf = int(shifts_t[i]), int(shifts_f[i])
        src = x[i, :, max(0, -sf):bands - max(0, sf), max(0, -st):frames - max(0, st)]
        out[i, :, max(0, sf):max(0, sf) + src.shape[1], max(0, st):max(0, st) + src.shape[2]] = src
    out = torch.where(out > -1.0, (out + gain).clamp(-1.0, 1.0), out)
    t0 = torch.randint(0, frames - 6, (n,))
    f0 = torch.randint(0, bands - 6, (n,))
    for i in range(n):
        out[i, :, :, t0[i]:t0[i] + int(torch.randint(0, 7, ()))] = -1.0
        out[i, :, f0[i]:f0[i] + int(torch.randint(0, 7, ())), :] = -1.0
    return out


@torch.no_grad()
def _predict(model: SpokenDigitClassifier, x: torch.Tensor, batch_size: int = 250) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + batch_size]).softmax(1) for i in range(0, x.shape[0], batch_size)])


def train_spoken_digit_classifier(
    seed: int = 0, *, epochs: int = 15, batch_size: int = 64, lr: float = 3e-3, threads: int | None = 1,
    cache_dir: str | os.PathLike | None = None, espeak: str = "espeak-ng",
) -> tuple[SpokenDigitClassifier, dict[str, Any]]:
    """Train the classifier from ``seed`` on the espeak-ng ``classifier`` split; score it on the ``eval`` split.

    Returns the model (eval mode) and a record (seed, settings, held-out accuracy, time). ``threads`` sets torch's
    intra-op threads during training (restored after); the global RNG state is left untouched. The data come from
    ``ldpruner.zoo.datasets.load_espeak_split`` (``cache_dir`` as there).
    """
    from ldpruner.zoo.datasets import ESPEAK_SPLITS, load_espeak_split

    mels, digits = load_espeak_split("classifier", cache_dir=cache_dir, executable=espeak)
    held, held_digits = load_espeak_split("eval", cache_dir=cache_dir, executable=espeak)
    x_train, y_train = torch.from_numpy(mels), torch.from_numpy(digits)
    x_held, y_held = torch.from_numpy(held), torch.from_numpy(held_digits)
    return train_classifier(
        SpokenDigitClassifier, (x_train, y_train), (x_held, y_held), architecture=ARCHITECTURE,
        data=(f"espeak-ng spoken digits (ldpruner.zoo.datasets): train = the 'classifier' split "
              f"({ESPEAK_SPLITS['classifier'][1]} clips), held out = the 'eval' split "
              f"({ESPEAK_SPLITS['eval'][1]} clips); "
              "neither is in the LDM's 'ldm' split"),
        augment=_augment, predict=lambda model, x: _predict(model, x).argmax(1), seed=seed, epochs=epochs,
        batch_size=batch_size, lr=lr, threads=threads, label_smoothing=0.05, per_digit=True,
    )


def save_spoken_digit_classifier(model: SpokenDigitClassifier, path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Write the weights as safetensors (atomically), with ``record`` as JSON in the file's metadata."""
    save_classifier(model, path, record)


def load_spoken_digit_classifier(path: str | os.PathLike | None = None) -> SpokenDigitClassifier:
    """The committed classifier (or the one at ``path``) in eval mode; its training record is ``model.record``."""
    return load_classifier(SpokenDigitClassifier, Path(path) if path is not None else SPOKEN_DIGIT_CLASSIFIER_PATH,
                           architecture=ARCHITECTURE, what="spoken-digit classifier",
                           recreate="python -m ldpruner.bench.metrics.spoken_digits --train")


def spoken_digit_probabilities(
    mels: Any, *, classifier: SpokenDigitClassifier | None = None, value_range: tuple[float, float] = (0.0, 1.0),
) -> torch.Tensor:
    """(N, 10) float32 digit probabilities of mel images (N, 1, 64, 64) in ``value_range``."""
    model = classifier if classifier is not None else load_spoken_digit_classifier()
    return _predict(model, _mel_batch(mels, value_range))


def recognisability(
    mels: Any, *, classifier: SpokenDigitClassifier | None = None, value_range: tuple[float, float] = (0.0, 1.0),
    thresholds: tuple[float, ...] = THRESHOLDS,
) -> dict[str, Any]:
    """How many clips say some digit clearly, and which digits.

    ``recognised[t]``: share of clips whose most probable digit has probability ≥ t; ``histogram``: counts of
    the most probable digit over the clips recognised at the first threshold; ``entropy_bits``: that histogram's
    entropy (log2 10 ≈ 3.32 when all digits are equally common, 0 when only one is); ``mean_confidence``.
    """
    if not thresholds or not all(0.0 < t < 1.0 for t in thresholds):
        raise MetricInputError(f"thresholds must be probabilities in (0, 1); got {thresholds!r}")
    probs = spoken_digit_probabilities(mels, classifier=classifier, value_range=value_range)
    confidence, digit = probs.max(1)
    clear = confidence >= thresholds[0]
    histogram = torch.bincount(digit[clear], minlength=10)
    share = histogram.double() / max(1, int(histogram.sum()))
    entropy = float(-(share[share > 0] * share[share > 0].log2()).sum())
    return {
        "n": int(probs.shape[0]),
        "recognised": {f"{t:g}": float((confidence >= t).double().mean()) for t in thresholds},
        "histogram": [int(c) for c in histogram],
        "entropy_bits": entropy,
        "max_entropy_bits": math.log2(10),
        "mean_confidence": float(confidence.mean()),
    }


class SpokenDigitFeatureExtractor:
    """The spoken-digit classifier's 64-d penultimate features (after ReLU) of mel images (N, 1, 64, 64).

    An in-domain feature space for FD/KID between generated and real clips; relative numbers only.
    """

    def __init__(self, *, classifier: SpokenDigitClassifier | None = None,
                 value_range: tuple[float, float] = (0.0, 1.0), batch_size: int = 250) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise MetricInputError(f"batch_size must be a positive int; got {batch_size!r}")
        self.classifier = classifier if classifier is not None else load_spoken_digit_classifier()
        self.value_range = check_value_range(value_range)
        self.batch_size = batch_size
        self.name = f"spoken-digit-classifier-penultimate-{ARCHITECTURE}"

    @property
    def dim(self) -> int:
        return SpokenDigitClassifier.penultimate_dim

    def describe(self) -> dict[str, Any]:
        record = getattr(self.classifier, "record", {})
        return {
            "name": self.name,
            "network": f"{ARCHITECTURE} trained on espeak-ng spoken digits (bench/metrics/spoken_digits.py)",
            "features": "penultimate layer (64, after ReLU)",
            "dim": self.dim,
            "input_size": "64x64 mel",
            "input": "log-mel images as ldpruner.zoo.audio.MelConfig defines them",
            "classifier_seed": record.get("seed"),
            "classifier_heldout_accuracy": record.get("heldout_accuracy"),
        }

    @torch.no_grad()
    def features(self, batch: Any) -> torch.Tensor:
        """(N, 64) float32 CPU features of mel images (N, 1, 64, 64) in ``value_range``."""
        x = _mel_batch(batch, self.value_range, "batch")
        self.classifier.eval()
        return torch.cat([self.classifier.penultimate(x[i:i + self.batch_size]).float()
                          for i in range(0, x.shape[0], self.batch_size)])


def noise_mels(n: int, *, seed: int = 0, config: Any = None) -> torch.Tensor:
    """(n, 1, 64, 64) mel images in [0, 1] of white-noise clips (Gaussian, random level 0.05–0.5): the floor that
    recognisability is read against. Needs librosa (``pip install 'ldpruner[bench]'``)."""
    from ldpruner.zoo import MissingPackageError
    from ldpruner.zoo.audio import MelConfig, waveform_to_mel

    config = config or MelConfig()
    if not isinstance(n, int) or n < 1:
        raise MetricInputError(f"n must be a positive int; got {n!r}")
    rng = np.random.default_rng(seed)
    audio = rng.standard_normal((n, config.clip_samples)) * rng.uniform(0.05, 0.5, (n, 1))
    try:
        mels = waveform_to_mel(np.clip(audio, -1, 1).astype(np.float32), config)
    except MissingPackageError as exc:
        raise MissingMetricPackageError(str(exc), name="librosa") from exc
    return (torch.from_numpy(mels) + 1.0) / 2.0


def spoken_digit_quality(
    generated: Any, reference: Any, baseline_reference: Any, *, noise: Any | None = None,
    classifier: SpokenDigitClassifier | None = None, value_range: tuple[float, float] = (0.0, 1.0), seed: int = 0,
) -> dict[str, Any]:
    """Recognisability of generated, real (``baseline_reference``) and ``noise`` clips, and FD/KID on the
    classifier's features: generated vs ``reference`` beside real-vs-real (``baseline_reference`` vs ``reference``,
    as many clips as generated, disjoint from ``reference``). All sets are mel images in ``value_range``."""
    model = classifier if classifier is not None else load_spoken_digit_classifier()
    extractor = SpokenDigitFeatureExtractor(classifier=model, value_range=value_range)
    for name, data in (("generated", generated), ("reference", reference), ("baseline_reference", baseline_reference)):
        _mel_batch(data, value_range, name)
    q = image_quality(_as_tensor(generated), _as_tensor(reference), _as_tensor(baseline_reference),
                      extractor=extractor, seed=seed)
    result: dict[str, Any] = {
        "recognisability": {
            "generated": recognisability(generated, classifier=model, value_range=value_range),
            "real_heldout": recognisability(baseline_reference, classifier=model, value_range=value_range),
        },
        **{k: q[k] for k in ("fd", "fd_real_vs_real", "kid", "kid_real_vs_real", "n_generated", "n_reference",
                             "n_baseline", "features", "kid_subset_size")},
        "note": ("relative only: FD/KID on the spoken-digit classifier's 64-d penultimate features; compare dense vs "
                 "pruned at equal counts, and read both against real vs real"),
    }
    if noise is not None:
        result["recognisability"]["noise"] = recognisability(noise, classifier=model, value_range=value_range)
    return result


def _as_tensor(data: Any) -> torch.Tensor:
    return torch.from_numpy(data) if isinstance(data, np.ndarray) else data


def _main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ldpruner.bench.metrics.spoken_digits",
                                description="Train the spoken-digit classifier and save its weights.")
    p.add_argument("--train", action="store_true", help="train (the only action; required so nothing runs by accident)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=SPOKEN_DIGIT_CLASSIFIER_PATH)
    p.add_argument("--data-cache", type=Path, default=None, help="reuse the espeak-ng splits cached here (.npz)")
    p.add_argument("--espeak", default="espeak-ng")
    args = p.parse_args(argv)
    if not args.train:
        p.error("pass --train to train the classifier and write --out")
    model, record = train_spoken_digit_classifier(args.seed, epochs=args.epochs, threads=args.threads,
                                                  cache_dir=args.data_cache, espeak=args.espeak)
    save_spoken_digit_classifier(model, args.out, record)
    print(json.dumps({"out": str(args.out), **record}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
