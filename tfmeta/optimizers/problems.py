"""Distributions of optimisation problems: what a learned optimizer is meta-trained and evaluated on. A problem is
its constants (drawn from a seed), its initial parameters and its loss; minibatches, where there are any, are
drawn from a per-step seed, so that a trajectory is a function of its seeds."""

from __future__ import annotations

import gin
import tensorflow as tf

from tfmeta import checks

DISTRIBUTIONS = ("uniform", "normal")


class OptimizationProblems:
    """The interface: `constants(seed)`, `initial_params(constants, seed)` and `loss(params, constants, seed)`;
    `problem_losses` where the optimizee is several independent problems optimised together."""

    def constants(self, seed: tf.Tensor) -> dict[str, tf.Tensor]:
        """The constants of one problem (e.g. W and y), drawn from a stateless `seed`."""
        raise NotImplementedError

    def initial_params(self, constants: dict, seed: tf.Tensor) -> list[tf.Tensor]:
        """The optimizee's initial parameters."""
        raise NotImplementedError

    def loss(self, params: list, constants: dict, seed: tf.Tensor) -> tf.Tensor:
        """The scalar loss at `params` (on the minibatch that `seed` draws, for stochastic problems)."""
        raise NotImplementedError

    def problem_losses(self, params: list, constants: dict, seed: tf.Tensor) -> tf.Tensor:
        """The losses [P] of the P independent problems the optimizee holds, whose mean is `loss`; when P > 1, every
        parameter's leading axis is the problem's. `tfmeta.optimizers.PolicyTraining` credits each problem's steps
        with its own losses. Default: the loss alone (P = 1)."""
        return self.loss(params, constants, seed)[None]


@gin.register(module="tfmeta")  # (gin only: problems are not Keras objects)
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

    def loss(self, params, constants, seed):
        return tf.reduce_mean(self.problem_losses(params, constants, seed))

    def problem_losses(self, params, constants, seed):
        residual = tf.linalg.matvec(constants["w"], params[0]) - constants["y"]
        return tf.reduce_sum(tf.square(residual), axis=-1)


ACTIVATIONS = ("sigmoid", "relu")


class _MnistProblems(OptimizationProblems):
    """What the MNIST problems share: the images of `split` (`tfmeta.data.mnist.mnist5k`'s fixed split, or
    `source="tfds"` for the full MNIST's "train"/"test"), minibatches of `batch_size` drawn uniformly with
    replacement from the step's seed, and the mean cross-entropy of `logits(params, images)`. A problem is one
    initialisation of the network."""

    def __init__(self, batch_size: int, split: str, source: str, initial_stddev: float):
        from tfmeta.data import mnist

        owner = type(self).__name__
        self.split, self.source = split, source
        self.batch_size = checks.integer(batch_size, "batch_size", minimum=1, owner=owner)
        self.initial_stddev = checks.number(initial_stddev, "initial_stddev", owner=owner)
        images, labels = mnist.mnist5k(split) if source == "mnist5k" else mnist.tfds_mnist(split)
        self.images, self.labels = tf.constant(images), tf.constant(labels)

    def constants(self, seed):
        return {}

    def logits(self, params: list, images: tf.Tensor) -> tf.Tensor:
        raise NotImplementedError

    def loss(self, params, constants, seed):
        index = tf.random.stateless_uniform([self.batch_size], seed, 0, tf.shape(self.labels, tf.int64)[0], tf.int64)
        logits = self.logits(params, tf.gather(self.images, index))
        return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(tf.gather(self.labels, index), logits))


def _normal_params(shapes: list, seed: tf.Tensor, stddevs: list) -> list[tf.Tensor]:
    seeds = tf.random.experimental.stateless_split(seed, len(shapes))
    return [stddev * tf.random.stateless_normal(s, seeds[i]) for i, (s, stddev) in enumerate(zip(shapes, stddevs))]


@gin.register(module="tfmeta")  # (gin only: problems are not Keras objects)
class MnistMLP(_MnistProblems):
    """An MLP classifier of MNIST digits trained on minibatches (deepmind/learning-to-learn `problems.mnist`: one
    hidden layer of 20 sigmoid units, weights and biases ~ N(0, 0.01²), minibatches of 128, mean cross-entropy).
    `hidden_units` and `activation` give the paper's generalisation tests (40 units, two layers, ReLU)."""

    def __init__(self, hidden_units=(20,), activation: str = "sigmoid", batch_size: int = 128, split: str = "train",
                 source: str = "mnist5k", initial_stddev: float = 0.01):
        self.hidden_units = [checks.integer(u, "hidden_units", minimum=1, owner="MnistMLP") for u in hidden_units]
        if activation not in ACTIVATIONS:
            raise ValueError(f"MnistMLP `activation` must be one of {ACTIVATIONS}; got {activation!r}.")
        self.activation = activation
        super().__init__(batch_size, split, source, initial_stddev)

    def initial_params(self, constants, seed):
        sizes = [784, *self.hidden_units, 10]
        shapes = [s for fan_in, fan_out in zip(sizes[:-1], sizes[1:]) for s in ([fan_in, fan_out], [fan_out])]
        return _normal_params(shapes, seed, [self.initial_stddev] * len(shapes))

    def logits(self, params, images):
        activation = tf.sigmoid if self.activation == "sigmoid" else tf.nn.relu
        x = images
        for i in range(0, len(params) - 2, 2):
            x = activation(x @ params[i] + params[i + 1])
        return x @ params[-2] + params[-1]


@gin.register(module="tfmeta")  # (gin only: problems are not Keras objects)
class MnistConv(_MnistProblems):
    """A small convolutional classifier of MNIST digits on minibatches: 3×3 convolutions of `channels` (each ReLU,
    then 2×2 max-pooling), then a linear layer to the 10 classes; minibatches of 128, mean cross-entropy. The
    kernels start from N(0, 2/fan_in) (He) and the biases at 0, since N(0, 0.01²) leaves a conv net with nothing to
    learn from at its start. With `CoordinatewiseLSTM(groups="by_rank")`, its convolution kernels, the dense
    kernel and the biases each get their own network, as the reference code's conv/fc nets on CIFAR."""

    def __init__(self, channels=(16, 16), batch_size: int = 128, split: str = "train", source: str = "mnist5k"):
        self.channels = [checks.integer(c, "channels", minimum=1, owner="MnistConv") for c in channels]
        if not self.channels:
            raise ValueError("MnistConv needs at least one convolution in `channels`.")
        super().__init__(batch_size, split, source, initial_stddev=0.0)

    def initial_params(self, constants, seed):
        shapes, stddevs = [], []
        for fan_in, fan_out in zip([1, *self.channels[:-1]], self.channels):
            shapes += [[3, 3, fan_in, fan_out], [fan_out]]
            stddevs += [(2.0 / (9 * fan_in)) ** 0.5, 0.0]
        side = 28
        for _ in self.channels:
            side = (side + 1) // 2  # 2×2 max-pooling with "SAME" padding
        features = side * side * self.channels[-1]
        return _normal_params(shapes + [[features, 10], [10]], seed, stddevs + [(1.0 / features) ** 0.5, 0.0])

    def logits(self, params, images):
        x = tf.reshape(images, [-1, 28, 28, 1])
        for i in range(0, len(params) - 2, 2):
            x = tf.nn.relu(tf.nn.conv2d(x, params[i], 1, "SAME") + params[i + 1])
            x = tf.nn.max_pool2d(x, 2, 2, "SAME")
        return tf.reshape(x, [tf.shape(x)[0], -1]) @ params[-2] + params[-1]
