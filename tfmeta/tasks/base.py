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
