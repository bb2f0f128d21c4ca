"""Distances between two sets of feature vectors: Fréchet distance and the kernel (KID) distance.

Fréchet distance between Gaussians fitted to the two sets (Heusel et al. 2017):
    FD = ‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^½)
KID, the unbiased MMD² with the polynomial kernel k(x, y) = (xᵀy / d + 1)³ (Bińkowski et al. 2018), averaged over
random subsets; mean and standard deviation over the subsets are reported.

Both are computed in float64 with numpy and scipy. Feature sets are (N, D) numpy arrays or torch tensors.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import scipy.linalg

from .errors import MetricInputError

__all__ = ["SQRTM_EPS", "SQRTM_IMAG_TOL", "feature_statistics", "frechet_distance", "kernel_inception_distance"]

# When the product of the covariances has no finite square root (singular covariances: fewer samples than
# dimensions, or dead feature channels), sqrtm is retried on (Σ_a + εI)(Σ_b + εI). Same offset as pytorch-fid.
SQRTM_EPS = 1e-6
# sqrtm of a real product of covariances may come back complex from rounding; imaginary parts on the diagonal up
# to this much (relative to the largest real diagonal entry, at least 1) are discarded, larger ones are an error.
SQRTM_IMAG_TOL = 1e-3


def _as_features(feats: Any, argument: str) -> np.ndarray:
    if hasattr(feats, "detach"):  # a torch tensor, without importing torch here
        feats = feats.detach().cpu().numpy()
    array = np.asarray(feats, dtype=np.float64)
    if array.ndim != 2:
        raise MetricInputError(f"{argument} must be a 2-D (N, D) feature array; got shape {array.shape}")
    if array.shape[0] < 2:
        raise MetricInputError(f"{argument} needs at least 2 feature vectors; got {array.shape[0]}")
    if not np.isfinite(array).all():
        raise MetricInputError(f"{argument} contains NaN or infinite values")
    return array


def _check_same_dim(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape[1] != b.shape[1]:
        raise MetricInputError(
            f"feats_a and feats_b must have the same feature dimension; got {a.shape[1]} and {b.shape[1]} "
            f"(were they computed by the same extractor?)"
        )


def feature_statistics(feats: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of an (N, D) feature set, in float64."""
    array = _as_features(feats, "feats")
    return array.mean(axis=0), np.cov(array, rowvar=False)


def _sqrtm_product(sigma_a: np.ndarray, sigma_b: np.ndarray) -> tuple[np.ndarray, float]:
    """(Σ_a Σ_b)^½ as a real matrix, and the offset ε that had to be added to both covariances (0 when none)."""
    for eps in (0.0, SQRTM_EPS):
        offset = eps * np.eye(sigma_a.shape[0])
        with warnings.catch_warnings():
            # singular covariances are expected (N ≤ D); the checks below decide whether the root is usable
            warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
            root = scipy.linalg.sqrtm((sigma_a + offset) @ (sigma_b + offset))
        if not np.isfinite(root).all():
            continue
        if np.iscomplexobj(root):
            diag = np.diagonal(root)
            scale = max(1.0, float(np.abs(diag.real).max()))
            if float(np.abs(diag.imag).max()) > SQRTM_IMAG_TOL * scale:
                continue
            root = root.real
        return root, eps
    raise MetricInputError(
        f"the covariance product has no usable real square root, even with an offset of {SQRTM_EPS:g}·I on both "
        f"covariances; the feature sets are degenerate (constant features, or far fewer samples than dimensions) — "
        f"use more samples, KID, or a lower-dimensional extractor"
    )


def frechet_distance(feats_a: Any, feats_b: Any) -> float:
    """Fréchet distance between Gaussians fitted to two (N, D) feature sets (N may differ between them).

    With fewer samples than dimensions the covariances are singular; the square root is then retried with the
    ``SQRTM_EPS`` offset (see there). FD is biased upwards at small N: compare values only at equal sample counts.
    """
    a = _as_features(feats_a, "feats_a")
    b = _as_features(feats_b, "feats_b")
    _check_same_dim(a, b)
    mu_a, sigma_a = a.mean(axis=0), np.atleast_2d(np.cov(a, rowvar=False))
    mu_b, sigma_b = b.mean(axis=0), np.atleast_2d(np.cov(b, rowvar=False))
    root, _ = _sqrtm_product(sigma_a, sigma_b)
    diff = mu_a - mu_b
    fd = float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * np.trace(root))
    # tr(Σ_a + Σ_b − 2(Σ_aΣ_b)^½) ≥ 0 in exact arithmetic; identical sets land a rounding error below zero
    return max(fd, 0.0)


def _polynomial_mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    m = x.shape[0]
    k_xx = (x @ x.T / d + 1.0) ** 3
    k_yy = (y @ y.T / d + 1.0) ** 3
    k_xy = (x @ y.T / d + 1.0) ** 3
    off_xx = (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
    off_yy = (k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(off_xx + off_yy - 2.0 * k_xy.mean())


def kernel_inception_distance(
    feats_a: Any, feats_b: Any, *, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID: (mean, std) over ``subsets`` of the unbiased polynomial-kernel MMD² between two (N, D) feature sets.

    Each subset draws ``subset_size`` vectors from each set without replacement (a fresh draw per subset, from a
    numpy generator seeded with ``seed``). ``subset_size`` must not exceed either set's size; when it equals both,
    every subset is the whole set and the std is 0. The estimator is unbiased, so sets from one distribution give
    values scattered around 0, slightly negative ones included.
    """
    a = _as_features(feats_a, "feats_a")
    b = _as_features(feats_b, "feats_b")
    _check_same_dim(a, b)
    if not isinstance(subsets, int) or subsets < 1:
        raise MetricInputError(f"subsets must be a positive int; got {subsets!r}")
    if not isinstance(subset_size, int) or subset_size < 2:
        raise MetricInputError(f"subset_size must be an int ≥ 2; got {subset_size!r}")
    smallest = min(a.shape[0], b.shape[0])
    if subset_size > smallest:
        raise MetricInputError(
            f"subset_size={subset_size} exceeds the smaller feature set ({a.shape[0]} and {b.shape[0]} vectors); "
            f"pass subset_size ≤ {smallest}"
        )
    rng = np.random.default_rng(seed)
    values = np.empty(subsets)
    for i in range(subsets):
        x = a[rng.choice(a.shape[0], subset_size, replace=False)]
        y = b[rng.choice(b.shape[0], subset_size, replace=False)]
        values[i] = _polynomial_mmd2_unbiased(x, y)
    return float(values.mean()), float(values.std())
