"""A learner whose weights are sampled (docs/architecture.md, "The engine's hooks"): a mean-field Gaussian layer
written in Keras 3 with `keras.random`, its KL from `tfp.distributions`, meta-learned by MAML through the hooks."""

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp
from conftest import random_episodes

import tfmeta

tfd = tfp.distributions


@keras.saving.register_keras_serializable(package="tfmeta_tests")
class MeanFieldDense(keras.layers.Layer):
    """A dense layer with a factorised Gaussian posterior N(μ, softplus(ρ)²) over its kernel and bias, sampled by
    reparameterisation with `keras.random` at every call. Its KL to N(0, 1), from `tfp.distributions`, is added
    with `add_loss` (scaled by `kl_weight`, e.g. 1 / examples), so the engine's objectives count it
    (`MetaLearner.task_objective` takes the learner's Keras losses at the adapted parameters)."""

    def __init__(self, units, kl_weight=1.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.units, self.kl_weight = units, kl_weight
        self.seed_generator = keras.random.SeedGenerator(seed)

    def build(self, input_shape):
        shapes = {"kernel": (input_shape[-1], self.units), "bias": (self.units,)}
        self.means = {k: self.add_weight(shape=s, name=f"{k}_mean", initializer="glorot_uniform" if k == "kernel"
                                         else "zeros") for k, s in shapes.items()}
        self.rhos = {k: self.add_weight(shape=s, name=f"{k}_rho", initializer=keras.initializers.Constant(-3.0))
                     for k, s in shapes.items()}

    def call(self, x):
        sampled, kl = {}, 0.0
        for k in ("kernel", "bias"):
            posterior = tfd.Normal(keras.ops.convert_to_tensor(self.means[k]), tf.nn.softplus(self.rhos[k]))
            noise = keras.random.normal(self.means[k].shape, seed=self.seed_generator, dtype=self.compute_dtype)
            sampled[k] = posterior.loc + posterior.scale * noise
            kl += tf.reduce_sum(tfd.kl_divergence(posterior, tfd.Normal(tf.zeros_like(posterior.loc), 1.0)))
        self.add_loss(self.kl_weight * kl)
        return x @ sampled["kernel"] + sampled["bias"]

    def get_config(self):
        return {**super().get_config(), "units": self.units, "kl_weight": self.kl_weight}


@keras.saving.register_keras_serializable(package="tfmeta_tests")
class SampledMAML(tfmeta.MAML):
    """MAML on a learner with sampled weights: the inner and outer objectives are the expected loss plus the KL (the
    layer's `add_loss`); the outer objective averages `samples` weight samples (a sample axis) and reports the
    predictive mean's squared error, `predictive_mse`."""

    def __init__(self, learner, samples=4, **kwargs):
        super().__init__(learner, **kwargs)
        self.samples = samples

    def outer_objective(self, fast, slow, state, episode, *, training, step=None, seed=None, start=None):
        losses, predictions = [], []
        for _ in range(self.samples):  # each pass draws new weights: the seed state moves on
            loss, outputs, state = self.task_objective(fast, slow, state, episode["query_x"], episode["query_y"],
                                                       training=training, step=step)
            losses.append(loss)
            predictions.append(outputs)
        mean = tf.reduce_mean(tf.stack(predictions), axis=0)  # [samples, examples, 1] -> the predictive mean
        return tf.add_n(losses) / self.samples, {
            "predictive_mse": tf.reduce_mean(tf.square(mean - episode["query_y"]))}, state

    def metric_names(self):
        return ["predictive_mse"]


def sampled_learner():
    inputs = keras.Input((2,), dtype="float64")
    hidden = keras.layers.Dense(8, activation="tanh", dtype="float64", name="features")(inputs)
    return keras.Model(inputs, MeanFieldDense(1, kl_weight=0.01, seed=3, dtype="float64", name="head")(hidden))


def test_sampled_weights_meta_gradient_counts_the_kl_and_matches_finite_differences_with_the_noise_fixed():
    meta = SampledMAML(sampled_learner(), update_rule=tfmeta.Sgd(0.1), inner_steps=2, samples=3)
    episodes = random_episodes(tasks=2)
    seeds = [np.array(v) for v in meta.learner.non_trainable_variables]

    def run():  # the same noise every time: the learner's and the meta-learner's seed states reset
        for variable, value in zip(meta.learner.non_trainable_variables, seeds):
            variable.assign(value)
        meta.task_seeds.state.assign([5, 0])
        return meta.compute_meta_gradients(episodes)

    grads, logs, _ = run()
    assert set(logs) == {"loss", "predictive_mse"}
    variables = meta.meta_variables
    eps = 1e-6
    for index in range(len(variables)):
        variable = variables[index]
        base = np.array(variable)
        position = tuple(0 for _ in base.shape)
        bumped = []
        for sign in (1, -1):
            value = base.copy()
            value[position] += sign * eps
            variable.assign(value)
            bumped.append(float(run()[1]["loss"]))
        variable.assign(base)
        numeric = (bumped[0] - bumped[1]) / (2 * eps)
        np.testing.assert_allclose(np.array(grads[index])[position], numeric, rtol=1e-5, atol=1e-8,
                                   err_msg=variable.path)
    # The KL counts: the same meta-learner without it (kl_weight 0) has another meta-gradient for the ρ's.
    head = meta.learner.get_layer("head")
    head.kl_weight = 0.0
    without, _, _ = run()
    rho = [i for i, v in enumerate(variables) if "rho" in v.path]
    assert rho and all(not np.allclose(grads[i], without[i]) for i in rho)


def test_evaluation_reports_the_predictive_mean_over_the_sample_axis():
    meta = SampledMAML(sampled_learner(), update_rule=tfmeta.Sgd(0.1), inner_steps=1, samples=8)
    meta.learner.get_layer("head").kl_weight = 0.0  # the loss is then the samples' mean squared error
    episodes = random_episodes(tasks=3)
    fast, slow = meta.read_params()
    state = meta.read_state()
    x = episodes["query_x"][0]
    first, after = meta.forward(fast, slow, state, x, training=False)
    second, _ = meta.forward(fast, slow, after, x, training=False)
    again, _ = meta.forward(fast, slow, state, x, training=False)
    assert not np.allclose(first, second) and np.array_equal(first, again)  # new weights per pass, fixed by seed
    results = meta.evaluate_tasks(episodes)
    assert set(results) == {"loss", "predictive_mse"} and results["predictive_mse"].shape == (3, 2)
    # The predictive mean's error is below the samples' mean error (Jensen; strictly, as the samples differ).
    assert np.all(np.array(results["predictive_mse"]) < np.array(results["loss"]))


def test_the_sampled_meta_gradient_is_the_same_eagerly_and_in_a_tf_function():
    """(Under XLA, `keras.random` draws other numbers than TensorFlow's CPU kernels.)"""
    meta = SampledMAML(sampled_learner(), update_rule=tfmeta.Sgd(0.1), inner_steps=2, samples=2)
    episode = {k: v[0] for k, v in random_episodes(tasks=1).items()}
    state = meta.read_state()
    run = lambda: meta.task_gradients(episode, state, tf.constant([1, 2], tf.int64))[0]  # noqa: E731
    eager = [g.numpy() for g in run()]
    for got, expected in zip(tf.function(run)(), eager):
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)
