"""Learner backbones used in the meta-learning literature, as ordinary Keras models."""

from __future__ import annotations

from typing import Optional, Sequence

import keras
import tensorflow as tf

from tfmeta import kernels
from tfmeta.kernels import conv_block, norm_pool
from tfmeta.layers import BatchNormalization, LinearTransform, Offset, PerStepBatchNormalization

POOLINGS = {"max": keras.layers.MaxPooling2D, "average": keras.layers.AveragePooling2D}


def mlp(
    input_shape: Sequence[int] = (1,),
    hidden_units: Sequence[int] = (40, 40),
    outputs: int = 1,
    activation: str = "relu",
    batch_norm: bool = False,
    transforms: bool = False,
    dtype: Optional[str] = None,
    name: str = "mlp",
) -> keras.Model:
    """A fully connected network; the defaults are the MAML paper's sine-regression learner (1-40-40-1, ReLU).

    Inputs of higher rank (images) are flattened first. `batch_norm=True` puts tfmeta's batch norm after every
    hidden layer, as in the MAML paper's fully connected Omniglot learner (`hidden_units=(256, 128, 64, 64)`).

    `transforms=True` makes it a T-Net: a meta-learned `LinearTransform` after every dense layer (before its
    activation), named `transform_<layer>`.
    """
    inputs = keras.Input(tuple(input_shape), dtype=dtype)
    x = keras.layers.Flatten(dtype=dtype)(inputs) if len(input_shape) > 1 else inputs
    layers = [(f"hidden_{i}", units, activation) for i, units in enumerate(hidden_units)] + [("head", outputs, None)]
    for layer_name, units, layer_activation in layers:
        separate = transforms or (batch_norm and layer_activation is not None)
        x = keras.layers.Dense(units, activation=None if separate else layer_activation, dtype=dtype,
                               name=layer_name)(x)
        if transforms:
            x = LinearTransform(dtype=dtype, name=f"transform_{layer_name}")(x)
        if batch_norm and layer_activation is not None:
            x = BatchNormalization(dtype=dtype, name=f"norm_{layer_name}")(x)
        if separate and layer_activation is not None:
            x = keras.layers.Activation(layer_activation, dtype=dtype)(x)
    return keras.Model(inputs, x, name=name)


@keras.saving.register_keras_serializable(package="tfmeta")
class ConvNet(keras.Model):
    """`conv_net`'s functional model: the same layers and weights as `keras.Model(inputs, outputs)`, except that
    where its batch norms use the batch's statistics and tfmeta's kernels may run (`tfmeta.kernels.usable`: no XLA,
    no GPU, not in a SavedModel export), its first block runs as one fused CPU kernel on inputs with few channels
    (`tfmeta.kernels.conv_block`), and the other blocks' batch norm, ReLU and max pooling run as kernels, forward and
    backward (`tfmeta.kernels.norm_pool`). The results agree with the layers' to float rounding."""

    def call(self, inputs, training=None, mask=None):
        layers = [layer for layer in self.layers if not isinstance(layer, keras.layers.InputLayer)]
        # Inputs of another rank or shape go to Keras, which adapts or rejects them as for any functional model.
        fits = getattr(inputs, "dtype", None) == "float32" and tf.TensorShape(self.inputs[0].shape).is_compatible_with(
            getattr(inputs, "shape", None))
        ops = kernels.usable() if mask is None and fits and self._is_chain(layers) else None
        if ops is None:
            return super().call(inputs, training=training, mask=mask)
        block = conv_block.fusable_layers(layers)
        x, i = inputs, 0
        if block is not None and self._batch_statistics(block[1], training):
            x, i = conv_block.call_block(ops, inputs, *block, training=bool(training)), 4
        while i < len(layers):
            if norm_pool.fusable(layers[i:]) and self._batch_statistics(layers[i], training):
                x, i = norm_pool.call_norm_pool(ops, x, layers[i], training=bool(training)), i + 3
            else:
                x, i = layers[i](x, training=training), i + 1
        return x

    @staticmethod
    def _batch_statistics(norm: BatchNormalization, training) -> bool:
        """Whether `norm` normalises with the batch's statistics in this call, as the kernels do (and is not
        recording them as its moving averages: `freeze_batch_statistics`)."""
        return norm.uses_batch_statistics(training) and not norm._recording

    def _is_chain(self, layers: list) -> bool:
        """Whether the model is one chain of `layers` (as `conv_net` builds it), which `call` can run in order."""
        tensors = [self.inputs[0], *(layer.output for layer in layers)]
        return len(self.inputs) == 1 and tensors[-1] is self.outputs[0] and all(
            len(layer._inbound_nodes) == 1 and layer.input is previous for layer, previous in zip(layers, tensors))


def conv_net(
    input_shape: Sequence[int] = (28, 28, 1),
    outputs: Optional[int] = 5,
    filters: int = 64,
    blocks: int = 4,
    activation: str = "relu",
    pooling: Optional[str] = "max",
    pooled_blocks: Optional[int] = None,
    global_pool: bool = False,
    batch_norm: bool = True,
    batch_norm_statistics: str = "batch",
    batch_norm_momentum: float = 0.99,
    per_step_batch_norm: Optional[int] = None,
    transforms: bool = False,
    dtype: Optional[str] = None,
    name: str = "conv4",
) -> keras.Model:
    """The few-shot "conv4" family: `blocks` x [3x3 conv, BatchNorm, activation, 2x2 pooling], flatten, dense.

    `pooling` is "max" (the standard conv4, e.g. `filters=32` for 84x84 inputs), "average", "stride" (stride-2
    convolutions instead of pooling: the MAML paper's Omniglot network) or None. Only the first
    `pooled_blocks` blocks pool (default: all; Relation Networks pool 2 of 4). `outputs=None` ends at the
    feature maps (an embedding for metric learners) instead of a dense layer of `outputs` logits.
    `global_pool=True` averages the last feature maps over space before the head (the MAML code's Omniglot
    network) instead of flattening them.

    Batch norm is tfmeta's (exact second-order gradients); `batch_norm_statistics` is its test-time policy
    ("batch": MAML paper, "running": moving averages); `per_step_batch_norm=K` uses MAML++'s per-step batch
    norm for K inner steps instead. `batch_norm_momentum` of the moving averages: Keras' 0.99, or 0.9 for
    PyTorch's default (0.1 in its convention), which the metric learners' reference code uses.
    `transforms=True` adds T-Nets' `LinearTransform` (a meta-learned 1x1 convolution) after every convolution.

    The model is a `ConvNet`: on images of 1-4 channels in float32, with ReLU and max pooling, its first block runs as
    one fused CPU kernel (3x faster on Omniglot's query passes; `tfmeta.kernels`).
    """
    if pooling is not None and pooling not in (*POOLINGS, "stride"):
        raise ValueError(f"conv_net `pooling` must be None, 'stride' or one of {sorted(POOLINGS)}; got {pooling!r}.")
    pooled_blocks = blocks if pooled_blocks is None else pooled_blocks
    inputs = keras.Input(tuple(input_shape), dtype=dtype)
    x = inputs
    for i in range(blocks):
        strides = 2 if pooling == "stride" and i < pooled_blocks else 1
        x = keras.layers.Conv2D(filters, 3, strides=strides, padding="same", dtype=dtype, name=f"conv_{i}")(x)
        if transforms:
            x = LinearTransform(dtype=dtype, name=f"transform_conv_{i}")(x)
        if per_step_batch_norm is not None:
            x = PerStepBatchNormalization(per_step_batch_norm, statistics=batch_norm_statistics,
                                          momentum=batch_norm_momentum, dtype=dtype, name=f"norm_{i}")(x)
        elif batch_norm:
            x = BatchNormalization(statistics=batch_norm_statistics, momentum=batch_norm_momentum, dtype=dtype,
                                   name=f"norm_{i}")(x)
        x = keras.layers.Activation(activation, dtype=dtype, name=f"act_{i}")(x)
        if pooling in POOLINGS and i < pooled_blocks:
            x = POOLINGS[pooling](2, dtype=dtype, name=f"pool_{i}")(x)
    if global_pool:
        x = keras.layers.GlobalAveragePooling2D(dtype=dtype)(x)
    if outputs is None:
        return ConvNet(inputs, x, name=name)
    x = keras.layers.Flatten(dtype=dtype)(x)
    return ConvNet(inputs, keras.layers.Dense(outputs, dtype=dtype, name="head")(x), name=name)


def point_model(dimensions: int = 2, warp: Optional[keras.layers.Layer] = None, dtype: Optional[str] = None,
                name: str = "point") -> keras.Model:
    """A point in input space as a learner: fed the start x0, it returns `x0 + b` with trainable `b` (the layer
    "offset", zero at first), so gradient descent on its parameters moves the point (e.g. on
    `tfmeta.tasks.SurfaceTasks`).

    With a `warp` layer ω (meta-only), it returns `x0 + ω(x0 + b) − ω(x0)`: gradient descent on `b` is then
    warped by ω's Jacobian at the current point, while every task still starts at x0 (ω cannot move the start).
    """
    inputs = keras.Input((dimensions,), dtype=dtype)
    point = Offset(dtype=dtype, name="offset")(inputs)
    if warp is not None:
        point = keras.layers.Add(dtype=dtype)([inputs, keras.layers.Subtract(dtype=dtype)([warp(point), warp(inputs)])])
    return keras.Model(inputs, point, name=name)
