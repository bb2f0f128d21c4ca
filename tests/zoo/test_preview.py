"""samples.png of a zoo build: dense / pruned / distilled rows on the same seeds, and the preview's own checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ldpruner import api
from ldpruner.base.errors import ConfigError
from ldpruner.runtime.graph_unet import GraphUNet
from ldpruner.zoo.preview import preview_grid

pytestmark = pytest.mark.usefixtures("one_thread")


def test_build_of_a_zoo_model_writes_a_sample_row_per_variant(tmp_path):
    report = api.build("zoo:crawl-tiles", out=tmp_path, budget=0.2, num_samples=2, steps=2, distill_steps=2,
                       progress=False)
    assert report["samples"] == {"path": str(tmp_path / "samples.png"), "rows": ["dense", "pruned", "distilled"]}
    assert report["artifacts"]["samples.png"] == str(tmp_path / "samples.png")
    grid = Image.open(tmp_path / "samples.png")
    # 10 tiles of 32x32 at 2x with 2 px padding per row, three rows
    assert grid.size == (10 * 64 + 11 * 2, 3 * 64 + 4 * 2)
    assert "![samples](samples.png)" in (tmp_path / "report.md").read_text()
    # a second build with the same inputs reuses it; without distillation the grid has two rows
    again = api.build("zoo:crawl-tiles", out=tmp_path, budget=0.2, num_samples=2, steps=2, distill_steps=2,
                      progress=False)
    assert "samples" in again["reused_stages"]
    two = api.build("zoo:crawl-tiles", out=tmp_path / "b", budget=0.2, num_samples=2, steps=2, distill_steps=0,
                    progress=False)
    assert (two["samples"]["rows"] == ["dense", "pruned"]
            and Image.open(tmp_path / "b" / "samples.png").size[1] == 2 * 64 + 3 * 2)


def test_a_non_zoo_build_has_no_samples(tmp_path):
    from conftest import make_tiny_unet2d

    make_tiny_unet2d().save_pretrained(tmp_path / "unet")
    report = api.build(tmp_path / "unet", out=tmp_path / "run", budget=0.1, num_samples=2, steps=2, distill_steps=0,
                       progress=False)
    assert report["samples"] is None and not (tmp_path / "run" / "samples.png").exists()


def test_the_dense_graph_row_equals_the_dense_unet_row(tmp_path):
    """The fx denoiser is a faithful stand-in: the traced dense graph samples what the diffusers UNet samples."""
    graph = api.inspect("zoo:mnist-t2i")
    info = preview_grid("mnist-t2i", {"dense": None, "traced": GraphUNet.of(graph.traced)},
                        tmp_path / "g.png", steps=2, scale=1)
    assert info["rows"] == ["dense", "traced"] and info["columns"] == 10 and len(info["prompts"]) == 10
    pixels = torch.from_numpy(np.array(Image.open(tmp_path / "g.png").convert("L"))).int()
    top, bottom = pixels[2:34], pixels[36:68]
    assert (top - bottom).abs().max() <= 1  # equal up to one grey level of rounding


def test_bad_arguments_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="variants must name at least one UNet"):
        preview_grid("crawl-tiles", {}, tmp_path / "x.png")
    with pytest.raises(ConfigError, match="steps must be a positive int"):
        preview_grid("crawl-tiles", {"dense": None}, tmp_path / "x.png", steps=0)
    assert not (tmp_path / "x.png").exists()


def test_build_no_samples_draws_no_grid_and_says_so(tmp_path):
    report = api.build("zoo:crawl-tiles", out=tmp_path, budget=0.2, num_samples=2, steps=2, distill_steps=0,
                       samples=False, progress=False)
    assert not (tmp_path / "samples.png").exists() and "samples" not in report["threads"]["stages"]
    assert report["samples"] == {"path": None, "rows": [], "skipped": "--no-samples (samples=False)"}
    assert "samples.png" not in report["artifacts"]
    assert "## Samples\n\nNot drawn: --no-samples (samples=False)." in (tmp_path / "report.md").read_text()
    # drawn, then switched off: the grid of the earlier build goes with its record (a user's edited grid would stay)
    options = dict(budget=0.2, num_samples=2, steps=2, distill_steps=0, progress=False)
    api.build("zoo:crawl-tiles", out=tmp_path, **options)
    assert (tmp_path / "samples.png").is_file()
    again = api.build("zoo:crawl-tiles", out=tmp_path, samples=False, **options)
    assert not (tmp_path / "samples.png").exists() and set(again["reused_stages"]) >= {"analyze", "select", "prune"}
    assert "samples" not in json.loads((tmp_path / ".ldpruner-build.json").read_text())["files"]
