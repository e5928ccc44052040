"""Distributions of optimisation problems: what a learned optimizer is meta-trained and evaluated on. A problem is
its constants (drawn from a seed), its initial parameters and its loss; minibatches, where there are any, are
drawn from a per-step seed, so that a trajectory is a function of its seeds."""

from __future__ import annotations

import tensorflow as tf

from tfmeta import checks
from tfmeta.registry import register

DISTRIBUTIONS = ("uniform", "normal")


class OptimizationProblems:
    """The interface: `constants(seed)`, `initial_params(constants, seed)` and `loss(params, constants, seed)`."""

    def constants(self, seed: tf.Tensor) -> dict[str, tf.Tensor]:
        """The constants of one problem (e.g. W and y), drawn from a stateless `seed`."""
        raise NotImplementedError

    def initial_params(self, constants: dict, seed: tf.Tensor) -> list[tf.Tensor]:
        """The optimizee's initial parameters."""
        raise NotImplementedError

    def loss(self, params: list, constants: dict, seed: tf.Tensor) -> tf.Tensor:
        """The scalar loss at `params` (on the minibatch that `seed` draws, for stochastic problems)."""
        raise NotImplementedError


@register
class Quadratics(OptimizationProblems):
    """`num_problems` independent quadratics f(θ) = ‖Wθ − y‖² optimised together, as one optimizee whose loss is
    their mean (deepmind/learning-to-learn `problems.quadratic`: 128 problems of 10 dimensions; W and y ~ U[0, 1),
    θ₀ ~ N(0, 0.01²)). `distribution="normal"` draws W and y from N(0, 1) instead, as the paper's text is
    reported to ("IID Gaussian"). `dtype`: of the constants and parameters."""

    def __init__(self, num_problems: int = 128, dims: int = 10, distribution: str = "uniform",
                 initial_stddev: float = 0.01, dtype: str = "float32"):
        self.num_problems = checks.integer(num_problems, "num_problems", minimum=1, owner="Quadratics")
        self.dims = checks.integer(dims, "dims", minimum=1, owner="Quadratics")
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"Quadratics `distribution` must be one of {DISTRIBUTIONS}; got {distribution!r}.")
        self.distribution = distribution
        self.initial_stddev = checks.number(initial_stddev, "initial_stddev", owner="Quadratics")
        self.dtype = tf.as_dtype(dtype).name

    def constants(self, seed):
        w_seed, y_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        draw = tf.random.stateless_uniform if self.distribution == "uniform" else tf.random.stateless_normal
        return {"w": draw([self.num_problems, self.dims, self.dims], w_seed, dtype=self.dtype),
                "y": draw([self.num_problems, self.dims], y_seed, dtype=self.dtype)}

    def initial_params(self, constants, seed):
        shape = [self.num_problems, self.dims]
        return [self.initial_stddev * tf.random.stateless_normal(shape, seed, dtype=self.dtype)]

    def get_config(self) -> dict:
        return {"num_problems": self.num_problems, "dims": self.dims, "distribution": self.distribution,
                "initial_stddev": self.initial_stddev, "dtype": self.dtype}

    def loss(self, params, constants, seed):
        residual = tf.linalg.matvec(constants["w"], params[0]) - constants["y"]
        return tf.reduce_mean(tf.reduce_sum(tf.square(residual), axis=-1))
