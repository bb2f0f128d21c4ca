"""Image quality of generated samples: FD and KID against real images, always beside the real-vs-real baseline.

    FD(generated, reference)            vs   FD(baseline_reference, reference)
    KID(generated, reference)           vs   KID(baseline_reference, reference)

``baseline_reference`` is a second set of real images, disjoint from ``reference`` and as large as ``generated``:
the baseline is what a perfect generator would score at this sample count (FD is biased upwards at small counts,
so only equal counts compare). The numbers are relative (dense vs pruned, ratio sweeps), never published FID.
"""

from __future__ import annotations

from typing import Any

import torch

from .distances import frechet_distance, kernel_inception_distance
from .errors import MetricInputError
from .features import (
    FeatureExtractor,
    FeatureSet,
    ImageFeatureExtractor,
    compute_features,
)

__all__ = ["RELATIVE_ONLY_NOTE", "image_quality"]

RELATIVE_ONLY_NOTE = (
    "relative only: FD/KID on {features} features at {input} px, not Inception-v3; not comparable to published "
    "FID/KID. Compare dense vs pruned at equal sample counts and read both against the real-vs-real baseline."
)
KID_SUBSETS = 100
KID_MAX_SUBSET_SIZE = 1000


def _as_feature_set(data: torch.Tensor | FeatureSet, extractor: FeatureExtractor, argument: str) -> FeatureSet:
    if isinstance(data, FeatureSet):
        if data.extractor != extractor.name:
            raise MetricInputError(
                f"{argument} holds features of {data.extractor!r}, but the extractor is {extractor.name!r}; "
                f"compute every set with the same extractor"
            )
        return data
    if isinstance(data, torch.Tensor):
        return compute_features(extractor, data)
    raise MetricInputError(
        f"{argument} must be an image tensor (N, C, H, W) or a FeatureSet; got {type(data).__name__}"
    )


def image_quality(
    generated: torch.Tensor | FeatureSet,
    reference: torch.Tensor | FeatureSet,
    baseline_reference: torch.Tensor | FeatureSet,
    *,
    extractor: FeatureExtractor | None = None,
    kid_subsets: int = KID_SUBSETS,
    kid_subset_size: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """FD and KID of ``generated`` against ``reference``, and the same for ``baseline_reference`` (real vs real).

    Each set is an image tensor (N, C, H, W) in the extractor's ``value_range`` or a ``FeatureSet`` computed with
    the same extractor (compute a reference once, reuse it for the dense and the pruned model). ``extractor``
    defaults to ``ImageFeatureExtractor()`` (EfficientNet-Lite0, 128 px, images in [0, 1]).

    Rules (each broken one raises ``MetricInputError``): ``baseline_reference`` has as many samples as
    ``generated``, and shares no sample with ``reference`` (checked on exact sample bytes when known).
    ``kid_subset_size`` defaults to min(1000, n // 2), n the smallest set, so that subsets differ.
    """
    extractor = extractor if extractor is not None else ImageFeatureExtractor()
    gen = _as_feature_set(generated, extractor, "generated")
    ref = _as_feature_set(reference, extractor, "reference")
    base = _as_feature_set(baseline_reference, extractor, "baseline_reference")
    if len(base) != len(gen):
        raise MetricInputError(
            f"baseline_reference has {len(base)} samples and generated {len(gen)}; the real-vs-real baseline is only "
            f"comparable at the same sample count — pass as many baseline images as generated ones"
        )
    if ref.fingerprints is not None and base.fingerprints is not None:
        shared = len(ref.fingerprints & base.fingerprints)
        if shared:
            raise MetricInputError(
                f"baseline_reference shares {shared} samples with reference; the real-vs-real baseline needs two "
                f"disjoint real splits"
            )
    smallest = min(len(gen), len(ref), len(base))
    subset_size = kid_subset_size if kid_subset_size is not None else min(KID_MAX_SUBSET_SIZE, smallest // 2)
    kid_gen = kernel_inception_distance(gen.values, ref.values, subsets=kid_subsets, subset_size=subset_size,
                                        seed=seed)
    kid_base = kernel_inception_distance(base.values, ref.values, subsets=kid_subsets, subset_size=subset_size,
                                         seed=seed)
    description = extractor.describe()
    return {
        "fd": frechet_distance(gen.values, ref.values),
        "fd_real_vs_real": frechet_distance(base.values, ref.values),
        "kid": {"mean": kid_gen[0], "std": kid_gen[1]},
        "kid_real_vs_real": {"mean": kid_base[0], "std": kid_base[1]},
        "kid_subsets": kid_subsets,
        "kid_subset_size": subset_size,
        "kid_kernel": "polynomial (x·y/d + 1)^3, unbiased MMD²",
        "seed": seed,
        "n_generated": len(gen),
        "n_reference": len(ref),
        "n_baseline": len(base),
        "features": description.get("name", extractor.name),
        "feature_dim": int(gen.values.shape[1]),
        "input_size": description.get("input_size"),
        "extractor": description,
        "note": RELATIVE_ONLY_NOTE.format(features=description.get("name", extractor.name),
                                          input=description.get("input_size", "?")),
    }
