"""T-Nets' meta-learned linear transformations (Lee & Choi, ICML 2018)."""

from __future__ import annotations

from typing import Optional

import keras
from keras import ops


def check_width(layer: keras.layers.Layer, argument: str, expected: Optional[int], input_shape) -> int:
    """The last input dimension of a layer that keeps its input's shape, checked against its `argument`."""
    width = input_shape[-1]
    if width is None:
        raise ValueError(f"layer '{layer.name}' needs a known last input dimension; got shape {input_shape}.")
    if expected is not None and expected != width:
        raise ValueError(
            f"layer '{layer.name}' has `{argument}`={expected} but its input has {width} channels "
            f"(shape {tuple(input_shape)}): it keeps its input's shape."
        )
    return width


@keras.saving.register_keras_serializable(package="tfmeta")
class LinearTransform(keras.layers.Layer):
    """`y = x @ T (+ b)` over the last axis (features, or channels of a feature map: a 1x1 convolution).

    T is square and, with `identity_init` (default), starts as the identity, so inserting the layer changes
    nothing until T is meta-learned. The layer is `meta_only`: the inner loop never adapts it (`Partition` keeps
    its variables slow). T-Nets insert it without bias; WarpGrad's `WarpDense` is this layer as a warp.
    """

    meta_only = True

    def __init__(self, units: Optional[int] = None, use_bias: bool = False, identity_init: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.units, self.use_bias, self.identity_init = units, use_bias, identity_init

    def build(self, input_shape):
        width = check_width(self, "units", self.units, input_shape)
        self.kernel = self.add_weight(shape=(width, width), name="kernel",
                                      initializer="identity" if self.identity_init else "glorot_uniform")
        self.bias = self.add_weight(shape=(width,), initializer="zeros", name="bias") if self.use_bias else None

    def call(self, inputs):
        outputs = ops.matmul(inputs, ops.cast(self.kernel, inputs.dtype))
        return outputs if self.bias is None else outputs + ops.cast(self.bias, inputs.dtype)

    def get_config(self):
        return {**super().get_config(), "units": self.units, "use_bias": self.use_bias,
                "identity_init": self.identity_init}


@keras.saving.register_keras_serializable(package="tfmeta")
class Offset(keras.layers.Layer):
    """`y = x + b` with a trainable vector `b` (zeros at first): makes a point in input space a model whose
    parameters are the point's displacement, e.g. for optimisation tasks on synthetic loss surfaces."""

    def build(self, input_shape):
        self.offset = self.add_weight(shape=(input_shape[-1],), initializer="zeros", name="offset")

    def call(self, inputs):
        return inputs + keras.ops.cast(self.offset, inputs.dtype)
