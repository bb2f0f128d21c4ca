"""What the metrics' small CNN classifiers (``digits``, ``spoken_digits``) share: shape, training and storage.

Shape: a body that ends in a 64-d ReLU layer (the penultimate features), dropout 0.3, a 10-way linear head.
Training: cross-entropy on augmented mini-batches of a fresh permutation each epoch, AdamW (weight decay 1e-4)
under a one-cycle learning rate, seeded on a forked global RNG (init, dropout, shuffling, augmentation) so the
caller's RNG state is untouched. Storage: safetensors, the training record as JSON in the metadata ("ldpruner").
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ldpruner.base.io import atomic_path

from .errors import MetricInputError

__all__ = ["PenultimateClassifier", "load_classifier", "save_classifier", "train_classifier"]


class PenultimateClassifier(nn.Module):
    """``body`` (ending in the ``penultimate_dim``-d ReLU layer), then dropout 0.3 and a 10-way linear head."""

    penultimate_dim = 64

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(self.penultimate_dim, 10)

    def penultimate(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.body(x)))


@contextlib.contextmanager
def _intra_op_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``threads`` inside the block (None keeps them), restored after."""
    previous = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        yield
    finally:
        torch.set_num_threads(previous)


def _fit(make_model: Callable[[], nn.Module], x_train: torch.Tensor, y_train: torch.Tensor, *,
         augment: Callable[[torch.Tensor], torch.Tensor], seed: int, epochs: int, batch_size: int, lr: float,
         label_smoothing: float) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make_model()
        steps_per_epoch = math.ceil(x_train.shape[0] / batch_size)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)
        for _ in range(epochs):
            model.train()
            order = torch.randperm(x_train.shape[0])
            for i in range(0, x_train.shape[0], batch_size):
                idx = order[i:i + batch_size]
                loss = F.cross_entropy(model(augment(x_train[idx])), y_train[idx], label_smoothing=label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
    return model.eval()


def train_classifier(
    make_model: Callable[[], nn.Module], train: tuple[torch.Tensor, torch.Tensor],
    heldout: tuple[torch.Tensor, torch.Tensor], *, architecture: str, data: str,
    augment: Callable[[torch.Tensor], torch.Tensor], predict: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    seed: int, epochs: int, batch_size: int, lr: float, threads: int | None, label_smoothing: float = 0.0,
    per_digit: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """``make_model()`` trained from ``seed`` on ``train`` = (inputs, digits), scored on ``heldout`` with ``predict``
    (model, inputs) -> digits; with ``threads`` intra-op threads (None keeps them; restored after).

    Returns the model in eval mode and its record: ``architecture``, the settings, ``data`` (where the data come
    from), the set sizes, held-out accuracy (per digit too with ``per_digit``), training accuracy and time.
    """
    (x_train, y_train), (x_held, y_held) = train, heldout
    start = time.perf_counter()
    with _intra_op_threads(threads):
        model = _fit(make_model, x_train, y_train, augment=augment, seed=seed, epochs=epochs, batch_size=batch_size,
                     lr=lr, label_smoothing=label_smoothing)
        held_pred = predict(model, x_held)
        scores = {"heldout_accuracy": float((held_pred == y_held).double().mean())}
        if per_digit:
            scores["heldout_accuracy_per_digit"] = [float((held_pred[y_held == d] == d).double().mean())
                                                    for d in range(10)]
        scores["train_accuracy"] = float((predict(model, x_train) == y_train).double().mean())
    record = {
        "architecture": architecture,
        "seed": seed,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "threads": threads,
        "torch": torch.__version__,
        "data": data,
        "n_train": int(x_train.shape[0]),
        "n_heldout": int(x_held.shape[0]),
        **scores,
        "train_seconds": round(time.perf_counter() - start, 1),
    }
    return model, record


def save_classifier(model: nn.Module, path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Write the weights as safetensors (atomically), with ``record`` as JSON in the file's metadata."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"ldpruner": json.dumps(record, sort_keys=True)})


def load_classifier(model_class: type[nn.Module], path: Path, *, architecture: str, what: str, recreate: str) -> Any:
    """``model_class`` with the weights at ``path`` in eval mode, its training record as ``model.record``.

    ``FileNotFoundError`` without the file (naming ``what`` and the command ``recreate`` that writes it);
    ``MetricInputError`` when the file's record names another architecture than ``architecture``.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"{what} weights {str(path)!r} not found; recreate them with {recreate} --out {path}")
    with safe_open(str(path), framework="pt") as f:
        record = json.loads((f.metadata() or {}).get("ldpruner", "{}"))
    if record.get("architecture") != architecture:
        raise MetricInputError(
            f"{str(path)!r} holds architecture {record.get('architecture')!r}; this code loads {architecture!r}"
        )
    model = model_class()
    model.load_state_dict(load_file(str(path)), strict=True)
    model.record = record
    return model.eval().requires_grad_(False)
