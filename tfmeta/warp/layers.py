"""Warp layers (Flennerhag et al., ICLR 2020): meta-learned layers interleaved with a learner's task layers.

A warp layer's variables are "slow": `meta_only = True` makes `tfmeta.Partition` keep them out of every inner
loop, so adaptation changes only the task layers while the warps precondition their gradients. Warps keep the
shape of their input (they can be inserted anywhere); a warp given an explicit width that differs from its
input's raises an error naming both.
"""

from __future__ import annotations

from typing import Optional

import keras
from keras import ops

from tfmeta.layers import BatchNormalization, LinearTransform
from tfmeta.layers.transforms import check_width


def _identity_conv(shape, dtype=None):
    """A convolution kernel that maps its input to itself under "same" padding: the identity on the tap at
    (size - 1) // 2, the centre for odd sizes (for even sizes "same" pads one more after than before)."""
    rows, cols, channels, _ = shape
    return ops.pad(ops.eye(channels, dtype=dtype)[None, None], [[(rows - 1) // 2, rows // 2],
                                                                 [(cols - 1) // 2, cols // 2], [0, 0], [0, 0]])


class WarpLayer(keras.layers.Layer):
    """Base of warp layers: meta-learned only, never adapted in an inner loop."""

    meta_only = True


@keras.saving.register_keras_serializable(package="tfmeta")
class WarpDense(LinearTransform, WarpLayer):
    """A linear warp over the last axis, `y = x @ W (+ b)`: `tfmeta.layers.LinearTransform` as a warp layer; with
    `identity_init` it starts as the identity."""


@keras.saving.register_keras_serializable(package="tfmeta")
class WarpConv2D(WarpLayer):
    """A linear convolutional warp (3x3 as in the paper's Omniglot and miniImageNet models, or 1x1), stride 1,
    "same" padding; `identity_init` starts it as the identity."""

    def __init__(self, kernel_size: int = 3, filters: Optional[int] = None, use_bias: bool = False,
                 identity_init: bool = True, **kwargs):
        super().__init__(**kwargs)
        if kernel_size < 1:
            raise ValueError(f"WarpConv2D `kernel_size` must be >= 1; got {kernel_size}.")
        self.kernel_size, self.filters = kernel_size, filters
        self.use_bias, self.identity_init = use_bias, identity_init

    def build(self, input_shape):
        if len(input_shape) != 4:
            raise ValueError(f"WarpConv2D '{self.name}' needs feature maps [batch, height, width, channels]; got "
                             f"input shape {tuple(input_shape)}.")
        channels = check_width(self, "filters", self.filters, input_shape)
        self.kernel = self.add_weight(
            shape=(self.kernel_size, self.kernel_size, channels, channels), name="kernel",
            initializer=_identity_conv if self.identity_init else "glorot_uniform",
        )
        self.bias = self.add_weight(shape=(channels,), initializer="zeros", name="bias") if self.use_bias else None

    def call(self, inputs):
        outputs = ops.conv(inputs, ops.cast(self.kernel, inputs.dtype), padding="same")
        return outputs if self.bias is None else outputs + ops.cast(self.bias, inputs.dtype)

    def get_config(self):
        return {**super().get_config(), "kernel_size": self.kernel_size, "filters": self.filters,
                "use_bias": self.use_bias, "identity_init": self.identity_init}


@keras.saving.register_keras_serializable(package="tfmeta")
class WarpScale(WarpLayer):
    """A channel-wise scaling warp, `y = x * s` over the last axis, `s` initialised to ones (the identity)."""

    def __init__(self, channels: Optional[int] = None, **kwargs):
        super().__init__(**kwargs)
        self.channels = channels

    def build(self, input_shape):
        width = check_width(self, "channels", self.channels, input_shape)
        self.scale = self.add_weight(shape=(width,), initializer="ones", name="scale")

    def call(self, inputs):
        return inputs * ops.cast(self.scale, inputs.dtype)

    def get_config(self):
        return {**super().get_config(), "channels": self.channels}


@keras.saving.register_keras_serializable(package="tfmeta")
class WarpConvBlock(WarpLayer):
    """A non-linear convolutional warp: 3x3 convolution, batch norm (tfmeta's, exact second-order), ReLU."""

    def __init__(self, kernel_size: int = 3, filters: Optional[int] = None, **kwargs):
        super().__init__(**kwargs)
        self.kernel_size, self.filters = kernel_size, filters

    def build(self, input_shape):
        channels = check_width(self, "filters", self.filters, input_shape)
        self.conv = WarpConv2D(self.kernel_size, channels, use_bias=True, identity_init=False, name="conv",
                               dtype=self.dtype_policy)
        self.norm = BatchNormalization(name="norm", dtype=self.dtype_policy)
        self.conv.build(input_shape)
        self.norm.build(input_shape)

    def call(self, inputs, training=None):
        return ops.relu(self.norm(self.conv(inputs), training=training))

    def get_config(self):
        return {**super().get_config(), "kernel_size": self.kernel_size, "filters": self.filters}


@keras.saving.register_keras_serializable(package="tfmeta")
class ResidualWarp(WarpLayer):
    """A residual warp block `y = x + f(x)`: `f` is `activation(W x + b)` (depth 1) or
    `W2 activation(W1 x + b1) + b2` (depth 2), with dense layers, or 3x3 convolutions on feature maps (the
    paper's ablation uses 1- and 2-layer blocks; its continual sine learner
    `ResidualWarp(depth=2, units=100, activation="tanh")`). `units` is the hidden width of a 2-layer block
    (default: the input's). `identity_init` zero-initialises the last layer, so that the block starts as the
    identity (for activations with f(0) = 0)."""

    def __init__(self, depth: int = 2, units: Optional[int] = None, activation: str = "tanh",
                 identity_init: bool = True, **kwargs):
        super().__init__(**kwargs)
        if depth not in (1, 2):
            raise ValueError(f"ResidualWarp `depth` must be 1 or 2; got {depth!r}.")
        self.depth, self.units, self.activation, self.identity_init = depth, units, activation, identity_init

    def build(self, input_shape):
        width = check_width(self, "input", None, input_shape)
        hidden = self.units or width
        if self.depth == 1 and hidden != width:
            raise ValueError(f"ResidualWarp '{self.name}' with depth=1 has `units`={hidden} but its input has "
                             f"{width} channels: a 1-layer residual block keeps the width.")
        widths = [hidden, width] if self.depth == 2 else [width]
        convolutional = len(input_shape) == 4
        self.blocks = []
        for i, units in enumerate(widths):
            activation = self.activation if i == 0 else None
            last = i == len(widths) - 1
            initializer = "zeros" if last and self.identity_init else "glorot_uniform"
            options = dict(activation=activation, kernel_initializer=initializer, name=f"layer_{i}",
                           dtype=self.dtype_policy)
            layer = (keras.layers.Conv2D(units, 3, padding="same", **options) if convolutional else
                     keras.layers.Dense(units, **options))
            layer.build(input_shape[:-1] + (input_shape[-1] if i == 0 else widths[i - 1],))
            self.blocks.append(layer)

    def call(self, inputs):
        outputs = inputs
        for layer in self.blocks:
            outputs = layer(outputs)
        return inputs + outputs

    def get_config(self):
        return {**super().get_config(), "depth": self.depth, "units": self.units, "activation": self.activation,
                "identity_init": self.identity_init}


@keras.saving.register_keras_serializable(package="tfmeta")
class FiLM(keras.layers.Layer):
    """FiLM conditioning on a task embedding: `y = x * (1 + z @ W_scale) + z @ W_shift` over the last axis.

    The embedding `z` (`embedding_dim` values) is a task parameter: it starts at zero for every task and is
    adapted by the inner loop (meta-learners give it no meta-gradient: it is listed in `context_weights`). The
    projections `W_scale`, `W_shift` are warp parameters, meta-learned only (`slow_weights`). At z = 0 the
    layer is the identity.
    """

    def __init__(self, embedding_dim: int = 16, **kwargs):
        super().__init__(**kwargs)
        if embedding_dim < 1:
            raise ValueError(f"FiLM `embedding_dim` must be >= 1; got {embedding_dim!r}.")
        self.embedding_dim = embedding_dim

    def build(self, input_shape):
        width = check_width(self, "input", None, input_shape)
        self.embedding = self.add_weight(shape=(self.embedding_dim,), initializer="zeros", name="embedding")
        self.scale_projection = self.add_weight(shape=(self.embedding_dim, width), initializer="glorot_uniform",
                                                name="scale_projection")
        self.shift_projection = self.add_weight(shape=(self.embedding_dim, width), initializer="glorot_uniform",
                                                name="shift_projection")

    @property
    def slow_weights(self) -> list:
        return [self.scale_projection, self.shift_projection]

    @property
    def context_weights(self) -> list:
        return [self.embedding]

    def call(self, inputs):
        z = ops.cast(self.embedding, inputs.dtype)[None]
        scale = ops.matmul(z, ops.cast(self.scale_projection, inputs.dtype))[0]
        shift = ops.matmul(z, ops.cast(self.shift_projection, inputs.dtype))[0]
        return inputs * (1.0 + scale) + shift

    def get_config(self):
        return {**super().get_config(), "embedding_dim": self.embedding_dim}


@keras.saving.register_keras_serializable(package="tfmeta")
class WarpRNNCell(keras.layers.Layer):
    """A recurrent warp (the Warp-RNN of Flennerhag et al., 2020, Appendix I): a task RNN cell whose input,
    recurrent and bias terms are modulated, step by step, by a meta-LSTM's hidden state.

      meta-LSTM:  (a_t, c_t) = LSTM([x_t, h_{t-1}], (a_{t-1}, c_{t-1}))
      modulations: (π_x, π_h, π_in, π_rec, π_b) = 1 + a_t P
      task cell:  h_t = tanh(((x_t ⊙ π_x) W) ⊙ π_in + ((h_{t-1} ⊙ π_h) U) ⊙ π_rec + b ⊙ π_b)

    W, U, b are task parameters (adapted in the inner loop); the meta-LSTM and the projection P are warp
    parameters (`slow_weights`). P starts at zero, so the cell starts as `keras.layers.SimpleRNN`'s tanh cell.
    Use it as `keras.layers.RNN(WarpRNNCell(units))`.
    """

    def __init__(self, units: int, meta_units: Optional[int] = None, **kwargs):
        super().__init__(**kwargs)
        if units < 1 or (meta_units is not None and meta_units < 1):
            raise ValueError(f"WarpRNNCell needs positive `units` and `meta_units`; got {units!r}, {meta_units!r}.")
        self.units, self.meta_units = units, meta_units or units
        self.state_size = [self.units, self.meta_units, self.meta_units]
        self.output_size = self.units

    def build(self, input_shape):
        features, units, meta = input_shape[-1], self.units, self.meta_units
        self.kernel = self.add_weight(shape=(features, units), initializer="glorot_uniform", name="kernel")
        self.recurrent_kernel = self.add_weight(shape=(units, units), initializer="orthogonal",
                                                name="recurrent_kernel")
        self.bias = self.add_weight(shape=(units,), initializer="zeros", name="bias")
        self.meta_kernel = self.add_weight(shape=(features + units, 4 * meta), initializer="glorot_uniform",
                                           name="meta_kernel")
        self.meta_recurrent_kernel = self.add_weight(shape=(meta, 4 * meta), initializer="orthogonal",
                                                     name="meta_recurrent_kernel")
        self.meta_bias = self.add_weight(shape=(4 * meta,), initializer="zeros", name="meta_bias")
        self.projection = self.add_weight(shape=(meta, features + 4 * units), initializer="zeros", name="projection")

    @property
    def slow_weights(self) -> list:
        return [self.meta_kernel, self.meta_recurrent_kernel, self.meta_bias, self.projection]

    def call(self, inputs, states, training=None):
        h, a, c = states
        cast = lambda w: ops.cast(w, inputs.dtype)  # noqa: E731
        gates = (ops.matmul(ops.concatenate([inputs, h], axis=-1), cast(self.meta_kernel))
                 + ops.matmul(a, cast(self.meta_recurrent_kernel)) + cast(self.meta_bias))
        i, f, g, o = ops.split(gates, 4, axis=-1)
        c = ops.sigmoid(f) * c + ops.sigmoid(i) * ops.tanh(g)
        a = ops.sigmoid(o) * ops.tanh(c)
        modulation = 1.0 + ops.matmul(a, cast(self.projection))
        features = inputs.shape[-1]
        pi_x = modulation[:, :features]
        pi_h, pi_in, pi_rec, pi_b = ops.split(modulation[:, features:], 4, axis=-1)
        h = ops.tanh(ops.matmul(inputs * pi_x, cast(self.kernel)) * pi_in
                     + ops.matmul(h * pi_h, cast(self.recurrent_kernel)) * pi_rec + cast(self.bias) * pi_b)
        return h, [h, a, c]

    def get_config(self):
        return {**super().get_config(), "units": self.units, "meta_units": self.meta_units}
