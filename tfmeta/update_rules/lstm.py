"""Learned update rules: the coordinatewise LSTM optimizer (Andrychowicz et al., 2016, "Learning to learn by
gradient descent by gradient descent") and the Meta-Learner LSTM (Ravi & Larochelle, 2017)."""

from __future__ import annotations

from typing import Sequence

import keras
import tensorflow as tf

from tfmeta import checks
from tfmeta.registry import register
from tfmeta.update_rules.base import Shapes, UpdateRule

PREPROCESSING = ("none", "log_sign")
GROUPS = ("shared", "by_rank")


def log_and_sign(grads: tf.Tensor, k: float) -> tf.Tensor:
    """The gradient preprocessing of Andrychowicz et al. (2016, Appendix A), as their code writes it: per
    coordinate (clip(log(|g| + ε)/k, −1, ·), clip(g·e^k, −1, 1)), i.e. (log|g|/k, sign g) for |g| ≥ e^−k and
    (−1, e^k·g) below, with ε the float32 machine epsilon. `grads` [n, 1] → [n, 2]."""
    eps = tf.constant(1.1920929e-07, grads.dtype)
    magnitude = tf.maximum(tf.math.log(tf.abs(grads) + eps) / k, -1.0)
    sign = tf.clip_by_value(grads * tf.exp(tf.constant(k, grads.dtype)), -1.0, 1.0)
    return tf.concat([magnitude, sign], axis=-1)


def finite_gradient(rule: UpdateRule, grad: tf.Tensor, index: int) -> tf.Tensor:
    """`grad`, checked to be finite when the graph runs: a NaN or Inf would enter the recurrent state of its
    coordinates and stay there, so it stops training with a message instead."""
    if isinstance(grad, tf.IndexedSlices):
        grad = tf.convert_to_tensor(grad)
    return tf.debugging.assert_all_finite(
        grad, f"update rule '{rule.name}': the gradient of parameter {index} (shape {grad.shape}) is not finite "
        "(NaN or Inf), and would corrupt its coordinates' recurrent state; lower the learning rate or check the loss.")


@register
class CoordinatewiseLSTM(UpdateRule):
    """A recurrent network that maps each coordinate's gradient to its update, with weights shared across
    coordinates and a recurrent state per coordinate: `hidden_units` LSTM layers (Keras `LSTMCell`s), then a
    linear output times `output_scale`.

    The reference code's settings (deepmind/learning-to-learn `util.py`): two layers of 20 units; quadratics: no
    preprocessing and output scale 1; MNIST and CIFAR: `log_sign` preprocessing with k = 5 and output scale 0.01
    (the paper's text gives p = 10: the code's k = 5 is what its results were run with).

    Args:
      hidden_units: the LSTM layers' sizes.
      preprocessing: "none" (the raw gradient) or "log_sign" (`log_and_sign` with `k`).
      k: the preprocessing's constant.
      output_scale: the factor on the network's output (the update).
      groups: "shared" (one network for all parameters) or "by_rank" (one network per rank of parameter:
        convolution kernels, dense kernels and biases each their own; a fixed grouping in the spirit of the
        reference code's separate conv and fc networks on CIFAR, which assign variables to networks by name).
    """

    def __init__(self, hidden_units: Sequence[int] = (20, 20), preprocessing: str = "none", k: float = 5.0,
                 output_scale: float = 1.0, groups: str = "shared", **kwargs):
        super().__init__(**kwargs)
        if preprocessing not in PREPROCESSING:
            raise ValueError(f"CoordinatewiseLSTM `preprocessing` must be one of {PREPROCESSING}; got "
                             f"{preprocessing!r}.")
        if groups not in GROUPS:
            raise ValueError(f"CoordinatewiseLSTM `groups` must be one of {GROUPS}; got {groups!r}.")
        self.hidden_units = [checks.integer(u, "hidden_units", minimum=1, owner="CoordinatewiseLSTM")
                             for u in hidden_units]
        if not self.hidden_units:
            raise ValueError("CoordinatewiseLSTM needs at least one LSTM layer in `hidden_units`.")
        self.preprocessing = preprocessing
        self.k = checks.number(k, "k", positive=True, owner="CoordinatewiseLSTM")
        self.output_scale = checks.number(output_scale, "output_scale", owner="CoordinatewiseLSTM")
        self.groups = groups

    def group_of(self, shape: Sequence[int]) -> str:
        """The network a parameter of this shape is updated by."""
        return "shared" if self.groups == "shared" else f"rank_{len(shape)}"

    def build(self, param_shapes: Shapes) -> None:
        features = 2 if self.preprocessing == "log_sign" else 1
        self.networks = {}
        for group in sorted({self.group_of(s) for s in param_shapes}):
            cells = [keras.layers.LSTMCell(units, dtype=self.dtype_policy, name=f"{group}_lstm_{i}")
                     for i, units in enumerate(self.hidden_units)]
            for cell, inputs in zip(cells, [features, *self.hidden_units[:-1]]):
                cell.build((None, inputs))
            head = keras.layers.Dense(1, dtype=self.dtype_policy, name=f"{group}_output")
            head.build((None, self.hidden_units[-1]))
            self.networks[group] = (cells, head)
            for layer in (*cells, head):  # direct attributes: what TensorFlow checkpoints follow
                setattr(self, layer.name, layer)
        super().build(param_shapes)

    def check_params(self, param_shapes: Shapes) -> None:
        """Builds the rule, or checks that it has a network for every parameter: its weights do not depend on the
        parameters' shapes, so a trained rule optimizes any problem whose parameter groups it was trained with."""
        if not self.built:
            return super().check_params(param_shapes)
        missing = sorted({self.group_of(s) for s in param_shapes} - set(self.networks))
        if missing:
            raise ValueError(f"update rule '{self.name}' has no network for the parameter groups {missing} (it was "
                             f"built with {sorted(self.networks)}): build it with parameters of those ranks, or use "
                             "groups='shared'.")

    def init_state(self, params, *, training=True, seed=None):
        """Per parameter and layer, the (h, c) state of every coordinate: zeros [coordinates, units]."""
        return tuple(tuple((tf.zeros([tf.size(p), u], p.dtype), tf.zeros([tf.size(p), u], p.dtype))
                           for u in self.hidden_units) for p in params)

    def update(self, grads, state, params, step, **extra):
        updates, new_state = [], []
        for index, (g, p, layers) in enumerate(zip(grads, params, state)):
            g = finite_gradient(self, g, index)
            cells, head = self.networks[self.group_of(p.shape)]
            x = tf.reshape(g, [-1, 1])
            if self.preprocessing == "log_sign":
                x = log_and_sign(x, self.k)
            layer_states = []
            for cell, (h, c) in zip(cells, layers):
                x, (h, c) = cell(x, [h, c])
                layer_states.append((h, c))
            updates.append(tf.reshape(head(x) * tf.constant(self.output_scale, g.dtype), tf.shape(p)))
            new_state.append(tuple(layer_states))
        return updates, tuple(new_state)

    def get_config(self) -> dict:
        return {**super().get_config(), "hidden_units": self.hidden_units, "preprocessing": self.preprocessing,
                "k": self.k, "output_scale": self.output_scale, "groups": self.groups}


@register
class MetaLearnerLSTM(UpdateRule):
    """The Meta-Learner LSTM (Ravi & Larochelle, 2017, "Optimization as a model for few-shot learning"): the
    learner's parameters are an LSTM's cell state, updated as θ_t = σ(f_t)⊙θ_{t−1} − σ(i_t)⊙∇_t, where per
    coordinate
        f_t = W_F·[h_t, θ_{t−1}, f_{t−1}] + b_F,   i_t = W_I·[h_t, θ_{t−1}, i_{t−1}] + b_I,
    and h_t is a first LSTM layer's output (`hidden_units`, a Keras `LSTMCell`) on the log-sign preprocessed
    gradient and loss (p = `k` = 10, as the authors' code). As the authors' code: f and i are carried before the
    sigmoid, W_F, W_I start in U(−0.01, 0.01), b_F in U(4, 5) and b_I in U(−5, −4), so that it starts close to
    gradient descent with a small step (σ(b_F) ≈ 1, σ(b_I) ≈ 0.01). The initial cell state, θ_0, is the
    meta-learned initialisation of the meta-learner that uses this rule (e.g. `MAML(..., first_order=True)`:
    the paper treats the learner's gradients and loss as constants). The loss is the inner step's `loss`.
    """

    def __init__(self, hidden_units: int = 20, k: float = 10.0, **kwargs):
        super().__init__(**kwargs)
        self.hidden_units = checks.integer(hidden_units, "hidden_units", minimum=1, owner="MetaLearnerLSTM")
        self.k = checks.number(k, "k", positive=True, owner="MetaLearnerLSTM")

    def build(self, param_shapes: Shapes) -> None:
        self.lstm = keras.layers.LSTMCell(self.hidden_units, dtype=self.dtype_policy, name="input_lstm")
        self.lstm.build((None, 4))
        small = keras.initializers.RandomUniform(-0.01, 0.01)
        self.gate_kernels = self.add_weight(shape=(2, self.hidden_units + 2), initializer=small, name="gate_kernels")
        self.forget_bias = self.add_weight(shape=(), initializer=keras.initializers.RandomUniform(4.0, 5.0),
                                           name="forget_bias")
        self.input_bias = self.add_weight(shape=(), initializer=keras.initializers.RandomUniform(-5.0, -4.0),
                                          name="input_bias")
        super().build(param_shapes)

    def init_state(self, params, *, training=True, seed=None):
        """Per parameter: the first layer's (h, c) and the pre-sigmoid gates (f, i) of every coordinate."""
        def zeros(p, width):
            return tf.zeros([tf.size(p), width], p.dtype)

        return tuple((zeros(p, self.hidden_units), zeros(p, self.hidden_units), zeros(p, 1), zeros(p, 1))
                     for p in params)

    def update(self, grads, state, params, step, loss=None, **extra):
        if loss is None:
            raise ValueError("MetaLearnerLSTM takes the support loss as an input: call `update(..., loss=)` (the "
                             "inner loop passes it).")
        updates, new_state = [], []
        for index, (g, p, (h, c, f, i)) in enumerate(zip(grads, params, state)):
            g = finite_gradient(self, g, index)
            g, theta = tf.reshape(g, [-1, 1]), tf.reshape(p, [-1, 1])
            losses = tf.fill(tf.shape(g), tf.cast(loss, g.dtype))
            x = tf.concat([log_and_sign(g, self.k), log_and_sign(losses, self.k)], axis=-1)
            h, (_, c) = self.lstm(x, [h, c])
            kernels = tf.cast(self.gate_kernels, g.dtype)
            f = tf.concat([h, theta, f], -1) @ kernels[0][:, None] + tf.cast(self.forget_bias, g.dtype)
            i = tf.concat([h, theta, i], -1) @ kernels[1][:, None] + tf.cast(self.input_bias, g.dtype)
            delta = (tf.sigmoid(f) - 1.0) * theta - tf.sigmoid(i) * g
            updates.append(tf.reshape(delta, tf.shape(p)))
            new_state.append((h, c, f, i))
        return updates, tuple(new_state)

    def get_config(self) -> dict:
        return {**super().get_config(), "hidden_units": self.hidden_units, "k": self.k}
