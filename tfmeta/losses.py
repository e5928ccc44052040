"""Per-example losses of few-shot learners, usable by name ("scores_cross_entropy", "gaussian_nll") in every learner."""

from __future__ import annotations

from typing import Callable, Optional, Union

import keras
import tensorflow as tf

from tfmeta import likelihoods


@keras.saving.register_keras_serializable(package="tfmeta")
def scores_cross_entropy(y_true, scores):
    """Cross-entropy of integer labels under class scores read as logits (per example)."""
    return keras.losses.sparse_categorical_crossentropy(y_true, scores, from_logits=True)


@keras.saving.register_keras_serializable(package="tfmeta")
def relation_mse(y_true, scores):
    """Relation Networks' loss: squared error of the relation scores against the one-hot labels (per example)."""
    target = tf.one_hot(tf.cast(y_true, tf.int32), tf.shape(scores)[-1], dtype=scores.dtype)
    return tf.reduce_mean(tf.square(scores - target), axis=-1)


@keras.saving.register_keras_serializable(package="tfmeta")
def gaussian_nll(y_true, outputs):
    """Negative log-likelihood of the targets under a heteroscedastic Gaussian head (`outputs`: the means, then
    as many raw scales; `tfmeta.likelihoods.HeteroscedasticNormal`), in nats per target value (per example)."""
    mean, stddev = likelihoods.split_heteroscedastic(outputs)
    log_prob = likelihoods.tfd().Normal(mean, stddev).log_prob(tf.cast(y_true, mean.dtype))
    return -tf.reduce_mean(log_prob, axis=-1)


LOSSES = {"scores_cross_entropy": scores_cross_entropy, "relation_mse": relation_mse, "gaussian_nll": gaussian_nll}
# What the targets of the known losses are: integer class labels (one dimension fewer than the predictions), or
# values shaped like the predictions. Other (custom) losses may take any targets, and are not checked.
LABEL_LOSSES = ("sparse_categorical_crossentropy", "scores_cross_entropy", "relation_mse")
DENSE_LOSSES = ("mean_squared_error", "mean_absolute_error", "mean_absolute_percentage_error",
                "mean_squared_logarithmic_error", "huber", "log_cosh", "categorical_crossentropy",
                "binary_crossentropy", "kl_divergence", "poisson", "hinge", "squared_hinge", "categorical_hinge")


def get(loss: Union[str, dict, Callable]) -> Callable:
    """A loss function or `keras.losses.Loss` from a tfmeta or Keras loss name, a serialised loss or a callable."""
    if isinstance(loss, str) and loss in LOSSES:
        return LOSSES[loss]
    return keras.losses.get(loss)


def target_kind(loss: Callable) -> Optional[str]:
    """"labels" if `loss` (a tfmeta or Keras loss) takes integer class labels, "dense" if it takes targets shaped
    like the predictions, None for losses it does not know."""
    name = getattr(loss, "name", None) or getattr(loss, "__name__", "")
    name = getattr(getattr(loss, "fn", None), "__name__", name)  # a keras.losses.Loss wraps its function
    return "labels" if name in LABEL_LOSSES else "dense" if name in DENSE_LOSSES else None


def per_example(loss: Callable) -> Callable:
    """`loss` as a function of (y_true, y_pred) returning one value per example (a `keras.losses.Loss`
    reduces in `__call__`; its `call` does not)."""
    return loss.call if isinstance(loss, keras.losses.Loss) else loss
