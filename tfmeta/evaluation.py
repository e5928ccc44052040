"""Evaluation over held-out tasks: adaptation curves with 95% confidence intervals, and strict JSON reports."""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from typing import Any, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from tfmeta.episodic import EpisodicLearner
from tfmeta.tasks import TaskDistribution


def mean_confidence_interval(values, confidence: float = 0.95) -> tuple[float, float]:
    """The mean of `values` and the half-width of its normal-approximation confidence interval
    (z·s/√n; with the ≥ 600 tasks used here the Student-t interval is the same to 0.1%)."""
    values = np.asarray(values, np.float64)
    if values.size < 2:
        raise ValueError(f"a confidence interval needs at least 2 values; got {values.size}.")
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    return float(values.mean()), float(z * values.std(ddof=1) / math.sqrt(values.size))


def adaptation_curve(
    meta_learner: EpisodicLearner,
    tasks: TaskDistribution,
    num_tasks: int = 600,
    steps: int = 10,
    seed: int = 1,
    batch_size: int = 100,
    at_steps: Optional[Sequence[int]] = None,
    progress: bool = False,
) -> dict:
    """Query loss and metrics after each of `at_steps` (default 0, 1, ..., `steps`) of `steps` inner steps on
    `num_tasks` held-out tasks.

    Tasks are drawn from `tasks` with the fixed evaluation `seed`. Returns the scored steps and, for "loss" and
    each metric, the mean and the 95% CI half-width per scored step, plus the per-task values. `progress` prints
    a line after each batch of `batch_size` tasks (a progress bar on a terminal).
    """
    if num_tasks < 2:
        raise ValueError(f"`num_tasks` must be >= 2 for a confidence interval; got {num_tasks}.")
    at_steps = list(range(steps + 1) if at_steps is None else at_steps)
    batch_size = min(batch_size, num_tasks)
    batches = tasks.dataset(batch_size, seed=seed, num_batches=math.ceil(num_tasks / batch_size))
    evaluate = tf.function(lambda e: meta_learner.evaluate_tasks(e, steps=steps, at_steps=at_steps))
    per_task: dict[str, list] = {}
    bar = keras.utils.Progbar(num_tasks, unit_name="task") if progress and sys.stdout.isatty() else None
    start = time.monotonic()
    for i, episodes in enumerate(batches):
        for name, values in evaluate(episodes).items():
            per_task.setdefault(name, []).append(values.numpy())
        done = min((i + 1) * batch_size, num_tasks)
        if bar is not None:
            bar.update(done)
        elif progress:
            print(f"Evaluated {done}/{num_tasks} held-out tasks ({time.monotonic() - start:.0f} s)", flush=True)
    result = {"num_tasks": num_tasks, "seed": seed, "steps": at_steps}
    for name, chunks in per_task.items():
        values = np.concatenate(chunks)[:num_tasks]
        stats = [mean_confidence_interval(values[:, k]) for k in range(len(at_steps))]
        result[name] = {
            "mean": [m for m, _ in stats],
            "ci95": [c for _, c in stats],
            "per_task": values.tolist(),
        }
    return result


def calibration_report(
    meta_learner: EpisodicLearner,
    tasks: TaskDistribution,
    num_tasks: int = 600,
    steps: Optional[int] = None,
    seed: int = 1,
    batch_size: int = 100,
    num_bins: int = 15,
    num_resamples: int = 1000,
) -> dict:
    """A classifier's calibration on `num_tasks` held-out tasks (drawn as `adaptation_curve` draws them) after
    `steps` inner steps: the expected calibration error of the predicted class over `num_bins` bins, pooling the
    queries of all tasks, with its 95% percentile-bootstrap interval over tasks (`num_resamples`), the reliability
    bins and the accuracy. Needs a meta-learner with a categorical likelihood (`predict_tasks`)."""
    from tfmeta import calibration

    if meta_learner.likelihood is None or not meta_learner.likelihood.classifies:
        raise ValueError("calibration_report needs a classifier with a categorical likelihood (`likelihood=` of the "
                         "meta-learner).")
    batch_size = min(batch_size, num_tasks)
    batches = tasks.dataset(batch_size, seed=seed, num_batches=math.ceil(num_tasks / batch_size))
    predict = tf.function(lambda e: meta_learner.predict_tasks(e, steps=steps))
    probabilities, labels = [], []
    for episodes in batches:
        probabilities.append(predict(episodes)["probabilities"].numpy())
        labels.append(np.reshape(episodes["query_y"].numpy(), probabilities[-1].shape[:2]))
    probabilities = np.concatenate(probabilities)[:num_tasks].astype(np.float64)
    probabilities /= probabilities.sum(-1, keepdims=True)  # float32 rounding
    labels = np.concatenate(labels)[:num_tasks]
    ece, low, high = calibration.bootstrap_interval(
        lambda p, y: calibration.expected_calibration_error(p, y, num_bins), [probabilities, labels],
        num_resamples=num_resamples, seed=seed)
    bins = calibration.reliability(probabilities, labels, num_bins)
    accuracy = float(np.mean(probabilities.argmax(-1) == labels))
    return {"num_tasks": num_tasks, "seed": seed, "num_bins": num_bins, "ece": ece, "ece_ci95": [low, high],
            "accuracy": accuracy, "reliability": {k: _empty_as_none(v) for k, v in bins.items()}}


def _empty_as_none(values) -> list:
    """A reliability column as a list, an empty bin's NaN as None: JSON's null for "no queries", which is not a
    non-finite result (5-way predictions, whose confidence is at least 0.2, leave the lowest bins empty)."""
    return [None if isinstance(v, float) and math.isnan(v) else v for v in np.asarray(values).tolist()]


def strict(value: Any, path: str = "", non_finite: Optional[list] = None) -> tuple[Any, list[str]]:
    """`value` (nested dicts, lists, numbers) with every non-finite number replaced by None, and the names of the
    fields that held one (e.g. "eval.loss.mean"), each once: JSON has no NaN or Infinity."""
    non_finite = [] if non_finite is None else non_finite
    if isinstance(value, dict):
        value = {k: strict(v, f"{path}.{k}" if path else str(k), non_finite)[0] for k, v in value.items()}
    elif isinstance(value, (list, tuple)):
        value = [strict(v, path, non_finite)[0] for v in value]
    elif isinstance(value, (float, np.floating)) and not math.isfinite(value):
        if path not in non_finite:
            non_finite.append(path)
        value = None
    elif isinstance(value, np.generic):
        value = value.item()
    return value, non_finite


def write_text(path: str, text: str) -> None:
    """Writes `text` to `path` atomically: to a temporary file beside it, then renamed over it."""
    temporary = f"{path}.tmp{os.getpid()}"
    with open(temporary, "w") as f:
        f.write(text)
    os.replace(temporary, path)


def write_json(path: str, data: dict) -> list[str]:
    """Writes `data` as strict JSON, atomically: non-finite numbers become null and their paths are listed under
    "non_finite". Returns those paths (empty when every number is finite)."""
    data, non_finite = strict(data)
    if non_finite:
        data = {**data, "non_finite": non_finite}
    write_text(path, json.dumps(data, indent=2, allow_nan=False))
    return non_finite
