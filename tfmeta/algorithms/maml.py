"""MAML (Finn et al., 2017), second- and first-order, with MAML++'s training refinements (Antoniou et al., 2019)."""

from __future__ import annotations

from typing import Optional, Sequence

import keras
import tensorflow as tf

from tfmeta.layers import warn_inexact_batch_norm
from tfmeta.meta_learner import MetaLearner
from tfmeta.registry import register


@register
class MAML(MetaLearner):
    """Model-Agnostic Meta-Learning: meta-learns the learner's initialisation θ by differentiating the query loss
    after `inner_steps` steps of the update rule on the support set.

    Args:
      first_order: treat the inner gradients as constants (first-order MAML, "FOMAML"): the meta-gradient is
        the query gradient at the adapted parameters.
      query_step_weights: MAML++'s multi-step loss: one weight per inner step for the query loss after that
        step (default: only the loss after the last step counts).
      multi_step_loss_annealing: MAML++'s annealed multi-step loss: the weights start uniform over the
        inner steps and move linearly, over this many meta-steps, to (almost) only the last step (the other
        steps keep 0.03/K each, as in MAML++).
      first_order_steps: MAML++'s derivative-order annealing: first-order for this many meta-steps, then
        as `first_order` says.
      **kwargs: see `MetaLearner`.

    MAML++'s other refinements are parts of their own: per-step learning rates (`tfmeta.LSLR`), per-step batch
    norm (`tfmeta.layers.PerStepBatchNormalization`) and cosine annealing of the meta learning rate
    (`keras.optimizers.schedules.CosineDecay`).
    """

    vectorizes_dense_learners = True

    def __init__(self, learner: keras.Model, first_order: bool = False,
                 query_step_weights: Optional[Sequence[float]] = None,
                 multi_step_loss_annealing: Optional[int] = None, first_order_steps: int = 0, **kwargs):
        super().__init__(learner, **kwargs)
        if query_step_weights is not None:
            query_step_weights = [float(w) for w in query_step_weights]
            if len(query_step_weights) != self.inner_steps or min(query_step_weights) < 0:
                raise ValueError(
                    f"`query_step_weights` must hold inner_steps={self.inner_steps} non-negative weights; "
                    f"got {query_step_weights}."
                )
        if multi_step_loss_annealing is not None:
            if query_step_weights is not None:
                raise ValueError("Give `query_step_weights` or `multi_step_loss_annealing`, not both.")
            if multi_step_loss_annealing < 1 or self.inner_steps < 1:
                raise ValueError("`multi_step_loss_annealing` must be >= 1 meta-steps, with inner_steps >= 1; got "
                                 f"{multi_step_loss_annealing} and inner_steps={self.inner_steps}.")
        if first_order_steps < 0:
            raise ValueError(f"`first_order_steps` must be >= 0; got {first_order_steps}.")
        self.first_order = bool(first_order)
        self.query_step_weights = query_step_weights
        self.multi_step_loss_annealing = multi_step_loss_annealing
        self.first_order_steps = first_order_steps
        if not self.first_order:
            warn_inexact_batch_norm(learner)
        if not (self.first_order or self.unroll_inner_loop):
            raise ValueError("second-order MAML differentiates through the inner loop: it needs "
                             "`unroll_inner_loop=True` (or `first_order=True`).")

    def step_weights(self) -> Optional[list]:
        """The weights of the query losses after inner steps 1..K, or None for the last step only."""
        if self.multi_step_loss_annealing is None:
            return self.query_step_weights
        k = self.inner_steps
        progress = tf.minimum(tf.cast(self.meta_step(), tf.float32) / self.multi_step_loss_annealing, 1.0)
        floor = 0.03 / k
        others = tf.maximum(1.0 / k - progress / k, floor)
        last = tf.minimum(1.0 / k + progress * (k - 1) / k, 1.0 - (k - 1) * floor)
        return [others] * (k - 1) + [last]

    def task_gradients(self, episode, state, seed):
        if self.first_order_steps and not self.first_order:
            return tf.cond(
                self.meta_step() < self.first_order_steps,
                lambda: self._task_gradients(episode, state, seed, first_order=True),
                lambda: self._task_gradients(episode, state, seed, first_order=False),
            )
        return self._task_gradients(episode, state, seed, self.first_order)

    def _task_gradients(self, episode, state, seed, first_order: bool):
        weights = self.step_weights()
        with tf.GradientTape() as tape:
            fast, slow = self.read_params()
            adaptation = self.adapt_episode(fast, slow, state, episode, self.inner_steps, training=True,
                                            first_order=first_order, keep_trajectory=weights is not None, seed=seed)
            if weights is None:
                weighted = [(1.0, self.inner_steps, adaptation.params)]
            else:
                weighted = [(w, k + 1, params) for k, (w, params) in enumerate(zip(weights, adaptation.trajectory[1:]))]
            state, objective = adaptation.state, 0.0
            for weight, step, params in weighted:
                loss, logs, state = self.outer_objective(params, slow, state, episode, training=True, step=step,
                                                         seed=seed, start=fast)
                weight = tf.cast(weight, loss.dtype) if tf.is_tensor(weight) else tf.constant(weight, loss.dtype)
                objective += weight * loss  # (tf.cast of a Python float would round it to float32 first)
        grads = tape.gradient(objective, self.meta_variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return grads, {"loss": objective, **logs}, state

    def get_config(self) -> dict:
        return {**super().get_config(), "first_order": self.first_order,
                "query_step_weights": self.query_step_weights,
                "multi_step_loss_annealing": self.multi_step_loss_annealing,
                "first_order_steps": self.first_order_steps}
