"""Batch normalisation with exact higher-order gradients, and the two test-time policies of meta-learning."""

from __future__ import annotations

import warnings

import keras
import tensorflow as tf
from keras import ops
from tensorflow.python.eager import record

STATISTICS = ("batch", "running")


@keras.saving.register_keras_serializable(package="tfmeta")
class BatchNormalization(keras.layers.BatchNormalization):
    """`keras.layers.BatchNormalization` whose second-order gradients are exact.

    Keras computes the batch variance with `tf.nn.moments`, which stops the gradient through the mean inside
    the variance: first derivatives stay exact, but MAML's meta-gradient (a derivative of a gradient) comes out
    wrong by a few percent. This layer computes `mean((x - mean(x))**2)` without the stop-gradient.

    statistics: what the layer normalises with at inference (`training=False`).
      "batch": the statistics of the current batch, as in the MAML paper and learn2learn (transductive: a
        query batch is normalised with its own statistics). The moving averages are still tracked in training.
      "running": the moving averages, as Keras does.
    In training (`training=True`) the layer always uses batch statistics and updates the moving averages.

    Batch statistics over the last axis in float32 run as TensorFlow's fused batch norm kernels, with the analytic
    backward formula in ordinary ops wherever the backward pass is itself differentiated (exact to any order; see
    `_fused_batch_norm`); other cases (masks, other axes or dtypes) compute the moments in separate ops as above.
    """

    def __init__(self, statistics: str = "batch", **kwargs):
        if statistics not in STATISTICS:
            raise ValueError(f"BatchNormalization `statistics` must be one of {STATISTICS}; got {statistics!r}.")
        for unsupported in ("renorm", "synchronized"):
            if kwargs.get(unsupported):
                raise ValueError(f"tfmeta BatchNormalization does not support `{unsupported}=True`.")
        super().__init__(**kwargs)
        self.statistics = statistics
        self._recording = False  # set by `freeze_batch_statistics`

    def call(self, inputs, training=None, mask=None):
        if self._recording and not training:
            mean, variance = self._moments(ops.cast(inputs, keras.backend.result_type(inputs.dtype, "float32")), mask)
            self.moving_mean.assign(ops.cast(mean, self.moving_mean.dtype))
            self.moving_variance.assign(ops.cast(variance, self.moving_variance.dtype))
        batch_statistics = self.uses_batch_statistics(training)
        if batch_statistics and self._fusable(inputs, mask):
            return self._fused_call(inputs, update=bool(training and self.trainable))
        if (training and self.trainable) or self.statistics == "running":
            return super().call(inputs, training=training, mask=mask)
        # Batch statistics at inference, leaving the moving averages untouched.
        inputs = ops.cast(inputs, keras.backend.result_type(inputs.dtype, "float32"))
        mean, variance = self._moments(inputs, mask)
        outputs = ops.batch_normalization(
            x=inputs,
            mean=mean,
            variance=variance,
            axis=self.axis,
            offset=ops.cast(self.beta, inputs.dtype) if self.center else None,
            scale=ops.cast(self.gamma, inputs.dtype) if self.scale else None,
            epsilon=self.epsilon,
        )
        return ops.cast(outputs, self.compute_dtype)

    def uses_batch_statistics(self, training) -> bool:
        """Whether a call with `training` normalises with the batch's statistics (training, or `statistics="batch"`)
        rather than the moving averages."""
        return bool((training and self.trainable) or self.statistics == "batch")

    def _fusable(self, inputs, mask) -> bool:
        rank = len(inputs.shape)
        return (
            keras.backend.backend() == "tensorflow" and mask is None and not self.renorm and rank >= 2
            and self.axis in (-1, rank - 1) and inputs.dtype == "float32"
        )

    def _fused_call(self, inputs, update: bool):
        """Normalises with the batch statistics through `FusedBatchNormV3` (channels last); with `update`, moves
        the moving averages towards them (the biased variance, as Keras does)."""
        channels = inputs.shape[-1]
        x = inputs if len(inputs.shape) == 4 else tf.reshape(inputs, [-1, 1, 1, channels])
        gamma = self.gamma if self.scale else tf.ones([channels])
        beta = self.beta if self.center else tf.zeros([channels])
        y, mean, variance = _fused_batch_norm(x, tf.convert_to_tensor(gamma), tf.convert_to_tensor(beta), self.epsilon,
                                           name=self.name)
        if update:
            count = tf.cast(tf.size(x) // channels, variance.dtype)
            # The fused op returns the unbiased variance (Bessel's correction); Keras tracks the biased one.
            self.update_moving_statistics(mean, variance * (count - 1) / count, count)
        y = y if len(inputs.shape) == 4 else tf.reshape(y, tf.shape(inputs))
        return ops.cast(y, self.compute_dtype)

    def update_moving_statistics(self, mean, variance, count) -> None:
        """Moves the moving averages towards a batch's `mean` and biased `variance` over `count` values per channel
        (the variance of a single value counts as 0), without gradient."""
        variance = tf.where(count > 1, variance, tf.zeros_like(variance))
        self.moving_mean.assign(self.moving_mean * self.momentum + tf.stop_gradient(mean) * (1.0 - self.momentum))
        self.moving_variance.assign(
            self.moving_variance * self.momentum + tf.stop_gradient(variance) * (1.0 - self.momentum))

    def _moments(self, inputs, mask):
        if mask is not None:
            return super()._moments(inputs, mask)
        return moments(inputs, self._reduction_axes)

    def get_config(self) -> dict:
        return {**super().get_config(), "statistics": self.statistics}


def _fused_batch_norm(x, gamma, beta, epsilon: float, name: str = "batch_norm"):
    """Training-mode batch norm over NHWC `x`: `(y, batch mean, unbiased batch variance)`. The backward pass's ops
    are named `<name>_grad/...`, so that profiles attribute them to the layer.

    The forward pass is TensorFlow's fused kernel. Its gradient is TensorFlow's fused backward kernel when no
    gradient tape records the backward pass (a query pass's backward, or first-order training), and the
    analytic formula in ordinary ops when one does (MAML differentiates its support passes' gradients), so
    that the second derivative is exact.

    Why not the fused backward kernel everywhere: when a support pass's gradient is differentiated again, the
    gradient at a convolution's output feeds two filter-gradient ops (the convolution's own, and the second-order
    one of its input gradient). oneDNN's graph rewrite merges a bias gradient with the first filter-gradient op it
    finds on that tensor, in no fixed order; merged with the second-order one, the graph holds a cycle
    ("N nodes in a cycle", seen in half of the runs of Meta-SGD's Omniglot test with the fused backward kernel
    under the support pass). Keeping the support pass's backward in ordinary ops keeps that graph as it was."""
    epsilon = max(epsilon, 1.001e-5)  # the fused kernel's minimum
    empty = tf.constant([], x.dtype)

    @tf.custom_gradient
    def forward(x, gamma, beta):
        y, mean, variance, *reserve = tf.raw_ops.FusedBatchNormV3(
            x=x, scale=gamma, offset=beta, mean=empty, variance=empty, epsilon=epsilon, data_format="NHWC",
            is_training=True)

        def backward(dy, dmean, dvariance):
            del dmean, dvariance  # the statistics only feed the moving averages, under a stop-gradient
            with tf.name_scope(f"{name}_grad"):
                if record.could_possibly_record():  # this backward pass is itself differentiated
                    return _batch_norm_backward(dy, x, gamma, epsilon)
                dx, dgamma, dbeta, _, _ = tf.raw_ops.FusedBatchNormGradV3(
                    y_backprop=dy, x=x, scale=gamma, reserve_space_1=reserve[0], reserve_space_2=reserve[1],
                    reserve_space_3=reserve[2], epsilon=epsilon, data_format="NHWC", is_training=True)
                return dx, dgamma, dbeta

        return (y, mean, variance), backward

    return forward(x, gamma, beta)


def _batch_norm_backward(dy, x, gamma, epsilon: float):
    """Training-mode batch norm's (dx, dgamma, dbeta) over NHWC `x`, in differentiable ops: few passes over the
    maps (each a memory-bound op, and more in its derivative), with the normalised input never formed."""
    axes = [0, 1, 2]
    count = tf.cast(tf.size(dy) // tf.shape(dy)[-1], dy.dtype)
    centred = x - tf.reduce_mean(x, axes)
    inverse_std = tf.math.rsqrt(tf.reduce_mean(tf.square(centred), axes) + epsilon)
    dbeta = tf.reduce_sum(dy, axes)
    dgamma = tf.reduce_sum(dy * centred, axes) * inverse_std
    scale = gamma * inverse_std
    return scale * dy - (scale * inverse_std * dgamma / count) * centred - scale * dbeta / count, dgamma, dbeta


def moments(inputs, axes):
    """The batch mean and (biased) variance over `axes`, as separate ops: their second-order gradients are exact,
    unlike `tf.nn.moments`' (see `BatchNormalization`)."""
    mean = ops.mean(inputs, axis=axes, keepdims=True)
    variance = ops.mean(ops.square(inputs - mean), axis=axes)
    return ops.squeeze(mean, axis=axes), variance


def batch_statistics_layers(model: keras.Layer) -> list[keras.Layer]:
    """The layers of `model` that normalise with the statistics of the current batch at inference
    (`statistics="batch"`): their outputs for an example depend on the other examples of its batch."""
    return [layer for layer in model._flatten_layers(include_self=True)
            if getattr(layer, "statistics", None) == "batch"]


def freeze_batch_statistics(model: keras.Model, x) -> None:
    """Fixes the batch-statistics layers of `model` (`batch_statistics_layers`) to the statistics of the batch `x`:
    their moving averages become the statistics each layer normalises `x` with at inference (each after the
    layers before it normalised with theirs), and they switch to `statistics="running"`, so that `model` then
    predicts every example alone, as it predicts it among `x`'s examples."""
    layers = batch_statistics_layers(model)
    for layer in layers:
        layer._recording = True
    try:
        model(x, training=False)
    finally:
        for layer in layers:
            layer._recording = False
    for layer in layers:
        layer.statistics = "running"


def inexact_batch_norms(model: keras.Layer) -> list[keras.Layer]:
    """The layers of `model` that are Keras' own BatchNormalization (inexact second-order gradients)."""
    return [
        layer
        for layer in model._flatten_layers(include_self=True)  # every nested layer, also in subclassed models
        if isinstance(layer, keras.layers.BatchNormalization) and not isinstance(layer, BatchNormalization)
    ]


def warn_inexact_batch_norm(model: keras.Layer) -> None:
    """Warns if second-order meta-gradients through `model` would be wrong because of Keras' BatchNormalization."""
    names = ", ".join(layer.name for layer in inexact_batch_norms(model))
    if names:
        warnings.warn(
            f"Learner '{model.name}' uses keras.layers.BatchNormalization ({names}), "
            "whose second-order gradients are inexact on the TensorFlow backend (a stop-gradient inside "
            "tf.nn.moments): second-order meta-gradients will be off by a few percent. Build the learner with "
            "tfmeta.layers.BatchNormalization, or convert it with tfmeta.layers.exact_batch_norm(learner).",
            stacklevel=3,
        )


def exact_batch_norm(model: keras.Model) -> keras.Model:
    """A copy of a functional or Sequential `model`, with the same weights, whose Keras BatchNormalization layers
    are replaced by tfmeta's (with `statistics="running"`, so that inference behaves as before)."""

    def clone(layer):
        config = layer.get_config()
        if isinstance(layer, keras.layers.BatchNormalization) and not isinstance(layer, BatchNormalization):
            return BatchNormalization.from_config({**config, "statistics": "running"})
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=clone, recursive=True)
    copy.set_weights(model.get_weights())
    return copy
