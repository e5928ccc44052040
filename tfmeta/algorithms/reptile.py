"""Reptile (Nichol, Achiam & Schulman, 2018)."""

from __future__ import annotations

import keras
import tensorflow as tf

from tfmeta.meta_learner import MetaLearner
from tfmeta.registry import register


@register
class Reptile(MetaLearner):
    """Reptile: moves the initialisation θ towards the parameters φ_τ adapted to each task.

    The meta-gradient of a task is θ − φ_τ, so `keras.optimizers.SGD(ε)` performs Reptile's update
    θ ← θ + ε·mean_τ(φ_τ − θ), and any other Keras optimizer (e.g. Adam, as in the Reptile paper's
    experiments) can apply it instead. Reptile has no separate meta-objective: the inner loop trains on all of
    a task's examples (support and query; or, for a stream of support batches, on the stream), and "loss" is
    their loss before the last inner step.
    Slow variables and learned update-rule parameters get zero meta-gradients.
    """

    def __init__(self, learner: keras.Model, **kwargs):
        super().__init__(learner, **kwargs)
        if self.inner_steps < 1:
            raise ValueError(f"Reptile needs `inner_steps` >= 1; got {self.inner_steps}.")

    def task_gradients(self, episode, state, seed):
        if not self.is_stream(episode):  # A stream of support batches is the task's data as it is.
            episode = {"support_x": tf.concat([episode["support_x"], episode["query_x"]], axis=0),
                       "support_y": tf.concat([episode["support_y"], episode["query_y"]], axis=0)}
        fast, slow = self.read_params()
        adaptation = self.adapt_episode(fast, slow, state, episode, self.inner_steps, training=True, first_order=True,
                                        seed=seed)
        grads = self.meta_gradients_for(self.partitioned_variables()[0],
                                        [theta - phi for theta, phi in zip(fast, adaptation.params)])
        return grads, {"loss": adaptation.losses[-1]}, adaptation.state

    def train_log_names(self) -> list[str]:
        return ["loss"]
