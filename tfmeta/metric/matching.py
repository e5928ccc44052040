"""Matching Networks (Vinyals et al., 2016), with optional full context embeddings."""

from __future__ import annotations

from typing import Optional

import keras
import tensorflow as tf

from tfmeta.metric.base import MetricLearner
from tfmeta.registry import register


def cosine_similarity(queries: tf.Tensor, support: tf.Tensor) -> tf.Tensor:
    """Cosine similarity of queries [..., n, d] with support embeddings [..., s, d]: [..., n, s]."""
    return tf.matmul(tf.math.l2_normalize(queries, -1), tf.math.l2_normalize(support, -1), transpose_b=True)


def attend(queries, support, support_one_hot, scale):
    """Matching Networks' classifier: log of the label distribution Σ_i softmax_i(scale·cos(q, g_i))·y_i."""
    attention = tf.nn.softmax(scale * cosine_similarity(queries, support), axis=-1)
    return tf.math.log(tf.matmul(attention, support_one_hot) + 1e-12)


def attention_lstm(cell: keras.layers.LSTMCell, queries: tf.Tensor, support: tf.Tensor, steps: int) -> tf.Tensor:
    """The full context embedding of queries [t, n, d] given the support set [t, s, d]: `steps` steps of an LSTM
    whose state reads the support set by attention (Vinyals et al., 2016, appendix A.2): the read r_{k-1} of
    h_{k-1} enters step k, added to the hidden state (the paper concatenates them; summing keeps the state at
    size d)."""
    t, n, d = tf.shape(queries)[0], tf.shape(queries)[1], tf.shape(queries)[2]
    flat = tf.reshape(queries, [-1, d])
    h_hat, c = tf.zeros_like(flat), tf.zeros_like(flat)
    for _ in range(steps):
        attention = tf.nn.softmax(tf.matmul(tf.reshape(h_hat, [t, n, d]), support, transpose_b=True), axis=-1)
        read = tf.reshape(tf.matmul(attention, support), [-1, d])
        h, (_, c) = cell(flat, [h_hat + read, c])
        h_hat = h + flat
    return tf.reshape(h_hat, [t, n, d])


@register
class MatchingNetwork(MetricLearner):
    """Classifies a query by cosine attention over the support embeddings: p(y | q) = Σ_i a(q, x_i)·y_i.

    Args:
      full_context_embeddings: embed the support set with a bidirectional LSTM over it (g) and the queries
        with an attention LSTM reading the support set for `processing_steps` steps (f), as in the paper.
      scale: multiplies the cosine similarities before the softmax (1.0 in the paper; larger values sharpen
        the attention).
    """

    def __init__(self, learner: keras.Model, full_context_embeddings: bool = False, processing_steps: int = 5,
                 scale: float = 1.0, **kwargs):
        super().__init__(learner, **kwargs)
        if processing_steps < 1:
            raise ValueError(f"`processing_steps` must be >= 1; got {processing_steps}.")
        self.full_context_embeddings = full_context_embeddings
        self.processing_steps = processing_steps
        self.scale = float(scale)
        features = 1
        for size in learner.outputs[0].shape[1:]:
            features *= size
        self.support_lstm = self.query_cell = None
        if full_context_embeddings:
            self.support_lstm = keras.layers.Bidirectional(
                keras.layers.LSTM(features, return_sequences=True), merge_mode="sum", name="support_lstm")
            self.support_lstm.build((None, None, features))
            self.query_cell = keras.layers.LSTMCell(features, name="query_lstm")
            self.query_cell.build((None, features))

    def embed_support(self, support: tf.Tensor) -> tf.Tensor:
        """g: flattened support embeddings [t, s, d], contextualised by the support LSTM if enabled."""
        support = tf.reshape(support, tf.concat([tf.shape(support)[:2], [-1]], 0))
        return support if self.support_lstm is None else support + self.support_lstm(support)

    def scores(self, support, support_y, query, ways, training):
        support = self.embed_support(support)
        query = tf.reshape(query, tf.concat([tf.shape(query)[:2], [-1]], 0))
        if self.query_cell is not None:
            query = attention_lstm(self.query_cell, query, support, self.processing_steps)
        return attend(query, support, tf.one_hot(support_y, ways, dtype=support.dtype), self.scale)

    def make_head(self, support, support_y, ways):
        support = self.embed_support(support[None])[0]
        head = MatchingHead(ways, support.shape[0], support.shape[1], self.scale, self.processing_steps,
                            None if self.query_cell is None else keras.saving.serialize_keras_object(self.query_cell))
        if self.query_cell is not None:
            head.query_cell.set_weights(self.query_cell.get_weights())
        head.support.assign(support)
        head.support_one_hot.assign(tf.one_hot(support_y, ways, dtype=support.dtype))
        return head

    def get_config(self):
        return {**super().get_config(), "full_context_embeddings": self.full_context_embeddings,
                "processing_steps": self.processing_steps, "scale": self.scale}


@keras.saving.register_keras_serializable(package="tfmeta")
class MatchingHead(keras.layers.Layer):
    """Scores embeddings [n, ...] by cosine attention over a fixed embedded support set (non-trainable
    weights), reading it with the attention LSTM `query_cell` first if given."""

    def __init__(self, ways: int, shots: int, features: int, scale: float = 1.0, processing_steps: int = 5,
                 query_cell: Optional[keras.layers.LSTMCell] = None, **kwargs):
        super().__init__(**kwargs)
        if isinstance(query_cell, dict):
            query_cell = keras.saving.deserialize_keras_object(query_cell)
            if not query_cell.built:
                query_cell.build((None, features))
        self.ways, self.shots, self.features = ways, shots, features
        self.scale, self.processing_steps, self.query_cell = scale, processing_steps, query_cell
        self.support = self.add_weight(shape=(shots, features), initializer="zeros", trainable=False,
                                       name="support")
        self.support_one_hot = self.add_weight(shape=(shots, ways), initializer="zeros", trainable=False,
                                               name="support_one_hot")

    def call(self, embeddings):
        queries = tf.reshape(embeddings, [1, tf.shape(embeddings)[0], -1])
        support = tf.cast(self.support, queries.dtype)[None]
        if self.query_cell is not None:
            queries = attention_lstm(self.query_cell, queries, support, self.processing_steps)
        return attend(queries, support, tf.cast(self.support_one_hot, queries.dtype)[None], self.scale)[0]

    def get_config(self):
        cell = None if self.query_cell is None else keras.saving.serialize_keras_object(self.query_cell)
        return {**super().get_config(), "ways": self.ways, "shots": self.shots, "features": self.features,
                "scale": self.scale, "processing_steps": self.processing_steps, "query_cell": cell}
