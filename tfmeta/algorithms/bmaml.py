"""Bayesian MAML (Yoon, Kim, Dia, Kim, Bengio & Ahn, 2018): particles adapted to a task's posterior by Stein
variational gradient descent, meta-trained with the chaser loss."""

from __future__ import annotations

import math
from typing import Optional

import keras
import tensorflow as tf

from tfmeta import checks, likelihoods, losses
from tfmeta import partition as partition_lib
from tfmeta.algorithms.particles import EMAML
from tfmeta.registry import register
from tfmeta.update_rules.svgd import Svgd


def _positive(value, argument: str) -> float:
    return checks.number(value, argument, positive=True, owner="BMAML")


@register
class BMAML(EMAML):
    """Bayesian MAML: M particles adapted by SVGD (`tfmeta.update_rules.Svgd`, the default update rule) to the
    posterior of the task given its support set D,
        p(w, λ, γ | D) ∝ Π_n N(y_n | f_w(x_n), 1/γ) · N(w | 0, 1/λ) · Gamma(γ; a_γ, b_γ) · Gamma(λ; a_λ, b_λ).
    Each particle carries the learner's weights w and two log-precisions, of the weight prior (log λ) and of the
    observation noise (log γ; a categorical likelihood has none). With `learn_prior_precision=False`, λ is fixed
    at `initial_prior_precision` (no hyperprior, not a particle coordinate): on a large network the summed prior
    makes log λ's curvature about half the number of weights, so a step size that suits the weights throws log λ
    to infinity in one step (0.08 on the 112k-weight Omniglot conv net sends it from 0 to 1,600). The data term
    sums over the support examples; the densities are TFP's (`tfd.Normal`, `tfd.Categorical`, and `tfd.ExpGamma`
    for the log-precisions, which includes the change of variables). The learner's own Keras losses (regularisers)
    are added per particle.

    Meta-training uses the chaser loss: the chaser is the particles after `inner_steps` steps on the support set;
    the leader continues from the chaser for `leader_steps` more steps on the support and query sets together and
    is held constant; the meta-objective is the squared distance between chaser and leader network weights (the
    log-precisions excluded), summed over particles, as in the official code. Evaluation adapts on the support
    set and predicts with the mixture of the particles' Gaussians N(f_w, 1/γ) (or their categoricals).

    Defaults are the official code's (jsikyoon/bmaml, `bmaml_main.py`, `bnn.py`): Gamma(2, 0.2) on γ and Gamma(2, 2)
    on λ (shape, rate); initial log γ ~ N(log 100, 0.001²) and log λ ~ N(log 1, 0.001²); one chaser step and one
    leader step with SVGD's step size 1e-3.

    Args:
      leader_steps: the leader's SVGD steps beyond the chaser's.
      noise_concentration, noise_rate: a_γ, b_γ.
      prior_concentration, prior_rate: a_λ, b_λ.
      initial_noise_precision, initial_prior_precision: the centres of the log-precisions' initial values.
      learn_prior_precision: whether each particle adapts its own log λ (the official code), or λ is fixed.
      likelihood: `tfmeta.likelihoods.Normal` (its `stddev` is replaced by each particle's 1/√γ) or `Categorical`;
        default: the loss's.
      **kwargs: see `EMAML` (`update_rule` defaults to `Svgd(1e-3)`).
    """

    takes_support_streams = False

    def __init__(self, learner: keras.Model, leader_steps: int = 1, noise_concentration: float = 2.0,
                 noise_rate: float = 0.2, prior_concentration: float = 2.0, prior_rate: float = 2.0,
                 initial_noise_precision: float = 100.0, initial_prior_precision: float = 1.0,
                 learn_prior_precision: bool = True,
                 likelihood: Optional[likelihoods.Likelihood] = None, **kwargs):
        if likelihood is None:
            likelihood = likelihoods.for_loss(losses.get(kwargs.get("loss", "mse")))
        if not isinstance(likelihood, (likelihoods.Normal, likelihoods.Categorical)):
            raise ValueError("BMAML's particles carry their own observation noise: `likelihood` must be "
                             "tfmeta.likelihoods.Normal (each particle's stddev is 1/sqrt(gamma)) or Categorical; "
                             f"got {type(likelihood).__name__}.")
        refused = [k for k in ("query_step_weights", "multi_step_loss_annealing", "first_order_steps") if kwargs.get(k)]
        if refused:
            raise ValueError(f"BMAML meta-trains with the chaser loss: MAML's {', '.join(refused)} do not apply.")
        self.learns_noise = not likelihood.classifies
        self.leader_steps = checks.integer(leader_steps, "leader_steps", owner="BMAML")
        self.noise_concentration = _positive(noise_concentration, "noise_concentration")
        self.noise_rate = _positive(noise_rate, "noise_rate")
        self.prior_concentration = _positive(prior_concentration, "prior_concentration")
        self.prior_rate = _positive(prior_rate, "prior_rate")
        self.initial_noise_precision = _positive(initial_noise_precision, "initial_noise_precision")
        self.initial_prior_precision = _positive(initial_prior_precision, "initial_prior_precision")
        self.learn_prior_precision = bool(learn_prior_precision)
        kwargs.setdefault("update_rule", Svgd(1e-3))
        super().__init__(learner, likelihood=likelihood, **kwargs)
        self.log_precisions = [
            self.add_weight(shape=(self.num_particles,), dtype=self._log_dtype, name=name,
                            initializer=keras.initializers.RandomNormal(math.log(precision), 0.001))
            for name, precision in self._precisions()]

    def _precisions(self) -> list[tuple[str, float]]:
        return ([("log_prior_precision", self.initial_prior_precision)] if self.learn_prior_precision else []) + (
            [("log_noise_precision", self.initial_noise_precision)] if self.learns_noise else [])

    def extra_particle_shapes(self):
        return [() for _ in self._precisions()]

    def extra_particle_variables(self):
        return self.log_precisions

    def _split(self, fast) -> tuple[list, Optional[tf.Tensor], Optional[tf.Tensor]]:
        """(network fast parameters, log λ [M] or None (fixed), log γ [M] or None) of the particles' fast
        parameters."""
        network = fast[:len(fast) - len(self._precisions())]
        precisions = iter(fast[len(network):])
        log_prior = next(precisions) if self.learn_prior_precision else None
        return network, log_prior, next(precisions) if self.learns_noise else None

    def particle_stddev(self, fast):
        _, _, log_noise = self._split(fast)
        return None if log_noise is None else tf.exp(-0.5 * log_noise)

    def negative_log_posterior(self, fast, slow, state, x, y, training: bool) -> tuple[tf.Tensor, list]:
        """The sum over particles of -log p(w, λ, γ | (x, y)) up to a constant, and the learner's new state."""
        tfd = likelihoods.tfd()
        network, log_prior, log_noise = self._split(fast)
        outputs, state, extra_losses = self._stateless_call(fast, slow, state, x, training, None, return_losses=True)
        targets = tf.broadcast_to(y, tf.concat([[self.num_particles], tf.shape(y)], 0))
        if self.learns_noise:
            stddev = tf.reshape(tf.exp(-0.5 * log_noise), [-1] + [1] * (outputs.shape.rank - 1))
            data = tfd.Normal(outputs, stddev).log_prob(tf.cast(targets, outputs.dtype))
        else:
            data = tfd.Categorical(logits=outputs).log_prob(tf.reshape(targets, tf.shape(outputs)[:-1]))
        log_posterior = tf.reduce_sum(tf.reshape(data, [self.num_particles, -1]), axis=1)
        weights = tf.concat([tf.reshape(w, [self.num_particles, -1])
                             for w in partition_lib.merge(network, slow, self.fast_mask)], axis=1)
        if log_prior is None:
            prior_stddev = tf.constant(self.initial_prior_precision ** -0.5, weights.dtype)
        else:
            prior_stddev = tf.exp(-0.5 * log_prior)[:, None]
        log_posterior += tf.reduce_sum(tfd.Normal(tf.zeros_like(weights), prior_stddev).log_prob(weights), axis=1)
        hyperprior = lambda a, b: tfd.ExpGamma(tf.constant(a, self._log_dtype), rate=tf.constant(b, self._log_dtype))  # noqa: E731
        if log_prior is not None:
            log_posterior += hyperprior(self.prior_concentration, self.prior_rate).log_prob(log_prior)
        if self.learns_noise:
            log_posterior += hyperprior(self.noise_concentration, self.noise_rate).log_prob(log_noise)
        if extra_losses:
            log_posterior -= tf.cast(tf.add_n(extra_losses), log_posterior.dtype)
        return -tf.reduce_sum(log_posterior), state

    def inner_objective(self, fast, slow, state, episode, step, *, training, seed=None, start=None):
        x, y = self.support_examples(episode, step)
        return self.negative_log_posterior(fast, slow, state, x, y, training)

    def adapted_predictive(self, fast, outputs):
        """The mixture of the particles' N(f_m, 1/γ_m) (or their categoricals)."""
        stddev = self.particle_stddev(fast)
        if stddev is not None:
            stddev = tf.reshape(stddev, [-1] + [1] * (outputs.shape.rank - 1))
        return self.likelihood.predictive(outputs, stddev)

    def task_gradients(self, episode, state, seed):
        both = {"support_x": tf.concat([episode["support_x"], episode["query_x"]], axis=0),
                "support_y": tf.concat([episode["support_y"], episode["query_y"]], axis=0)}
        with tf.GradientTape() as tape:
            fast, slow = self.read_params()
            chaser = self.adapt_episode(fast, slow, state, episode, self.inner_steps, training=True,
                                        first_order=self.first_order, seed=seed)
            with tape.stop_recording():  # the leader is a target: the tape does not see it, no gradient flows
                leader = self.adapt_episode(chaser.params, slow, chaser.state, both, self.leader_steps,
                                            training=True, first_order=True, seed=seed)
            objective = tf.add_n([tf.reduce_sum(tf.square(c - target))
                                  for c, target in zip(self._split(chaser.params)[0], self._split(leader.params)[0])])
        grads = tape.gradient(objective, self.meta_variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        _, logs, state = self.outer_objective(chaser.params, slow, chaser.state, episode, training=True,
                                              step=self.inner_steps)
        return grads, {"loss": objective, **logs}, state

    def get_config(self) -> dict:
        return {**super().get_config(), "leader_steps": self.leader_steps,
                "noise_concentration": self.noise_concentration, "noise_rate": self.noise_rate,
                "prior_concentration": self.prior_concentration, "prior_rate": self.prior_rate,
                "initial_noise_precision": self.initial_noise_precision,
                "initial_prior_precision": self.initial_prior_precision,
                "learn_prior_precision": self.learn_prior_precision}
