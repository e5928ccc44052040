"""Implicit MAML (Rajeswaran, Finn, Kakade & Levine, NeurIPS 2019)."""

from __future__ import annotations

from typing import Callable

import keras
import tensorflow as tf

from tfmeta import checks
from tfmeta.meta_learner import MetaLearner
from tfmeta.registry import register


def _dot(a, b) -> tf.Tensor:
    return tf.add_n([tf.reduce_sum(x * y) for x, y in zip(a, b)])


def conjugate_gradient(matvec: Callable[[list], list], b: list, steps: int) -> tuple[list, tf.Tensor]:
    """Approximately solves A x = b for a symmetric A given as `matvec`, from x = 0, with `steps`
    conjugate-gradient iterations (unrolled; exact after as many iterations as unknowns if A is positive
    definite). A neural network's Hessian can be indefinite: the iterations stop at the first direction of
    non-positive curvature (as truncated CG does), instead of stepping to infinity along it.

    Returns x and the iteration (0..steps-1) at which the iterations stopped at non-positive (or non-finite)
    curvature, or `steps` if they never did: stopping at 0 returns x = 0. A solve that converges (a zero
    residual, hence a zero direction) stops without counting."""
    x = [tf.zeros_like(t) for t in b]
    r = list(b)
    p = list(b)
    rr = _dot(r, r)
    active = tf.constant(True)
    stopped = tf.constant(steps, tf.int32)
    for iteration in range(steps):
        ap = matvec(p)
        curvature = _dot(p, ap)
        positive = curvature > 0  # False for NaN too
        stopped = tf.where(active & ~positive & (rr > 0), iteration, stopped)
        active = active & positive
        alpha = tf.where(active, tf.math.divide_no_nan(rr, curvature), tf.zeros_like(rr))
        x = [xi + alpha * pi for xi, pi in zip(x, p)]
        r = [ri - alpha * api for ri, api in zip(r, ap)]
        rr_next = _dot(r, r)
        p = [ri + tf.math.divide_no_nan(rr_next, rr) * pi for ri, pi in zip(r, p)]
        rr = rr_next
    return x, stopped


@register
class IMAML(MetaLearner):
    """Implicit MAML: meta-gradients by the implicit function theorem instead of through the inner loop.

    Adaptation (in meta-training and at evaluation) minimises the support loss plus (λ/2)‖φ − θ‖² with
    `inner_steps` steps of the update rule from θ. The meta-gradient for the fast parameters is
    (I + H/λ)⁻¹ ∇_φ L_query(φ), with H the Hessian of the support loss at the adapted φ, computed with `cg_steps`
    iterations of conjugate gradient on Hessian-vector products. Nothing is differentiated through the inner
    steps, so memory does not grow with their number. Slow variables get the query gradient at φ; update-rule
    variables get no meta-gradient.

    Conjugate gradient stops at the first direction of non-positive curvature (the Hessian can be indefinite).
    The training logs count how often: `cg_dropped` is the fraction of tasks whose solve stopped at its first
    iteration (their fast variables get a zero meta-gradient), `cg_truncated` the fraction stopped later (a
    truncated solve).

    Args:
      regularization: λ > 0, the strength of the proximal term.
      cg_steps: conjugate-gradient iterations.
      **kwargs: see `MetaLearner`.
    """

    def __init__(self, learner: keras.Model, regularization: float = 1.0, cg_steps: int = 5, **kwargs):
        super().__init__(learner, **kwargs)
        if not regularization > 0:
            raise ValueError(f"`regularization` (λ) must be positive; got {regularization!r}.")
        checks.integer(cg_steps, "cg_steps", minimum=1, owner="IMAML")
        self.regularization = float(regularization)
        self.cg_steps = cg_steps

    def inner_objective(self, fast, slow, state, episode, step, *, training, seed=None, start=None):
        """The support loss plus the proximal term (λ/2)‖φ − θ‖² to the start θ of the adaptation (a constant)."""
        if start is None:
            raise ValueError("IMAML's inner objective is proximal to where the adaptation started: pass `start` (the "
                             "fast parameters the inner loop starts from, as `adapt_episode` does).")
        loss, state = super().inner_objective(fast, slow, state, episode, step, training=training, seed=seed)
        proximal = tf.add_n([tf.reduce_sum(tf.square(p - tf.stop_gradient(a))) for p, a in zip(fast, start)])
        return loss + tf.cast(self.regularization / 2, proximal.dtype) * proximal, state

    def adapt_episode(self, fast, slow, state, episode, steps, *, training, first_order=False, keep_trajectory=False,
                      seed=None, check_finite=True):
        """`MetaLearner.adapt_episode`, always first-order: nothing is differentiated through iMAML's inner loop."""
        return super().adapt_episode(fast, slow, state, episode, steps, training=training, first_order=True,
                                     keep_trajectory=keep_trajectory, seed=seed, check_finite=check_finite)

    def task_gradients(self, episode, state, seed):
        fast, slow = self.read_params()
        adaptation = self.adapt_episode(fast, slow, state, episode, self.inner_steps, training=True, seed=seed)
        phi = [tf.stop_gradient(p) for p in adaptation.params]
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(phi + slow)
            query_loss, logs, new_state = self.outer_objective(phi, slow, adaptation.state, episode, training=True,
                                                               seed=seed, start=fast)
        phi_grads, slow_grads = tape.gradient(query_loss, [phi, slow],
                                              unconnected_gradients=tf.UnconnectedGradients.ZERO)

        def hessian_vector_product(vector):
            # The Hessian of the support loss on all of the task's support data (a stream's batches together).
            with tf.GradientTape(watch_accessed_variables=False) as outer:
                outer.watch(phi)
                with tf.GradientTape(watch_accessed_variables=False) as inner:
                    inner.watch(phi)
                    loss, _ = MetaLearner.inner_objective(self, phi, slow, state, episode, None, training=True,
                                                          seed=seed)
                grads = inner.gradient(loss, phi, unconnected_gradients=tf.UnconnectedGradients.ZERO)
                projection = _dot(grads, [tf.stop_gradient(v) for v in vector])
            return outer.gradient(projection, phi, unconnected_gradients=tf.UnconnectedGradients.ZERO)

        def matvec(vector):
            hv = hessian_vector_product(vector)
            return [v + h / tf.cast(self.regularization, h.dtype) for v, h in zip(vector, hv)]

        implicit, stopped = conjugate_gradient(matvec, phi_grads, self.cg_steps)
        fast_variables, slow_variables = self.partitioned_variables()
        grads = self.meta_gradients_for(fast_variables + slow_variables, implicit + slow_grads)
        logs = {"loss": query_loss, **logs, "cg_dropped": tf.cast(stopped == 0, query_loss.dtype),
                "cg_truncated": tf.cast(tf.logical_and(stopped > 0, stopped < self.cg_steps), query_loss.dtype)}
        return grads, logs, new_state

    def train_log_names(self) -> list[str]:
        return super().train_log_names() + ["cg_dropped", "cg_truncated"]

    def log_names(self) -> list[str]:
        """`MetaLearner.log_names` and the conjugate-gradient counts of training (see the class docstring)."""
        return super().log_names() + ["cg_dropped", "cg_truncated"]

    def get_config(self) -> dict:
        return {**super().get_config(), "regularization": self.regularization, "cg_steps": self.cg_steps}
