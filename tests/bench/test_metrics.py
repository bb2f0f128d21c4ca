"""Quality metrics on known cases: closed-form Fréchet distances, KID of identical / shifted sets, EfficientNet-Lite0
features of real vs degraded MNIST digits, the committed digit classifier, sample files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits

from ldpruner.bench.metrics import (
    DigitFeatureExtractor,
    FeatureExtractor,
    FeatureSet,
    ImageFeatureExtractor,
    MetricInputError,
    classify_digits,
    compute_features,
    frechet_distance,
    image_quality,
    kernel_inception_distance,
    load_digit_classifier,
    prompt_digit_accuracy,
    save_image_grid,
    save_wav,
    train_digit_classifier,
)
from ldpruner.bench.metrics.digits import DIGIT_CLASSIFIER_PATH
from ldpruner.zoo.datasets import load_mnist_5k, mnist_to_model_range, split_mnist

pytestmark = pytest.mark.usefixtures("one_thread", "one_blas_thread")


@pytest.fixture(scope="module")
def one_blas_thread():
    # sqrtm of a 1280² matrix takes ~2 s on one thread and 10× longer when OpenBLAS threads fight a busy machine
    with threadpool_limits(limits=1):
        yield


def gaussian(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)) + shift


def whitened(n: int, d: int, seed: int) -> np.ndarray:
    """Samples whose sample mean is exactly 0 and sample covariance exactly the identity."""
    x = gaussian(n, d, seed)
    x -= x.mean(axis=0)
    cov = np.cov(x, rowvar=False)
    return x @ np.linalg.inv(np.linalg.cholesky(cov)).T


# ------------------------------------------------------------------------------------------------ Fréchet distance


def test_fd_of_identical_sets_is_zero():
    a = gaussian(500, 16, seed=0)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(torch.from_numpy(a).float(), torch.from_numpy(a).float()) == pytest.approx(0.0, abs=1e-4)


def test_fd_of_a_shifted_copy_is_the_squared_mean_shift():
    # equal covariances: FD = ‖Δμ‖² + tr(Σ + Σ − 2Σ) = ‖Δμ‖²
    a = gaussian(400, 16, seed=1)
    delta = np.random.default_rng(2).normal(size=16)
    assert frechet_distance(a, a + delta) == pytest.approx(float(delta @ delta), rel=1e-6)


def test_fd_closed_form_with_different_covariances():
    # sample statistics exactly μ_a = 0, Σ_a = I and μ_b = m, Σ_b = diag(s²): FD = ‖m‖² + Σ (1 − s)²
    d = 12
    a = whitened(300, d, seed=3)
    s = np.linspace(0.5, 2.0, d)
    m = np.linspace(-1.0, 1.0, d)
    b = whitened(300, d, seed=4) * s + m
    expected = float(m @ m + np.sum((1.0 - s) ** 2))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-6)


def test_fd_of_independent_gaussians_approaches_the_closed_form():
    # FD = ‖Δμ‖² = 2 here; sampling noise of the means moves it by about ±0.07 (1σ) at this n
    d, shift = 8, 0.5
    a, b = gaussian(4000, d, seed=5), gaussian(4000, d, seed=6, shift=shift)
    assert frechet_distance(a, b) == pytest.approx(d * shift**2, abs=0.25)


def test_fd_grows_with_the_shift():
    a, b = gaussian(500, 16, seed=7), gaussian(500, 16, seed=8)
    values = [frechet_distance(a, b + shift) for shift in (0.0, 0.25, 0.5, 1.0, 2.0)]
    assert values == sorted(values) and values[0] < values[1] < values[-1]


def test_fd_with_singular_covariances_is_finite():
    # fewer samples than dimensions: both covariances are singular
    a, b = gaussian(20, 64, seed=9), gaussian(20, 64, seed=10, shift=1.0)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-4)
    # reference value: tr((Σ_aΣ_b)^½) = Σ √λ of the similar PSD matrix Σ_a^½ Σ_b Σ_a^½
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(sa)
    sa_half = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh(sa_half @ sb @ sa_half), 0, None)).sum()
    diff = a.mean(0) - b.mean(0)
    expected = diff @ diff + np.trace(sa) + np.trace(sb) - 2 * trace_root
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize(
    "a, b, match",
    [
        (np.zeros((10, 4)), np.zeros((10, 5)), "same feature dimension"),
        (np.zeros(10), np.zeros(10), "2-D"),
        (np.zeros((1, 4)), np.zeros((10, 4)), "at least 2"),
        (np.full((10, 4), np.nan), np.zeros((10, 4)), "NaN"),
    ],
)
def test_fd_rejects_bad_feature_sets(a, b, match):
    with pytest.raises(MetricInputError, match=match):
        frechet_distance(a, b)


# ------------------------------------------------------------------------------------------------------------ KID


def test_kid_of_identical_sets_is_about_zero_and_shifts_raise_it():
    a = gaussian(500, 16, seed=11)
    same, _ = kernel_inception_distance(a, a, subsets=20, subset_size=250)
    shifted, _ = kernel_inception_distance(a, a + 1.0, subsets=20, subset_size=250)
    assert shifted > 1.0
    assert abs(same) < 0.01 * shifted


def test_kid_of_one_distribution_is_zero_within_its_spread():
    a, b = gaussian(500, 16, seed=12), gaussian(500, 16, seed=13)
    mean, std = kernel_inception_distance(a, b, subsets=50, subset_size=250)
    assert abs(mean) < 3 * std + 1e-3


def test_kid_grows_with_the_shift():
    a, b = gaussian(400, 16, seed=14), gaussian(400, 16, seed=15)
    means = [kernel_inception_distance(a, b + s, subsets=10, subset_size=200)[0] for s in (0.0, 0.25, 0.5, 1.0)]
    assert means == sorted(means)
    assert means[1] > 5 * abs(means[0])


def test_kid_is_seeded_and_full_subsets_have_no_spread():
    a, b = gaussian(100, 8, seed=16), gaussian(100, 8, seed=17, shift=0.5)
    assert kernel_inception_distance(a, b, subsets=5, subset_size=50, seed=3) == \
        kernel_inception_distance(a, b, subsets=5, subset_size=50, seed=3)
    assert kernel_inception_distance(a, b, subsets=5, subset_size=50, seed=3) != \
        kernel_inception_distance(a, b, subsets=5, subset_size=50, seed=4)
    assert kernel_inception_distance(a, b, subsets=3, subset_size=100)[1] == pytest.approx(0.0, abs=1e-12)


def test_kid_rejects_subsets_larger_than_the_sets():
    with pytest.raises(MetricInputError, match="subset_size=101 exceeds"):
        kernel_inception_distance(gaussian(100, 4, 0), gaussian(200, 4, 1), subset_size=101)
    with pytest.raises(MetricInputError, match="subsets"):
        kernel_inception_distance(gaussian(100, 4, 0), gaussian(200, 4, 1), subsets=0, subset_size=10)


# ------------------------------------------------------------------------------------------------- MNIST digits


@pytest.fixture(scope="module")
def mnist():
    images, labels = load_mnist_5k()
    train, held = split_mnist(labels)
    return mnist_to_model_range(images), torch.from_numpy(labels), train, held


def test_split_holds_out_the_last_tenth_of_each_digit(mnist):
    _, labels, train, held = mnist
    assert len(train) == 4500 and len(held) == 500 and not set(train) & set(held)
    for digit in range(10):
        rows = np.flatnonzero(labels.numpy() == digit)
        assert list(held[labels[held].numpy() == digit]) == list(rows[-50:])


def test_committed_classifier_reads_held_out_digits(mnist):
    images, labels, _, held = mnist
    model = load_digit_classifier()
    with torch.no_grad():
        predicted = model(images[held]).argmax(1)
    accuracy = float((predicted == labels[held]).double().mean())
    assert accuracy >= 0.95
    assert accuracy == pytest.approx(model.record["heldout_accuracy"], abs=1e-9)
    assert DIGIT_CLASSIFIER_PATH.stat().st_size < 512 * 1024
    # prompt alignment on real held-out digits with their true digits is exactly the classifier's accuracy,
    # whichever range the images are given in
    assert prompt_digit_accuracy(images[held], labels[held], value_range=(-1, 1), classifier=model) == accuracy
    unit = (images[held] + 1) / 2
    assert prompt_digit_accuracy(unit, labels[held].tolist(), classifier=model) == accuracy
    assert prompt_digit_accuracy(unit[:, :, 2:30, 2:30], labels[held].numpy(), classifier=model) == accuracy
    wrong = (labels[held] + 1) % 10
    assert prompt_digit_accuracy(unit, wrong, classifier=model) < 0.05


def test_prompt_digit_accuracy_rejects_bad_inputs(mnist):
    images, labels, _, held = mnist
    unit = (images[held[:10]] + 1) / 2
    model = load_digit_classifier()
    with pytest.raises(MetricInputError, match="one digit per image"):
        prompt_digit_accuracy(unit, labels[held[:9]], classifier=model)
    with pytest.raises(MetricInputError, match="0..9"):
        prompt_digit_accuracy(unit, [10] * 10, classifier=model)
    with pytest.raises(MetricInputError, match="value_range"):
        prompt_digit_accuracy(images[held[:10]], labels[held[:10]], classifier=model)  # [-1, 1] given as [0, 1]
    with pytest.raises(MetricInputError, match="grayscale"):
        classify_digits(unit.expand(-1, 3, -1, -1), classifier=model)


def test_digit_features_separate_real_from_noise(mnist):
    images, _, train, held = mnist
    extractor = DigitFeatureExtractor(value_range=(-1, 1))
    assert isinstance(extractor, FeatureExtractor)
    rng = np.random.default_rng(0)
    ref = compute_features(extractor, images[train[rng.permutation(len(train))[:500]]])
    real = compute_features(extractor, images[held])
    noised = images[held] + 0.6 * torch.randn(images[held].shape, generator=torch.Generator().manual_seed(0))
    noisy = compute_features(extractor, noised.clamp(-1, 1))
    assert ref.values.shape == (500, 64)
    assert frechet_distance(real.values, ref.values) * 3 < frechet_distance(noisy.values, ref.values)


# --------------------------------------------------------------------------------- EfficientNet-Lite0 features


def blur(x: torch.Tensor) -> torch.Tensor:
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
    k = torch.outer(k, k) / k.sum() ** 2
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), k[None, None])


@pytest.fixture(scope="module")
def efficientnet():
    return ImageFeatureExtractor(input_size=64, value_range=(-1, 1))


@pytest.fixture(scope="module")
def digit_feature_sets(mnist, efficientnet):
    """EfficientNet-Lite0 features (64 px) of 200 real digits, 200 other real digits, and degraded copies of those."""
    images, _, train, _ = mnist
    rows = train[np.random.default_rng(0).permutation(len(train))[:400]]
    reference, other = images[rows[:200]], images[rows[200:]]
    noise = torch.randn(other.shape, generator=torch.Generator().manual_seed(0))
    return {
        "reference": compute_features(efficientnet, reference),
        "real": compute_features(efficientnet, other),
        "blurred": compute_features(efficientnet, blur(other)),
        "noised": compute_features(efficientnet, (other + 0.5 * noise).clamp(-1, 1)),
    }


def test_efficientnet_features_rank_degraded_digits_below_real_ones(digit_feature_sets):
    sets = digit_feature_sets
    ref = sets["reference"].values
    assert ref.shape == (200, 1280)
    fd = {k: frechet_distance(sets[k].values, ref) for k in ("real", "blurred", "noised")}
    kid = {k: kernel_inception_distance(sets[k].values, ref, subsets=20, subset_size=100)
           for k in ("real", "blurred", "noised")}
    assert fd["real"] * 2 < fd["blurred"] < fd["noised"], fd
    assert kid["real"][0] + 3 * kid["real"][1] < kid["blurred"][0] - 3 * kid["blurred"][1], kid
    assert kid["blurred"][0] < kid["noised"][0], kid


def test_image_quality_reports_the_real_vs_real_baseline(digit_feature_sets, efficientnet):
    sets = digit_feature_sets
    report = image_quality(sets["blurred"], sets["reference"], sets["real"], extractor=efficientnet, kid_subsets=10)
    assert report["fd"] > 2 * report["fd_real_vs_real"] > 0
    assert report["kid"]["mean"] > report["kid_real_vs_real"]["mean"]
    assert report["n_generated"] == report["n_baseline"] == report["n_reference"] == 200
    assert report["kid_subset_size"] == 100 and report["input_size"] == 64 and report["feature_dim"] == 1280
    assert report["features"] == "efficientnet-lite0-imagenet-64px"
    assert "relative only" in report["note"] and "not comparable to published FID" in report["note"]
    json.dumps(report)  # the report goes into report.json as is


def test_image_quality_rejects_unequal_counts_shared_samples_and_foreign_features(mnist):
    images, _, train, held = mnist
    extractor = DigitFeatureExtractor(value_range=(-1, 1))
    reference, baseline, generated = images[train[:100]], images[train[100:200]], images[held[:100]]
    report = image_quality(generated, reference, baseline, extractor=extractor, kid_subsets=5)
    assert report["n_generated"] == 100 and report["features"] == extractor.name
    with pytest.raises(MetricInputError, match="same sample count"):
        image_quality(generated, reference, baseline[:50], extractor=extractor)
    with pytest.raises(MetricInputError, match="shares 50 samples"):
        image_quality(generated, reference, images[train[50:150]], extractor=extractor)
    foreign = FeatureSet(values=np.zeros((100, 64)), extractor="some-other-network")
    with pytest.raises(MetricInputError, match="some-other-network"):
        image_quality(foreign, reference, baseline, extractor=extractor)


def test_efficientnet_preprocessing(efficientnet, mnist):
    images = mnist[0][:6]
    gray = efficientnet.features(images)
    assert gray.shape == (6, 1280) and gray.dtype == torch.float32
    torch.testing.assert_close(efficientnet.features(images.expand(-1, 3, -1, -1)), gray)
    # batching does not change the features
    small_batches = ImageFeatureExtractor(input_size=64, value_range=(-1, 1), batch_size=4)
    torch.testing.assert_close(small_batches.features(images), gray, rtol=1e-4, atol=1e-4)
    with pytest.raises(MetricInputError, match="value_range"):
        efficientnet.features((images + 1) * 127.5)
    with pytest.raises(MetricInputError, match="1 or 3 channels"):
        efficientnet.features(images.expand(-1, 4, -1, -1))
    with pytest.raises(MetricInputError, match="input_size"):
        ImageFeatureExtractor(input_size=16)


def test_any_feature_extractor_plugs_in():
    class SpectrumFeatures:
        """An audio-style extractor: magnitude spectrum of 1-D clips."""

        name = "toy-spectrum"

        def features(self, batch: torch.Tensor) -> torch.Tensor:
            return torch.fft.rfft(batch, dim=-1).abs()[:, :16].float()

        def describe(self) -> dict:
            return {"name": self.name}

    extractor = SpectrumFeatures()
    assert isinstance(extractor, FeatureExtractor)
    t = torch.arange(256) / 256
    g = torch.Generator().manual_seed(0)
    low = torch.sin(2 * torch.pi * 3 * t) + 0.1 * torch.randn(64, 256, generator=g)
    high = torch.sin(2 * torch.pi * 9 * t) + 0.1 * torch.randn(64, 256, generator=g)
    other_low = torch.sin(2 * torch.pi * 3 * t) + 0.1 * torch.randn(64, 256, generator=g)
    a, b, c = (compute_features(extractor, x) for x in (low, other_low, high))
    assert a.extractor == "toy-spectrum" and len(a) == 64
    assert frechet_distance(a.values, b.values) * 10 < frechet_distance(a.values, c.values)


# ------------------------------------------------------------------------------------------------- sample files


def test_save_image_grid_writes_the_images_in_order(tmp_path):
    from PIL import Image

    images = torch.linspace(-1, 1, 5).view(5, 1, 1, 1).expand(5, 1, 4, 6).contiguous()
    path = save_image_grid(images, tmp_path / "grid.png", nrow=3, value_range=(-1, 1), padding=1)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 * 5 + 1, 3 * 7 + 1)
    assert grid[1, 1] == 0 and grid[1 + 5, 1 + 7] == 255  # first image black, fifth (2nd row, 2nd col) white
    assert grid[1, 1 + 2 * 7] == 128  # third image: 0 in [-1, 1]
    assert grid[1 + 5, 1 + 2 * 7] == 255  # no sixth image: background
    rgb = save_image_grid(torch.rand(2, 3, 8, 8), tmp_path / "rgb.png", nrow=2, scale=2)
    assert np.asarray(Image.open(rgb)).shape == (2 + 16 + 2, 2 + 2 * (16 + 2), 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "rgb.png"]  # no temporary files left
    with pytest.raises(MetricInputError, match=".png"):
        save_image_grid(images, tmp_path / "grid.jpg", nrow=3, value_range=(-1, 1))


def test_save_wav_round_trips_16_bit_pcm(tmp_path):
    from scipy.io import wavfile

    t = np.arange(1600) / 16000
    clip = 0.5 * np.sin(2 * np.pi * 440 * t)
    sr, data = wavfile.read(save_wav(torch.from_numpy(clip), 16000, tmp_path / "tone.wav"))
    assert sr == 16000 and data.dtype == np.int16 and data.shape == (1600,)
    np.testing.assert_allclose(data / 32767, clip, atol=1e-4)
    sr, stereo = wavfile.read(save_wav(np.stack([clip, -clip * 3]), 8000, tmp_path / "stereo.wav"))
    assert stereo.shape == (1600, 2) and stereo[:, 1].min() == -32767  # beyond ±1 is clipped
    with pytest.raises(MetricInputError, match="sr"):
        save_wav(clip, 0, tmp_path / "bad.wav")
    with pytest.raises(MetricInputError, match="NaN"):
        save_wav(np.full(10, np.nan), 16000, tmp_path / "bad.wav")


# ------------------------------------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_training_the_digit_classifier_reproduces_the_committed_accuracy():
    model, record = train_digit_classifier(seed=0)
    assert record["heldout_accuracy"] >= 0.95
    assert record["n_train"] == 4500 and record["n_heldout"] == 500
    committed = load_digit_classifier()
    assert record["heldout_accuracy"] == pytest.approx(committed.record["heldout_accuracy"], abs=0.01)


@pytest.mark.slow
def test_efficientnet_at_224_px_ranks_blur_below_real(mnist):
    images, _, train, _ = mnist
    rows = train[np.random.default_rng(1).permutation(len(train))[:600]]
    extractor = ImageFeatureExtractor(input_size=224, value_range=(-1, 1))
    reference, other = images[rows[:300]], images[rows[300:]]
    report = image_quality(blur(other), reference, other, extractor=extractor, kid_subsets=20)
    assert report["fd"] > report["fd_real_vs_real"]
    assert report["kid"]["mean"] > report["kid_real_vs_real"]["mean"] + 3 * report["kid_real_vs_real"]["std"]
