"""`MetaLearner`: the base of gradient-based meta-learners, which adapt a learner model by an inner loop.

Episodes are supervised or stream episodes (`tfmeta.episodes`), with a leading task dimension. `train_step` runs
`meta_update`: by default one meta-gradient per task (`task_gradients`, mapped over the batch by `map_meta_batch`),
averaged over the tasks and applied with the compiled Keras optimizer. `test_step` adapts to each task's support
data and reports the query loss and metrics before and after adaptation. An algorithm states what differs through
four hooks (docs/architecture.md, "Contracts"): `inner_objective` (what the inner loop minimises),
`outer_objective` (the task's objective after adaptation), `task_gradients` (one task's meta-gradient) and
`meta_update` (what a meta-step does with a batch).

The learner is adapted functionally: its variables are read once per task and every adapted forward pass goes
through `learner.stateless_call` with substituted parameter values; the inner loop never writes a variable.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence, Union

import keras
import tensorflow as tf

from tfmeta import checks
from tfmeta import adapted as adapted_lib
from tfmeta import episodes as episodes_lib
from tfmeta import losses
from tfmeta import partition as partition_lib
from tfmeta.episodic import EpisodicLearner, Metric, merge_leading_axes, specs
from tfmeta.inner_loop import Adaptation, at_step, at_task, inner_loop
from tfmeta.layers import batch_statistics_layers, freeze_batch_statistics
from tfmeta.likelihoods import HeteroscedasticNormal, Likelihood
from tfmeta.update_rules import Sgd, UpdateRule


def _is_seed_state(variable) -> bool:
    return variable.name == "seed_generator_state"


class MetaLearner(EpisodicLearner):
    """Base class of gradient-based meta-learners over a Keras `learner`, adapted by an inner loop.

    Args:
      learner: any built Keras model; its trainable variables are the meta-learned initialisation.
      loss, metrics, task_parallelism, likelihood: see `EpisodicLearner`.
      update_rule: the inner-loop rule (default `Sgd(0.01)`); its variables are meta-learned with the learner.
      inner_steps: inner-loop steps during meta-training.
      eval_inner_steps: inner-loop steps in `evaluate` and `adapt` (default: `inner_steps`).
      partition: which learner variables the inner loop adapts (default: all).
      unroll_inner_loop: unroll inner loops in Python (needed to differentiate through them, e.g. MAML's
        second-order meta-gradient); False runs them in a `tf.while_loop`, whose graph
        and tracing time do not grow with the steps: for first-order algorithms with long inner loops (Leap,
        Reptile) and long evaluations.
      rematerialize_inner_steps: recompute each inner step in the backward pass instead of keeping its
        activations (gradient checkpointing): second-order memory grows with the inner steps by one parameter
        set per step rather than by the activations, for about one more forward-backward pass per step (see
        docs/performance.md for measured memory and time). Only second-order unrolled inner loops keep past
        steps' activations, so first-order and `tf.while_loop` inner loops are unchanged by it.
    """

    takes_support_streams = True

    def __init__(
        self,
        learner: keras.Model,
        loss: Union[str, Callable] = "mse",
        metrics: Sequence[Metric] = (),
        update_rule: Optional[UpdateRule] = None,
        inner_steps: int = 1,
        eval_inner_steps: Optional[int] = None,
        partition: Optional[partition_lib.Partition] = None,
        task_parallelism: str = "auto",
        unroll_inner_loop: bool = True,
        rematerialize_inner_steps: bool = False,
        likelihood: Optional[Likelihood] = None,
        name: Optional[str] = None,
    ):
        if update_rule is not None and not isinstance(update_rule, UpdateRule):
            raise TypeError(f"`update_rule` must be a tfmeta UpdateRule; got {type(update_rule).__name__}.")
        super().__init__(learner, loss=loss, metrics=metrics, task_parallelism=task_parallelism, likelihood=likelihood,
                         name=name)
        if self.likelihood is not None:
            self.likelihood.check_learner(learner)
        elif loss == "gaussian_nll":  # the loss of a heteroscedastic head needs that head too
            HeteroscedasticNormal().check_learner(learner)
        self.partition = partition if partition is not None else partition_lib.Partition()
        self.fast_mask = self.partition.mask(learner)
        self.update_rule = update_rule if update_rule is not None else Sgd(0.01)
        fast_variables, _ = partition_lib.split(learner.trainable_variables, self.fast_mask)
        try:
            self.update_rule.check_params(self.fast_shapes(fast_variables))
        except ValueError as error:
            raise ValueError(f"`update_rule` does not match the partition's fast variables: {error}") from None
        self.inner_steps = checks.integer(inner_steps, "inner_steps")
        self.eval_inner_steps = checks.integer(
            inner_steps if eval_inner_steps is None else eval_inner_steps, "eval_inner_steps"
        )
        self.unroll_inner_loop = bool(unroll_inner_loop)
        self.rematerialize_inner_steps = bool(rematerialize_inner_steps)
        self.task_seeds = keras.random.SeedGenerator(name="task_seeds")  # for update rules that sample
        self.built = True  # Nothing to build: stops `fit` from tracing the model on an episode.

    # ----------------------------------------------------------------------------------------------- pieces

    def fast_shapes(self, fast_variables: Sequence[keras.Variable]) -> list[tuple]:
        """The shapes of the fast parameters the update rule sees (algorithms that adapt several models at
        once, `tfmeta.algorithms.EMAML`, stack them on a leading axis)."""
        return [tuple(v.shape) for v in fast_variables]

    @property
    def meta_variables(self) -> list[keras.Variable]:
        """What the outer loop learns: the learner's trainable variables, then the update rule's."""
        return self.learner.trainable_variables + self.update_rule.trainable_variables

    @property
    def context_mask(self) -> tuple[bool, ...]:
        """Per meta-variable, whether it is a context parameter (a task embedding, `partition.context_weights`):
        those restart from their initial value in every task and get no meta-gradient."""
        context = {id(v) for v in partition_lib.context_weights(self.learner)}
        return tuple(id(v) in context for v in self.meta_variables)

    def partitioned_variables(self) -> tuple[list[keras.Variable], list[keras.Variable]]:
        """The learner's (fast, slow) trainable variables: what the inner loop adapts, and what it does not."""
        return partition_lib.split(self.learner.trainable_variables, self.fast_mask)

    def meta_gradients_for(self, variables: Sequence[keras.Variable], grads: Sequence[tf.Tensor]) -> list[tf.Tensor]:
        """The meta-gradient in `meta_variables` order from the gradients `grads` of `variables` (any of the
        meta-variables, in any order); the others get zeros. The one owner of the layout, for algorithms whose
        meta-gradient is not a tape's gradient of all meta-variables (Reptile, iMAML)."""
        by_variable = {id(v): g for v, g in zip(variables, grads)}
        meta_variables = self.meta_variables
        unknown = set(by_variable) - {id(v) for v in meta_variables}
        if unknown:
            raise ValueError(f"meta_gradients_for: {len(unknown)} of the variables are not meta-variables of "
                             f"'{self.name}'.")
        return [by_variable[id(v)] if id(v) in by_variable else tf.zeros(v.shape, v.dtype) for v in meta_variables]

    def log_names(self) -> list[str]:
        """The query loss and metrics after adaptation, and before it (`pre_adapt_*`, in `evaluate`)."""
        names = super().log_names()
        return names + [f"pre_adapt_{n}" for n in names]

    def call(self, inputs, training=False):
        """The learner at the meta-learned initialisation."""
        return self.learner(inputs, training=training)

    def read_params(self) -> tuple[list[tf.Tensor], list[tf.Tensor]]:
        """The learner's current (fast, slow) trainable values; read inside a tape to differentiate them."""
        values = [tf.convert_to_tensor(v) for v in self.learner.trainable_variables]
        return partition_lib.split(values, self.fast_mask)

    def forward(self, fast, slow, state, x, training: bool, step: Optional[int] = None):
        """The learner's output for fast parameter values `fast`: returns `(outputs, new_state)`. `step` marks
        a query pass after that many inner steps (for layers that depend on the step)."""
        return self._stateless_call(fast, slow, state, x, training, step)

    def task_objective(self, fast, slow, state, x, y, training: bool, step: Optional[int] = None):
        """The task loss of fast parameters `fast` on examples `(x, y)`, with the learner's own Keras losses
        (`kernel_regularizer`, `add_loss`) at those parameters added, as Keras' `fit` adds them: what the inner
        loop minimises on a support set and the outer loop on a query set. Returns `(loss, outputs, new_state)`."""
        outputs, state, losses = self._stateless_call(fast, slow, state, x, training, step, return_losses=True)
        loss = self.loss_value(y, outputs)
        if losses:
            loss += tf.cast(tf.add_n(losses), loss.dtype)
        return loss, outputs, state

    def _stateless_call(self, fast, slow, state, x, training: bool, step, return_losses: bool = False):
        trainable = partition_lib.merge(fast, slow, self.fast_mask)
        kwargs = {"training": training} if self.learner._call_has_training_arg else {}
        with contextlib.nullcontext() if step is None else at_step(step):
            return self.learner.stateless_call(trainable, state, x, return_losses=return_losses, **kwargs)

    def inner_objective(self, fast, slow, state, episode: dict, step, *, training: bool,
                        seed: Optional[tf.Tensor] = None, start: Optional[list] = None) -> tuple[tf.Tensor, list]:
        """What the inner loop minimises at inner step `step`: returns `(loss, new_state)` for fast parameters
        `fast`. The default is the task objective (`task_objective`) on the step's support examples
        (`support_examples`: all of them, or batch `step` of a stream); `step=None` asks for the objective on all of
        the task's support data (iMAML's Hessian). Override it for another inner objective (a policy's surrogate
        loss on rollouts it samples, an ELBO); `seed` is the task's stateless seed (fold the step and a constant of
        your own into it before sampling) and `start` the fast parameters the adaptation started from."""
        x, y = self.support_examples(episode, step)
        loss, _, state = self.task_objective(fast, slow, state, x, y, training=training)
        return loss, state

    def outer_objective(self, fast, slow, state, episode: dict, *, training: bool, step=None,
                        seed: Optional[tf.Tensor] = None, start: Optional[list] = None) -> tuple[tf.Tensor, dict, list]:
        """What the outer loop minimises for one task at adapted fast parameters `fast`, after `step` inner steps
        (None: the learner's query pass is not marked with a step): returns `(loss, logs, new_state)`, where `logs`
        are the task metrics (named by `metric_names`) that training and evaluation report. The default is the query
        loss (`task_objective` on `query_x`, `query_y`); `seed` and `start` are as in `inner_objective` (an outer
        objective on rollouts needs the pre-adaptation policy `start` for the sampling distribution's term). Every
        algorithm, the evaluation and `adapt` go through this hook and `inner_objective`."""
        loss, predictions, state = self.task_objective(fast, slow, state, episode["query_x"], episode["query_y"],
                                                       training=training, step=step)
        scored = self.likelihood is not None and not training
        predictive = self.adapted_predictive(fast, predictions) if scored else None
        return loss, self.metric_values(episode["query_y"], predictions, predictive, scores=not training), state

    def adapted_predictive(self, fast, outputs):
        """The predictive distribution of the targets given the outputs of the learner at fast parameters `fast`:
        `predictive(outputs)`, unless the parameters carry their own noise (BMAML's particles)."""
        return self.predictive(outputs)

    def adapt_episode(
        self, fast, slow, state, episode: dict, steps, *, training: bool, first_order: bool = False,
        keep_trajectory: bool = False, seed: Optional[tf.Tensor] = None, check_finite: bool = True,
    ) -> Adaptation:
        """Runs the inner loop from `fast` on the inner objective of one task (`inner_objective` of `episode`).
        `check_finite=False` lets a diverging adaptation run on (an evaluation records its non-finite results)
        instead of failing at its first non-finite loss."""

        def objective(params, state, step):
            return self.inner_objective(params, slow, state, episode, step, training=training, seed=seed, start=fast)

        return inner_loop(
            objective, fast, state, self.update_rule, steps,
            first_order=first_order, keep_trajectory=keep_trajectory, training=training, seed=seed,
            unroll=self.unroll_inner_loop, rematerialize=self.rematerialize_inner_steps, check_finite=check_finite,
        )

    def adapt_params(self, fast, slow, state, x, y, steps, **kwargs) -> Adaptation:
        """`adapt_episode` on the support set `(x, y)` of a supervised task (keyword arguments: see there)."""
        return self.adapt_episode(fast, slow, state, {"support_x": x, "support_y": y}, steps, **kwargs)

    def is_stream(self, episode: dict) -> bool:
        """Whether a task's support data is a stream of batches (`stream_x`, `stream_y`: one per inner step, e.g. the
        mini-batches of multi-shot adaptation) rather than one support set (see `tfmeta.episodes`)."""
        return episodes_lib.is_stream(episode)

    def check_targets(self, targets: dict, name) -> None:
        """For the losses `tfmeta.losses.target_kind` knows, the targets' per-example shape must be the learner's
        output shape (e.g. MSE) or, for integer class labels, that shape without its last axis (the classes; a
        trailing axis of 1 is accepted too, as Keras' sparse losses squeeze it)."""
        kind, outputs = losses.target_kind(self.loss_object), getattr(self.learner, "outputs", None)
        if kind is None or not outputs or len(outputs) != 1:
            return
        output_shape = tuple(outputs[0].shape[1:])
        expected = [output_shape[:-1], output_shape[:-1] + (1,)] if kind == "labels" else [output_shape]
        what = "integer class labels" if kind == "labels" else "targets"
        for key, (shape, dtype) in targets.items():
            if not any(shape.is_compatible_with(e) for e in expected):
                raise ValueError(
                    f"{name(key)} must hold {what} of shape {tuple(expected[0])} per example for the loss of learner "
                    f"'{self.learner.name}', whose outputs have shape {tuple(output_shape)}; got {tuple(shape)} per "
                    f"example{' (one-hot labels: pass their argmax)' if kind == 'labels' else ''}.")
            if kind == "labels" and not dtype.is_integer:
                raise ValueError(f"{name(key)} must hold integer class labels for the loss of learner "
                                 f"'{self.learner.name}'; got dtype {dtype.name}.")

    def value_checks(self, tensors: dict, name) -> list:
        """`EpisodicLearner.value_checks`, and class labels within the learner's head: 0..outputs-1."""
        checks = super().value_checks(tensors, name)
        outputs = getattr(self.learner, "outputs", None)
        if losses.target_kind(self.loss_object) != "labels" or not outputs or outputs[0].shape[-1] is None:
            return checks
        ways = outputs[0].shape[-1]
        for key in ("support_y", "stream_y", "query_y"):
            if key in tensors and tensors[key].dtype.is_integer:
                labels = tf.cast(tensors[key], tf.int64)
                checks.append(tf.debugging.assert_non_negative(labels, message=f"{name(key)} holds negative labels"))
                checks.append(tf.debugging.assert_less(labels, tf.constant(ways, tf.int64), message=(
                    f"{name(key)} holds class labels outside 0..{ways - 1}: learner {self.learner.name} has "
                    f"{ways} outputs")))
        return checks

    def support_examples(self, episode: dict, step=None) -> tuple[tf.Tensor, tf.Tensor]:
        """The support examples `(x, y)` of inner step `step` (a Python int or an int tensor) of a task: its support
        set, or for a stream its batch `step` (cycling when there are more steps than batches); with `step=None`
        all of them (a stream's batches as one set)."""
        if not self.is_stream(episode):
            return episode["support_x"], episode["support_y"]
        x, y = episode["stream_x"], episode["stream_y"]
        if step is None:
            return merge_leading_axes(x), merge_leading_axes(y)
        index = step % tf.shape(x)[0]
        return tf.gather(x, index), tf.gather(y, index)

    def task_gradients(self, episode: dict, state: list, seed: tf.Tensor) -> tuple[list, dict, list]:
        """For one task: the meta-gradient for each of `meta_variables`, the scalar logs named by
        `train_log_names()` and the learner's non-trainable state after the task. `seed` is a stateless seed
        of the task, for update rules that sample. Algorithms implement this."""
        raise NotImplementedError

    def train_log_names(self) -> list[str]:
        """The logs `task_gradients` returns: the loss and the task metrics after adaptation (without a
        likelihood's scores, which evaluation reports: their predictive CDFs cost a meta-step more than they tell)."""
        scores = set(self.likelihood.score_names()) if self.likelihood is not None else set()
        return ["loss", *[n for n in self.metric_names() if n not in scores]]

    # ----------------------------------------------------------------------------------- meta-batches

    def compute_meta_gradients(self, episodes: dict) -> tuple[list, dict, list]:
        """The meta-gradient of a batch of episodes (the mean over tasks), the mean logs and the new state."""
        episodes = self.check_episodes(episodes)
        state = self.read_state()

        def one_task(episode, task_state, seed):
            grads, logs, new_state = self.task_gradients(episode, task_state, seed)
            return grads, {k: tf.cast(v, self._log_dtype) for k, v in logs.items()}, new_state

        signature = (specs(self.meta_variables), self._log_spec(self.train_log_names()), specs(state))
        grads, logs, states = self.map_meta_batch(one_task, episodes, signature, state, self.task_seeds.next())
        # A non-finite meta-objective stops the step here, naming the task, before its meta-gradient reaches the
        # weights (and before the next step fails on them).
        finite = tf.math.is_finite(logs["loss"])
        check = tf.debugging.Assert(tf.reduce_all(finite), [
            "tfmeta: non-finite meta-objective (NaN or inf) of task", tf.argmin(tf.cast(finite, tf.int32),
                                                                                output_type=tf.int32),
            "of the meta-batch (its query loss: non-finite targets, or an exploding adaptation)"])
        with tf.control_dependencies([check]):
            grads = [tf.identity(g) for g in grads]
        # Context parameters (task embeddings) restart from their initial value in every task: no meta-gradient.
        grads = [tf.zeros_like(g[0]) if c else tf.reduce_mean(g, axis=0) for g, c in zip(grads, self.context_mask)]
        logs = {k: tf.reduce_mean(v, axis=0) for k, v in logs.items()}
        return grads, logs, self.merge_task_states(states)

    def map_meta_batch(self, per_task: Callable, episodes: dict, signature, state: list, batch_seed: tf.Tensor):
        """Maps `per_task(episode, task_state, seed)` over the tasks of a meta-batch (`map_tasks`) with what every
        algorithm's meta-step shares: each task's stateless seed (`batch_seed` folded with the task's global index,
        unique across replicas), its own random stream in the learner's state (`task_state`) and `at_task`, which
        error messages name."""
        _, tasks = self.task_count(episodes)

        def one_task(index, episode):
            index = self.global_task_index(index, tasks)
            with at_task(index):
                return per_task(episode, self.task_state(state, index),
                                tf.random.experimental.stateless_fold_in(batch_seed, index))

        return self.map_tasks(one_task, episodes, signature)

    def task_state(self, state: list, index) -> list:
        """The learner's state for task `index` of a meta-batch: each task draws its own random stream (dropout
        masks), so the state of every seed generator is offset by the task index."""
        return [s + tf.cast(index, s.dtype) * tf.constant([1, 0], s.dtype) if _is_seed_state(v) else s
                for v, s in zip(self.learner.non_trainable_variables, state)]

    def merge_task_states(self, states: list) -> list:
        """The learner's state after a meta-batch from its per-task states (leading task axis): statistics are
        averaged over tasks; seed states continue from task 0, whose offset is zero."""
        return [s[0] if _is_seed_state(v) or not s.dtype.is_floating else tf.reduce_mean(s, axis=0)
                for v, s in zip(self.learner.non_trainable_variables, states)]

    def train_step(self, data):
        episodes, _, _ = keras.utils.unpack_x_y_sample_weight(data)  # `train_on_batch` passes (x, None, None)
        return self._update_trackers(self.meta_update(episodes))

    def meta_update(self, episodes: dict) -> dict:
        """One meta-step on a batch of episodes: returns its logs (named by `train_log_names`). By default one
        optimizer update with the mean meta-gradient (`compute_meta_gradients`); an algorithm that updates several
        times per meta-step, or keeps buffers (WarpGrad's warp updates, ContinualWarpGrad's streams), overrides
        this and reuses `map_meta_batch`, `apply_gradients` and `merge_task_states`."""
        grads, logs, state = self.compute_meta_gradients(episodes)
        self.update(grads, self.meta_variables, state)
        return logs

    def evaluate_tasks(
        self, episodes: dict, steps: Optional[int] = None, at_steps: Optional[Sequence[int]] = None
    ) -> dict:
        """Adapts to each task's support set with `steps` inner steps (default `eval_inner_steps`, in inference
        mode) and returns, per task, the query loss and metrics after each of `at_steps` steps (default: before
        and after adaptation) as tensors of shape `[tasks, len(at_steps)]`."""
        episodes = self.check_episodes(episodes)
        steps, at_steps = self.curve_points(steps, at_steps)
        state = self.read_state()

        def one_task(index, episode):
            fast, slow = self.read_params()
            return self.task_curve(fast, slow, state, episode, steps, at_steps)

        signature = {n: tf.TensorSpec([len(at_steps)], self._log_dtype) for n in ["loss", *self.metric_names()]}
        return self.map_tasks(one_task, episodes, signature)

    def predict_tasks(self, episodes: dict, steps: Optional[int] = None) -> dict:
        """Per task, the likelihood's summary of the predictive distribution of the query targets after `steps`
        inner steps (default `eval_inner_steps`, inference mode, as `evaluate` adapts): "probabilities" and
        "classes" [tasks, queries, ...], or "mean" and "stddev". What calibration statistics pooled over episodes
        read (`tfmeta.evaluation.calibration_report`)."""
        if self.likelihood is None:
            raise ValueError(f"predict_tasks needs the predictive distribution of a likelihood: build {self.name} "
                             "with `likelihood=` (tfmeta.likelihoods).")
        episodes = self.check_episodes(episodes)
        steps = checks.integer(self.eval_inner_steps if steps is None else steps, "steps")
        state = self.read_state()

        def one_task(index, episode):
            fast, slow = self.read_params()
            return self.predictive_summary(fast, slow, state, episode, steps, check_finite=False)

        one = {k: tf.TensorSpec(v.shape[1:], v.dtype) for k, v in episodes.items()}
        traced = tf.function(lambda e: one_task(tf.constant(0), e), autograph=False).get_concrete_function(one)
        signature = tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype), traced.structured_outputs)
        return self.map_tasks(one_task, episodes, signature)

    def predictive_summary(self, fast, slow, state, episode: dict, steps, check_finite: bool = True) -> dict:
        """The likelihood's summary of the predictive distribution of one task's query targets after `steps` inner
        steps from the fast parameters `fast` (inference mode)."""
        adaptation = self.adapt_episode(fast, slow, state, episode, steps, training=False, check_finite=check_finite)
        outputs, _ = self.forward(adaptation.params, slow, state, episode["query_x"], training=False, step=steps)
        return self.likelihood.summary(self.adapted_predictive(adaptation.params, outputs))

    def curve_points(self, steps: Optional[int], at_steps: Optional[Sequence[int]]) -> tuple[int, tuple]:
        """`evaluate_tasks`' inner steps (default `eval_inner_steps`) and the steps to report (default: before and
        after adaptation), checked."""
        steps = checks.integer(self.eval_inner_steps if steps is None else steps, "steps")
        at_steps = (0, steps) if at_steps is None else tuple(at_steps)
        if not all(0 <= k <= steps for k in at_steps):
            raise ValueError(f"`at_steps` must lie in [0, {steps}]; got {at_steps}.")
        return steps, at_steps

    def task_curve(self, fast, slow, state, episode: dict, steps: int, at_steps: Sequence[int]) -> dict:
        """One task's query loss and metrics after each of `at_steps` of `steps` inner steps (inference mode)
        from the fast parameters `fast`: a dict of tensors of shape [len(at_steps)]."""
        adaptation = self.adapt_episode(  # a task that diverges gives non-finite results, which the report names
            fast, slow, state, episode, steps, training=False, keep_trajectory=True, check_finite=False,
        )

        def query_results(params, k=None):
            loss, logs, _ = self.outer_objective(params, slow, state, episode, training=False, step=k, start=fast)
            return {n: tf.cast(v, self._log_dtype) for n, v in {"loss": loss, **logs}.items()}

        if self.unroll_inner_loop:
            results = [query_results(adaptation.trajectory[k], k) for k in at_steps]
            return {n: tf.stack([r[n] for r in results]) for n in results[0]}
        # One query pass in the graph, mapped over the points (and their step, for per-step layers).
        points = [tf.stack([adaptation.trajectory[k][i] for k in at_steps]) for i in range(len(fast))]
        return tf.map_fn(lambda point: query_results(*point), (points, tf.constant(at_steps)), fn_output_signature={
            n: tf.TensorSpec([], self._log_dtype) for n in ["loss", *self.metric_names()]})

    # ------------------------------------------------------------------------------------------ adapt

    def adapt(self, support_x, support_y, steps: Optional[int] = None, batch_norm: str = "batch") -> keras.Model:
        """Adapts the learner to one task's support set and returns it as a new Keras model.

        The result is a copy of the learner (same architecture) carrying the adapted weights: it can `predict`,
        be saved and be trained further. Adaptation runs in inference mode, as in `evaluate`, and the copy
        predicts what `evaluate` scores. For a learner that normalises with batch statistics at inference
        (`tfmeta.layers.batch_statistics_layers`), `batch_norm` says how:
          "batch" (default, `evaluate`'s policy): the copy comes wrapped in a `TransductiveModel`, which
            normalises the whole input it is given as one batch, as `evaluate` normalises the query set,
            whatever `predict`'s `batch_size`;
          "support": the normalisation is fixed to the statistics of the support set at the adapted weights
            (`tfmeta.layers.freeze_batch_statistics`), so each example is predicted on its own (an inductive
            classifier, which `evaluate` does not score).
        Learners with per-step batch norm predict with the set of inner step `steps`, as `evaluate` does.
        """
        steps = checks.integer(self.eval_inner_steps if steps is None else steps, "steps")
        support_x, support_y = self.check_support(support_x, support_y)
        fast, slow = self.read_params()
        return self.adapted_model(fast, slow, support_x, support_y, steps, batch_norm)

    def adapted_model(self, fast, slow, support_x, support_y, steps: int, batch_norm: str = "batch") -> keras.Model:
        """A copy of the learner carrying the parameters adapted from `fast` to `(support_x, support_y)` (see
        `adapt`)."""
        if batch_norm not in adapted_lib.BATCH_NORM_POLICIES:
            raise ValueError(f"`batch_norm` must be one of {adapted_lib.BATCH_NORM_POLICIES}; got {batch_norm!r}.")
        state = self.read_state()
        adaptation = self.adapt_episode(fast, slow, state, {"support_x": support_x, "support_y": support_y}, steps,
                                        training=False)
        try:
            adapted = keras.models.clone_model(self.learner)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"`adapt` returns a copy of learner '{self.learner.name}' made by keras.models.clone_model, which "
                "rebuilds a subclassed model from its get_config(): give its __init__ **kwargs for Keras' own "
                f"arguments (and a get_config for its own). Cloning failed with: {error}") from None
        if not adapted.built:
            adapted(support_x[:1])
        values = partition_lib.merge(adaptation.params, slow, self.fast_mask) + state
        variables = adapted.trainable_variables + adapted.non_trainable_variables
        if [tuple(v.shape) for v in variables] != [tuple(t.shape) for t in values]:
            raise ValueError(f"keras.models.clone_model did not reproduce learner '{self.learner.name}' faithfully.")
        for variable, value in zip(variables, values):
            variable.assign(value)
        for layer in adapted._flatten_layers(include_self=True):  # per-step layers: the set after `steps` steps
            if hasattr(layer, "inference_step"):
                layer.inference_step = steps
        if not batch_statistics_layers(adapted):
            return adapted
        if batch_norm == "support":
            freeze_batch_statistics(adapted, support_x)
            return adapted
        return adapted_lib.TransductiveModel(adapted, name=f"{adapted.name}_adapted")

    # ----------------------------------------------------------------------------------------- serving

    serves_inner_steps = True

    def serving_ways(self) -> Optional[int]:
        outputs = getattr(self.learner, "outputs", None)
        return outputs[0].shape[-1] if outputs else None

    def serve(self, request: dict, steps) -> tf.Tensor:
        fast, slow = self.read_params()
        return self.serve_from(fast, slow, self.read_state(), request, steps)

    def serve_predictive(self, request: dict, steps) -> dict:
        fast, slow = self.read_params()
        episode = {k: request[k] for k in ("support_x", "support_y", "query_x")}
        return self.predictive_summary(fast, slow, self.read_state(), episode, steps)

    def serve_from(self, fast, slow, state, request: dict, steps) -> tf.Tensor:
        """`serve` from the fast parameters `fast`: the inner loop on the request's support set, then the query
        pass after `steps` steps."""
        support = {k: request[k] for k in ("support_x", "support_y")}
        adaptation = self.adapt_episode(fast, slow, state, support, steps, training=False)
        outputs, _ = self.forward(adaptation.params, slow, state, request["query_x"], training=False, step=steps)
        return outputs

    # ------------------------------------------------------------------------------------ serialisation

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "update_rule": keras.saving.serialize_keras_object(self.update_rule),
            "inner_steps": self.inner_steps,
            "eval_inner_steps": self.eval_inner_steps,
            "partition": self.partition.get_config(),
            "unroll_inner_loop": self.unroll_inner_loop,
            "rematerialize_inner_steps": self.rematerialize_inner_steps,
        }

    @classmethod
    def from_config(cls, config: dict):
        config = dict(config)
        config["update_rule"] = keras.saving.deserialize_keras_object(config["update_rule"])
        config["partition"] = partition_lib.Partition(**config["partition"])
        return super().from_config(config)
