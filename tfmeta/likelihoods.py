"""Likelihoods: what a learner's outputs say about its targets, as TensorFlow Probability distributions.

A likelihood turns the outputs of one model for a batch of examples into a distribution over their targets
(`distribution`), and the outputs of several models (the samples of a posterior, the particles of an ensemble:
a leading sample axis) into the predictive distribution, the uniform mixture over the models (`predictive`).
From a predictive distribution and the targets it scores a task (`scores`): the mean negative log-likelihood of
the targets and, for continuous targets, the fraction inside the central 50% and 90% intervals, read from the
predictive CDF (a target is inside the central interval of level p when |F(y) - 1/2| <= p/2), which is exact for
mixtures too. A meta-learner given a likelihood reports these scores beside its loss and metrics; the
probabilistic meta-learners (`tfmeta.algorithms.EMAML`, `BMAML`, ...) adapt and predict with theirs.
"""

from __future__ import annotations

from typing import Optional

import keras
import tensorflow as tf

from tfmeta import checks
from tfmeta.registry import register

COVERAGE_LEVELS = (0.5, 0.9)


def tfd():
    """`tfp.distributions`, imported on first use (TensorFlow Probability adds about a second to `import tfmeta`)."""
    import tensorflow_probability as tfp

    return tfp.distributions


class Likelihood:
    """Base class: the distribution of one example's targets given a model's outputs for it."""

    classifies = False  # whether the targets are class labels (a categorical likelihood)

    def distribution(self, outputs: tf.Tensor, stddev: Optional[tf.Tensor] = None):
        """The distribution of the targets given one model's `outputs` [examples, ...]; `stddev` overrides a
        Gaussian likelihood's noise (e.g. per particle)."""
        raise NotImplementedError

    def predictive(self, samples: tf.Tensor, stddev: Optional[tf.Tensor] = None):
        """The uniform mixture over models of their distributions: `samples` are the outputs of S models, shape
        [S, examples, ...]; `stddev` (broadcastable to the samples' targets) overrides the noise per model."""
        raise NotImplementedError

    def point(self, samples: tf.Tensor) -> tf.Tensor:
        """One prediction in the learner's output space from S models' outputs [S, examples, ...], which the
        meta-learner's loss and metrics score: the predictive mean (regression) or the log of the averaged class
        probabilities (classification; logits of the predictive)."""
        raise NotImplementedError

    def check_learner(self, learner: keras.Model) -> None:
        """Refuses a learner whose outputs this likelihood cannot read (checked where a meta-learner takes both)."""

    def score_names(self) -> list[str]:
        return ["nll"]

    def scores(self, predictive, targets: tf.Tensor) -> dict[str, tf.Tensor]:
        """The task's mean negative log-likelihood of `targets` under `predictive` (nats per target value) and,
        for continuous targets, the coverage of the central intervals of `COVERAGE_LEVELS`."""
        return {"nll": -tf.reduce_mean(predictive.log_prob(targets))}

    def summary(self, predictive) -> dict[str, tf.Tensor]:
        """What `adapt`'s model and serving return for a predictive distribution."""
        raise NotImplementedError

    def get_config(self) -> dict:
        return {}

    @classmethod
    def from_config(cls, config: dict):
        return cls(**config)


@register
class Categorical(Likelihood):
    """Class labels under the softmax of the learner's outputs (logits). A mixture of categoricals is the
    categorical of the averaged probabilities."""

    classifies = True

    def check_learner(self, learner):
        classes = _output_size(learner)
        if classes is not None and classes < 2:
            raise ValueError(f"a Categorical likelihood reads the outputs of learner '{learner.name}' as logits of at "
                             f"least 2 classes; they have size {classes}.")

    def scores(self, predictive, targets):
        if targets.shape.rank == predictive.logits.shape.rank:  # labels with a trailing axis of 1
            targets = tf.squeeze(targets, -1)
        return super().scores(predictive, targets)

    def distribution(self, outputs, stddev=None):
        return tfd().Categorical(logits=outputs)

    def predictive(self, samples, stddev=None):
        return tfd().Categorical(logits=self.point(samples))

    def point(self, samples):
        models = tf.cast(tf.shape(samples)[0], samples.dtype)  # (known only at run time when serving draws it)
        return tf.reduce_logsumexp(tf.nn.log_softmax(samples), axis=0) - tf.math.log(models)

    def summary(self, predictive):
        probabilities = predictive.probs_parameter()
        return {"probabilities": probabilities, "classes": tf.argmax(probabilities, axis=-1, output_type=tf.int32)}


class _Gaussian(Likelihood):
    """Targets under Normal(mean, stddev) per coordinate; several models give the uniform Gaussian mixture."""

    def mean_and_stddev(self, outputs, stddev=None) -> tuple[tf.Tensor, tf.Tensor]:
        raise NotImplementedError

    def distribution(self, outputs, stddev=None):
        return tfd().Normal(*self.mean_and_stddev(outputs, stddev))

    def predictive(self, samples, stddev=None):
        mean, scale = self.mean_and_stddev(samples, stddev)
        if samples.shape[0] == 1:
            return tfd().Normal(mean[0], scale[0])
        scale = tf.broadcast_to(scale, tf.shape(mean))
        components = tfd().Normal(tf.experimental.numpy.moveaxis(mean, 0, -1),
                                  tf.experimental.numpy.moveaxis(scale, 0, -1))
        weights = tfd().Categorical(logits=tf.zeros(tf.shape(components.loc), mean.dtype))
        return tfd().MixtureSameFamily(weights, components)

    def point(self, samples):
        return tf.reduce_mean(self.mean_and_stddev(samples)[0], axis=0)

    def score_names(self):
        return ["nll"] + [f"coverage_{round(100 * level)}" for level in COVERAGE_LEVELS]

    def scores(self, predictive, targets):
        targets = tf.cast(targets, predictive.dtype)
        scores = super().scores(predictive, targets)
        distance = tf.abs(predictive.cdf(targets) - 0.5)
        for level in COVERAGE_LEVELS:
            inside = tf.cast(distance <= level / 2, predictive.dtype)
            scores[f"coverage_{round(100 * level)}"] = tf.reduce_mean(inside)
        return scores

    def summary(self, predictive):
        return {"mean": predictive.mean(), "stddev": predictive.stddev()}


@register
class Normal(_Gaussian):
    """Targets under Normal(outputs, stddev) with a fixed noise level `stddev`: the likelihood that a mean squared
    error loss assumes (up to constants). A point-estimate learner (MAML) gets a predictive NLL and intervals from
    it; state the level beside the numbers."""

    def __init__(self, stddev: float = 1.0):
        self.stddev = checks.number(stddev, "stddev", positive=True, owner="Normal")

    def mean_and_stddev(self, outputs, stddev=None):
        if stddev is None:
            return outputs, tf.fill(tf.shape(outputs), tf.cast(self.stddev, outputs.dtype))
        return outputs, tf.cast(stddev, outputs.dtype)

    def get_config(self):
        return {"stddev": self.stddev}


@register
class HeteroscedasticNormal(_Gaussian):
    """A heteroscedastic Gaussian head: the learner's last axis holds the means, then as many raw scales, each
    mapped to a standard deviation by softplus(raw) + `MIN_STDDEV` (`split_heteroscedastic`). Train it with the
    loss "gaussian_nll" (`tfmeta.losses.gaussian_nll`), this likelihood's negative log-likelihood."""

    def check_learner(self, learner):
        size = _output_size(learner)
        if size is not None and size % 2:
            raise ValueError(f"a heteroscedastic Gaussian (the HeteroscedasticNormal likelihood, the loss "
                             f"'gaussian_nll') needs a probabilistic head: learner '{learner.name}' must output means "
                             "and as many raw scales (an even last axis, e.g. outputs=2 for one target); its outputs "
                             f"have size {size}.")

    def mean_and_stddev(self, outputs, stddev=None):
        if stddev is not None:
            raise ValueError("HeteroscedasticNormal predicts its own standard deviations; `stddev` must be None.")
        return split_heteroscedastic(outputs)


MIN_STDDEV = 1e-3  # keeps a heteroscedastic head's likelihood bounded when a target is fitted exactly


def split_heteroscedastic(outputs: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """A heteroscedastic head's outputs [..., 2d] as (means, standard deviations) [..., d]."""
    if outputs.shape[-1] is None or outputs.shape[-1] % 2:
        raise ValueError("a heteroscedastic Gaussian head needs an even number of outputs (means, then raw "
                         f"scales); got outputs of shape {tuple(outputs.shape)}.")
    mean, raw = tf.split(outputs, 2, axis=-1)
    return mean, tf.nn.softplus(raw) + tf.cast(MIN_STDDEV, raw.dtype)


def _output_size(learner: keras.Model):
    outputs = getattr(learner, "outputs", None)
    return outputs[0].shape[-1] if outputs and len(outputs) == 1 else None


def for_loss(loss) -> Likelihood:
    """The likelihood a loss assumes: categorical for cross-entropies, the heteroscedastic Gaussian for
    `gaussian_nll`, a unit-variance Gaussian otherwise (mean squared error)."""
    name = str(getattr(loss, "name", None) or getattr(loss, "__name__", "")).lower()
    name = getattr(getattr(loss, "fn", None), "__name__", name)
    if "crossentropy" in name or "cross_entropy" in name:
        return Categorical()
    if name == "gaussian_nll":
        return HeteroscedasticNormal()
    return Normal(1.0)


def get(likelihood) -> Optional[Likelihood]:
    """A likelihood from an instance, a serialised one or None."""
    if likelihood is None or isinstance(likelihood, Likelihood):
        return likelihood
    if isinstance(likelihood, dict):
        return keras.saving.deserialize_keras_object(likelihood)
    raise TypeError(f"`likelihood` must be a tfmeta.likelihoods.Likelihood; got {type(likelihood).__name__}.")
