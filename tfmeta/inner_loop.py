"""The inner loop: K steps of an update rule on a task's support loss, unrolled in Python."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Callable, Iterator, Optional

import tensorflow as tf

from tfmeta.update_rules import UpdateRule

LossFn = Callable[[list, list, int], tuple[tf.Tensor, list]]

_context = threading.local()


@contextlib.contextmanager
def at_step(step: int) -> Iterator[None]:
    """Marks the forward passes traced inside as belonging to inner step `step` (0: before adaptation).

    Layers whose behaviour depends on the inner step (MAML++'s per-step batch norm) read it with
    `current_step()`. The inner loop sets it for every support pass; a query pass after k steps sets k.
    """
    previous = getattr(_context, "step", None)
    _context.step = step
    try:
        yield
    finally:
        _context.step = previous


def current_step() -> Optional[int]:
    """The inner step being traced, or None outside an adaptation."""
    return getattr(_context, "step", None)


@dataclasses.dataclass
class Adaptation:
    """Result of an inner loop.

    params: the adapted fast parameters.
    state: the learner's non-trainable state (BatchNorm statistics, RNG seeds) after the last forward pass.
    losses: the support loss before each step.
    trajectory: if requested, the fast parameters before step 1, after step 1, ..., after the last step.
    grads, rule_states: with the trajectory, the support-loss gradient and the update rule's state before each
      step (what a replay of step k needs: WarpGrad's meta-objective, Leap's meta-gradient).
    """

    params: list[tf.Tensor]
    state: list[tf.Tensor]
    losses: list[tf.Tensor]
    trajectory: Optional[list[list[tf.Tensor]]] = None
    grads: Optional[list[list[tf.Tensor]]] = None
    rule_states: Optional[list] = None


def inner_loop(
    loss_fn: LossFn,
    params: list[tf.Tensor],
    state: list[tf.Tensor],
    rule: UpdateRule,
    steps: int,
    *,
    first_order: bool = False,
    keep_trajectory: bool = False,
    training: bool = True,
    seed: Optional[tf.Tensor] = None,
) -> Adaptation:
    """Adapts `params` with `steps` steps of `rule` on `loss_fn(params, state, step) -> (loss, state)`.

    The loop is unrolled in Python (`steps` is static), so an enclosing `tf.GradientTape` differentiates
    through every step: this gives MAML's second-order meta-gradient. With `first_order=True` the inner
    gradients are treated as constants, which gives first-order MAML. The learner's variables are not read or
    written here: everything flows through `params` and `state`. `training` and the stateless `seed` are
    passed to the rule's per-task state (e.g. MT-Nets sample their masks from it in training).
    """
    if steps < 0:
        raise ValueError(f"inner loop `steps` must be >= 0; got {steps}.")
    params = list(params)
    rule_state = rule.init_state(params, training=training, seed=seed)
    trajectory, all_grads, rule_states = ([params], [], []) if keep_trajectory else (None, None, None)
    losses = []
    for step in range(steps):
        with tf.GradientTape(watch_accessed_variables=False) as tape, at_step(step):
            tape.watch(params)
            loss, state = loss_fn(params, state, step)
        grads = tape.gradient(loss, params, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        if first_order:
            grads = [tf.stop_gradient(g) for g in grads]
        if keep_trajectory:
            all_grads.append(grads)
            rule_states.append(rule_state)
        updates, rule_state = rule.update(grads, rule_state, params, step)
        params = [p + u for p, u in zip(params, updates)]
        losses.append(loss)
        if keep_trajectory:
            trajectory.append(params)
    return Adaptation(params=params, state=list(state), losses=losses, trajectory=trajectory, grads=all_grads,
                      rule_states=rule_states)
