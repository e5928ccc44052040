"""Continual sine regression: WarpGrad's continual-learning experiment (Flennerhag et al., 2020, Appendix J)."""

from __future__ import annotations

import math

import tensorflow as tf

from tfmeta import checks
from tfmeta.tasks.base import TaskDistribution
from tfmeta.tasks.sine import _check_range


class ContinualSineTasks(TaskDistribution):
    """A task is a stream: the input range is cut into `sub_tasks` consecutive intervals, and the learner sees
    them one after another, `steps_per_sub_task` batches of `batch_size` points from each.

    The target is a sigmoid-gated mixture of two sines,
    y = σ(x − c)·A1·sin(x − φ1) + (1 − σ(x − c))·A2·sin(x − φ2), with amplitudes A ~ U[0.1, 5], phases
    φ ~ U[0, π] and offset c ~ U[−5, 5] (our reading of the paper's Appendix J; its code for this experiment is
    not public).
    `order="random"` presents the intervals in a random order per task instead of left to right.

    Episodes are streams (`tfmeta.episodes`; with the leading task axis of every batch): `stream_x`, `stream_y`
    [steps, batch_size, 1] are the stream's batches; `query_x`, `query_y` [sub_tasks, query_size, 1] hold held-out
    points of each sub-task in the order presented, for the meta-objective and the evaluation.
    """

    def __init__(self, sub_tasks: int = 5, steps_per_sub_task: int = 20, batch_size: int = 5,
                 query_size: int = 100, order: str = "sequential",
                 amplitude_range: tuple[float, float] = (0.1, 5.0), phase_range: tuple[float, float] = (0.0, math.pi),
                 offset_range: tuple[float, float] = (-5.0, 5.0), input_range: tuple[float, float] = (-5.0, 5.0)):
        for name, value in (("sub_tasks", sub_tasks), ("steps_per_sub_task", steps_per_sub_task),
                            ("batch_size", batch_size), ("query_size", query_size)):
            checks.integer(value, name, minimum=1, owner="ContinualSineTasks")
        if order not in ("sequential", "random"):
            raise ValueError(f"ContinualSineTasks `order` must be 'sequential' or 'random'; got {order!r}.")
        self.sub_tasks, self.steps_per_sub_task, self.batch_size = sub_tasks, steps_per_sub_task, batch_size
        self.query_size, self.order = query_size, order
        self.amplitude_range = _check_range(amplitude_range, "amplitude_range")
        self.phase_range = _check_range(phase_range, "phase_range")
        self.offset_range = _check_range(offset_range, "offset_range")
        self.input_range = _check_range(input_range, "input_range")

    @property
    def steps(self) -> int:
        """Length of the stream (inner steps)."""
        return self.sub_tasks * self.steps_per_sub_task

    def sample(self, seed, num_tasks):
        seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 7))
        uniform = lambda shape, s, bounds: tf.random.stateless_uniform(shape, s, *bounds)  # noqa: E731
        a1, a2 = (uniform([num_tasks, 1, 1, 1], s, self.amplitude_range) for s in seeds[:2])
        p1, p2 = (uniform([num_tasks, 1, 1, 1], s, self.phase_range) for s in seeds[2:4])
        c = uniform([num_tasks, 1, 1, 1], seeds[4], self.offset_range)
        order = tf.tile(tf.range(self.sub_tasks)[None], [num_tasks, 1])
        if self.order == "random":
            order = tf.argsort(tf.random.stateless_uniform([num_tasks, self.sub_tasks], seeds[5]), axis=1)
        low, high = self.input_range
        width = (high - low) / self.sub_tasks

        def points(interval, shape, s):  # interval: [tasks, n] -> x: [tasks, n, m, 1]
            start = low + width * tf.cast(interval, tf.float32)[..., None, None]
            return start + width * tf.random.stateless_uniform(shape, s)

        def target(x):
            gate = tf.sigmoid(x - c)
            return gate * a1 * tf.sin(x - p1) + (1 - gate) * a2 * tf.sin(x - p2)

        stream_seed, query_seed = tf.unstack(tf.random.experimental.stateless_split(seeds[6], 2))
        stream_interval = tf.repeat(order, self.steps_per_sub_task, axis=1)
        x = points(stream_interval, [num_tasks, self.steps, self.batch_size, 1], stream_seed)
        qx = points(order, [num_tasks, self.sub_tasks, self.query_size, 1], query_seed)
        return {"stream_x": x, "stream_y": target(x), "query_x": qx, "query_y": target(qx)}
