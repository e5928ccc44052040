"""Prototypical Networks (Snell, Swersky & Zemel, 2017)."""

from __future__ import annotations

import keras
import tensorflow as tf

from tfmeta.metric.base import MetricLearner, class_sums
from tfmeta.registry import register


def negative_squared_distances(queries: tf.Tensor, prototypes: tf.Tensor) -> tf.Tensor:
    """-‖q − p‖² for queries [..., n, d] and prototypes [..., ways, d]: [..., n, ways]."""
    cross = tf.matmul(queries, prototypes, transpose_b=True)
    return (2.0 * cross - tf.reduce_sum(tf.square(queries), -1)[..., :, None]
            - tf.reduce_sum(tf.square(prototypes), -1)[..., None, :])


@register
class PrototypicalNetwork(MetricLearner):
    """Classifies a query by the squared Euclidean distance of its embedding to each class prototype, the mean
    embedding of the class's support examples (embeddings are flattened). Train with more ways than at test
    time, as the paper does, by giving the training task distribution more ways."""

    def scores(self, support, support_y, query, ways, training):
        sums, counts = class_sums(_flatten(support), support_y, ways)
        return negative_squared_distances(_flatten(query), sums / counts[..., None])

    def make_head(self, support, support_y, ways):
        sums, counts = class_sums(_flatten(support[None]), support_y[None], ways)
        prototypes = (sums / counts[..., None])[0]
        head = PrototypeHead(ways, prototypes.shape[-1])
        head.prototypes.assign(prototypes)
        return head


def _flatten(embeddings: tf.Tensor) -> tf.Tensor:
    """[tasks, n, ...] -> [tasks, n, features]."""
    return tf.reshape(embeddings, tf.concat([tf.shape(embeddings)[:2], [-1]], 0))


@keras.saving.register_keras_serializable(package="tfmeta")
class PrototypeHead(keras.layers.Layer):
    """Scores embeddings [n, ...] against class prototypes [ways, features] (a non-trainable weight) by
    negative squared distance."""

    def __init__(self, ways: int, features: int, **kwargs):
        super().__init__(**kwargs)
        self.ways, self.features = ways, features
        self.prototypes = self.add_weight(shape=(ways, features), initializer="zeros", trainable=False,
                                          name="prototypes")

    def call(self, embeddings):
        flat = tf.reshape(embeddings, [tf.shape(embeddings)[0], -1])
        return negative_squared_distances(flat, tf.cast(self.prototypes, flat.dtype))

    def get_config(self):
        return {**super().get_config(), "ways": self.ways, "features": self.features}
