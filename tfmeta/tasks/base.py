"""Task distributions: seeded, stateless samplers of episodes, served as `tf.data` pipelines."""

from __future__ import annotations

import abc
from typing import Optional

import tensorflow as tf

from tfmeta import checks


class TaskDistribution(abc.ABC):
    """A distribution over tasks. An episode batch is a dict of one of the kinds of `tfmeta.episodes` (e.g.
    `support_x`, `support_y`, `query_x`, `query_y`) with a leading task dimension."""

    @abc.abstractmethod
    def sample(self, seed: tf.Tensor, num_tasks: int) -> dict[str, tf.Tensor]:
        """Draws `num_tasks` episodes as a deterministic function of a stateless seed (int tensor of shape [2])."""

    def dataset(
        self, meta_batch_size: int, seed: int = 0, start: int = 0, num_batches: Optional[int] = None
    ) -> tf.data.Dataset:
        """Batches of `meta_batch_size` episodes; batch `i` is drawn with seed `(seed, i)`.

        Batches depend only on `seed` and their index, so a resumed run continues the same stream from batch
        `start`, and two datasets with different seeds share no task draws. Infinite unless `num_batches`.
        """
        checks.integer(meta_batch_size, "meta_batch_size", minimum=1)
        if start < 0:
            raise ValueError(f"`start` must be >= 0; got {start}.")
        base_seed = tf.constant([seed, 0], tf.int64)
        batches = tf.data.Dataset.counter(start)
        if num_batches is not None:
            batches = batches.take(num_batches)
        batches = batches.map(
            lambda i: self.sample(tf.random.experimental.stateless_fold_in(base_seed, i), meta_batch_size),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        return batches.prefetch(tf.data.AUTOTUNE)


class FiniteTasks(TaskDistribution):
    """A finite set of tasks (episodes with a leading task axis), fixed once: each batch is `num_tasks` of them
    drawn without replacement from the batch's seed."""

    def __init__(self, tasks: dict):
        counts = {k: int(v.shape[0]) for k, v in tasks.items()}
        if len(set(counts.values())) != 1:
            raise ValueError(f"the arrays of a finite set of tasks must hold the same number of tasks; got {counts}.")
        self.tasks = tasks
        self.count = next(iter(counts.values()))

    def sample(self, seed, num_tasks):
        if num_tasks > self.count:
            raise ValueError(f"a batch of {num_tasks} tasks cannot be drawn without replacement from a finite set of "
                             f"{self.count}.")
        chosen = tf.math.top_k(tf.random.stateless_uniform([self.count], seed), num_tasks).indices
        return {k: tf.gather(v, chosen) for k, v in self.tasks.items()}


def finite_tasks(tasks: TaskDistribution, num_tasks: int, seed: int = 0) -> FiniteTasks:
    """`num_tasks` episodes of `tasks` drawn once with `seed` (their points too), as a finite set to meta-train on:
    BMAML's small-set regime (100 or 1,000 sinusoids). Evaluate on `tasks` itself with another seed."""
    checks.integer(num_tasks, "num_tasks", minimum=1, owner="finite_tasks")
    return FiniteTasks(tasks.sample(tf.constant([seed, 0], tf.int64), num_tasks))

