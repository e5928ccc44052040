"""An optimizer learned by reinforcement learning (Li & Malik, 2017, "Learning to Optimize"): the update step is the
action of a stochastic policy whose observation is the recent gradients and changes of the objective."""

from __future__ import annotations

from typing import Sequence

import keras
import tensorflow as tf

from tfmeta import checks, likelihoods
from tfmeta.registry import register
from tfmeta.update_rules.base import Shapes, UpdateRule


@register
class PolicyOptimizer(UpdateRule):
    """A Gaussian policy over each coordinate's step, N(μ(o), σ²), shared across coordinates: the observation o of a
    coordinate is its last `history` gradients and the last `history` changes of the objective (zeros before the
    first steps), μ an MLP (`hidden_units`, tanh) and σ a learned scalar. As an update rule (`update`) it takes the
    policy's mean step, deterministically; `tfmeta.optimizers.PolicyTraining` samples the steps and trains the policy
    by policy gradient. Li & Malik train it with guided policy search; the observation here follows their
    description (recent gradients and objective values), not their exact features, which were not available.

    Args:
      history: the observation's window H.
      hidden_units: the MLP's hidden layers.
      initial_stddev: σ's initial value (the exploration noise of a step).
      output_scale: the factor on the MLP's output (μ), so that initial steps are small.
    """

    def __init__(self, history: int = 5, hidden_units: Sequence[int] = (32,), initial_stddev: float = 0.01,
                 output_scale: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        self.history = checks.integer(history, "history", minimum=1, owner="PolicyOptimizer")
        self.hidden_units = [checks.integer(u, "hidden_units", minimum=1, owner="PolicyOptimizer")
                             for u in hidden_units]
        self.initial_stddev = checks.number(initial_stddev, "initial_stddev", positive=True, owner="PolicyOptimizer")
        self.output_scale = checks.number(output_scale, "output_scale", owner="PolicyOptimizer")

    def build(self, param_shapes: Shapes) -> None:
        self.mean_network = keras.Sequential(
            [keras.Input((2 * self.history,), dtype=self.dtype_policy.variable_dtype)]
            + [keras.layers.Dense(u, activation="tanh", dtype=self.dtype_policy) for u in self.hidden_units]
            + [keras.layers.Dense(1, dtype=self.dtype_policy)], name="mean_network")
        self.log_stddev = self.add_weight(shape=(), name="log_stddev", initializer=keras.initializers.Constant(
            float(tf.math.log(self.initial_stddev))))
        super().build(param_shapes)

    def check_params(self, param_shapes: Shapes) -> None:
        """Builds the policy; once built it takes parameters of any shapes (its weights act per coordinate)."""
        if not self.built:
            super().check_params(param_shapes)

    def init_state(self, params, *, training=True, seed=None):
        """Per parameter the gradient history [coordinates, H]; the objective's changes [H] and its last value."""
        dtype = params[0].dtype
        return (tuple(tf.zeros([tf.size(p), self.history], p.dtype) for p in params),
                tf.zeros([self.history], dtype), tf.zeros([], dtype), tf.zeros([], dtype))

    def observe(self, grads: list, state: tuple, loss: tf.Tensor) -> tuple[list[tf.Tensor], tuple]:
        """The observation of every coordinate, per parameter [coordinates, 2H], and the state after this step's
        gradient and loss entered the windows."""
        histories, changes, previous, started = state
        loss = tf.cast(loss, changes.dtype)
        change = tf.where(started > 0, loss - previous, tf.zeros_like(loss))
        changes = tf.concat([changes[1:], change[None]], 0)
        observations, new_histories = [], []
        for g, h in zip(grads, histories):
            if isinstance(g, tf.IndexedSlices):
                g = tf.convert_to_tensor(g)
            h = tf.concat([h[:, 1:], tf.reshape(tf.cast(g, h.dtype), [-1, 1])], 1)
            new_histories.append(h)
            observations.append(tf.concat([h, tf.broadcast_to(changes, tf.shape(h))], 1))
        return observations, (tuple(new_histories), changes, loss, tf.ones_like(started))

    def policy(self, observations: list) -> list:
        """The policy's per-coordinate step distributions (`tfd.Normal`), one per parameter, [coordinates]."""
        stddev = tf.exp(self.log_stddev)
        return [likelihoods.tfd().Normal(self.output_scale * self.mean_network(o)[:, 0], tf.cast(stddev, o.dtype))
                for o in observations]

    def update(self, grads, state, params, step, loss=None, **extra):
        if loss is None:
            raise ValueError("PolicyOptimizer observes the objective: call `update(..., loss=)` (the inner loop "
                             "passes it).")
        observations, state = self.observe(grads, state, loss)
        steps = [tf.reshape(d.mean(), tf.shape(p)) for d, p in zip(self.policy(observations), params)]
        return steps, state

    def get_config(self) -> dict:
        return {**super().get_config(), "history": self.history, "hidden_units": self.hidden_units,
                "initial_stddev": self.initial_stddev, "output_scale": self.output_scale}
