"""Sine-regression task distribution: the MAML paper's settings, determinism, resumable streams."""

import math

import numpy as np
import tensorflow as tf

import tfmeta


def test_sine_episodes_follow_the_paper_distribution():
    tasks = tfmeta.tasks.SineTasks(num_support=5)
    episodes, parameters = tasks.sample_with_parameters(tf.constant([3, 0], tf.int64), 2000)
    assert {k: tuple(v.shape) for k, v in episodes.items()} == {
        "support_x": (2000, 5, 1), "support_y": (2000, 5, 1), "query_x": (2000, 5, 1), "query_y": (2000, 5, 1)}
    assert all(v.dtype == tf.float32 for v in episodes.values())
    amplitude, phase = parameters["amplitude"].numpy(), parameters["phase"].numpy()
    assert 0.1 <= amplitude.min() < 0.2 and 4.9 < amplitude.max() <= 5.0
    assert 0.0 <= phase.min() < 0.05 and math.pi - 0.05 < phase.max() <= math.pi
    x = np.concatenate([episodes["support_x"], episodes["query_x"]], 1)
    y = np.concatenate([episodes["support_y"], episodes["query_y"]], 1)
    assert -5.0 <= x.min() < -4.9 and 4.9 < x.max() <= 5.0
    np.testing.assert_allclose(y, amplitude[:, None, None] * np.sin(x - phase[:, None, None]), rtol=1e-5, atol=1e-5)
    # Support and query points are separate draws.
    assert not np.allclose(episodes["support_x"], episodes["query_x"])


def test_streams_are_deterministic_and_resumable():
    tasks = tfmeta.tasks.SineTasks()
    first = list(tasks.dataset(4, seed=7, num_batches=5))
    again = list(tasks.dataset(4, seed=7, num_batches=5))
    resumed = list(tasks.dataset(4, seed=7, start=3, num_batches=2))
    other = next(iter(tasks.dataset(4, seed=8)))
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a["query_y"], b["query_y"])
    for a, b in zip(first[3:], resumed):
        np.testing.assert_array_equal(a["support_x"], b["support_x"])
    assert not np.allclose(first[0]["support_x"], first[1]["support_x"])
    assert not np.allclose(first[0]["support_x"], other["support_x"])
