"""Learner backbones used in the meta-learning literature, as ordinary Keras models."""

from __future__ import annotations

from typing import Optional, Sequence

import keras

from tfmeta.layers import BatchNormalization, LinearTransform, PerStepBatchNormalization

POOLINGS = {"max": keras.layers.MaxPooling2D, "average": keras.layers.AveragePooling2D}


def mlp(
    input_shape: Sequence[int] = (1,),
    hidden_units: Sequence[int] = (40, 40),
    outputs: int = 1,
    activation: str = "relu",
    transforms: bool = False,
    dtype: Optional[str] = None,
    name: str = "mlp",
) -> keras.Model:
    """A fully connected network; the defaults are the MAML paper's sine-regression learner (1-40-40-1, ReLU).

    `transforms=True` makes it a T-Net: a meta-learned `LinearTransform` after every dense layer (before its
    activation), named `transform_<layer>`.
    """
    inputs = keras.Input(tuple(input_shape), dtype=dtype)
    x = inputs
    layers = [(f"hidden_{i}", units, activation) for i, units in enumerate(hidden_units)] + [("head", outputs, None)]
    for layer_name, units, layer_activation in layers:
        x = keras.layers.Dense(units, activation=None if transforms else layer_activation, dtype=dtype,
                               name=layer_name)(x)
        if transforms:
            x = LinearTransform(dtype=dtype, name=f"transform_{layer_name}")(x)
            if layer_activation is not None:
                x = keras.layers.Activation(layer_activation, dtype=dtype)(x)
    return keras.Model(inputs, x, name=name)


def conv_net(
    input_shape: Sequence[int] = (28, 28, 1),
    outputs: int = 5,
    filters: int = 64,
    blocks: int = 4,
    activation: str = "relu",
    pooling: Optional[str] = "max",
    batch_norm: bool = True,
    batch_norm_statistics: str = "batch",
    per_step_batch_norm: Optional[int] = None,
    transforms: bool = False,
    dtype: Optional[str] = None,
    name: str = "conv4",
) -> keras.Model:
    """The few-shot "conv4" family: `blocks` x [3x3 conv, BatchNorm, activation, 2x2 pooling], flatten, dense.

    Batch norm is tfmeta's (exact second-order gradients); `batch_norm_statistics` is its test-time policy
    ("batch": MAML paper, "running": moving averages); `per_step_batch_norm=K` uses MAML++'s per-step batch
    norm for K inner steps instead. `transforms=True` adds T-Nets' `LinearTransform` (a meta-learned 1x1
    convolution) after every convolution. `pooling=None` keeps the spatial size.
    """
    if pooling is not None and pooling not in POOLINGS:
        raise ValueError(f"conv_net `pooling` must be None or one of {sorted(POOLINGS)}; got {pooling!r}.")
    inputs = keras.Input(tuple(input_shape), dtype=dtype)
    x = inputs
    for i in range(blocks):
        x = keras.layers.Conv2D(filters, 3, padding="same", dtype=dtype, name=f"conv_{i}")(x)
        if transforms:
            x = LinearTransform(dtype=dtype, name=f"transform_conv_{i}")(x)
        if per_step_batch_norm is not None:
            x = PerStepBatchNormalization(per_step_batch_norm, statistics=batch_norm_statistics, dtype=dtype,
                                          name=f"norm_{i}")(x)
        elif batch_norm:
            x = BatchNormalization(statistics=batch_norm_statistics, dtype=dtype, name=f"norm_{i}")(x)
        x = keras.layers.Activation(activation, dtype=dtype, name=f"act_{i}")(x)
        if pooling is not None:
            x = POOLINGS[pooling](2, dtype=dtype, name=f"pool_{i}")(x)
    x = keras.layers.Flatten(dtype=dtype)(x)
    return keras.Model(inputs, keras.layers.Dense(outputs, dtype=dtype, name="head")(x), name=name)
