"""How well predictive distributions are calibrated over held-out episodes.

Classification: expected calibration error and reliability bins over the predicted class's probability.
Regression with a Gaussian predictive: negative log-likelihood and coverage of central intervals. The
statistics pool the queries of all episodes; `bootstrap_interval` resamples whole episodes (the unit of
independence) for a confidence interval. The distribution maths is TensorFlow Probability's
(`tfp.stats.expected_calibration_error`, `tfd.Normal`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfmeta.checks import integer

tfd = tfp.distributions


def _classification(probabilities, labels) -> tuple[np.ndarray, np.ndarray]:
    """`probabilities` [episodes, queries, classes] and `labels` [episodes, queries], checked."""
    probabilities, labels = np.asarray(probabilities, np.float64), np.asarray(labels)
    if probabilities.ndim != 3:
        raise ValueError(f"`probabilities` must have shape [episodes, queries, classes]; got {probabilities.shape}.")
    if labels.shape != probabilities.shape[:2] or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"`labels` must be integers of shape {probabilities.shape[:2]} (episodes, queries); got "
                         f"{labels.dtype} of shape {labels.shape}.")
    if (probabilities < 0).any() or not np.allclose(probabilities.sum(-1), 1.0, atol=1e-4):
        raise ValueError("`probabilities` must be non-negative and sum to 1 over the classes (the last axis).")
    if (labels < 0).any() or (labels >= probabilities.shape[-1]).any():
        raise ValueError(f"`labels` must lie in [0, {probabilities.shape[-1]}) (the classes of `probabilities`).")
    return probabilities, labels


def _logits(probabilities, labels) -> tuple[tf.Tensor, tf.Tensor]:
    """All episodes' queries as TFP's calibration functions take them: float32 logits (TFP applies a softmax, and
    the log of the probabilities gives them back) and int32 labels."""
    probabilities, labels = _classification(probabilities, labels)
    logits = tf.math.log(tf.constant(probabilities.reshape(-1, probabilities.shape[-1]), tf.float32))
    return logits, tf.constant(labels.reshape(-1), tf.int32)


def expected_calibration_error(probabilities, labels, num_bins: int = 15) -> float:
    """ECE of the predicted class (the most probable one) over `num_bins` equal-width confidence bins, pooling the
    queries of all episodes: the count-weighted mean |accuracy - confidence| of the bins."""
    num_bins = integer(num_bins, "num_bins", minimum=1, owner="expected_calibration_error")
    logits, labels = _logits(probabilities, labels)
    return float(tfp.stats.expected_calibration_error(num_bins, logits=logits, labels_true=labels))


def reliability(probabilities, labels, num_bins: int = 15) -> dict:
    """The bins of a reliability diagram, pooling all episodes' queries: per equal-width confidence bin, the
    queries' `count`, mean `confidence` and `accuracy` (NaN for an empty bin), and the bins' `edges`. The bins
    are those of `expected_calibration_error` (TFP's: `tf.histogram_fixed_width_bins` of the softmax of the
    logits), so that the count-weighted mean gap of these bins is that ECE."""
    num_bins = integer(num_bins, "num_bins", minimum=1, owner="reliability")
    logits, labels = _logits(probabilities, labels)
    confidence = tf.reduce_max(tf.nn.softmax(logits), axis=1)
    bins = tf.histogram_fixed_width_bins(confidence, [0.0, 1.0], nbins=num_bins).numpy()
    correct = (tf.argmax(logits, axis=1, output_type=tf.int32) == labels).numpy()
    count = np.bincount(bins, minlength=num_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = lambda values: np.bincount(bins, values, minlength=num_bins) / count  # noqa: E731
        return {"edges": np.linspace(0.0, 1.0, num_bins + 1), "count": count,
                "confidence": mean(confidence.numpy()), "accuracy": mean(correct)}


def _regression(mean, stddev, targets) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    arrays = [np.asarray(a, np.float64) for a in (mean, stddev, targets)]
    if arrays[0].ndim < 2 or any(a.shape != arrays[0].shape for a in arrays):
        raise ValueError("`mean`, `stddev` and `targets` must share one shape [episodes, queries, ...]; got "
                         f"{[a.shape for a in arrays]}.")
    if not (arrays[1] > 0).all():
        raise ValueError("`stddev` must be positive.")
    return tuple(arrays)


def gaussian_nll(mean, stddev, targets) -> np.ndarray:
    """Per episode, the mean negative log-likelihood of the targets under Normal(mean, stddev), in nats."""
    mean, stddev, targets = _regression(mean, stddev, targets)
    nll = -tfd.Normal(mean, stddev).log_prob(targets).numpy()
    return nll.reshape(nll.shape[0], -1).mean(1)


def interval_coverage(mean, stddev, targets, level: float) -> np.ndarray:
    """Per episode, the fraction of targets inside the central `level` interval of Normal(mean, stddev)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"`level` must lie in (0, 1); got {level!r}.")
    mean, stddev, targets = _regression(mean, stddev, targets)
    normal = tfd.Normal(mean, stddev)
    low, high = (normal.quantile(0.5 + side * level / 2).numpy() for side in (-1, 1))
    inside = (targets >= low) & (targets <= high)
    return inside.reshape(inside.shape[0], -1).mean(1)


def bootstrap_interval(statistic: Callable[..., float], arrays: Sequence, num_resamples: int = 1000,
                       confidence: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """`statistic(*arrays)` and its percentile bootstrap interval: the arrays' leading axis (episodes) is resampled
    with replacement, jointly, `num_resamples` times with a fixed `seed`. Returns (value, low, high)."""
    arrays = [np.asarray(a) for a in arrays]
    episodes = len(arrays[0])
    if episodes < 2 or any(len(a) != episodes for a in arrays):
        raise ValueError("`arrays` must share a leading (episodes) axis of length >= 2; got "
                         f"{[a.shape for a in arrays]}.")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"`confidence` must lie in (0, 1); got {confidence!r}.")
    num_resamples = integer(num_resamples, "num_resamples", minimum=1, owner="bootstrap_interval")
    rng = np.random.default_rng(seed)
    resampled = [statistic(*(a[index] for a in arrays))
                 for index in rng.integers(0, episodes, size=(num_resamples, episodes))]
    low, high = np.percentile(resampled, [50 * (1 - confidence), 50 * (1 + confidence)])
    return float(statistic(*arrays)), float(low), float(high)
