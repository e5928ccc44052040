"""MAML (Finn et al., 2017), second- and first-order, with MAML++'s optional multi-step query loss."""

from __future__ import annotations

from typing import Optional, Sequence

import keras
import tensorflow as tf

from tfmeta.layers import warn_inexact_batch_norm
from tfmeta.meta_learner import MetaLearner


@keras.saving.register_keras_serializable(package="tfmeta")
class MAML(MetaLearner):
    """Model-Agnostic Meta-Learning: meta-learns the learner's initialisation θ by differentiating the query loss
    after `inner_steps` steps of the update rule on the support set.

    Args:
      first_order: treat the inner gradients as constants (first-order MAML, "FOMAML"): the meta-gradient is
        the query gradient at the adapted parameters.
      query_step_weights: MAML++'s multi-step loss: one weight per inner step for the query loss after that
        step (default: only the loss after the last step counts).
      **kwargs: see `MetaLearner`.
    """

    def __init__(self, learner: keras.Model, first_order: bool = False,
                 query_step_weights: Optional[Sequence[float]] = None, **kwargs):
        super().__init__(learner, **kwargs)
        if query_step_weights is not None:
            query_step_weights = [float(w) for w in query_step_weights]
            if len(query_step_weights) != self.inner_steps or min(query_step_weights) < 0:
                raise ValueError(
                    f"`query_step_weights` must hold inner_steps={self.inner_steps} non-negative weights; "
                    f"got {query_step_weights}."
                )
        self.first_order = bool(first_order)
        self.query_step_weights = query_step_weights
        if not self.first_order:
            warn_inexact_batch_norm(learner)

    def task_gradients(self, episode, state):
        with tf.GradientTape() as tape:
            fast, slow = self.read_params()
            adaptation = self.adapt_params(
                fast, slow, state, episode["support_x"], episode["support_y"], self.inner_steps,
                training=True, first_order=self.first_order, keep_trajectory=self.query_step_weights is not None,
            )
            if self.query_step_weights is None:
                weighted = [(1.0, adaptation.params)]
            else:
                weighted = list(zip(self.query_step_weights, adaptation.trajectory[1:]))
            state, objective = adaptation.state, 0.0
            for weight, params in weighted:
                predictions, state = self.forward(params, slow, state, episode["query_x"], training=True)
                query_loss = self.loss_value(episode["query_y"], predictions)
                objective += weight * query_loss
        grads = tape.gradient(objective, self.meta_variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return grads, {"loss": objective, **self.metric_values(episode["query_y"], predictions)}, state

    def get_config(self) -> dict:
        return {**super().get_config(), "first_order": self.first_order,
                "query_step_weights": self.query_step_weights}
