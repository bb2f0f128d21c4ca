"""The spoken-digit metrics on known cases: real clips are recognised and noise is not, identical sets are at FD 0,
damaged mels move away from real ones, and malformed inputs raise MetricInputError."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch

from ldpruner.bench.metrics import (
    FeatureExtractor,
    MetricInputError,
    SpokenDigitFeatureExtractor,
    frechet_distance,
    load_spoken_digit_classifier,
    noise_mels,
    recognisability,
    spoken_digit_probabilities,
    spoken_digit_quality,
)
from ldpruner.bench.metrics.digits import DIGIT_CLASSIFIER_PATH
from ldpruner.bench.metrics.spoken_digits import SPOKEN_DIGIT_CLASSIFIER_PATH

N_REAL = 200
pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                reason="the real clips are synthesised by Debian espeak-ng (apt-get install espeak-ng)")


@pytest.fixture(scope="module")
def classifier():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_spoken_digit_classifier()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def real():
    """The first N_REAL clips of the held-out eval split: mels (N, 1, 64, 64) in [0, 1] and their digits."""
    from ldpruner.zoo.audio import MelConfig, waveform_to_mel
    from ldpruner.zoo.datasets import espeak_clip, espeak_split_plan

    config = MelConfig()
    plan = espeak_split_plan("eval")[:N_REAL]
    audio = np.stack([espeak_clip(item, config) for item in plan])
    mels = (torch.from_numpy(waveform_to_mel(audio, config)) + 1) / 2
    return mels, torch.tensor([item["digit"] for item in plan])


def _halves(mels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two disjoint digit-balanced halves: the eval plan says 0–9 in turn, so alternate blocks of ten clips."""
    block = (torch.arange(mels.shape[0]) // 10) % 2 == 0
    return mels[block], mels[~block]


def test_committed_classifier_loads_from_safetensors_with_its_record(classifier):
    assert SPOKEN_DIGIT_CLASSIFIER_PATH.suffix == ".safetensors"
    assert SPOKEN_DIGIT_CLASSIFIER_PATH.stat().st_size < 2_000_000
    record = classifier.record
    assert record["architecture"] == "SpokenDigitClassifier-v1"
    assert record["n_heldout"] == 1000 and record["heldout_accuracy"] >= 0.9
    assert not classifier.training


def test_real_clips_are_recognised_and_read_correctly(classifier, real):
    mels, digits = real
    probs = spoken_digit_probabilities(mels, classifier=classifier)
    assert probs.shape == (N_REAL, 10) and torch.allclose(probs.sum(1), torch.ones(N_REAL), atol=1e-5)
    assert float((probs.argmax(1) == digits).double().mean()) > 0.9
    r = recognisability(mels, classifier=classifier)
    assert r["recognised"]["0.5"] > 0.9 and r["recognised"]["0.9"] > 0.8
    assert sum(r["histogram"]) == round(r["recognised"]["0.5"] * N_REAL)
    assert r["entropy_bits"] > 3.2 and r["max_entropy_bits"] == pytest.approx(math.log2(10))
    # the same clips in the recipe's [-1, 1] range read the same
    again = recognisability(mels * 2 - 1, classifier=classifier, value_range=(-1.0, 1.0))
    assert again["histogram"] == r["histogram"]


def test_noise_and_silence_are_not_recognised(classifier):
    noise = recognisability(noise_mels(100, seed=1), classifier=classifier)
    assert noise["recognised"]["0.5"] < 0.1 and noise["recognised"]["0.9"] < 0.05
    silence = recognisability(torch.zeros(4, 1, 64, 64), classifier=classifier)
    assert silence["recognised"]["0.9"] == 0.0
    # one digit only: the histogram has a single bar and zero entropy
    one = recognisability(torch.zeros(1, 1, 64, 64) + 0.5, classifier=classifier, thresholds=(0.01,))
    assert one["entropy_bits"] == 0.0 and sum(one["histogram"]) == 1


def test_identical_sets_have_zero_distance_and_damage_increases_it(classifier, real):
    mels, _ = real
    extractor = SpokenDigitFeatureExtractor(classifier=classifier)
    assert isinstance(extractor, FeatureExtractor) and extractor.describe()["dim"] == 64
    a, b = _halves(mels)
    fa, fb = extractor.features(a), extractor.features(b)
    assert fa.shape == (N_REAL // 2, 64) and fa.dtype == torch.float32
    assert frechet_distance(fa, fa) < 1e-6
    base = frechet_distance(fa, fb)
    shifted = torch.roll(a, shifts=12, dims=-1)  # 0.2 s later, wrapped
    blurred = torch.nn.functional.avg_pool2d(a, 7, 1, 3)
    noisy = (a + 0.15 * torch.randn(a.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    for damaged in (shifted, blurred, noisy):
        assert frechet_distance(extractor.features(damaged), fb) > 2 * base
    q = spoken_digit_quality(a, b, a, classifier=classifier)
    assert q["fd"] == pytest.approx(q["fd_real_vs_real"]) and q["n_generated"] == N_REAL // 2
    assert set(q["recognisability"]) == {"generated", "real_heldout"}


def test_quality_reports_noise_beside_real(classifier, real):
    mels, _ = real
    noise = noise_mels(N_REAL // 2, seed=2)
    q = spoken_digit_quality(noise, *_halves(mels), noise=noise, classifier=classifier)
    assert q["fd"] > 10 * q["fd_real_vs_real"]
    assert (q["recognisability"]["noise"]["recognised"]["0.9"]
            < q["recognisability"]["real_heldout"]["recognised"]["0.9"])
    assert q["kid"]["mean"] > q["kid_real_vs_real"]["mean"]
    with pytest.raises(MetricInputError, match="same sample count"):
        spoken_digit_quality(noise[:50], *_halves(mels), classifier=classifier)


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(2, 1, 32, 32), r"shape \(N, 1, 64, 64\)"),
    (torch.zeros(2, 64, 64), r"shape \(N, 1, 64, 64\)"),
    (torch.zeros(2, 2, 64, 64), r"shape \(N, 1, 64, 64\)"),
    (torch.zeros(0, 1, 64, 64), r"shape \(N, 1, 64, 64\)"),
    (torch.zeros(2, 1, 64, 64, dtype=torch.uint8), "floating point"),
    (torch.full((2, 1, 64, 64), 200.0), "outside value_range"),
    (torch.full((2, 1, 64, 64), float("nan")), "NaN"),
    ([[0.0]], "must be a torch.Tensor"),
])
def test_bad_inputs_raise_metric_input_error(classifier, bad, message):
    with pytest.raises(MetricInputError, match=message):
        spoken_digit_probabilities(bad, classifier=classifier)
    with pytest.raises(MetricInputError, match=message):
        SpokenDigitFeatureExtractor(classifier=classifier).features(bad)


def test_other_errors_are_typed(classifier):
    with pytest.raises(MetricInputError, match="thresholds"):
        recognisability(torch.zeros(2, 1, 64, 64), classifier=classifier, thresholds=(1.5,))
    with pytest.raises(MetricInputError, match="value_range"):
        recognisability(torch.zeros(2, 1, 64, 64), classifier=classifier, value_range=(1.0, 0.0))
    with pytest.raises(MetricInputError, match="holds architecture 'DigitClassifier-v1'"):
        load_spoken_digit_classifier(DIGIT_CLASSIFIER_PATH)
    with pytest.raises(FileNotFoundError, match="--train"):
        load_spoken_digit_classifier("/nonexistent/spoken.safetensors")
    with pytest.raises(MetricInputError, match="n must be a positive int"):
        noise_mels(0)
    # numpy mels are accepted as they are
    assert spoken_digit_probabilities(np.zeros((1, 1, 64, 64), np.float32), classifier=classifier).shape == (1, 10)
