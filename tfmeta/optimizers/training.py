"""Meta-training a learned update rule on optimisation problems by truncated backpropagation through time."""

from __future__ import annotations

import os

import keras
import numpy as np
import tensorflow as tf

from tfmeta import checks
from tfmeta.optimizers.problems import OptimizationProblems
from tfmeta.registry import register
from tfmeta.update_rules.base import UpdateRule


def _constant(model: keras.Model, value: tf.Tensor, name: str) -> keras.Variable:
    """A non-trainable variable of `model` holding `value`, also set as the attribute `name`: TensorFlow
    checkpoints follow direct attributes, not the lists and dicts that hold the variables."""
    variable = model.add_weight(shape=tuple(value.shape), dtype=value.dtype, trainable=False, name=name,
                                initializer=lambda shape, dtype, v=value: v)
    setattr(model, name, variable)
    return variable


@register
class OptimizerTraining(keras.Model):
    """Meta-trains `rule` (e.g. `tfmeta.CoordinatewiseLSTM`) as Andrychowicz et al. (2016) do: each `train_step`
    runs `unroll` steps of the rule on the current problem of `problems` from where the last one stopped, and
    takes one step of the compiled optimizer on the rule's weights to lower the sum of the losses before each step
    and after the last (the reference code's meta-loss); after `horizon` steps a new problem starts. The
    optimizee's parameters, the rule's state, the problem's constants and the position in the horizon are
    non-trainable variables carried across `train_step`s (truncated backpropagation: what is carried has no
    gradient), so a checkpoint taken in the middle of a horizon resumes it exactly. The optimizee's gradients (and
    the loss, for rules that take it) are constants (`second_order=False`, the paper's choice: the second-order
    terms through them are dropped) or differentiated (`second_order=True`).

    Problem k draws its constants and initial parameters from `seed` folded with k, and step t's minibatch from
    that folded with t: meta-training is a function of `seed`.
    """

    def __init__(self, rule: UpdateRule, problems: OptimizationProblems, unroll: int = 20, horizon: int = 100,
                 second_order: bool = False, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(rule, UpdateRule):
            raise TypeError(f"`rule` must be a tfmeta UpdateRule; got {type(rule).__name__}.")
        self.unroll = checks.integer(unroll, "unroll", minimum=1, owner="OptimizerTraining")
        self.horizon = checks.integer(horizon, "horizon", minimum=1, owner="OptimizerTraining")
        if self.horizon % self.unroll:
            raise ValueError(f"OptimizerTraining `horizon` ({horizon}) must be a multiple of `unroll` ({unroll}).")
        self.rule, self.problems = rule, problems
        self.second_order, self.seed = bool(second_order), int(seed)
        constants, params, state = self.fresh_problem(tf.constant(0, tf.int64))
        self.rule.check_params([tuple(p.shape) for p in params])
        self.constant_variables = {k: _constant(self, v, f"constant_{k}") for k, v in constants.items()}
        self.param_variables = [_constant(self, p, f"param_{i}") for i, p in enumerate(params)]
        self.state_structure = state
        self.state_variables = [_constant(self, s, f"state_{i}") for i, s in enumerate(tf.nest.flatten(state))]
        _constant(self, tf.constant(0, tf.int64), "position")
        _constant(self, tf.constant(0, tf.int64), "problem")
        self.built = True

    def problem_seed(self, problem: tf.Tensor) -> tf.Tensor:
        return tf.random.experimental.stateless_fold_in(tf.constant([self.seed, 0], tf.int64), problem)

    def fresh_problem(self, problem: tf.Tensor) -> tuple[dict, list, object]:
        """Problem `problem`'s constants, initial parameters and the rule's initial state."""
        seed = self.problem_seed(problem)
        constants = self.problems.constants(seed)
        params = self.problems.initial_params(constants, tf.random.experimental.stateless_fold_in(seed, 1))
        return constants, params, self.rule.init_state(params)

    def unrolled(self, params: list, state, constants: dict, problem: tf.Tensor,
                 position) -> tuple[tf.Tensor, tf.Tensor, list, object]:
        """`unroll` steps of the rule from `params` and `state`: the meta-loss (the sum of the losses before each
        step and after the last), the last loss, and the parameters and state reached."""
        seed = self.problem_seed(problem)
        step_seed = lambda k: tf.random.experimental.stateless_fold_in(seed, 2 + position + k)  # noqa: E731
        meta_loss = 0.0
        for k in range(self.unroll):
            with tf.GradientTape() as tape:
                tape.watch(params)
                loss = self.problems.loss(params, constants, step_seed(k))
            grads = tape.gradient(loss, params)
            rule_loss = loss
            if not self.second_order:  # the optimizee's gradients and loss are inputs of the rule, held constant
                grads, rule_loss = [tf.stop_gradient(g) for g in grads], tf.stop_gradient(loss)
            updates, state = self.rule.update(grads, state, params, position + k, loss=rule_loss)
            params = [p + u for p, u in zip(params, updates)]
            meta_loss += loss
        final = self.problems.loss(params, constants, step_seed(self.unroll))
        return meta_loss + final, final, params, state

    def train_step(self, data):
        del data  # the problems are drawn from seeds: `fit` on `dataset()` only counts steps
        problem, position = tf.convert_to_tensor(self.problem), tf.convert_to_tensor(self.position)
        constants = {k: tf.convert_to_tensor(v) for k, v in self.constant_variables.items()}
        params = [tf.convert_to_tensor(v) for v in self.param_variables]
        state = tf.nest.pack_sequence_as(self.state_structure, [tf.convert_to_tensor(v) for v in self.state_variables])
        with tf.GradientTape() as tape:
            meta_loss, final, params, state = self.unrolled(params, state, constants, problem, position)
        variables = self.rule.trainable_variables
        self.optimizer.apply(tape.gradient(meta_loss, variables), variables)
        position = position + self.unroll
        done = position >= self.horizon

        def fresh():  # drawn only on the meta-step that ends a horizon
            constants, params, state = self.fresh_problem(problem + 1)
            return constants, params, tf.nest.flatten(state)

        next_constants, next_params, next_state = tf.cond(
            done, fresh, lambda: (constants, params, tf.nest.flatten(state)))
        for k, variable in self.constant_variables.items():
            variable.assign(next_constants[k])
        for variable, value in zip(self.param_variables + self.state_variables, next_params + next_state):
            variable.assign(value)
        self.position.assign(tf.where(done, tf.constant(0, tf.int64), position))
        self.problem.assign_add(tf.cast(done, tf.int64))
        return {"loss": meta_loss / (self.unroll + 1), "final_loss": final}

    @staticmethod
    def dataset() -> tf.data.Dataset:
        """What `fit` iterates (with `steps_per_epoch`): one dummy element per meta-step."""
        return tf.data.Dataset.from_tensors(0).repeat()


class _SaveEachEpoch(keras.callbacks.Callback):
    def __init__(self, manager: tf.train.CheckpointManager):
        super().__init__()
        self.manager = manager
        self.non_finite = False

    def on_epoch_end(self, epoch, logs=None):
        if not all(np.isfinite(v) for v in (logs or {}).values()):
            self.non_finite = self.model.stop_training = True
            return
        self.manager.save(checkpoint_number=int(self.model.optimizer.iterations))


def meta_train(trainer: keras.Model, model_dir: str, num_steps: int, steps_per_epoch: int = 100,
               learning_rate: float = 1e-3, verbose: int = 2) -> str:
    """Meta-trains the rule of `trainer` (an `OptimizerTraining` or a `PolicyTraining`) for `num_steps` meta-steps
    with Adam (`learning_rate`; the reference code's
    1e-3), resuming from the last checkpoint in `model_dir/checkpoints` (written after every epoch of
    `steps_per_epoch` meta-steps: a killed run loses at most one epoch, and resumes in the middle of a horizon where
    it stopped). A non-finite meta-loss stops the run with `FloatingPointError`, the last good checkpoint kept.
    Writes the trained rule to `model_dir/rule.json` (`save_rule`) and returns its path."""
    from tfmeta.optimizers.keras_optimizer import save_rule

    checks.integer(num_steps, "num_steps")
    checks.integer(steps_per_epoch, "steps_per_epoch", minimum=1)
    if num_steps % steps_per_epoch:
        raise ValueError(f"`num_steps` ({num_steps}) must be a multiple of `steps_per_epoch` ({steps_per_epoch}).")
    trainer.compile(keras.optimizers.Adam(learning_rate))
    trainer.optimizer.build(trainer.rule.trainable_variables)
    checkpoint = tf.train.Checkpoint(model=trainer, optimizer=trainer.optimizer)
    manager = tf.train.CheckpointManager(checkpoint, os.path.join(model_dir, "checkpoints"), max_to_keep=3)
    if manager.latest_checkpoint:
        checkpoint.restore(manager.latest_checkpoint).assert_consumed()
    done = int(trainer.optimizer.iterations)
    saver = _SaveEachEpoch(manager)
    trainer.fit(trainer.dataset(), steps_per_epoch=steps_per_epoch, epochs=num_steps // steps_per_epoch,
                initial_epoch=done // steps_per_epoch, callbacks=[saver], verbose=verbose)
    if saver.non_finite:
        raise FloatingPointError(f"meta-training stopped at meta-step {int(trainer.optimizer.iterations)}: the "
                                 f"meta-loss is not finite. The last good checkpoint is {manager.latest_checkpoint}; "
                                 "lower the learning rate or the rule's output scale.")
    path = os.path.join(model_dir, "rule.json")
    save_rule(trainer.rule, path)
    return path
