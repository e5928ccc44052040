"""MAML++'s per-step batch normalisation (Antoniou et al., ICLR 2019: BNRS and BNWB)."""

from __future__ import annotations

import keras
from keras import ops

from tfmeta.inner_loop import current_step
from tfmeta.layers.batch_norm import STATISTICS


@keras.saving.register_keras_serializable(package="tfmeta")
class PerStepBatchNormalization(keras.layers.Layer):
    """Batch normalisation with its own moving statistics and its own scale/offset for every inner step.

    Set k (k = 0..`steps`) serves the forward passes of inner step k (`tfmeta.inner_loop.at_step`); the last
    set serves the query pass after `steps` steps and inference outside an inner loop; later steps reuse it.
    Scale and offset are meta-learned per step and never adapted (`meta_only`). The batch variance is computed
    without a stop-gradient, so second-order gradients are exact. `statistics` is the test-time policy of
    `tfmeta.layers.BatchNormalization`.
    """

    meta_only = True

    def __init__(self, steps: int, statistics: str = "batch", momentum: float = 0.99, epsilon: float = 1e-3,
                 **kwargs):
        super().__init__(**kwargs)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"PerStepBatchNormalization `steps` must be a non-negative integer; got {steps!r}.")
        if statistics not in STATISTICS:
            raise ValueError(f"PerStepBatchNormalization `statistics` must be one of {STATISTICS}; "
                             f"got {statistics!r}.")
        self.steps = steps
        self.statistics = statistics
        self.momentum = momentum
        self.epsilon = epsilon

    def build(self, input_shape):
        shape = (self.steps + 1, input_shape[-1])
        self.gamma = self.add_weight(shape=shape, initializer="ones", name="gamma")
        self.beta = self.add_weight(shape=shape, initializer="zeros", name="beta")
        self.moving_mean = self.add_weight(shape=shape, initializer="zeros", trainable=False, name="moving_mean")
        self.moving_variance = self.add_weight(shape=shape, initializer="ones", trainable=False,
                                               name="moving_variance")

    def call(self, inputs, training=None):
        step = current_step()
        step = self.steps if step is None else min(step, self.steps)
        axes = list(range(len(inputs.shape) - 1))
        inputs = ops.cast(inputs, keras.backend.result_type(inputs.dtype, "float32"))
        if training or self.statistics == "batch":
            mean = ops.mean(inputs, axis=axes, keepdims=True)
            variance = ops.mean(ops.square(inputs - mean), axis=axes)
            mean = ops.squeeze(mean, axis=axes)
        else:
            mean, variance = self.moving_mean[step], self.moving_variance[step]
        if training:
            row = ops.expand_dims(ops.one_hot(step, self.steps + 1, dtype=self.moving_mean.dtype), -1)
            for moving, batch in ((self.moving_mean, mean), (self.moving_variance, variance)):
                blended = moving * self.momentum + ops.cast(batch, moving.dtype) * (1 - self.momentum)
                moving.assign(row * blended + (1 - row) * moving)
        outputs = ops.batch_normalization(
            inputs, ops.cast(mean, inputs.dtype), ops.cast(variance, inputs.dtype), axis=-1,
            offset=ops.cast(self.beta[step], inputs.dtype), scale=ops.cast(self.gamma[step], inputs.dtype),
            epsilon=self.epsilon,
        )
        return ops.cast(outputs, self.compute_dtype)

    def get_config(self) -> dict:
        return {**super().get_config(), "steps": self.steps, "statistics": self.statistics,
                "momentum": self.momentum, "epsilon": self.epsilon}
