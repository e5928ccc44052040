"""Sine-wave regression, as in the MAML paper (Finn et al., 2017, Section 5.1)."""

from __future__ import annotations

import math
from typing import Optional

import tensorflow as tf

from tfmeta import checks
from tfmeta.tasks.base import TaskDistribution


def _check_range(value, argument: str) -> tuple[float, float]:
    low, high = (float(v) for v in value)
    if not low <= high:
        raise ValueError(f"`{argument}` must be a (low, high) pair with low <= high; got {value!r}.")
    return low, high


class SineTasks(TaskDistribution):
    """Tasks y = A·sin(x − φ) with A ~ U[0.1, 5], φ ~ U[0, π], x ~ U[−5, 5] (the MAML paper's settings).

    Each episode has `num_support` (K) support points and `num_query` query points (default K), all drawn
    independently from the input range.
    """

    def __init__(
        self,
        num_support: int = 10,
        num_query: Optional[int] = None,
        amplitude_range: tuple[float, float] = (0.1, 5.0),
        phase_range: tuple[float, float] = (0.0, math.pi),
        input_range: tuple[float, float] = (-5.0, 5.0),
    ):
        num_query = num_support if num_query is None else num_query
        for name, value in (("num_support", num_support), ("num_query", num_query)):
            checks.integer(value, name, minimum=1, owner="SineTasks")
        self.num_support = num_support
        self.num_query = num_query
        self.amplitude_range = _check_range(amplitude_range, "amplitude_range")
        self.phase_range = _check_range(phase_range, "phase_range")
        self.input_range = _check_range(input_range, "input_range")

    def sample_parameters(self, seed: tf.Tensor, num_tasks: int) -> dict[str, tf.Tensor]:
        """Amplitudes and phases of `num_tasks` tasks, each of shape [num_tasks]."""
        amplitude_seed, phase_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        return {
            "amplitude": tf.random.stateless_uniform([num_tasks], amplitude_seed, *self.amplitude_range),
            "phase": tf.random.stateless_uniform([num_tasks], phase_seed, *self.phase_range),
        }

    @staticmethod
    def function(parameters: dict[str, tf.Tensor], x: tf.Tensor) -> tf.Tensor:
        """The targets of each task at inputs `x` of shape [tasks, points, 1]."""
        return parameters["amplitude"][:, None, None] * tf.sin(x - parameters["phase"][:, None, None])

    def sample(self, seed, num_tasks):
        return self.sample_with_parameters(seed, num_tasks)[0]

    def sample_with_parameters(self, seed: tf.Tensor, num_tasks: int) -> tuple[dict, dict]:
        """The episodes of `sample(seed, num_tasks)` and the amplitudes and phases of their tasks."""
        parameter_seed, input_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        parameters = self.sample_parameters(parameter_seed, num_tasks)
        x = tf.random.stateless_uniform(
            [num_tasks, self.num_support + self.num_query, 1], input_seed, *self.input_range
        )
        y = self.function(parameters, x)
        k = self.num_support
        episodes = {"support_x": x[:, :k], "support_y": y[:, :k], "query_x": x[:, k:], "query_y": y[:, k:]}
        return episodes, parameters
