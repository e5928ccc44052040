"""Multi-shot tasks: each task is one group of classes (an Omniglot alphabet) learned from a stream of mini-batches,
the protocol of Leap and WarpGrad (Flennerhag et al., 2019, Section 4.1; 2020, Section 4.2)."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from tfmeta import checks
from tfmeta.data.augment import RandomAffine
from tfmeta.data.classes import ClassImages
from tfmeta.data.few_shot import Augmentation
from tfmeta.data.omniglot import alphabet_split
from tfmeta.tasks.base import TaskDistribution


class GroupTasks(TaskDistribution):
    """`ways`-way tasks, each over the classes of one group (e.g. the characters of one alphabet): the task learner
    is tested on the first `test_examples` examples of each class and trains on a stream of `steps` mini-batches
    of `batch_size` drawn from the next `train_examples` (epochs without replacement, augmented).

    Groups with fewer than `ways` classes are dropped; a task draws its group uniformly, then `ways` of the
    group's classes without replacement, labelled 0..ways-1 in a random order.

    Episodes are streams (`tfmeta.episodes`): `stream_x` [tasks, steps, batch_size, H, W, C] (one batch per inner
    step, see `MetaLearner.support_examples`), `stream_y` [tasks, steps, batch_size], `query_x` [tasks, ways *
    test_examples, H, W, C] (not augmented), `query_y`.
    """

    def __init__(self, classes: ClassImages, ways: int = 20, train_examples: int = 15, test_examples: int = 5,
                 steps: int = 100, batch_size: int = 20, augmentation: Optional[Augmentation] = None):
        for name, value in (("ways", ways), ("train_examples", train_examples), ("test_examples", test_examples),
                            ("steps", steps), ("batch_size", batch_size)):
            checks.integer(value, name, minimum=1, owner="GroupTasks")
        if train_examples + test_examples > int(classes.counts.min()):
            raise ValueError(f"`train_examples` + `test_examples` = {train_examples + test_examples} is more than the "
                             f"{int(classes.counts.min())} examples of the smallest class.")
        members = {}
        for index, group in enumerate(classes.groups):
            members.setdefault(group, []).append(index)
        kept = {g: m for g, m in sorted(members.items()) if len(m) >= ways}
        if not kept:
            sizes = {g: len(m) for g, m in members.items()}
            raise ValueError(f"no group has `ways`={ways} classes; classes per group: {sizes}.")
        self.groups = list(kept)
        self.dropped = sorted(set(members) - set(kept))
        self.classes, self.ways, self.steps, self.batch_size = classes, ways, steps, batch_size
        self.train_examples, self.test_examples = train_examples, test_examples
        self.augmentation = augmentation
        width = max(len(m) for m in kept.values())
        table = np.zeros((len(kept), width), np.int32)
        for g, m in enumerate(kept.values()):
            table[g, :len(m)] = m
        self._table = tf.constant(table)
        self._sizes = tf.constant([len(m) for m in kept.values()], tf.int32)
        self._images = tf.constant(classes.images)

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.classes.images.shape[2:])

    def sample(self, seed, num_tasks):
        group_seed, class_seed, label_seed, order_seed, augment_seed = tf.unstack(
            tf.random.experimental.stateless_split(seed, 5))
        group = tf.random.stateless_uniform([num_tasks], group_seed, 0, len(self.groups), tf.int32)
        # `ways` classes of the group without replacement: the largest of uniform keys over its valid slots.
        keys = tf.random.stateless_uniform([num_tasks, self._table.shape[1]], class_seed)
        valid = tf.range(self._table.shape[1])[None] < tf.gather(self._sizes, group)[:, None]
        _, slots = tf.math.top_k(tf.where(valid, keys, -1.0), self.ways)
        chosen = tf.gather(tf.gather(self._table, group), slots, batch_dims=1)  # [tasks, ways]
        labels = tf.argsort(tf.random.stateless_uniform([num_tasks, self.ways], label_seed), axis=-1)

        # The training stream: passes over the ways * train_examples pool, each in a fresh random order.
        pool = self.ways * self.train_examples
        passes = math.ceil(self.steps * self.batch_size / pool)
        order = tf.argsort(tf.random.stateless_uniform([num_tasks, passes, pool], order_seed), axis=-1)
        order = tf.reshape(order, [num_tasks, passes * pool])[:, :self.steps * self.batch_size]
        slot, example = order // self.train_examples, order % self.train_examples
        support_x = tf.gather_nd(self._images, tf.stack([tf.gather(chosen, slot, batch_dims=1),
                                                         self.test_examples + example], -1))
        support_y = tf.gather(labels, slot, batch_dims=1)
        if self.augmentation is not None:
            support_x = self.augmentation(support_x, augment_seed)

        query_x = tf.gather(self._images[:, :self.test_examples], chosen)  # [tasks, ways, test_examples, ...]
        query_y = tf.broadcast_to(labels[..., None], [num_tasks, self.ways, self.test_examples])
        return {"stream_x": tf.reshape(support_x, [num_tasks, self.steps, self.batch_size, *self.image_shape]),
                "stream_y": tf.reshape(support_y, [num_tasks, self.steps, self.batch_size]),
                "query_x": tf.reshape(query_x, [num_tasks, self.ways * self.test_examples, *self.image_shape]),
                "query_y": tf.reshape(query_y, [num_tasks, self.ways * self.test_examples])}


# Held-out alphabets for multi-shot Omniglot on the small archives: Tagalog (17 characters) cannot make a 20-way
# task, so Early_Aramaic (22) joins Balinese (24); the other 5 alphabets (24-47 characters) are for meta-training.
MULTI_SHOT_TEST_ALPHABETS = ("Balinese", "Early_Aramaic")


def omniglot_alphabet_tasks(
    split: str = "train",
    path: Optional[str] = None,
    test_alphabets: Sequence[str] = MULTI_SHOT_TEST_ALPHABETS,
    ways: int = 20,
    train_drawers: int = 15,
    test_drawers: int = 5,
    steps: int = 100,
    batch_size: int = 20,
    affine: bool = True,
    image_size: int = 28,
) -> GroupTasks:
    """Multi-shot Omniglot (Leap / WarpGrad protocol): each alphabet a `ways`-way task (alphabets with fewer
    characters dropped), drawers 1..`test_drawers` for testing (as the official WarpGrad code holds out each
    character's first 5 images) and the next `train_drawers` for training (a stream of `steps` batches of
    `batch_size`, randomly affine-transformed if `affine`); alphabet-level splits
    ("train": every alphabet not in `test_alphabets`; "test": `test_alphabets`)."""
    classes = alphabet_split(split, path, test_alphabets, image_size)  # a character's images in drawer order
    return GroupTasks(classes, ways=ways, train_examples=train_drawers, test_examples=test_drawers,
                      steps=steps, batch_size=batch_size, augmentation=RandomAffine() if affine else None)
