"""What the zoo recipes share (zoo/recipes/_training.py): the command-line shell every recipe runs in, and the
learning-rate schedule of both training stages."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from ldpruner.zoo.recipes import _training, crawl_tiles, espeak_digits, mnist_t2i

RECIPES = {"mnist-t2i": mnist_t2i, "crawl-tiles": crawl_tiles, "espeak-digits": espeak_digits}
each_recipe = pytest.mark.parametrize("folder", list(RECIPES))


@each_recipe
def test_existing_output_needs_overwrite(folder, tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("x")
    assert RECIPES[folder].main(["--out", str(tmp_path)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "x"


@each_recipe
def test_evaluate_only_needs_a_folder_the_recipe_trained(folder, tmp_path, capsys):
    assert RECIPES[folder].main(["--out", str(tmp_path), "--evaluate-only"]) == 2
    assert "--evaluate-only needs a model trained by this recipe" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@each_recipe
def test_training_flags_must_be_positive_and_out_defaults_to_the_zoo_folder(folder, capsys):
    recipe = RECIPES[folder]
    with pytest.raises(SystemExit) as info:
        recipe.parse_args(["--unet-steps", "0"])
    assert info.value.code == 2
    assert "--unet-steps must be >= 1; got 0" in capsys.readouterr().err
    assert recipe.parse_args([]).out == Path(recipe.__file__).resolve().parent.parent / folder


def test_cosine_lr_warms_up_linearly_then_decays_to_the_floor():
    lrs = [_training.cosine_lr(step, 10, 4, 1.0, 0.1) for step in range(11)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == pytest.approx(1.0) and lrs[10] == pytest.approx(0.1)
    assert all(a > b for a, b in itertools.pairwise(lrs[4:]))
    # a warmup longer than the run (mnist-t2i's VAE at a few steps) never leaves the ramp
    assert _training.cosine_lr(2, 3, 100, 1.0, 0.1) == pytest.approx(0.03)
