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


ACTIVATIONS = ("sigmoid", "relu")


@register
class MnistMLP(OptimizationProblems):
    """An MLP classifier of MNIST digits trained on minibatches (deepmind/learning-to-learn `problems.mnist`: one
    hidden layer of 20 sigmoid units, weights and biases ~ N(0, 0.01²), minibatches of 128 drawn uniformly with
    replacement, mean cross-entropy). A problem is one initialisation of the network; its minibatches come from the
    step's seed. `split` picks the images (`tfmeta.data.mnist.mnist5k`'s fixed split, or `source="tfds"` for the
    full MNIST's "train"/"test"); `hidden_units` and `activation` give the paper's generalisation tests (40 units,
    two layers, ReLU)."""

    def __init__(self, hidden_units=(20,), activation: str = "sigmoid", batch_size: int = 128, split: str = "train",
                 source: str = "mnist5k", initial_stddev: float = 0.01):
        from tfmeta.data import mnist

        self.hidden_units = [checks.integer(u, "hidden_units", minimum=1, owner="MnistMLP") for u in hidden_units]
        if activation not in ACTIVATIONS:
            raise ValueError(f"MnistMLP `activation` must be one of {ACTIVATIONS}; got {activation!r}.")
        self.activation, self.split, self.source = activation, split, source
        self.batch_size = checks.integer(batch_size, "batch_size", minimum=1, owner="MnistMLP")
        self.initial_stddev = checks.number(initial_stddev, "initial_stddev", owner="MnistMLP")
        images, labels = mnist.mnist5k(split) if source == "mnist5k" else mnist.tfds_mnist(split)
        self.images, self.labels = tf.constant(images), tf.constant(labels)

    def constants(self, seed):
        return {}

    def initial_params(self, constants, seed):
        sizes = [784, *self.hidden_units, 10]
        shapes = [s for fan_in, fan_out in zip(sizes[:-1], sizes[1:]) for s in ([fan_in, fan_out], [fan_out])]
        seeds = tf.random.experimental.stateless_split(seed, len(shapes))
        return [self.initial_stddev * tf.random.stateless_normal(s, seeds[i]) for i, s in enumerate(shapes)]

    def loss(self, params, constants, seed):
        index = tf.random.stateless_uniform([self.batch_size], seed, 0, tf.shape(self.labels, tf.int64)[0], tf.int64)
        x, labels = tf.gather(self.images, index), tf.gather(self.labels, index)
        activation = tf.sigmoid if self.activation == "sigmoid" else tf.nn.relu
        for i in range(0, len(params) - 2, 2):
            x = activation(x @ params[i] + params[i + 1])
        logits = x @ params[-2] + params[-1]
        return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))

    def get_config(self) -> dict:
        return {"hidden_units": self.hidden_units, "activation": self.activation, "batch_size": self.batch_size,
                "split": self.split, "source": self.source, "initial_stddev": self.initial_stddev}
