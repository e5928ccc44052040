"""T-Nets' meta-learned linear transformations (Lee & Choi, ICML 2018)."""

from __future__ import annotations

import keras


@keras.saving.register_keras_serializable(package="tfmeta")
class LinearTransform(keras.layers.Layer):
    """`y = x @ T` over the last axis (features, or channels of a feature map: a 1x1 convolution).

    T is square and identity-initialised, so inserting the layer changes nothing until T is meta-learned.
    The layer is `meta_only`: the inner loop never adapts it (`Partition` keeps its variables slow).
    """

    meta_only = True

    def build(self, input_shape):
        units = input_shape[-1]
        self.kernel = self.add_weight(shape=(units, units), initializer="identity", name="kernel")

    def call(self, inputs):
        return keras.ops.matmul(inputs, keras.ops.cast(self.kernel, inputs.dtype))


@keras.saving.register_keras_serializable(package="tfmeta")
class Offset(keras.layers.Layer):
    """`y = x + b` with a trainable vector `b` (zeros at first): makes a point in input space a model whose
    parameters are the point's displacement, e.g. for optimisation tasks on synthetic loss surfaces."""

    def build(self, input_shape):
        self.offset = self.add_weight(shape=(input_shape[-1],), initializer="zeros", name="offset")

    def call(self, inputs):
        return inputs + keras.ops.cast(self.offset, inputs.dtype)
