"""N-way K-shot episodes sampled from classes of images, vectorised over the tasks of a batch."""

from __future__ import annotations

from typing import Callable, Optional

import tensorflow as tf

from tfmeta import checks
from tfmeta.data.classes import ClassImages
from tfmeta.tasks.base import TaskDistribution

Augmentation = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]


def rotate90(images: tf.Tensor, quarter_turns: tf.Tensor) -> tf.Tensor:
    """Rotates each image [..., H, W, C] counter-clockwise by its own number of quarter turns (0-3), for square
    images; `quarter_turns` has the leading shape of `images`."""
    once = tf.reverse(tf.linalg.matrix_transpose(tf.experimental.numpy.moveaxis(images, -1, -3)), [-2])
    once = tf.experimental.numpy.moveaxis(once, -3, -1)
    twice = tf.reverse(images, [-3, -2])
    thrice = tf.reverse(once, [-3, -2])
    turns = tf.reshape(quarter_turns, tf.concat([tf.shape(quarter_turns), [1, 1, 1]], 0))
    return tf.where(turns == 0, images, tf.where(turns == 1, once, tf.where(turns == 2, twice, thrice)))


class FewShotTasks(TaskDistribution):
    """N-way K-shot classification episodes over the classes of a `ClassImages`.

    Each episode draws `ways` distinct classes, then `shots` + `queries` distinct examples of each class
    (support and query never share an example), and labels the classes 0..N-1 in a random order.
    Episode batches are drawn with vectorised stateless ops, so a batch is a pure function of its seed.

    Args:
      classes: the classes to draw from (one split: classes are never shared between splits).
      ways, shots, queries: N, K and Q (query examples per class).
      rotations: 90-degree rotations of every class as new classes (4x the classes; Santoro et al., 2016, as
        used by MAML on Omniglot). Needs square images.
      augmentation: `f(images [tasks, n, H, W, C], seed) -> images`, applied per episode (e.g. `random_affine`).
    """

    def __init__(self, classes: ClassImages, ways: int = 5, shots: int = 1, queries: int = 15,
                 rotations: bool = False, augmentation: Optional[Augmentation] = None):
        for name, value in (("ways", ways), ("shots", shots), ("queries", queries)):
            checks.integer(value, name, minimum=1, owner="FewShotTasks")
        if rotations and classes.images.shape[2] != classes.images.shape[3]:
            raise ValueError(f"`rotations` needs square images; got {classes.images.shape[2:4]}.")
        self.rotations = 4 if rotations else 1
        available = classes.num_classes * self.rotations
        if ways > available:
            raise ValueError(f"`ways`={ways} is more than the {available} classes available"
                             f"{' (with rotations)' if rotations else ''}.")
        smallest = int(classes.counts.min())
        if shots + queries > smallest:
            small = [n for n, c in zip(classes.names, classes.counts) if c < shots + queries]
            raise ValueError(f"`shots` + `queries` = {shots + queries} is more than the {smallest} examples of class "
                             f"{small[0]!r} ({len(small)} classes have too few examples).")
        self.classes = classes
        self.ways, self.shots, self.queries = ways, shots, queries
        self.augmentation = augmentation
        self._images = tf.constant(classes.images)
        self._counts = tf.constant(classes.counts, tf.int32)

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.classes.images.shape[2:])

    def sample(self, seed, num_tasks):
        class_seed, example_seed, label_seed, augment_seed = tf.unstack(
            tf.random.experimental.stateless_split(seed, 4))
        total = self.classes.num_classes * self.rotations
        per_class = self.shots + self.queries
        # Classes without replacement: the `ways` largest of i.i.d. uniform keys.
        _, chosen = tf.math.top_k(tf.random.stateless_uniform([num_tasks, total], class_seed), self.ways)
        base, turns = chosen // self.rotations, chosen % self.rotations
        # Examples without replacement within each class (padding slots get key -1, never chosen).
        keys = tf.random.stateless_uniform([num_tasks, self.ways, self._images.shape[1]], example_seed)
        valid = tf.range(self._images.shape[1])[None, None, :] < tf.gather(self._counts, base)[..., None]
        _, examples = tf.math.top_k(tf.where(valid, keys, -1.0), per_class)
        images = tf.gather_nd(self._images, tf.stack([tf.broadcast_to(base[..., None], examples.shape), examples], -1))
        if self.rotations > 1:
            images = rotate90(images, tf.broadcast_to(turns[..., None], examples.shape))
        # A random label for each class slot.
        labels = tf.argsort(tf.random.stateless_uniform([num_tasks, self.ways], label_seed), axis=-1)
        labels = tf.broadcast_to(labels[..., None], examples.shape)
        images = tf.reshape(images, [num_tasks, self.ways * per_class, *self.image_shape])
        if self.augmentation is not None:
            images = self.augmentation(images, augment_seed)
        images = tf.reshape(images, [num_tasks, self.ways, per_class, *self.image_shape])

        def split(start, size):
            return (tf.reshape(images[:, :, start:start + size], [num_tasks, self.ways * size, *self.image_shape]),
                    tf.reshape(labels[:, :, start:start + size], [num_tasks, self.ways * size]))

        support_x, support_y = split(0, self.shots)
        query_x, query_y = split(self.shots, self.queries)
        return {"support_x": support_x, "support_y": support_y, "query_x": query_x, "query_y": query_y}
