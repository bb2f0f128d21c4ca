"""One primary quality number per zoo model, for benchmarks that evaluate many variants of it (every criterion ×
budget, every single-operator removal): FD/KID against held-out real data beside the real-vs-real baseline, with
the reference and baseline features computed once.

Images (``mnist-t2i``, ``crawl-tiles``): ImageNet EfficientNet-Lite0 features (sampling and real sets from
``ldpruner.bench.quality``); audio (``espeak-digits``, mel images): the spoken-digit classifier's features. Relative
numbers (dense vs pruned on the same seeds), never comparable to a published FID.
"""

from __future__ import annotations

from typing import Any

import torch

from ldpruner.base.errors import ConfigError
from ldpruner.bench.quality import AUDIO_MODELS, QUALITY_MODELS, distill_options, real_sets, zoo_sampler

__all__ = ["FD_MODELS", "ZooFD", "distill_options"]

FD_MODELS = QUALITY_MODELS


class ZooFD:
    """``sample(unet or None)`` → samples on fixed seeds (and prompts); ``quality(samples)`` → ``fd`` (the primary
    number), ``kid``, both real-vs-real baselines, and prompt-digit accuracy for the T2I model."""

    def __init__(self, name: str, samples: int, sample_steps: int):
        from ldpruner.bench import metrics

        if name not in FD_MODELS:
            raise ConfigError(f"no quality reference for zoo model {name!r}; supported: {list(FD_MODELS)}")
        self.name, self.samples, self.sample_steps = name, samples, sample_steps
        self.metrics = metrics
        held, base, _ = real_sets(name, samples)
        self.sample, self.digits = zoo_sampler(name, samples, sample_steps)
        self.extractor = (metrics.SpokenDigitFeatureExtractor() if name in AUDIO_MODELS
                          else metrics.ImageFeatureExtractor())
        self.features = self.extractor.name
        self._held = metrics.compute_features(self.extractor, held)
        self._base = metrics.compute_features(self.extractor, base)

    @property
    def spec(self) -> str:
        return f"zoo:{self.name}"

    def quality(self, samples: torch.Tensor) -> dict[str, Any]:
        m = self.metrics
        q = m.image_quality(m.compute_features(self.extractor, samples), self._held, self._base,
                            extractor=self.extractor)
        result = {"fd": q["fd"], "fd_real_vs_real": q["fd_real_vs_real"], "kid": q["kid"]["mean"],
                  "kid_std": q["kid"]["std"], "kid_real_vs_real": q["kid_real_vs_real"]["mean"]}
        if self.digits is not None:
            result["prompt_digit_accuracy"] = m.prompt_digit_accuracy(samples, self.digits)
        return result
