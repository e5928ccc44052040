"""Relation Networks (Sung et al., 2018)."""

from __future__ import annotations

from typing import Optional, Sequence

import keras
import tensorflow as tf

from tfmeta.metric.base import MetricLearner, class_sums, copy_model
from tfmeta.registry import register


def relation_module(input_shape: Sequence[int], filters: int = 64, hidden_units: int = 8,
                    batch_norm_momentum: float = 0.9, name: str = "relation_module") -> keras.Model:
    """The paper's relation module on a pair of concatenated feature maps [h, w, 2c]: two blocks of 3x3 conv,
    batch norm, ReLU and 2x2 max-pooling (valid: 7x7 maps end at 1x1, as in the reference code), then a ReLU
    layer of `hidden_units` and a sigmoid relation score.
    The batch norm momentum defaults to PyTorch's (0.1 there, 0.9 in Keras' convention)."""
    inputs = keras.Input(tuple(input_shape))
    x = inputs
    for i in range(2):
        x = keras.layers.Conv2D(filters, 3, padding="same", name=f"conv_{i}")(x)
        x = keras.layers.BatchNormalization(momentum=batch_norm_momentum, name=f"norm_{i}")(x)
        x = keras.layers.ReLU()(x)
        if min(x.shape[1:3]) >= 2:  # maps already 1x1 (small inputs) are not pooled further
            x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(hidden_units, activation="relu", name="hidden")(x)
    return keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid", name="score")(x), name=name)


def relate(module: keras.Model, query: tf.Tensor, classes: tf.Tensor, training: bool) -> tf.Tensor:
    """Relation scores [t, n, ways] of query feature maps [t, n, h, w, c] with class feature maps
    [t, ways, h, w, c]: the module applied to every (query, class) pair concatenated along channels."""
    n, ways = tf.shape(query)[1], tf.shape(classes)[1]
    pairs = tf.concat([tf.repeat(query[:, :, None], ways, axis=2),
                       tf.repeat(classes[:, None], n, axis=1)], axis=-1)
    scores = module(tf.reshape(pairs, tf.concat([[-1], tf.shape(pairs)[3:]], 0)), training=training)
    return tf.reshape(scores, [tf.shape(query)[0], n, ways])


@register
class RelationNetwork(MetricLearner):
    """Scores a (query, class) pair with a learned relation module on their concatenated feature maps; a class's
    feature map is the sum of its support examples' (as in the paper for K > 1). The learner must output feature
    maps [h, w, c] (e.g. `conv_net(outputs=None, pooled_blocks=2)`). Trained with `relation_mse` by default.

    Args:
      module: the relation module, a Keras model on [h, w, 2c] (default: `relation_module`).
    """

    def __init__(self, learner: keras.Model, module: Optional[keras.Model] = None, loss="relation_mse", **kwargs):
        super().__init__(learner, loss=loss, **kwargs)
        shape = learner.outputs[0].shape[1:]
        if len(shape) != 3:
            raise ValueError(f"RelationNetwork's `learner` must output feature maps [height, width, channels]; "
                             f"'{learner.name}' outputs {tuple(shape)}.")
        self.module = module or relation_module((*shape[:2], 2 * shape[2]))

    def scores(self, support, support_y, query, ways, training):
        classes, _ = class_sums(support, support_y, ways)
        return relate(self.module, query, classes, training)

    def make_head(self, support, support_y, ways):
        classes, _ = class_sums(support[None], support_y[None], ways)
        head = RelationHead(tuple(classes.shape[1:]), copy_model(self.module))
        head.classes.assign(classes[0])
        return head

    def get_config(self):
        return {**super().get_config(), "module": keras.saving.serialize_keras_object(self.module)}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["module"] = keras.saving.deserialize_keras_object(config["module"])
        return super().from_config(config)


@keras.saving.register_keras_serializable(package="tfmeta")
class RelationHead(keras.layers.Layer):
    """Relation scores [n, ways] of feature maps [n, h, w, c] against fixed class feature maps (a
    non-trainable weight [ways, h, w, c]), with the relation `module`."""

    def __init__(self, classes_shape: Sequence[int], module, **kwargs):
        super().__init__(**kwargs)
        self.classes_shape = tuple(classes_shape)
        self.module = keras.saving.deserialize_keras_object(module) if isinstance(module, dict) else module
        self.classes = self.add_weight(shape=self.classes_shape, initializer="zeros", trainable=False,
                                       name="classes")

    def call(self, feature_maps):
        return relate(self.module, feature_maps[None], tf.cast(self.classes, feature_maps.dtype)[None], False)[0]

    def get_config(self):
        return {**super().get_config(), "classes_shape": self.classes_shape,
                "module": keras.saving.serialize_keras_object(self.module)}
