"""MAML++'s per-step batch normalisation (Antoniou et al., ICLR 2019: BNRS and BNWB)."""

from __future__ import annotations

from typing import Optional

import keras
from keras import ops

from tfmeta import checks
from tfmeta.inner_loop import current_step
from tfmeta.layers.batch_norm import STATISTICS, moments


@keras.saving.register_keras_serializable(package="tfmeta")
class PerStepBatchNormalization(keras.layers.Layer):
    """Batch normalisation with its own moving statistics and its own scale/offset for every inner step.

    Set k (k = 0..`steps`) serves the forward passes of inner step k (`tfmeta.inner_loop.at_step`, a Python int
    or an int tensor); the last set serves the query pass after `steps` steps; later steps reuse it. Outside an
    inner loop the layer uses set `inference_step` (default: the last): `adapt(steps=k)` returns a model fixed
    at set k, the set `evaluate` scores its query with after k steps.
    Scale and offset are meta-learned per step and never adapted (`meta_only`). The batch variance is computed
    without a stop-gradient, so second-order gradients are exact. `statistics` is the test-time policy of
    `tfmeta.layers.BatchNormalization`.
    """

    meta_only = True

    def __init__(self, steps: int, statistics: str = "batch", momentum: float = 0.99, epsilon: float = 1e-3,
                 inference_step: Optional[int] = None, **kwargs):
        super().__init__(**kwargs)
        checks.integer(steps, "steps", owner="PerStepBatchNormalization")
        if statistics not in STATISTICS:
            raise ValueError(f"PerStepBatchNormalization `statistics` must be one of {STATISTICS}; "
                             f"got {statistics!r}.")
        if inference_step is not None:
            checks.integer(inference_step, "inference_step", owner="PerStepBatchNormalization")
        self.steps = steps
        self.inference_step = inference_step
        self.statistics = statistics
        self.momentum = momentum
        self.epsilon = epsilon
        self._recording = False  # set by `tfmeta.layers.freeze_batch_statistics`

    def build(self, input_shape):
        shape = (self.steps + 1, input_shape[-1])
        self.gamma = self.add_weight(shape=shape, initializer="ones", name="gamma")
        self.beta = self.add_weight(shape=shape, initializer="zeros", name="beta")
        self.moving_mean = self.add_weight(shape=shape, initializer="zeros", trainable=False, name="moving_mean")
        self.moving_variance = self.add_weight(shape=shape, initializer="ones", trainable=False,
                                               name="moving_variance")

    def call(self, inputs, training=None):
        step = current_step()
        if step is None:
            step = self.steps if self.inference_step is None else self.inference_step
        step = min(step, self.steps) if isinstance(step, int) else ops.minimum(ops.cast(step, "int32"), self.steps)
        axes = list(range(len(inputs.shape) - 1))
        inputs = ops.cast(inputs, keras.backend.result_type(inputs.dtype, "float32"))
        if training or self.statistics == "batch":
            mean, variance = moments(inputs, axes)
        else:
            mean, variance = self.moving_mean[step], self.moving_variance[step]
        if training or self._recording:  # recording: the set's moving statistics become the batch's
            row = ops.expand_dims(ops.one_hot(step, self.steps + 1, dtype=self.moving_mean.dtype), -1)
            momentum = self.momentum if training else 0.0
            for moving, batch in ((self.moving_mean, mean), (self.moving_variance, variance)):
                blended = moving * momentum + ops.cast(batch, moving.dtype) * (1 - momentum)
                moving.assign(row * blended + (1 - row) * moving)
        outputs = ops.batch_normalization(
            inputs, ops.cast(mean, inputs.dtype), ops.cast(variance, inputs.dtype), axis=-1,
            offset=ops.cast(self.beta[step], inputs.dtype), scale=ops.cast(self.gamma[step], inputs.dtype),
            epsilon=self.epsilon,
        )
        return ops.cast(outputs, self.compute_dtype)

    def get_config(self) -> dict:
        return {**super().get_config(), "steps": self.steps, "statistics": self.statistics,
                "momentum": self.momentum, "epsilon": self.epsilon, "inference_step": self.inference_step}
