"""The crawl-tiles recipe: its tile filter, dedup, compositing and split on a synthetic atlas, its missing-package
error, and a tiny end-to-end run that writes a folder ldpruner and stock diffusers load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ldpruner.zoo import datasets
from ldpruner.zoo.recipes import crawl_tiles as recipe

PIL = pytest.importorskip("PIL")
pytestmark = pytest.mark.usefixtures("one_thread")


def _tile(rng: np.random.Generator, *, alpha: float = 1.0) -> np.ndarray:
    tile = np.zeros((32, 32, 4), dtype=np.uint8)
    tile[..., :3] = rng.integers(0, 256, (32, 32, 3))
    rows = int(round(32 * alpha))
    tile[:rows, :, 3] = 255
    return tile


def _write_atlases(folder, rng: np.random.Generator) -> dict[str, int]:
    """Four 2×3-cell atlases; per atlas: kept tiles, an empty cell, a 2 %-alpha cell, a flat cell, a duplicate."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    shared = _tile(rng)
    expected = {}
    for i, name in enumerate(datasets.CRAWL_ATLASES):
        flat = np.zeros((32, 32, 4), dtype=np.uint8)
        flat[..., :3], flat[..., 3] = 90, 255  # fully opaque but RGB std 0
        sparse = _tile(rng, alpha=1 / 32)  # one opaque row: 3 % < 5 %
        cells = [_tile(rng), shared, np.zeros((32, 32, 4), np.uint8), sparse, flat, _tile(rng, alpha=0.5)]
        atlas = np.zeros((64, 96 + 7, 4), dtype=np.uint8)  # the 7 extra columns are not a whole cell
        for k, cell in enumerate(cells):
            r, c = divmod(k, 3)
            atlas[r * 32:(r + 1) * 32, c * 32:(c + 1) * 32] = cell
        Image.fromarray(atlas, "RGBA").save(folder / f"{name}.png")
        expected[name] = 3 if i == 0 else 2  # `shared` counts once, in the first atlas
    return expected


def test_slicing_filters_deduplicates_and_composites_over_black(tmp_path):
    expected = _write_atlases(tmp_path / "tiles", np.random.default_rng(0))
    tiles, sources = datasets.load_crawl_tiles(tmp_path / "tiles")
    assert tiles.shape == (sum(expected.values()), 32, 32, 3) and tiles.dtype == np.uint8
    assert {name: sources.count(name) for name in datasets.CRAWL_ATLASES} == expected
    assert len({t.tobytes() for t in tiles}) == len(tiles)
    half = tiles[sources.index("main") + 2]  # the half-transparent tile: its lower half is black
    assert (half[16:] == 0).all() and half[:16].std() > 5
    x = datasets.tiles_to_model_range(tiles)
    assert tuple(x.shape) == (len(tiles), 3, 32, 32) and float(x.min()) >= -1 and float(x.max()) <= 1


def test_split_is_by_content_hash_and_independent_of_order():
    tiles = np.random.default_rng(1).integers(0, 256, (400, 32, 32, 3), dtype=np.uint8)
    train, held = datasets.split_crawl_tiles(tiles)
    assert not set(train) & set(held) and sorted([*train, *held]) == list(range(400))
    assert 20 < len(held) < 80  # about 1/8
    order = np.random.default_rng(2).permutation(400)
    _, held_shuffled = datasets.split_crawl_tiles(tiles[order])
    assert set(order[held_shuffled]) == set(held)


def test_missing_atlases_name_the_debian_package(tmp_path, capsys):
    with pytest.raises(datasets.MissingTilesError, match="apt-get install crawl-tiles-data"):
        datasets.load_crawl_tiles(tmp_path)
    assert recipe.main(["--out", str(tmp_path / "out"), "--tiles-dir", str(tmp_path / "none")]) == 2
    assert "apt-get install crawl-tiles-data" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_tiny_end_to_end_run_writes_a_loadable_model(tmp_path):
    import diffusers

    from ldpruner.zoo import load_unconditional

    _write_atlases(tmp_path / "tiles", np.random.default_rng(0))
    out = tmp_path / "m"
    argv = ["--out", str(out), "--tiles-dir", str(tmp_path / "tiles"), "--vae-steps", "2", "--unet-steps", "2",
            "--grid-size", "1", "--grid-steps", "1", "--batch-size", "4", "--eval-samples", "0"]
    assert recipe.main(argv) == 0
    training = json.loads((out / "training.json").read_text())
    assert training["data"]["tiles"] == 9 and training["params"]["unet"] > 2_000_000
    assert "not computed" in (out / "README.md").read_text()
    model = load_unconditional(out)
    first = model.sample(1, steps=1)
    assert tuple(first.shape) == (1, 3, 32, 32)
    pipe = diffusers.DiffusionPipeline.from_pretrained(out, local_files_only=True)
    assert isinstance(pipe, diffusers.LDMPipeline)
    # the same seed reproduces the same weights
    again = tmp_path / "again"
    assert recipe.main([*argv[:1], str(again), *argv[2:]]) == 0
    torch.testing.assert_close(load_unconditional(again).sample(1, steps=1), first)
