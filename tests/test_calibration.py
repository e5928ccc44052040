"""Calibration statistics against hand computations and against predictions calibrated by construction."""

import numpy as np
import pytest

from tfmeta import calibration


def two_class(confidence, correct):
    """Episodes of 2-class predictions with the given confidence in class 0, labelled 0 where `correct`."""
    confidence = np.asarray(confidence, np.float64)
    probabilities = np.stack([confidence, 1 - confidence], -1)
    return probabilities, np.where(correct, 0, 1).astype(np.int32)


def test_expected_calibration_error_by_hand_and_its_bins():
    # One episode, 4 queries: confidences 0.9, 0.9 (bin 13 of 15), 0.6, 0.6 (bin 8); accuracies 1/2 and 1.
    probabilities, labels = two_class([[0.9, 0.9, 0.6, 0.6]], [[True, False, True, True]])
    expected = (2 * abs(0.5 - 0.9) + 2 * abs(1.0 - 0.6)) / 4
    assert calibration.expected_calibration_error(probabilities, labels) == pytest.approx(expected, abs=1e-6)
    bins = calibration.reliability(probabilities, labels)
    assert bins["count"].sum() == 4 and np.count_nonzero(bins["count"]) == 2
    filled = bins["count"] > 0
    np.testing.assert_allclose(bins["confidence"][filled], [0.6, 0.9])
    np.testing.assert_allclose(bins["accuracy"][filled], [1.0, 0.5])
    gap = np.sum(bins["count"][filled] * np.abs(bins["accuracy"] - bins["confidence"])[filled]) / 4
    assert gap == pytest.approx(expected)


def test_calibrated_predictions_score_near_zero_and_overconfident_ones_do_not():
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.5, 1.0, size=(600, 75))
    correct = rng.random(confidence.shape) < confidence  # right as often as claimed
    calibrated = calibration.expected_calibration_error(*two_class(confidence, correct))
    assert calibrated < 0.01
    # Claimed 0.9 everywhere, right 60% of the time.
    overconfident = calibration.expected_calibration_error(*two_class(np.full((600, 75), 0.9),
                                                                      rng.random((600, 75)) < 0.6))
    assert overconfident == pytest.approx(0.3, abs=0.01)


def test_gaussian_nll_and_interval_coverage():
    rng = np.random.default_rng(1)
    mean, stddev = rng.normal(size=(600, 20)), rng.uniform(0.5, 2.0, size=(600, 20))
    targets = mean + stddev * rng.normal(size=mean.shape)
    nll = calibration.gaussian_nll(mean, stddev, targets)
    by_hand = 0.5 * np.log(2 * np.pi * stddev**2) + 0.5 * ((targets - mean) / stddev) ** 2
    np.testing.assert_allclose(nll, by_hand.mean(1), rtol=1e-6)
    for level in (0.5, 0.9):
        assert calibration.interval_coverage(mean, stddev, targets, level).mean() == pytest.approx(level, abs=0.01)
    # Intervals half as wide as they should be: the central 50% holds about 26% (2 * Phi(0.337) - 1).
    assert calibration.interval_coverage(mean, stddev / 2, targets, 0.5).mean() == pytest.approx(0.264, abs=0.01)


def test_bootstrap_interval_over_episodes():
    rng = np.random.default_rng(2)
    confidence = rng.uniform(0.5, 1.0, size=(200, 15))
    probabilities, labels = two_class(confidence, rng.random(confidence.shape) < 0.75)
    value, low, high = calibration.bootstrap_interval(calibration.expected_calibration_error, (probabilities, labels),
                                                      num_resamples=200)
    assert low < value < high
    assert (value, low, high) == calibration.bootstrap_interval(calibration.expected_calibration_error,
                                                                (probabilities, labels), num_resamples=200)
    narrow = calibration.bootstrap_interval(np.mean, (rng.normal(size=2000),), num_resamples=200)
    wide = calibration.bootstrap_interval(np.mean, (rng.normal(size=50),), num_resamples=200)
    assert narrow[2] - narrow[1] < (wide[2] - wide[1]) / 3  # the width falls as 1/sqrt(episodes)


def test_bad_input_names_the_argument():
    probabilities, labels = two_class([[0.9, 0.6]], [[True, False]])
    with pytest.raises(ValueError, match=r"`probabilities` must have shape \[episodes, queries, classes\]"):
        calibration.expected_calibration_error(probabilities[0], labels)
    with pytest.raises(ValueError, match="`labels` must be integers of shape"):
        calibration.expected_calibration_error(probabilities, labels[:, :1])
    with pytest.raises(ValueError, match="sum to 1"):
        calibration.reliability(probabilities * 2, labels)
    with pytest.raises(ValueError, match=r"`labels` must lie in \[0, 2\)"):
        calibration.expected_calibration_error(probabilities, labels + 2)
    with pytest.raises(ValueError, match="`num_bins` must be an integer >= 1"):
        calibration.expected_calibration_error(probabilities, labels, num_bins=0)
    with pytest.raises(ValueError, match="`stddev` must be positive"):
        calibration.gaussian_nll(np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="`level` must lie in"):
        calibration.interval_coverage(np.zeros((2, 3)), np.ones((2, 3)), np.zeros((2, 3)), 1.5)
    with pytest.raises(ValueError, match="leading .episodes. axis"):
        calibration.bootstrap_interval(np.mean, (np.zeros(1),))


def test_reliability_bins_are_those_of_the_expected_calibration_error():
    """Confidences on bin edges (multiples of 1/30 with 15 bins) land in the same bin for both."""
    rng = np.random.default_rng(3)
    confidence = rng.integers(15, 31, size=(50, 20)) / 30
    probabilities, labels = two_class(confidence, rng.random(confidence.shape) < 0.7)
    bins = calibration.reliability(probabilities, labels)
    filled = bins["count"] > 0
    gap = np.sum(bins["count"][filled] * np.abs(bins["accuracy"] - bins["confidence"])[filled]) / bins["count"].sum()
    assert gap == pytest.approx(calibration.expected_calibration_error(probabilities, labels), abs=1e-5)
