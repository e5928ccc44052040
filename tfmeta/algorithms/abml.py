"""Amortized Bayesian meta-learning (ABML; Ravi & Beatson, 2019): a Gaussian prior over the learner's weights is
meta-learned; each task's posterior is a Gaussian fitted by a few gradient steps on the ELBO, starting from the
prior."""

from __future__ import annotations

import math
from typing import Optional

import keras
import tensorflow as tf

from tfmeta import checks, likelihoods
from tfmeta.algorithms.particles import SamplingLearner
from tfmeta.inner_loop import Adaptation, inner_loop
from tfmeta.registry import register

_SAMPLES = 1_000_003  # the seed stream of the samples that predict (the inner steps' streams are their indices)


@register
class ABML(SamplingLearner):
    """ABML: the meta-parameters θ = (μ, σ) are a diagonal Gaussian prior p(w | θ) = N(μ, σ²) over the learner's
    fast weights (μ: the learner's weights), with the hyperprior μ ~ N(0, 1), σ⁻² ~ Gamma(1, 0.01).

    For a task with support set D (N_D points) and query set D* (N_D* points), the posterior q_λ(w) = N(λ_μ, λ_σ²)
    starts at the prior (λ = θ) and takes `inner_steps` steps of the update rule on the negative ELBO per support
    point, −E_q[log p(D | w)]/N_D + `kl_weight`·KL(q_λ ‖ p(w | θ))/N_D (reparameterised, `num_samples` draws of w
    per step; the log-likelihood is the task loss, e.g. the cross-entropy or "gaussian_nll"). The meta-objective
    is, per point of D ∪ D*,
        (N_D*·NLL(D*) + N_D·NLL(D))/(N_D + N_D*) + (`kl_weight`·KL(q_λ ‖ p) + `hyperprior_weight`·(−log p(θ)))
        /(N_D + N_D*),
    the likelihood of both sets under the adapted posterior, as the explicit ABML of Zhang et al.'s code
    (zhangyilang/iBaML `src/abml.py`, whose defaults are a KL weight of 1e-2 per class and a hyperprior weight of
    the KL's divided by the 40,000 meta-iterations: with `kl_weight` = 1 the objective is an ELBO per point).
    Predictions are the mixture over `num_samples` draws of the adapted posterior (reproducibly:
    `SamplingLearner`).

    Args:
      learner: the architecture; its weights are μ's initial values.
      num_samples: weight samples per inner step, per meta-objective and per prediction.
      kl_weight, hyperprior_weight: the weights above.
      initial_stddev: σ's initial value (e^-4 ≈ 0.018 in cnguyen10/few_shot_meta_learning; e^-5 in iBaML).
      hyperprior_concentration, hyperprior_rate: the Gamma hyperprior on the prior precisions σ⁻².
      seed: the seed of evaluation's samples.
      **kwargs: see `SamplingLearner`, `ParticleLearner` (`likelihood`, `particle_parallelism`) and `MAML`
        (`update_rule`: the posterior's inner-loop rule, on (λ_μ, log λ_σ); `inner_steps`; `first_order`).
    """

    def __init__(self, learner: keras.Model, num_samples: int = 5, kl_weight: float = 1.0,
                 hyperprior_weight: float = 2.5e-5, initial_stddev: float = 0.02,
                 hyperprior_concentration: float = 1.0, hyperprior_rate: float = 0.01, seed: int = 0,
                 likelihood: Optional[likelihoods.Likelihood] = None, **kwargs):
        self.kl_weight = checks.number(kl_weight, "kl_weight", owner="ABML")
        self.hyperprior_weight = checks.number(hyperprior_weight, "hyperprior_weight", owner="ABML")
        self.initial_stddev, self.hyperprior_concentration, self.hyperprior_rate = (
            checks.number(value, name, positive=True, owner="ABML") for name, value in (
                ("initial_stddev", initial_stddev), ("hyperprior_concentration", hyperprior_concentration),
                ("hyperprior_rate", hyperprior_rate)))
        super().__init__(learner, num_samples=num_samples, seed=seed, likelihood=likelihood, **kwargs)
        fast, _ = self.partitioned_variables()
        self.log_prior_stddev = [
            self.add_weight(shape=v.shape, dtype=v.dtype, name=f"log_prior_stddev_{v.name}",
                            initializer=keras.initializers.Constant(math.log(self.initial_stddev))) for v in fast]

    @property
    def meta_variables(self) -> list[keras.Variable]:
        return self.learner.trainable_variables + self.log_prior_stddev + self.update_rule.trainable_variables

    def fast_shapes(self, fast_variables):
        """The update rule adapts the posterior's means and log standard deviations."""
        shapes = [tuple(v.shape) for v in fast_variables]
        return shapes + shapes

    # -------------------------------------------------------------------------------------- distributions

    @staticmethod
    def gaussians(params) -> list:
        """The per-weight `tfd.Normal`s of variational parameters (means, then log standard deviations)."""
        n = len(params) // 2
        return [likelihoods.tfd().Normal(m, tf.exp(s)) for m, s in zip(params[:n], params[n:])]

    def prior_params(self, mean) -> list[tf.Tensor]:
        """θ as variational parameters: the fast weights' means `mean`, then the prior's log standard deviations."""
        return list(mean) + [tf.convert_to_tensor(s) for s in self.log_prior_stddev]

    def kl(self, posterior, prior) -> tf.Tensor:
        """KL(q_λ ‖ p(w | θ)) of variational parameters `posterior` and `prior`, summed over the weights."""
        return tf.add_n([tf.reduce_sum(likelihoods.tfd().kl_divergence(q, p))
                         for q, p in zip(self.gaussians(posterior), self.gaussians(prior))])

    def negative_log_hyperprior(self, prior) -> tf.Tensor:
        """−log p(θ): N(0, 1) on the means and Gamma(a, b) on the precisions σ⁻² (as densities of σ⁻²)."""
        tfd, n = likelihoods.tfd(), len(prior) // 2
        gamma = tfd.Gamma(tf.constant(self.hyperprior_concentration, prior[0].dtype),
                          tf.constant(self.hyperprior_rate, prior[0].dtype))
        return -tf.add_n([tf.reduce_sum(tfd.Normal(tf.zeros_like(m), 1.0).log_prob(m))
                          + tf.reduce_sum(gamma.log_prob(tf.exp(-2.0 * s))) for m, s in zip(prior[:n], prior[n:])])

    # ------------------------------------------------------------------------------------------ the loops

    def posterior(self, mean, slow, state, episode, steps, *, training, first_order=False, keep_trajectory=False,
                  seed, check_finite=True) -> Adaptation:
        """The inner loop on the variational parameters, from the prior: `steps` steps on the negative ELBO per
        support point, each with its own `num_samples` draws (the seed folded with the step)."""
        x, y = episode["support_x"], episode["support_y"]
        start = self.prior_params(mean)
        points = tf.cast(tf.shape(y)[0], start[0].dtype)

        def objective(params, state, step):
            step_seed = tf.random.experimental.stateless_fold_in(seed, step)
            samples = self.draw(self.gaussians(params), step_seed)
            nll, _, state = self.task_objective(samples, slow, state, x, y, training=training)
            return nll + tf.constant(self.kl_weight, nll.dtype) * self.kl(params, start) / points, state

        return inner_loop(objective, start, state, self.update_rule, steps, first_order=first_order,
                          keep_trajectory=keep_trajectory, training=training, seed=seed, unroll=self.unroll_inner_loop,
                          rematerialize=self.rematerialize_inner_steps, check_finite=check_finite)

    def predictive_samples(self, params, seed) -> list[tf.Tensor]:
        """The `num_samples` weight draws of variational parameters `params` that predict."""
        return self.draw(self.gaussians(params), tf.random.experimental.stateless_fold_in(seed, _SAMPLES))

    def adapt_episode(self, fast, slow, state, episode, steps, *, training, first_order=False, keep_trajectory=False,
                      seed=None, check_finite=True):
        """The posterior fitted to the support set, as `num_samples` weight draws (stacked fast parameters; the
        trajectory's points are draws, with the same noise, of the posterior after each step). `fast` is μ;
        without a `seed`, the draws are from `evaluation_seed`."""
        if seed is None:
            seed = self.evaluation_seed(episode)
        fitted = self.posterior(fast, slow, state, episode, steps, training=training, first_order=first_order,
                                keep_trajectory=keep_trajectory, seed=seed, check_finite=check_finite)
        trajectory = (None if fitted.trajectory is None
                      else [self.predictive_samples(p, seed) for p in fitted.trajectory])
        return Adaptation(self.predictive_samples(fitted.params, seed), fitted.state, fitted.losses, trajectory)

    def task_gradients(self, episode, state, seed):
        """The meta-gradient of the likelihood of support and query sets under the adapted posterior, its KL from
        the prior and the hyperprior (see the class docstring)."""
        with tf.GradientTape() as tape:
            mean, slow = self.read_params()
            fitted = self.posterior(mean, slow, state, episode, self.inner_steps, training=True,
                                    first_order=self.first_order, seed=seed)
            samples = self.predictive_samples(fitted.params, seed)
            query, logs, state = self.outer_objective(samples, slow, fitted.state, episode, training=True,
                                                      step=self.inner_steps, seed=seed)
            support, _, _ = self.task_objective(samples, slow, state, episode["support_x"], episode["support_y"],
                                                training=True)
            n_support, n_query = (tf.cast(tf.shape(episode[k])[0], query.dtype) for k in ("support_y", "query_y"))
            prior = self.prior_params(mean)
            objective = (n_query * query + n_support * support + tf.constant(self.kl_weight, query.dtype)
                         * self.kl(fitted.params, prior) + tf.constant(self.hyperprior_weight, query.dtype)
                         * self.negative_log_hyperprior(prior)) / (n_support + n_query)
        grads = tape.gradient(objective, self.meta_variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return grads, {**logs, "loss": objective}, state

    def get_config(self) -> dict:
        return {**super().get_config(), "kl_weight": self.kl_weight, "hyperprior_weight": self.hyperprior_weight,
                "initial_stddev": self.initial_stddev, "hyperprior_concentration": self.hyperprior_concentration,
                "hyperprior_rate": self.hyperprior_rate}
