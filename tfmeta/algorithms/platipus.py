"""PLATIPUS (Finn, Xu & Levine, 2018, "Probabilistic Model-Agnostic Meta-Learning"): a Gaussian over the learner's
initial weights, shifted per task by a learned gradient step, sampled, then adapted by MAML's inner loop."""

from __future__ import annotations

import math
from typing import Optional

import keras
import tensorflow as tf

from tfmeta import checks, likelihoods
from tfmeta.algorithms.particles import SamplingLearner
from tfmeta.registry import register


@register
class PLATIPUS(SamplingLearner):
    """PLATIPUS, as its Algorithms 1 (meta-training) and 2 (inference).

    The meta-parameters are the mean μ of the initial weights (the learner's weights), their prior standard
    deviation σ, the inference network's standard deviation v (per weight; the paper's v_q is a variance) and two
    learned step sizes γ_p, γ_q. For a task with support set D and query set D*:
      prior      p(θ | D)  = N(μ − γ_p ∇_μ L(μ, D),  σ²)
      inference  q(θ | D*) = N(μ − γ_q ∇_μ L(μ, D*), v²)   (conditioned on the query set: meta-training only)
    Meta-training samples θ ~ q, adapts φ = θ − α∇L(θ, D) with the inner loop, and minimises
    L(φ, D*) + `kl_weight`·KL(q ‖ p) (TFP's closed form, summed over the weights); inference samples θ ~ p and
    adapts. `num_samples` samples (stacked, as `ParticleLearner` stacks particles) give as many adapted models,
    whose mixture is the predictive distribution.

    Sampling is reproducible (see `SamplingLearner`). Only the partition's fast weights are random; the others are
    μ's.

    The re-implementations report that PLATIPUS is hard to train from scratch (exploding regression losses) and
    start μ from MAML's meta-learned weights: pass a learner that carries them (`tfmeta.experiment.warm_start`).

    Args:
      learner: the architecture; its weights are μ's initial values.
      num_samples: models sampled per task (the paper's L).
      kl_weight: the weight of KL(q ‖ p) in the meta-objective (Algorithm 1: 1).
      initial_stddev: the initial σ and v (re-implementations start them at e^-4 ≈ 0.018 or 0.02).
      initial_step_size: the initial γ_p and γ_q (0.01 in the re-implementations).
      seed: the seed of evaluation's samples (folded with the support set's hash).
      **kwargs: see `SamplingLearner`, `ParticleLearner` (`likelihood`, `particle_parallelism`) and `MAML`
        (`update_rule`: α's rule; `inner_steps`; `first_order`, which also treats the gradients of the γ steps as
        constants).
    """

    def __init__(self, learner: keras.Model, num_samples: int = 5, kl_weight: float = 1.0,
                 initial_stddev: float = 0.02, initial_step_size: float = 0.01, seed: int = 0,
                 likelihood: Optional[likelihoods.Likelihood] = None, **kwargs):
        self.kl_weight = checks.number(kl_weight, "kl_weight", owner="PLATIPUS")
        self.initial_stddev = checks.number(initial_stddev, "initial_stddev", positive=True, owner="PLATIPUS")
        self.initial_step_size = checks.number(initial_step_size, "initial_step_size", owner="PLATIPUS")
        super().__init__(learner, num_samples=num_samples, seed=seed, likelihood=likelihood, **kwargs)
        fast, _ = self.partitioned_variables()
        log_stddev = keras.initializers.Constant(math.log(self.initial_stddev))
        self.log_prior_stddev, self.log_inference_stddev = (
            [self.add_weight(shape=v.shape, dtype=v.dtype, initializer=log_stddev, name=f"{kind}_{v.name}")
             for v in fast] for kind in ("log_prior_stddev", "log_inference_stddev"))
        self.step_sizes = self.add_weight(shape=(2,), dtype=self._log_dtype, name="step_sizes",
                                          initializer=keras.initializers.Constant(self.initial_step_size))

    @property
    def meta_variables(self) -> list[keras.Variable]:
        return (self.learner.trainable_variables + self.log_prior_stddev + self.log_inference_stddev
                + [self.step_sizes] + self.update_rule.trainable_variables)

    # -------------------------------------------------------------------------------------- distributions

    def shifted_mean(self, mean, slow, state, x, y, step_size, training: bool, first_order: bool) -> list[tf.Tensor]:
        """μ − step_size·∇_μ L(μ, (x, y)): the mean of the prior (support set) or of the inference distribution
        (query set)."""
        with tf.GradientTape() as tape:
            tape.watch(mean)
            loss, _, _ = self.task_objective([m[None] for m in mean], slow, state, x, y, training=training)
        grads = tape.gradient(loss, mean, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        if first_order:
            grads = [tf.stop_gradient(g) for g in grads]
        return [m - tf.cast(step_size, m.dtype) * g for m, g in zip(mean, grads)]

    def prior(self, mean, slow, state, x, y, training: bool = False, first_order: bool = True):
        """p(θ | D) for the support set (x, y): per fast weight, `tfd.Normal(μ − γ_p ∇L(μ, D), σ)`."""
        means = self.shifted_mean(mean, slow, state, x, y, self.step_sizes[0], training, first_order)
        return [likelihoods.tfd().Normal(m, tf.exp(s)) for m, s in zip(means, self.log_prior_stddev)]

    def inference(self, mean, slow, state, x, y, training: bool = False, first_order: bool = True):
        """q(θ | D*) for the query set (x, y): per fast weight, `tfd.Normal(μ − γ_q ∇L(μ, D*), v)`."""
        means = self.shifted_mean(mean, slow, state, x, y, self.step_sizes[1], training, first_order)
        return [likelihoods.tfd().Normal(m, tf.exp(s)) for m, s in zip(means, self.log_inference_stddev)]

    # ------------------------------------------------------------------------------------------ the loops

    def adapt_episode(self, fast, slow, state, episode, steps, *, training, first_order=False, keep_trajectory=False,
                      seed=None, check_finite=True):
        """Algorithm 2: samples θ from the prior given the support set, then runs the inner loop from the samples.
        `fast` is μ; without a `seed`, the samples are drawn from `evaluation_seed`."""
        x, y = episode["support_x"], episode["support_y"]
        if seed is None:
            seed = self.evaluation_seed(episode)
        samples = self.draw(self.prior(fast, slow, state, x, y, training), seed)
        return super().adapt_episode(samples, slow, state, episode, steps, training=training, first_order=first_order,
                                     keep_trajectory=keep_trajectory, seed=seed, check_finite=check_finite)

    def task_gradients(self, episode, state, seed):
        """Algorithm 1 for one task: the meta-gradient of L(φ, D*) + kl_weight·KL(q(θ | D*) ‖ p(θ | D))."""
        with tf.GradientTape() as tape:
            mean, slow = self.read_params()
            prior = self.prior(mean, slow, state, episode["support_x"], episode["support_y"], True, self.first_order)
            inference = self.inference(mean, slow, state, episode["query_x"], episode["query_y"], True,
                                       self.first_order)
            samples = self.draw(inference, seed)
            adaptation = super().adapt_episode(samples, slow, state, episode, self.inner_steps, training=True,
                                               first_order=self.first_order, seed=seed)
            loss, logs, state = self.outer_objective(adaptation.params, slow, adaptation.state, episode,
                                                     training=True, step=self.inner_steps, seed=seed, start=samples)
            kl = tf.add_n([tf.reduce_sum(likelihoods.tfd().kl_divergence(q, p)) for q, p in zip(inference, prior)])
            objective = loss + tf.constant(self.kl_weight, loss.dtype) * kl
        grads = tape.gradient(objective, self.meta_variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return grads, {**logs, "loss": objective}, state

    def get_config(self) -> dict:
        return {**super().get_config(), "kl_weight": self.kl_weight, "initial_stddev": self.initial_stddev,
                "initial_step_size": self.initial_step_size}
