"""Sine-regression task distribution: the MAML paper's settings, determinism, resumable streams."""

import math

import numpy as np
import pytest
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


def test_sine_frequency_and_amplitude_scaled_noise():
    tasks = tfmeta.tasks.SineTasks(50, 50, frequency_range=(0.5, 2.0), phase_range=(0.0, 2 * np.pi), noise_scale=0.01)
    episodes, parameters = tasks.sample_with_parameters(tf.constant([3, 0], tf.int64), 400)
    frequency = parameters["frequency"].numpy()
    assert frequency.min() >= 0.5 and frequency.max() <= 2.0 and frequency.std() > 0.3
    clean = tasks.function(parameters, episodes["support_x"])
    residual = (episodes["support_y"] - clean).numpy()[..., 0] / (0.01 * parameters["amplitude"].numpy()[:, None])
    assert residual.mean() == pytest.approx(0.0, abs=0.01) and residual.std() == pytest.approx(1.0, rel=0.02)
    noiseless = tfmeta.tasks.SineTasks(10)  # the default keeps the MAML paper's tasks, draw for draw
    same = noiseless.sample(tf.constant([3, 0], tf.int64), 4)
    np.testing.assert_array_equal(same["support_y"], tfmeta.tasks.SineTasks.function(
        noiseless.sample_with_parameters(tf.constant([3, 0], tf.int64), 4)[1], same["support_x"]))


def test_finite_tasks_draw_batches_from_one_fixed_set():
    finite = tfmeta.tasks.finite_tasks(tfmeta.tasks.SineTasks(5), num_tasks=20, seed=7)
    seen = set()
    for batch in finite.dataset(8, seed=0, num_batches=10):
        keys = {tuple(np.round(x, 6)) for x in batch["support_x"].numpy()[..., 0]}
        assert len(keys) == 8  # without replacement within a batch
        seen |= keys
    pool = {tuple(np.round(x, 6)) for x in finite.tasks["support_x"].numpy()[..., 0]}
    assert seen <= pool and len(pool) == 20 and len(seen) > 8
    with pytest.raises(ValueError, match=r"cannot be drawn without replacement from a finite set of 20"):
        finite.sample(tf.constant([0, 0], tf.int64), 21)
