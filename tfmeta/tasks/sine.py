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
    """Tasks y = A·sin(ω·x − φ) + ε with A ~ U[0.1, 5], φ ~ U[0, π], ω = 1, x ~ U[−5, 5] and no noise by default
    (the MAML paper's settings).

    Each episode has `num_support` (K) support points and `num_query` query points (default K), all drawn
    independently from the input range. `frequency_range` draws ω per task; the observation noise ε is Gaussian
    with standard deviation `noise_stddev + noise_scale · A` (BMAML's protocol: ω ~ U[0.5, 2], φ ~ U[0, 2π] and
    noise_scale = 0.01), on support and query targets alike.
    """

    def __init__(
        self,
        num_support: int = 10,
        num_query: Optional[int] = None,
        amplitude_range: tuple[float, float] = (0.1, 5.0),
        phase_range: tuple[float, float] = (0.0, math.pi),
        input_range: tuple[float, float] = (-5.0, 5.0),
        frequency_range: tuple[float, float] = (1.0, 1.0),
        noise_stddev: float = 0.0,
        noise_scale: float = 0.0,
    ):
        num_query = num_support if num_query is None else num_query
        for name, value in (("num_support", num_support), ("num_query", num_query)):
            checks.integer(value, name, minimum=1, owner="SineTasks")
        self.num_support = num_support
        self.num_query = num_query
        self.amplitude_range = _check_range(amplitude_range, "amplitude_range")
        self.phase_range = _check_range(phase_range, "phase_range")
        self.input_range = _check_range(input_range, "input_range")
        self.frequency_range = _check_range(frequency_range, "frequency_range")
        for name, value in (("noise_stddev", noise_stddev), ("noise_scale", noise_scale)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"SineTasks `{name}` must be finite and >= 0; got {value!r}.")
        self.noise_stddev, self.noise_scale = float(noise_stddev), float(noise_scale)

    def sample_parameters(self, seed: tf.Tensor, num_tasks: int) -> dict[str, tf.Tensor]:
        """Amplitudes, phases and frequencies of `num_tasks` tasks, each of shape [num_tasks]."""
        amplitude_seed, phase_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        frequency_seed = tf.random.experimental.stateless_fold_in(seed, 3)  # leaves the other streams as they were
        return {
            "amplitude": tf.random.stateless_uniform([num_tasks], amplitude_seed, *self.amplitude_range),
            "phase": tf.random.stateless_uniform([num_tasks], phase_seed, *self.phase_range),
            "frequency": tf.random.stateless_uniform([num_tasks], frequency_seed, *self.frequency_range),
        }

    @staticmethod
    def function(parameters: dict[str, tf.Tensor], x: tf.Tensor) -> tf.Tensor:
        """The noise-free targets of each task at inputs `x` of shape [tasks, points, 1]."""
        frequency = parameters.get("frequency")
        wx = x if frequency is None else frequency[:, None, None] * x
        return parameters["amplitude"][:, None, None] * tf.sin(wx - parameters["phase"][:, None, None])

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
        if self.noise_stddev or self.noise_scale:
            stddev = self.noise_stddev + self.noise_scale * parameters["amplitude"][:, None, None]
            y += stddev * tf.random.stateless_normal(tf.shape(y), tf.random.experimental.stateless_fold_in(seed, 4))
        k = self.num_support
        episodes = {"support_x": x[:, :k], "support_y": y[:, :k], "query_x": x[:, k:], "query_y": y[:, k:]}
        return episodes, parameters


class SineLineTasks(SineTasks):
    """PLATIPUS' ambiguous regression (Finn, Xu & Levine, 2018, Section 6.1, as the public re-implementations
    set it): each task is, with probability `line_probability`, a line y = a·x + b with slope a and intercept b
    ~ U[−3, 3], else a sine A·sin(x − φ) with A ~ U[0.1, 5] and φ ~ U[0, π]; x ~ U[−5, 5]; Gaussian observation
    noise of standard deviation 0.3 on support and query targets; 5 support points, from which a sine and a line
    are often both plausible.

    Args: as `SineTasks`, plus `slope_range`, `intercept_range` and `line_probability`.
    """

    def __init__(self, num_support: int = 5, num_query: Optional[int] = None, noise_stddev: float = 0.3,
                 slope_range: tuple[float, float] = (-3.0, 3.0), intercept_range: tuple[float, float] = (-3.0, 3.0),
                 line_probability: float = 0.5, **kwargs):
        super().__init__(num_support=num_support, num_query=num_query, noise_stddev=noise_stddev, **kwargs)
        self.slope_range = _check_range(slope_range, "slope_range")
        self.intercept_range = _check_range(intercept_range, "intercept_range")
        if not 0 <= line_probability <= 1:
            raise ValueError(f"SineLineTasks `line_probability` must lie in [0, 1]; got {line_probability!r}.")
        self.line_probability = float(line_probability)

    def sample_parameters(self, seed, num_tasks):
        """`SineTasks`' parameters, plus each task's slope, intercept and whether it is a line ("line", 0 or 1)."""
        parameters = super().sample_parameters(seed, num_tasks)
        slope_seed, intercept_seed, kind_seed = tf.unstack(
            tf.random.experimental.stateless_split(tf.random.experimental.stateless_fold_in(seed, 5), 3))
        parameters["slope"] = tf.random.stateless_uniform([num_tasks], slope_seed, *self.slope_range)
        parameters["intercept"] = tf.random.stateless_uniform([num_tasks], intercept_seed, *self.intercept_range)
        parameters["line"] = tf.cast(tf.random.stateless_uniform([num_tasks], kind_seed) < self.line_probability,
                                     tf.float32)
        return parameters

    @staticmethod
    def function(parameters, x):
        line = parameters["slope"][:, None, None] * x + parameters["intercept"][:, None, None]
        return tf.where(parameters["line"][:, None, None] > 0, line, SineTasks.function(parameters, x))
