"""MALTML: Model-Agnostic Learning to Meta-Learn (Devos & Dandi, 2020): meta-learning over families of tasks."""

from __future__ import annotations

from typing import Optional, Sequence

import keras
import tensorflow as tf

from tfmeta import checks
from tfmeta.episodic import merge_leading_axes
from tfmeta.inner_loop import Adaptation, inner_loop
from tfmeta.meta_learner import MetaLearner
from tfmeta.tasks.families import FAMILY_KEYS, GOAL_KEYS, TASK_KEYS
from tfmeta.update_rules import Sgd, UpdateRule
from tfmeta.registry import register


@register
class MALTML(MetaLearner):
    """Learns an initialisation θ that, after meta-finetuning on a few tasks of a new family, finetunes quickly
    to a goal task of that family (the paper's Algorithm 1). Per family episode (`tfmeta.tasks.TaskFamilies`):

      task steps         θ'_j  = θ − α ∇ L(θ; D_j)                      for its L meta-finetuning tasks j
      meta-finetuning    θ_F   = θ − β ∇_θ Σ_j L(θ'_j(θ); D'_j)         (the family step, a MAML step)
      goal finetuning    θ''_g = θ_F − γ ∇ L(θ_F; D_g)                   for its goal tasks g
      outer objective    mean_g L(θ''_g; D'_g), minimised over θ by the compiled Keras optimizer (η),

    differentiated through all three levels (third-order derivatives). With β = 0 this is MAML's meta-gradient
    from θ with step γ on the goal tasks. The first-order variant (`first_order=True`) is the paper's Reptile-style
    approximation: θ_F and θ''_g are computed with every gradient treated as a constant, goal finetuning trains on
    all of a goal task's examples (as Reptile does), and the meta-gradient is θ − mean_g θ''_g, so that
    `keras.optimizers.SGD(η)` moves θ ← θ + η·mean_families(θ''_family − θ).

    Args:
      learner: any built Keras model.
      task_rule: the task steps' rule, α (default `Sgd(0.001)`, the paper's).
      family_rule: the meta-finetuning rule, β (default `Sgd(0.01)`).
      update_rule: the goal-finetuning rule, γ (default `Sgd(0.001)`); also what `evaluate` finetunes with.
        A learned rule (e.g. `LearnedSgd(per_element=False, log_space=True)`) meta-learns its step sizes.
      task_steps, family_steps: task steps per meta-finetuning task and meta-finetuning steps per family.
      inner_steps: goal-finetuning steps in meta-training; `eval_inner_steps`: in evaluation.
      first_order: the Reptile-style approximation described above.
      **kwargs: see `MetaLearner`.

    `evaluate` reports the goal tasks' query loss after 0..k finetuning steps from θ_F, and the same from θ
    without the family's meta-update (`loss_without_meta_update`): at 0 steps their difference is the
    improvement the meta-update brings.
    """

    def __init__(
        self,
        learner: keras.Model,
        task_rule: Optional[UpdateRule] = None,
        family_rule: Optional[UpdateRule] = None,
        task_steps: int = 1,
        family_steps: int = 1,
        first_order: bool = False,
        update_rule: Optional[UpdateRule] = None,
        **kwargs,
    ):
        super().__init__(learner, update_rule=Sgd(0.001) if update_rule is None else update_rule, **kwargs)
        rules = {"task_rule": task_rule or Sgd(0.001), "family_rule": family_rule or Sgd(0.01)}
        fast_shapes = [p.shape for p in self.read_params()[0]]
        for argument, rule in rules.items():
            if not isinstance(rule, UpdateRule):
                raise TypeError(f"`{argument}` must be a tfmeta UpdateRule; got {type(rule).__name__}.")
            try:
                rule.check_params(fast_shapes)
            except ValueError as error:
                raise ValueError(f"`{argument}` does not match the partition's fast variables: {error}") from None
        self.task_rule, self.family_rule = rules["task_rule"], rules["family_rule"]
        self.task_steps = checks.integer(task_steps, "task_steps")
        self.family_steps = checks.integer(family_steps, "family_steps")
        self.first_order = bool(first_order)
        if not (self.first_order or self.unroll_inner_loop):
            raise ValueError("MALTML's exact meta-gradient differentiates through the inner loops: it needs "
                             "`unroll_inner_loop=True` (or `first_order=True`).")
        learned = self.task_rule.trainable_variables + self.family_rule.trainable_variables
        if self.first_order and self.inner_steps < 1:
            raise ValueError(f"first-order MALTML needs `inner_steps` >= 1; got {self.inner_steps}.")
        if self.first_order and (learned or self.update_rule.trainable_variables):
            raise ValueError("first-order MALTML gives no meta-gradient to learned step sizes: use fixed rules "
                             "(e.g. Sgd) or `first_order=False`.")

    @property
    def meta_variables(self) -> list[keras.Variable]:
        """The learner's trainable variables, then the goal, task and family rules' (learned step sizes)."""
        rules = [getattr(self, "task_rule", None), getattr(self, "family_rule", None)]
        return super().meta_variables + [v for rule in rules if rule is not None for v in rule.trainable_variables]

    def log_names(self) -> list[str]:
        return super().log_names() + ["loss_without_meta_update", "pre_adapt_loss_without_meta_update"]

    # ---------------------------------------------------------------------------------------- the levels

    def meta_finetune(self, fast, slow, state, episode: dict, *, training: bool, first_order: bool,
                      seed: Optional[tf.Tensor] = None, check_finite: bool = True) -> Adaptation:
        """θ_F: `family_steps` steps of `family_rule` on the meta-finetuning loss Σ_j L(θ'_j; D'_j) of the
        family's L tasks, each θ'_j after `task_steps` steps of `task_rule` on D_j (`check_finite`: see
        `MetaLearner.adapt_episode`)."""
        num_tasks = episode["support_x"].shape[0]
        task_seeds = [None if seed is None else tf.random.experimental.stateless_fold_in(seed, j)
                      for j in range(num_tasks)]

        def family_loss(params, state, step):
            total = 0.0
            for j in range(num_tasks):
                task_episode = {k: episode[k][j] for k in TASK_KEYS}

                def task_loss(task_params, state, task_step, task_episode=task_episode, j=j):
                    return self.inner_objective(task_params, slow, state, task_episode, task_step, training=training,
                                                seed=task_seeds[j], start=params)

                task = inner_loop(task_loss, params, state, self.task_rule, self.task_steps, first_order=first_order,
                                  training=training, seed=task_seeds[j], check_finite=check_finite)
                loss, _, state = self.outer_objective(task.params, slow, task.state, task_episode, training=training,
                                                      seed=task_seeds[j], start=params)
                total += loss
            return total, state

        return inner_loop(family_loss, fast, state, self.family_rule, self.family_steps, first_order=first_order,
                          training=training, seed=seed, check_finite=check_finite)

    def task_gradients(self, episode, state, seed):
        goals = episode["goal_support_x"].shape[0]
        goal_seeds = [tf.random.experimental.stateless_fold_in(seed, 1_000_000 + g) for g in range(goals)]
        if self.first_order:
            return self._first_order_gradients(episode, state, seed, goal_seeds)
        with tf.GradientTape() as tape:
            fast, slow = self.read_params()
            family = self.meta_finetune(fast, slow, state, episode, training=True, first_order=False, seed=seed)
            state, objective, metrics = family.state, 0.0, []
            for g in range(goals):
                goal_episode = {k: episode[f"goal_{k}"][g] for k in TASK_KEYS}
                goal = self.adapt_episode(family.params, slow, state, goal_episode, self.inner_steps, training=True,
                                          seed=goal_seeds[g])
                loss, goal_logs, state = self.outer_objective(goal.params, slow, goal.state, goal_episode,
                                                              training=True, seed=goal_seeds[g], start=family.params)
                objective += loss / goals
                metrics.append(goal_logs)
        grads = tape.gradient(objective, self.meta_variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        logs = {n: tf.add_n([m[n] for m in metrics]) / goals for n in metrics[0]}
        return grads, {"loss": objective, **logs}, state

    def _first_order_gradients(self, episode, state, seed, goal_seeds):
        fast, slow = self.read_params()
        family = self.meta_finetune(fast, slow, state, episode, training=True, first_order=True, seed=seed)
        state, targets, losses = family.state, [], []
        for g, goal_seed in enumerate(goal_seeds):
            x = tf.concat([episode["goal_support_x"][g], episode["goal_query_x"][g]], axis=0)
            y = tf.concat([episode["goal_support_y"][g], episode["goal_query_y"][g]], axis=0)
            goal = self.adapt_params(family.params, slow, state, x, y, self.inner_steps, training=True,
                                     first_order=True, seed=goal_seed)
            state = goal.state
            targets.append(goal.params)
            losses.append(goal.losses[-1])
        target = [tf.add_n(list(ps)) / len(targets) for ps in zip(*targets)]
        grads = self.meta_gradients_for(self.partitioned_variables()[0],
                                        [theta - phi for theta, phi in zip(fast, target)])
        return grads, {"loss": tf.add_n(losses) / len(losses)}, state

    def train_log_names(self) -> list[str]:
        return ["loss"] if self.first_order else super().train_log_names()

    # ------------------------------------------------------------------------------------- evaluation

    def check_episodes(self, episodes: dict) -> dict:
        """Validates a batch of family episodes (`tfmeta.tasks.families`): the tasks of every family, as episodes
        ([families · tasks, examples, ...]), by `MetaLearner.check_episodes`; returns its eight arrays, which
        depend on the value checks."""
        if not isinstance(episodes, dict) or not all(k in episodes for k in FAMILY_KEYS):
            found = sorted(episodes) if isinstance(episodes, dict) else type(episodes).__name__
            raise ValueError(f"MALTML takes family episodes, dicts with keys {FAMILY_KEYS} "
                             f"(see tfmeta.tasks.TaskFamilies); got {found}.")
        e = {k: tf.convert_to_tensor(episodes[k]) for k in FAMILY_KEYS}
        for keys, what in ((TASK_KEYS, "meta-finetuning tasks (L)"), (GOAL_KEYS, "goal tasks (G)")):
            shape = e[keys[0]].shape
            if shape.rank is not None and shape.rank < 4:
                raise ValueError(f"episodes['{keys[0]}'] must have shape [families, tasks, examples, features...]; "
                                 f"got {tuple(shape)}.")
            if shape[1] is None or shape[1] < 1:
                raise ValueError(f"family episodes need a static number >= 1 of {what}; episodes['{keys[0]}'] has "
                                 f"shape {tuple(shape)}.")
            flat = {k: merge_leading_axes(e[key]) for k, key in zip(TASK_KEYS, keys)}
            try:  # The tasks of a family are episodes like any other.
                checked = MetaLearner.check_episodes(self, flat)
            except ValueError as error:
                raise ValueError(f"the {what} of a family: {error}") from None
            for k, key in zip(TASK_KEYS, keys):
                e[key] = tf.ensure_shape(tf.reshape(checked[k], tf.shape(e[key])), e[key].shape)
        return e

    def evaluate_tasks(self, episodes: dict, steps: Optional[int] = None,
                       at_steps: Optional[Sequence[int]] = None) -> dict:
        """Per family, the goal tasks' query loss and metrics (mean over its goal tasks) after each of `at_steps`
        of `steps` finetuning steps from θ_F, and `loss_without_meta_update` from θ: tensors [families, points]."""
        episodes = self.check_episodes(episodes)
        steps, at_steps = self.curve_points(steps, at_steps)
        state = self.read_state()
        goals = episodes["goal_support_x"].shape[1]
        names = ["loss", *self.metric_names()]

        def one_family(index, episode):
            fast, slow = self.read_params()
            family = self.meta_finetune(fast, slow, state, episode, training=False, first_order=True,
                                        check_finite=False)  # a diverging family gives non-finite results
            results = {}
            for start, suffix in ((family.params, ""), (fast, "_without_meta_update")):
                curves = [self.task_curve(start, slow, state, {k: episode[f"goal_{k}"][g] for k in TASK_KEYS},
                                          steps, at_steps) for g in range(goals)]
                for name in names if not suffix else ["loss"]:
                    results[name + suffix] = tf.add_n([c[name] for c in curves]) / goals
            return results

        signature = {n: tf.TensorSpec([len(at_steps)], self._log_dtype)
                     for n in names + ["loss_without_meta_update"]}
        return self.map_tasks(one_family, episodes, signature)

    def adapt(self, support_x, support_y, steps: Optional[int] = None, batch_norm: str = "batch",
              family: Optional[dict] = None) -> keras.Model:
        """The learner finetuned on a goal task's examples with `steps` steps (default `eval_inner_steps`) from
        θ_F, the initialisation meta-finetuned on `family` (a dict of the family's L tasks, `support_x` etc. of
        shape [L, examples, ...]), or from θ without `family`; `batch_norm` as in `MetaLearner.adapt`."""
        steps = checks.integer(self.eval_inner_steps if steps is None else steps, "steps")
        support_x, support_y = self.check_support(support_x, support_y)
        fast, slow = self.read_params()
        if family is not None:
            if not isinstance(family, dict) or not all(k in family for k in TASK_KEYS):
                raise ValueError(f"`family` must be a dict with keys {TASK_KEYS} of shape [L, examples, ...].")
            family = {k: tf.convert_to_tensor(family[k]) for k in TASK_KEYS}
            MetaLearner.check_episodes(self, family)
            state = self.read_state()
            fast = self.meta_finetune(fast, slow, state, family, training=False, first_order=True).params
        return self.adapted_model(fast, slow, support_x, support_y, steps, batch_norm)

    # ----------------------------------------------------------------------------------------- serving

    serves_families = True

    def serve(self, request: dict, steps) -> tf.Tensor:
        """Meta-finetunes on the request's family (`family_support_x`, ... of shape [L, examples, ...]) first, as
        `adapt(family=...)` does, then finetunes on its support set."""
        fast, slow = self.read_params()
        state = self.read_state()
        family = {k: request[f"family_{k}"] for k in TASK_KEYS}
        fast = self.meta_finetune(fast, slow, state, family, training=False, first_order=True).params
        return self.serve_from(fast, slow, state, request, steps)

    # ------------------------------------------------------------------------------------ serialisation

    def get_config(self) -> dict:
        return {**super().get_config(),
                "task_rule": keras.saving.serialize_keras_object(self.task_rule),
                "family_rule": keras.saving.serialize_keras_object(self.family_rule),
                "task_steps": self.task_steps, "family_steps": self.family_steps, "first_order": self.first_order}

    @classmethod
    def from_config(cls, config: dict):
        config = dict(config)
        for key in ("task_rule", "family_rule"):
            config[key] = keras.saving.deserialize_keras_object(config[key])
        return super().from_config(config)
