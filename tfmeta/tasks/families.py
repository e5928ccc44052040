"""Families of task distributions, for learning to meta-learn (MALTML, Devos & Dandi, 2020).

A family is itself a task distribution (sine waves sharing one phase, the characters of one alphabet). A family
episode holds L meta-finetuning tasks of one family and G goal tasks of the same family:

  support_x, support_y  [families, L, K, ...]   the task steps' examples of the L meta-finetuning tasks
  query_x, query_y      [families, L, Q, ...]   their meta-step examples
  goal_support_x, ...   [families, G, K, ...]   the goal tasks' finetuning examples
  goal_query_x, ...     [families, G, Q', ...]  the goal tasks' held-out examples

`TaskFamilies.dataset` serves batches of family episodes like any `TaskDistribution`; `goal_tasks()` is the
task distribution of their goal tasks alone, which evaluates a learner that ignores families (MAML) on exactly
the goal tasks a MALTML learner is evaluated on.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import tensorflow as tf

from tfmeta.episodes import FAMILY_KEYS, GOAL_KEYS, SUPERVISED_KEYS  # noqa: F401  (re-exported)
from tfmeta import checks
from tfmeta.tasks.base import FiniteTasks, TaskDistribution
from tfmeta.tasks.sine import SineTasks, _check_range

TASK_KEYS = SUPERVISED_KEYS


class TaskFamilies(TaskDistribution):
    """A distribution over task distributions; `sample(seed, n)` draws n family episodes (module docstring).

    Args:
      num_tasks: L, the meta-finetuning tasks per family episode (>= 1).
      num_goal_tasks: G, the goal tasks per family episode (>= 1).
    """

    def __init__(self, num_tasks: int = 5, num_goal_tasks: int = 2):
        self.num_tasks = checks.integer(num_tasks, "num_tasks", minimum=1)
        self.num_goal_tasks = checks.integer(num_goal_tasks, "num_goal_tasks", minimum=1)

    def goal_tasks(self) -> TaskDistribution:
        """The goal tasks of the family episodes as plain episodes ([families·G, ...]): the same tasks for the
        same seed, for learners that ignore family structure."""
        return _GoalTasks(self)


def goal_tasks(families: TaskFamilies) -> TaskDistribution:
    """`families.goal_tasks()`, for gin configs: `Experiment.eval_tasks = @goal_tasks()`."""
    return families.goal_tasks()


class _GoalTasks(TaskDistribution):
    def __init__(self, families: TaskFamilies):
        self.families = families

    def sample(self, seed, num_tasks):
        g = self.families.num_goal_tasks
        episodes = self.families.sample(seed, math.ceil(num_tasks / g))
        fold = lambda t: tf.reshape(t, tf.concat([[-1], tf.shape(t)[2:]], 0))[:num_tasks]  # noqa: E731
        return {k: fold(episodes[f"goal_{k}"]) for k in TASK_KEYS}


class SineFamilies(TaskFamilies):
    """Sine families (the MALTML paper's regression setting): each family fixes a phase φ ~ U[0, π]; its tasks
    y = A·sin(x − φ) draw their amplitude A ~ U[0.1, 5.0] and inputs x ~ U[−5, 5].

    Args:
      num_tasks, num_goal_tasks: L and G (see `TaskFamilies`).
      num_support: K, examples of a task step (and of goal finetuning).
      num_query: Q, examples of a meta step.
      num_goal_query: held-out examples per goal task (default Q; evaluations use more for a precise error).
      amplitude_range, phase_range, input_range: as in `SineTasks`.
    """

    def __init__(
        self,
        num_tasks: int = 5,
        num_goal_tasks: int = 2,
        num_support: int = 5,
        num_query: int = 5,
        num_goal_query: Optional[int] = None,
        amplitude_range: Sequence[float] = (0.1, 5.0),
        phase_range: Sequence[float] = (0.0, math.pi),
        input_range: Sequence[float] = (-5.0, 5.0),
    ):
        super().__init__(num_tasks, num_goal_tasks)
        self.num_support = checks.integer(num_support, "num_support", minimum=1)
        self.num_query = checks.integer(num_query, "num_query", minimum=1)
        self.num_goal_query = checks.integer(num_query if num_goal_query is None else num_goal_query,
                                             "num_goal_query", minimum=1)
        self.amplitude_range = _check_range(amplitude_range, "amplitude_range")
        self.phase_range = _check_range(phase_range, "phase_range")
        self.input_range = _check_range(input_range, "input_range")

    def sample(self, seed, num_tasks):
        return self.sample_with_parameters(seed, num_tasks)[0]

    def sample_with_parameters(self, seed: tf.Tensor, num_families: int) -> tuple[dict, dict]:
        """`num_families` family episodes and their tasks' parameters: "phase" [families] and "amplitude",
        "goal_amplitude" [families, L] and [families, G]."""
        phase_seed, amplitude_seed, task_seed, goal_seed = tf.unstack(
            tf.random.experimental.stateless_split(seed, 4))
        n, tasks, goals = num_families, self.num_tasks, self.num_goal_tasks
        phase = tf.random.stateless_uniform([n], phase_seed, *self.phase_range)
        amplitude = tf.random.stateless_uniform([n, tasks + goals], amplitude_seed, *self.amplitude_range)
        parameters = {"phase": phase, "amplitude": amplitude[:, :tasks], "goal_amplitude": amplitude[:, tasks:]}
        episodes = {}
        for prefix, count, queries, amplitudes, input_seed in (
            ("", tasks, self.num_query, amplitude[:, :tasks], task_seed),
            ("goal_", goals, self.num_goal_query, amplitude[:, tasks:], goal_seed),
        ):
            x = tf.random.stateless_uniform([n, count, self.num_support + queries, 1], input_seed,
                                            *self.input_range)
            y = SineTasks.function({"amplitude": tf.reshape(amplitudes, [-1]),
                                    "phase": tf.repeat(phase, count)}, tf.reshape(x, [n * count, -1, 1]))
            y = tf.reshape(y, tf.shape(x))
            k = self.num_support
            episodes.update({f"{prefix}support_x": x[:, :, :k], f"{prefix}support_y": y[:, :, :k],
                             f"{prefix}query_x": x[:, :, k:], f"{prefix}query_y": y[:, :, k:]})
        return episodes, parameters


class MixtureFamilies(TaskFamilies):
    """Families given as task distributions (e.g. `FewShotTasks` over one Omniglot alphabet each) or as finite
    sets of tasks (dicts of `support_x`, `support_y`, `query_x`, `query_y` arrays with a leading task axis): a
    family episode picks one family uniformly and draws its L + G tasks from it (from a finite set, without
    replacement). The families must give episodes of the same shapes (same ways and shots)."""

    def __init__(self, families: Sequence, num_tasks: int = 5, num_goal_tasks: int = 2):
        super().__init__(num_tasks, num_goal_tasks)
        families = list(families)
        if not families:
            raise ValueError("`families` must hold at least one family.")
        self.families = [self._as_tasks(f, i) for i, f in enumerate(families)]
        self._signature = None

    def _as_tasks(self, family, index: int) -> TaskDistribution:
        if isinstance(family, TaskDistribution):
            return family
        if not isinstance(family, dict) or not all(k in family for k in TASK_KEYS):
            raise ValueError(f"`families[{index}]` must be a TaskDistribution or a dict with keys {TASK_KEYS}; "
                             f"got {type(family).__name__}.")
        tasks = FiniteTasks({k: tf.convert_to_tensor(family[k]) for k in TASK_KEYS})
        needed = self.num_tasks + self.num_goal_tasks
        if tasks.count < needed:
            raise ValueError(f"`families[{index}]` has {tasks.count} tasks, fewer than the num_tasks + num_goal_tasks "
                             f"= {self.num_tasks} + {self.num_goal_tasks} distinct tasks a family episode draws.")
        return tasks

    def sample(self, seed, num_tasks):
        choice_seed, task_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        chosen = tf.random.stateless_uniform([num_tasks], choice_seed, 0, len(self.families), tf.int32)
        count = self.num_tasks + self.num_goal_tasks

        def one(args):
            index, family_seed = args
            branches = [lambda f=f: f.sample(family_seed, count) for f in self.families]
            return tf.switch_case(index, branches)

        seeds = tf.random.experimental.stateless_split(task_seed, num_tasks)
        if self._signature is None:  # The episodes' specs, from a trace of the first family (nothing runs).
            trace = tf.function(lambda s: self.families[0].sample(s, count))
            outputs = trace.get_concrete_function(tf.TensorSpec([2], seed.dtype)).structured_outputs
            self._signature = {k: tf.TensorSpec(v.shape, v.dtype) for k, v in outputs.items()}
        tasks = tf.map_fn(one, (chosen, seeds), fn_output_signature=self._signature)
        split = self.num_tasks
        return {**{k: v[:, :split] for k, v in tasks.items()},
                **{f"goal_{k}": v[:, split:] for k, v in tasks.items()}}

