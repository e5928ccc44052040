"""The inner loop: K steps of an update rule on a task's support loss, unrolled in Python or in a `tf.while_loop`."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Any, Callable, Iterator, Optional, Union

import tensorflow as tf
from tensorflow.python.eager import record

from tfmeta.update_rules import UpdateRule

LossFn = Callable[[list, list, int], tuple[tf.Tensor, list]]

_context = threading.local()


@contextlib.contextmanager
def _setting(name: str, value) -> Iterator[None]:
    previous = getattr(_context, name, None)
    setattr(_context, name, value)
    try:
        yield
    finally:
        setattr(_context, name, previous)


def at_step(step: Union[int, tf.Tensor]) -> contextlib.AbstractContextManager:
    """Marks the forward passes traced inside as belonging to inner step `step` (0: before adaptation), a Python
    int or, in `tf.while_loop` inner loops and serving signatures, an int tensor.

    Layers whose behaviour depends on the inner step (MAML++'s per-step batch norm) read it with
    `current_step()`. The inner loop sets it for every support pass; a query pass after k steps sets k.
    """
    return _setting("step", step)


def current_step() -> Optional[Union[int, tf.Tensor]]:
    """The inner step being traced (an int or an int tensor), or None outside an adaptation."""
    return getattr(_context, "step", None)


def at_task(index: tf.Tensor) -> contextlib.AbstractContextManager:
    """Marks the inner loops traced inside as adapting task `index` of a meta-batch, which their error messages
    name (a non-finite support loss)."""
    return _setting("task", index)


def check_finite_loss(loss: tf.Tensor, step) -> tf.Tensor:
    """`loss`, after an in-graph check that it is finite whose error names the inner step and the task (see
    `at_task`). XLA compiles the check out; the training loop's NaN guard still stops the run."""
    task = getattr(_context, "task", None)
    where = ["tfmeta: non-finite support loss (NaN or inf) at inner step", tf.cast(step, tf.int32)]
    if task is not None:
        where += ["of task", tf.cast(task, tf.int32), "of the meta-batch"]
    check = tf.debugging.Assert(tf.math.is_finite(loss), where + [
        "(non-finite inputs, or an inner learning rate too large for the task)"])
    with tf.control_dependencies([check]):
        return tf.identity(loss)


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


@dataclasses.dataclass
class Step:
    """Result of one inner step (`inner_step`): the loss before it and its gradient, the rule's updates, the
    parameters after it (`params + updates`), the learner's state and the rule's state after it."""

    loss: tf.Tensor
    grads: list[tf.Tensor]
    updates: list[tf.Tensor]
    params: list[tf.Tensor]
    state: list[tf.Tensor]
    rule_state: Any


def inner_step(
    loss_fn: LossFn,
    params: list[tf.Tensor],
    state: list[tf.Tensor],
    rule: UpdateRule,
    rule_state: Any,
    step: Union[int, tf.Tensor],
    *,
    first_order: bool = False,
    check_finite: bool = True,
) -> Step:
    """One step of `rule` on `loss_fn(params, state, step) -> (loss, state)` from `params`: the only place an inner
    step is written (the inner loop, WarpGrad's replayed steps, continual streams all take it). The forward pass
    runs under `at_step(step)`; the rule receives the loss as an extra argument (`UpdateRule.update`).
    `first_order=True` treats the gradient, and the loss the rule receives, as constants; otherwise an enclosing
    tape differentiates through them (second order). With `check_finite` the loss is checked to be finite in the
    graph (`check_finite_loss`)."""
    params = list(params)
    with tf.GradientTape(watch_accessed_variables=False) as tape, at_step(step):
        tape.watch(params)
        loss, state = loss_fn(params, state, step)
        if check_finite:
            loss = check_finite_loss(loss, step)
    # First order: no enclosing tape records the gradient's ops, so they are constants to it (and batch norm's
    # backward may run as its fused kernel, `layers.batch_norm._fused_batch_norm`).
    with record.stop_recording() if first_order else contextlib.nullcontext():
        grads = tape.gradient(loss, params, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    rule_loss = tf.stop_gradient(loss) if first_order else loss
    updates, rule_state = rule.update(grads, rule_state, params, step, loss=rule_loss)
    return Step(loss=loss, grads=grads, updates=list(updates), params=[p + u for p, u in zip(params, updates)],
                state=list(state), rule_state=rule_state)


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
    unroll: bool = True,
    rematerialize: bool = False,
    check_finite: bool = True,
) -> Adaptation:
    """Adapts `params` with `steps` steps of `rule` on `loss_fn(params, state, step) -> (loss, state)`.

    Unrolled in Python (`unroll=True`, `steps` static), an enclosing `tf.GradientTape` differentiates through
    every step: this gives MAML's second-order meta-gradient. With `first_order=True` the inner gradients are
    treated as constants, which gives first-order MAML. `unroll=False` runs the steps after the first in a
    `tf.while_loop`, so the graph and its tracing time do not grow with `steps` (Leap's or Reptile's hundreds
    of steps, long evaluations); gradients then do not flow through the steps (inner gradients are constants)
    and `step` is a tensor in `loss_fn`, the rule and `current_step()` (per-step layers index by it). The learner's
    variables are not read or written here: everything flows through `params` and `state`. `training` and
    the stateless `seed` are passed to the rule's per-task state (e.g. MT-Nets sample their masks from it).
    `steps` may be an int tensor (a serving request's step count): the loop then runs in a `tf.while_loop`
    whatever `unroll` says, and returns only the parameters and state. `rematerialize=True` keeps only each
    unrolled step's inputs for the backward pass and recomputes the step there (see `rematerialized`): the
    second-order meta-gradient's memory then grows with the steps by a parameter set, not by the activations.
    With `check_finite`, every support loss is checked to be finite in the graph (`check_finite_loss`).
    """
    params = list(params)
    rule_state = rule.init_state(params, training=training, seed=seed)
    if isinstance(steps, (tf.Tensor, tf.Variable)):
        return _dynamic_loop(loss_fn, params, list(state), rule, rule_state, steps, check_finite)
    if steps < 0:
        raise ValueError(f"inner loop `steps` must be >= 0; got {steps}.")

    def one_step(step, params, state, rule_state, unrolled):
        result = inner_step(loss_fn, params, state, rule, rule_state, step,
                            first_order=first_order or not unrolled, check_finite=check_finite)
        return result.loss, result.grads, result.params, result.state, result.rule_state

    if not unroll and steps > 1:
        return _while_loop(one_step, params, list(state), rule_state, steps, keep_trajectory)
    if rematerialize and not first_order:
        one_step = _rematerialized_step(one_step)
    trajectory, all_grads, rule_states = ([params], [], []) if keep_trajectory else (None, None, None)
    losses = []
    for step in range(steps):
        loss, grads, next_params, state, next_rule_state = one_step(step, params, state, rule_state, True)
        if keep_trajectory:
            all_grads.append(grads)
            rule_states.append(rule_state)
            trajectory.append(next_params)
        losses.append(loss)
        params, rule_state = next_params, next_rule_state
    return Adaptation(params=params, state=list(state), losses=losses, trajectory=trajectory, grads=all_grads,
                      rule_states=rule_states)


def _rematerialized_step(one_step):
    """`one_step` as a function whose backward pass recomputes the step from its inputs."""

    def step_fn(step, params, state, rule_state, unrolled):
        n, m = len(params), len(state)
        structure = []  # the rule state's structure after the step, recorded when the step runs

        def flat_step(inputs):
            loss, grads, next_params, next_state, next_rule_state = one_step(
                step, inputs[:n], inputs[n:n + m], tf.nest.pack_sequence_as(rule_state, inputs[n + m:]), unrolled)
            structure[:] = [next_rule_state]
            return [loss, *grads, *next_params, *next_state, *tf.nest.flatten(next_rule_state)]

        outputs = rematerialized(flat_step)(*params, *state, *tf.nest.flatten(rule_state))
        loss, grads, next_params = outputs[0], outputs[1:1 + n], outputs[1 + n:1 + 2 * n]
        next_state, rule_leaves = outputs[1 + 2 * n:1 + 2 * n + m], outputs[1 + 2 * n + m:]
        return (loss, list(grads), list(next_params), list(next_state),
                tf.nest.pack_sequence_as(structure[0], rule_leaves))

    return step_fn


def rematerialized(fn: Callable[[list], list]) -> Callable[..., list]:
    """`fn(tensors) -> tensors` as a function of the same value whose gradient recomputes `fn` instead of keeping its
    intermediate tensors (gradient checkpointing; like `tf.recompute_grad`, which stops the tapes inside `fn`
    that an inner loop needs). The recomputation waits for the incoming gradients, so that graph optimisations
    cannot merge it with the forward pass. Only floating-point inputs and outputs carry gradients."""

    @tf.custom_gradient
    def run(*inputs):
        outputs = fn(list(inputs))

        def grad(*output_grads, variables=None):
            # `tf.custom_gradient` passes `variables` only when `fn` read variables; then it wants their grads.
            read_variables = variables is not None
            variables = list(variables or [])
            used = [o.dtype.is_floating and g is not None for o, g in zip(outputs, output_grads)]
            output_grads = [g for g, u in zip(output_grads, used) if u]
            with tf.control_dependencies(output_grads):
                replayed = [tf.identity(x) for x in inputs]
            sources = [x for x in replayed if x.dtype.is_floating]
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(sources + variables)
                recomputed = fn(replayed)
            grads = tape.gradient([r for r, u in zip(recomputed, used) if u], sources + variables,
                                  output_gradients=output_grads, unconnected_gradients=tf.UnconnectedGradients.ZERO)
            source_grads = iter(grads[:len(sources)])
            input_grads = [next(source_grads) if x.dtype.is_floating else None for x in inputs]
            return (input_grads, grads[len(sources):]) if read_variables else input_grads

        return outputs, grad

    return run


def _dynamic_loop(loss_fn, params, state, rule, rule_state, steps, check_finite) -> Adaptation:
    """`inner_loop` for a number of steps known only at run time (a serving request's): a `tf.while_loop`
    from step 0, without differentiation through it, trajectory or losses."""

    def body(step, params, state, rule_state):
        result = inner_step(loss_fn, params, state, rule, rule_state, step, first_order=True,
                            check_finite=check_finite)
        return step + 1, result.params, result.state, result.rule_state

    _, params, state, _ = tf.while_loop(lambda step, *_: step < tf.cast(steps, tf.int32), body,
                                        (tf.constant(0), params, state, rule_state))
    return Adaptation(params=params, state=state, losses=[])


def _while_loop(one_step, params, state, rule_state, steps, keep_trajectory) -> Adaptation:
    """`inner_loop` with steps 1.. in a `tf.while_loop`; step 0 runs outside it and fixes the dtypes."""
    loss, grads, next_params, next_state, next_rule_state = one_step(0, params, state, rule_state, False)

    def arrays(values, size):
        return [tf.TensorArray(v.dtype, size=size, element_shape=v.shape) for v in values]

    records = {"losses": arrays([loss], steps)}
    if keep_trajectory:
        records.update(trajectory=arrays(params, steps + 1), grads=arrays(grads, steps),
                       rule_states=arrays(tf.nest.flatten(rule_state), steps))
        records["trajectory"] = [a.write(0, p).write(1, q)
                                 for a, p, q in zip(records["trajectory"], params, next_params)]

    def write(records, step, loss, grads, rule_state):
        records = dict(records, losses=[records["losses"][0].write(step, loss)])
        if keep_trajectory:
            records["grads"] = [a.write(step, g) for a, g in zip(records["grads"], grads)]
            records["rule_states"] = [a.write(step, r) for a, r in
                                      zip(records["rule_states"], tf.nest.flatten(rule_state))]
        return records

    records = write(records, 0, loss, grads, rule_state)

    def body(step, params, state, rule_state, records):
        loss, grads, next_params, next_state, next_rule_state = one_step(step, params, state, rule_state, False)
        records = write(records, step, loss, grads, rule_state)
        if keep_trajectory:
            records["trajectory"] = [a.write(step + 1, p) for a, p in zip(records["trajectory"], next_params)]
        return step + 1, next_params, next_state, next_rule_state, records

    _, params, state, rule_state, records = tf.while_loop(
        lambda step, *_: step < steps, body, (tf.constant(1), next_params, next_state, next_rule_state, records))
    losses = tf.unstack(records["losses"][0].stack(), steps)
    if not keep_trajectory:
        return Adaptation(params=params, state=state, losses=losses)

    def per_step(values, count):
        return [list(step_values) for step_values in zip(*[tf.unstack(a.stack(), count) for a in values])]

    if tf.nest.flatten(rule_state):
        rule_states = [tf.nest.pack_sequence_as(rule_state, leaves)
                       for leaves in per_step(records["rule_states"], steps)]
    else:
        rule_states = [rule_state] * steps
    return Adaptation(params=params, state=state, losses=losses, trajectory=per_step(records["trajectory"], steps + 1),
                      grads=per_step(records["grads"], steps), rule_states=rule_states)
