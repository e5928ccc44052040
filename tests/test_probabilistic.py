"""Probabilistic meta-learning: likelihoods and their scores, SVGD, ensembles of MAML and Bayesian MAML, checked
against hand computations, TFP's closed forms and finite differences (float64)."""

import math
import subprocess

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import check_directional_derivatives, random_episodes, values

import tfmeta
from tfmeta import likelihoods


def small_mlp(outputs=1, dtype="float64"):
    return tfmeta.models.mlp(input_shape=(2,), hidden_units=(6, 5), outputs=outputs, activation="tanh", dtype=dtype)


def numpy_svgd(theta, grads, lr):
    """SVGD's update by hand: theta, grads [M, D]; h = median of the M*M squared distances / log M."""
    m = theta.shape[0]
    squared = ((theta[:, None] - theta[None]) ** 2).sum(-1)
    h = np.median(squared) / math.log(m)  # numpy's median averages the two middle values, as the official code
    kernel = np.exp(-squared / h)
    drive = kernel @ -grads
    repulsion = np.stack([sum(2.0 / h * (theta[i] - theta[j]) * kernel[i, j] for j in range(m)) for i in range(m)])
    return lr * (drive + repulsion) / m, h


@pytest.mark.parametrize("particles", [3, 4])  # an odd and an even number of squared distances
def test_svgd_update_equals_hand_computation(particles):
    rng = np.random.default_rng(0)
    params = [tf.constant(rng.normal(size=(particles, 2, 2))), tf.constant(rng.normal(size=(particles, 3)))]
    grads = [tf.constant(rng.normal(size=p.shape)) for p in params]
    rule = tfmeta.Svgd(0.1)
    rule.check_params([p.shape for p in params])
    updates, _ = rule.update(grads, (), params, 0)
    flat = lambda ts: np.concatenate([np.reshape(t, (particles, -1)) for t in ts], 1)  # noqa: E731
    expected, _ = numpy_svgd(flat(params), flat(grads), 0.1)
    np.testing.assert_allclose(flat(updates), expected, rtol=1e-12)


def test_svgd_differentiates_the_kernel_but_not_the_bandwidth():
    rng = np.random.default_rng(1)
    theta, grads = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    weights, direction = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    rule = tfmeta.Svgd(0.1)
    rule.check_params([(3, 4)])
    params = tf.constant(theta)
    with tf.GradientTape() as tape:
        tape.watch(params)
        objective = tf.reduce_sum(rule.update([tf.constant(grads)], (), [params], 0)[0][0] * weights)
    analytic = float(np.sum(tape.gradient(objective, params).numpy() * direction))
    _, h = numpy_svgd(theta, grads, 0.1)

    def fixed_bandwidth(t):
        squared = ((t[:, None] - t[None]) ** 2).sum(-1)
        kernel = np.exp(-squared / h)
        repulsion = 2.0 / h * (t * kernel.sum(1, keepdims=True) - kernel @ t)
        return np.sum(0.1 * (kernel @ -grads + repulsion) / 3 * weights)

    eps = 1e-6
    numeric = (fixed_bandwidth(theta + eps * direction) - fixed_bandwidth(theta - eps * direction)) / (2 * eps)
    assert analytic == pytest.approx(numeric, rel=1e-7)


def test_svgd_with_one_particle_is_gradient_descent_and_needs_stacked_parameters():
    rule = tfmeta.Svgd(0.5)
    rule.check_params([(1, 3)])
    updates, _ = rule.update([tf.constant([[1.0, -2.0, 4.0]])], (), [tf.zeros([1, 3])], 0)
    np.testing.assert_allclose(updates[0], [[-0.5, 1.0, -2.0]])
    with pytest.raises(ValueError, match=r"stacked over the same particles"):
        tfmeta.MAML(small_mlp(), update_rule=tfmeta.Svgd())


def test_mixture_scores_equal_hand_computation():
    rng = np.random.default_rng(2)
    means, stddevs = rng.normal(size=(3, 40, 1)), rng.uniform(0.3, 1.5, size=(3, 1, 1))
    targets = rng.normal(size=(40, 1))
    predictive = likelihoods.Normal().predictive(tf.constant(means), tf.constant(stddevs))
    scores = likelihoods.Normal().scores(predictive, tf.constant(targets))
    density = np.exp(-0.5 * ((targets - means) / stddevs) ** 2) / (stddevs * math.sqrt(2 * math.pi))
    assert float(scores["nll"]) == pytest.approx(-np.mean(np.log(density.mean(0))), rel=1e-10)

    def cdf(y, i):  # the mixture's CDF at query i
        return np.mean([0.5 * (1 + math.erf((y - means[s, i, 0]) / (stddevs[s, 0, 0] * math.sqrt(2))))
                        for s in range(3)])

    def quantile(p, i):  # by bisection
        low, high = -20.0, 20.0
        for _ in range(100):
            mid = (low + high) / 2
            low, high = (mid, high) if cdf(mid, i) < p else (low, mid)
        return low

    for level in (0.5, 0.9):
        inside = [quantile(0.5 - level / 2, i) <= targets[i, 0] <= quantile(0.5 + level / 2, i) for i in range(40)]
        assert float(scores[f"coverage_{round(100 * level)}"]) == pytest.approx(np.mean(inside))
    np.testing.assert_allclose(predictive.mean().numpy(), means.mean(0), rtol=1e-12)
    variance = (stddevs**2 + means**2).mean(0) - means.mean(0) ** 2
    np.testing.assert_allclose(predictive.stddev().numpy(), np.sqrt(variance), rtol=1e-10)


def test_categorical_mixture_averages_probabilities():
    logits = np.random.default_rng(3).normal(size=(4, 6, 3))
    labels = np.array([0, 1, 2, 0, 1, 2])
    categorical = likelihoods.Categorical()
    probabilities = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    mean = probabilities.mean(0)
    np.testing.assert_allclose(np.exp(categorical.point(tf.constant(logits))), mean, rtol=1e-12)
    scores = categorical.scores(categorical.predictive(tf.constant(logits)), tf.constant(labels))
    assert float(scores["nll"]) == pytest.approx(-np.mean(np.log(mean[np.arange(6), labels])), rel=1e-12)


def test_emaml_particles_each_take_their_own_maml_step():
    """Particle m of EMAML adapts and scores exactly as MAML started from particle m's initial weights."""
    episodes = random_episodes(tasks=1)
    ensemble = tfmeta.EMAML(small_mlp(), num_particles=3, update_rule=tfmeta.Sgd(0.3), inner_steps=2,
                            metrics=["mean_squared_error"])
    fast, slow = ensemble.read_params()
    episode = {k: v[0] for k, v in episodes.items()}
    adapted = ensemble.adapt_episode(fast, slow, [], episode, 2, training=True).params
    single = tfmeta.MAML(small_mlp(), update_rule=tfmeta.Sgd(0.3), inner_steps=2)
    losses = []
    for m in range(3):
        for variable, particle in zip(single.learner.trainable_variables, ensemble.particles):
            variable.assign(particle[m])
        f, s = single.read_params()
        expected = single.adapt_episode(f, s, [], episode, 2, training=True).params
        for a, e in zip(adapted, expected):
            np.testing.assert_allclose(a[m], e, rtol=1e-12)
        losses.append(float(single.outer_objective(expected, s, [], episode, training=True)[0]))
    loss, logs, _ = ensemble.outer_objective(adapted, slow, [], episode, training=True)
    assert float(loss) == pytest.approx(np.mean(losses), rel=1e-12)
    outputs = np.stack([single.learner.stateless_call([p[m] for p in adapted], [], episode["query_x"])[0]
                        for m in range(3)])
    ensemble_mse = np.mean((outputs.mean(0) - episode["query_y"].numpy()) ** 2)
    assert float(logs["mean_squared_error"]) == pytest.approx(ensemble_mse, rel=1e-12)


@pytest.mark.parametrize("mapping", ["vectorized_map", "unrolled"])
def test_emaml_meta_gradient_matches_finite_differences(mapping):
    from test_gradients import check_finite_differences

    meta = tfmeta.EMAML(small_mlp(), num_particles=2, update_rule=tfmeta.Sgd(0.3), inner_steps=2,
                        particle_parallelism=mapping)
    episodes = random_episodes()
    grads, _, _ = tf.function(meta.compute_meta_gradients)(episodes)
    check_finite_differences(meta, episodes, grads)


def test_particles_start_independently_and_identical_starts_are_refused():
    meta = tfmeta.EMAML(small_mlp(), num_particles=3)
    kernel = meta.particles[0].numpy()
    assert not np.allclose(kernel[0], kernel[1]) and not np.allclose(kernel[1], kernel[2])
    np.testing.assert_array_equal(kernel[0], meta.learner.trainable_variables[0].numpy())
    inputs = keras.Input((2,))
    seeded = keras.Model(inputs, keras.layers.Dense(1, kernel_initializer=keras.initializers.GlorotUniform(7))(inputs))
    with pytest.raises(ValueError, match=r"particles of EMAML start identical.*seeded initialisers"):
        tfmeta.EMAML(seeded, num_particles=2)


def bmaml(particles=3, **kwargs):
    return tfmeta.BMAML(small_mlp(), num_particles=particles, update_rule=tfmeta.Svgd(1e-2), **kwargs)


@pytest.mark.parametrize("learn_prior", [True, False])
def test_bmaml_negative_log_posterior_equals_closed_form(learn_prior):
    """With `learn_prior_precision=False`, λ is the fixed initial precision: no particle coordinate, no
    hyperprior."""
    meta = bmaml(noise_concentration=2.0, noise_rate=0.2, prior_concentration=3.0, prior_rate=2.0,
                 initial_prior_precision=2.5, learn_prior_precision=learn_prior)
    values = ([0.3, -0.2, 0.1], [4.0, 3.5, 4.2]) if learn_prior else ([4.0, 3.5, 4.2],)
    assert len(meta.log_precisions) == len(values)
    for variable, value in zip(meta.log_precisions, values):
        variable.assign(value)
    episode = {k: v[0] for k, v in random_episodes(tasks=1).items()}
    fast, slow = meta.read_params()
    value, _ = meta.negative_log_posterior(fast, slow, [], episode["support_x"], episode["support_y"], True)
    log_gamma = meta.log_precisions[-1].numpy()
    log_lambda = meta.log_precisions[0].numpy() if learn_prior else np.full(3, math.log(2.5))
    net = tfmeta.MAML(small_mlp())

    def log_gamma_density(log_x, a, b):  # Gamma(a, rate b) of x = exp(log_x), times the Jacobian dx/dlog_x = x
        x = np.exp(log_x)
        return a * math.log(b) - math.lgamma(a) + (a - 1) * log_x - b * x + log_x

    total = 0.0
    for m in range(3):
        params = [p[m].numpy() for p in meta.particles]
        prediction = net.learner.stateless_call(params, [], episode["support_x"])[0].numpy()
        residual = episode["support_y"].numpy() - prediction
        gamma, lam = np.exp(log_gamma[m]), np.exp(log_lambda[m])
        weights = np.concatenate([p.ravel() for p in params])
        total += np.sum(0.5 * np.log(gamma / (2 * math.pi)) - 0.5 * gamma * residual**2)
        total += np.sum(0.5 * np.log(lam / (2 * math.pi)) - 0.5 * lam * weights**2)
        total += log_gamma_density(log_gamma[m], 2.0, 0.2)
        if learn_prior:
            total += log_gamma_density(log_lambda[m], 3.0, 2.0)
    assert float(value) == pytest.approx(-total, rel=1e-12)


def chaser_and_leader(meta, episode, steps, leader_steps):
    fast, slow = meta.read_params()
    chaser = meta.adapt_episode(fast, slow, [], episode, steps, training=True).params
    both = {"support_x": tf.concat([episode["support_x"], episode["query_x"]], 0),
            "support_y": tf.concat([episode["support_y"], episode["query_y"]], 0)}
    leader = meta.adapt_episode(chaser, slow, [], both, leader_steps, training=True).params
    network = len(meta.particles)
    return chaser[:network], leader[:network]


def test_bmaml_chaser_loss_holds_the_leader_constant():
    """The meta-gradient is that of Σ‖chaser(θ) − L‖² with the leader L a constant, not a function of θ."""
    meta = bmaml(inner_steps=2, leader_steps=2)
    episodes = random_episodes(tasks=1)
    episode = {k: v[0] for k, v in episodes.items()}
    grads, logs, _ = meta.compute_meta_gradients(episodes)
    with tf.GradientTape(persistent=True) as tape:
        chaser, leader = chaser_and_leader(meta, episode, 2, 2)
        held = tf.add_n([tf.reduce_sum((c - tf.stop_gradient(t)) ** 2) for c, t in zip(chaser, leader)])
        through = tf.add_n([tf.reduce_sum((c - t) ** 2) for c, t in zip(chaser, leader)])
    assert float(logs["loss"]) == pytest.approx(float(held), rel=1e-12)
    for name, objective in (("held", held), ("through", through)):
        expected = tape.gradient(objective, meta.meta_variables, unconnected_gradients="zero")
        close = all(np.allclose(g, e, rtol=1e-9, atol=1e-12) for g, e in zip(grads, expected))
        assert close == (name == "held"), name


@pytest.mark.parametrize("particles", [1, 3])
def test_bmaml_meta_gradient_matches_finite_differences(particles, monkeypatch):
    """The second-order meta-gradient through the SVGD steps (kernel and repulsive terms with 3 particles; plain
    gradient descent on the negative log posterior with 1) and the log-precisions equals finite differences. The
    bandwidth is held at a constant in both, as the meta-gradient holds it (the median heuristic's own derivative
    is left out by design: `test_svgd_differentiates_the_kernel_but_not_the_bandwidth`)."""
    from tfmeta.update_rules import svgd

    meta = bmaml(particles=particles, inner_steps=2, leader_steps=1)
    flat = tf.concat([tf.reshape(p, [particles, -1]) for p in meta.read_params()[0]], axis=1)
    squared = tf.reduce_sum(tf.square(flat[:, None] - flat[None]), axis=-1)
    bandwidth = float(svgd.median_bandwidth(squared)) if particles > 1 else 1.0  # the heuristic's, at the start
    monkeypatch.setattr(svgd, "median_bandwidth", lambda squared: tf.constant(bandwidth, squared.dtype))
    episodes = random_episodes(tasks=1)
    episode = {k: v[0] for k, v in episodes.items()}
    grads, _, _ = meta.compute_meta_gradients(episodes)
    _, leader = chaser_and_leader(meta, episode, 2, 1)
    distance = lambda: sum(float(tf.reduce_sum((c - t) ** 2))  # noqa: E731
                           for c, t in zip(chaser_and_leader(meta, episode, 2, 0)[0], leader))
    rng = np.random.default_rng(4)
    theta = values(meta.meta_variables)
    direction = [rng.normal(size=t.shape) for t in theta]
    eps, sides = 1e-6, []
    for sign in (1, -1):
        for v, t, d in zip(meta.meta_variables, theta, direction):
            v.assign(t + sign * eps * d)
        sides.append(distance())
    for v, t in zip(meta.meta_variables, theta):
        v.assign(t)
    analytic = sum(float(np.sum(np.array(g) * d)) for g, d in zip(grads, direction))
    assert analytic == pytest.approx((sides[0] - sides[1]) / (2 * eps), rel=1e-6)
    assert any(np.abs(g).max() > 0 for g in grads[-1:])  # the log-precisions get a meta-gradient


def test_bmaml_predicts_with_each_particles_noise():
    meta = bmaml(metrics=["mean_squared_error"])
    meta.log_precisions[1].assign([0.0, 2.0, 4.0])
    episode = {k: v[0] for k, v in random_episodes(tasks=1, query=75).items()}
    fast, slow = meta.read_params()
    _, logs, _ = meta.outer_objective(fast, slow, [], episode, training=False)
    outputs = meta._stateless_call(fast, slow, [], episode["query_x"], False, None)[0]
    stddev = tf.constant(np.exp(-0.5 * np.array([0.0, 2.0, 4.0]))[:, None, None])
    expected = likelihoods.Normal().scores(likelihoods.Normal().predictive(outputs, stddev), episode["query_y"])
    assert float(logs["nll"]) == pytest.approx(float(expected["nll"]), rel=1e-12)


@pytest.mark.parametrize("algorithm", ["EMAML", "BMAML"])
def test_evaluate_and_adapt_predict_agree_at_75_queries(algorithm):
    make = getattr(tfmeta, algorithm)
    meta = make(small_mlp(dtype="float32"), num_particles=4, metrics=["mean_squared_error"], eval_inner_steps=3,
                likelihood=likelihoods.Normal(0.5))
    episodes = random_episodes(tasks=1, query=75, dtype="float32")
    results = meta.evaluate_tasks(episodes)
    model = meta.adapt(episodes["support_x"][0], episodes["support_y"][0], return_samples=True)
    predicted = model.predict(episodes["query_x"][0], verbose=0)
    assert predicted["samples"].shape == (75, 4, 1) and predicted["stddev"].shape == (75, 1)
    mse = np.mean((predicted["mean"] - episodes["query_y"][0].numpy()) ** 2)
    assert float(results["mean_squared_error"][0, -1]) == pytest.approx(mse, rel=1e-5)
    stddev = meta.particle_stddev(meta.read_params()[0]) if algorithm == "BMAML" else None
    if stddev is None:
        stddev = 0.5
    else:  # BMAML's particles predict with their own noise, adapted with the rest
        stddev = None
    if stddev is not None:
        samples = np.moveaxis(predicted["samples"], 1, 0)
        variance = (samples**2).mean(0) - samples.mean(0) ** 2 + stddev**2
        np.testing.assert_allclose(predicted["stddev"], np.sqrt(variance), rtol=1e-4)


def test_bad_probabilistic_arguments_are_refused_with_their_name():
    with pytest.raises(ValueError, match=r"`num_particles` must be an integer >= 1"):
        tfmeta.EMAML(small_mlp(), num_particles=0)
    for stddev in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match=r"Normal `stddev` must be positive"):
            likelihoods.Normal(stddev)
    with pytest.raises(ValueError, match=r"`noise_rate` must be positive"):
        bmaml(noise_rate=0.0)
    for likelihood in (likelihoods.HeteroscedasticNormal(), None):  # given, or implied by the loss
        with pytest.raises(ValueError, match=r"needs a probabilistic head: learner .* size 1"):
            tfmeta.MAML(small_mlp(outputs=1), loss="gaussian_nll", likelihood=likelihood)
    with pytest.raises(ValueError, match=r"BMAML.*`likelihood` must be"):
        tfmeta.BMAML(small_mlp(outputs=2), loss="gaussian_nll")
    with pytest.raises(ValueError, match=r"`particle_parallelism` must be one of"):
        tfmeta.EMAML(small_mlp(), particle_parallelism="pmap")
    with pytest.raises(ValueError, match=r"chaser loss.*query_step_weights"):
        bmaml(inner_steps=2, query_step_weights=[0.5, 0.5])


def test_probabilistic_learners_round_trip_their_config():
    for meta in (bmaml(leader_steps=3, prior_rate=1.5, learn_prior_precision=False),
                 tfmeta.MAML(small_mlp(2), loss="gaussian_nll", likelihood=likelihoods.HeteroscedasticNormal())):
        clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(meta))
        assert clone.get_config() == meta.get_config()
        assert type(clone.likelihood) is type(meta.likelihood) and clone.metric_names() == meta.metric_names()


def test_an_ensemble_called_predicts_its_mean_at_the_initial_particles(tmp_path):
    meta = tfmeta.EMAML(small_mlp(), num_particles=3)
    x = np.random.default_rng(5).normal(size=(9, 2))
    outputs = [meta.learner.stateless_call([p[m] for p in meta.particles], [], x)[0] for m in range(3)]
    np.testing.assert_allclose(meta(x), np.mean(outputs, axis=0), rtol=1e-6)  # Keras casts inputs to float32
    from tfmeta import plotting

    plotting.plot_sine_adaptation(tfmeta.BMAML(tfmeta.models.mlp((1,), (8,), 1), num_particles=2),
                                  tfmeta.tasks.SineTasks(5), str(tmp_path / "tasks.png"), seed=0, num_tasks=2)
    assert (tmp_path / "tasks.png").stat().st_size > 10_000


@pytest.mark.parametrize("algorithm", ["MAML", "EMAML"])
def test_predict_tasks_agree_with_adapt_and_calibration_report_pools_them(algorithm, tmp_path):
    from conftest import classification_episodes

    from tfmeta import calibration, evaluation

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    learner = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Flatten(), keras.layers.Dense(8, "relu"),
                                keras.layers.Dense(5)])
    kwargs = {"num_particles": 3} if algorithm == "EMAML" else {}
    meta = getattr(tfmeta, algorithm)(learner, loss=loss, update_rule=tfmeta.Sgd(0.5), eval_inner_steps=2,
                                      likelihood=likelihoods.Categorical(), **kwargs)
    episodes = classification_episodes(tasks=2, ways=5, shots=1, queries=15, dtype="float32")
    predicted = meta.predict_tasks(episodes)
    assert predicted["probabilities"].shape == (2, 75, 5)
    for task in range(2):
        model = meta.adapt(episodes["support_x"][task], episodes["support_y"][task])
        outputs = model.predict(episodes["query_x"][task], verbose=0)
        probabilities = outputs["probabilities"] if isinstance(outputs, dict) else tf.nn.softmax(outputs).numpy()
        np.testing.assert_allclose(predicted["probabilities"][task], probabilities, rtol=1e-5, atol=1e-7)

    class Fixed(tfmeta.tasks.TaskDistribution):
        def sample(self, seed, num_tasks):
            return {k: v[:num_tasks] for k, v in episodes.items()}

    report = evaluation.calibration_report(meta, Fixed(), num_tasks=2, batch_size=2, num_resamples=50)
    probabilities = predicted["probabilities"].numpy().astype(np.float64)
    probabilities /= probabilities.sum(-1, keepdims=True)
    expected = calibration.expected_calibration_error(probabilities, episodes["query_y"].numpy())
    assert report["ece"] == pytest.approx(expected, rel=1e-6)
    assert report["ece_ci95"][0] <= report["ece"] <= report["ece_ci95"][1]
    assert report["accuracy"] == pytest.approx(np.mean(probabilities.argmax(-1) == episodes["query_y"].numpy()))
    # 5-way confidences are >= 0.2: the lowest bins are empty, which JSON writes as null, not as a non-finite result
    assert report["reliability"]["accuracy"][0] is None and evaluation.strict(report)[1] == []
    from tfmeta import plotting

    plotting.plot_reliability(report, str(tmp_path / "reliability.png"), label=algorithm)
    assert (tmp_path / "reliability.png").stat().st_size > 10_000


def platipus(samples=3, **kwargs):
    return tfmeta.PLATIPUS(small_mlp(), num_samples=samples, update_rule=tfmeta.Sgd(0.3), **kwargs)


def test_platipus_distributions_follow_its_algorithms_and_tfp():
    """The prior is N(μ − γ_p ∇L(μ, support), σ²) and the inference distribution N(μ − γ_q ∇L(μ, query), v²);
    KL(q ‖ p) equals the closed form of two diagonal Gaussians."""
    meta = platipus()
    rng = np.random.default_rng(6)
    for variable in meta.log_prior_stddev + meta.log_inference_stddev:
        variable.assign(rng.normal(-2.0, 0.3, size=variable.shape))
    meta.step_sizes.assign([0.05, 0.2])
    episode = {k: v[0] for k, v in random_episodes(tasks=1).items()}
    mean, slow = meta.read_params()
    for split, distributions, step, log_stddev in (
            ("support", meta.prior, 0.05, meta.log_prior_stddev),
            ("query", meta.inference, 0.2, meta.log_inference_stddev)):
        x, y = episode[f"{split}_x"], episode[f"{split}_y"]
        with tf.GradientTape() as tape:
            tape.watch(mean)
            loss = tf.reduce_mean((meta.learner.stateless_call(mean, [], x)[0] - y) ** 2)
        grads = tape.gradient(loss, mean)
        for d, m, g, s in zip(distributions(mean, slow, [], x, y), mean, grads, log_stddev):
            np.testing.assert_allclose(d.mean(), m - step * g, rtol=1e-12)
            np.testing.assert_allclose(d.stddev(), np.exp(s.numpy()), rtol=1e-12)
    q = meta.inference(mean, slow, [], episode["query_x"], episode["query_y"])
    p = meta.prior(mean, slow, [], episode["support_x"], episode["support_y"])
    kl = sum(float(tf.reduce_sum(likelihoods.tfd().kl_divergence(a, b))) for a, b in zip(q, p))
    closed = sum(np.sum(np.log(b.stddev() / a.stddev()) + (a.stddev() ** 2 + (a.mean() - b.mean()) ** 2)
                        / (2 * b.stddev() ** 2) - 0.5) for a, b in zip(q, p))
    assert kl == pytest.approx(closed, rel=1e-10) and kl > 0


def platipus_objective(meta, episode, seed):
    """Algorithm 1's objective for one task, written out: the query loss of the adapted samples plus KL(q ‖ p)."""
    mean, slow = meta.read_params()
    prior = meta.prior(mean, slow, [], episode["support_x"], episode["support_y"], first_order=False)
    inference = meta.inference(mean, slow, [], episode["query_x"], episode["query_y"], first_order=False)
    samples = meta.draw(inference, seed)
    adapted = tfmeta.MetaLearner.adapt_episode(meta, samples, slow, [], episode, meta.inner_steps, training=True)
    loss = meta.task_objective(adapted.params, slow, [], episode["query_x"], episode["query_y"], True)[0]
    kl = tf.add_n([tf.reduce_sum(likelihoods.tfd().kl_divergence(a, b)) for a, b in zip(inference, prior)])
    return float(loss + meta.kl_weight * kl)


def test_platipus_meta_gradient_matches_finite_differences():
    """The second-order meta-gradient through the prior's and the inference network's gradient steps, the
    reparameterised samples and the inner loop (float64; one task, its seed held fixed)."""
    meta = platipus(inner_steps=2, kl_weight=0.5)
    rng = np.random.default_rng(7)
    for variable in meta.log_prior_stddev + meta.log_inference_stddev:
        variable.assign(rng.normal(-1.5, 0.3, size=variable.shape))
    episodes = random_episodes(tasks=1)
    episode = {k: v[0] for k, v in episodes.items()}
    seed = tf.constant([3, 4])
    grads, logs, _ = meta.task_gradients(episode, [], seed)
    assert float(logs["loss"]) == pytest.approx(platipus_objective(meta, episode, seed), rel=1e-12)
    check_directional_derivatives(meta.meta_variables, grads, lambda: platipus_objective(meta, episode, seed))
    names = [v.name for v in meta.meta_variables]
    for name in ("log_prior_stddev", "log_inference_stddev", "step_sizes"):  # each gets a meta-gradient
        assert any(np.abs(g).max() > 0 for g, n in zip(grads, names) if n.startswith(name)), name


def test_platipus_samples_are_reproducible_and_differ_across_tasks_and_samples():
    meta = platipus(samples=4)
    episodes = random_episodes(tasks=2, query=75)
    mean, slow = meta.read_params()
    draws = [meta.adapt_episode(mean, slow, [], {k: v[t] for k, v in episodes.items()}, 0, training=False).params
             for t in (0, 1, 0)]
    np.testing.assert_array_equal(draws[0][0], draws[2][0])  # the same task: the same samples
    noise = [(d[0] - p.mean()) / p.stddev() for d, p in (  # different tasks: different draws of the noise
        (draws[t], meta.prior(mean, slow, [], episodes["support_x"][t], episodes["support_y"][t])[0]) for t in (0, 1))]
    assert not np.allclose(noise[0], noise[1])
    assert not np.allclose(draws[0][0][0], draws[0][0][1])
    other = platipus(samples=4, seed=1)
    for variable, value in zip(other.meta_variables, values(meta.meta_variables)):
        variable.assign(value)
    episode = {k: v[0] for k, v in episodes.items()}
    assert not np.allclose(other.adapt_episode(mean, slow, [], episode, 0, training=False).params[0], draws[0][0])
    # Training draws from the inference distribution with the task's seed: reproducible, and seed-dependent.
    first, second, third = (meta.task_gradients(episode, [], tf.constant(s))[1]["loss"]
                            for s in ([1, 2], [1, 2], [2, 2]))
    assert float(first) == float(second) != float(third)


@pytest.mark.parametrize("algorithm", ["PLATIPUS", "ABML"])
def test_sampling_learners_evaluate_adapt_predict_and_serve_alike_at_75_queries(algorithm, tmp_path):
    from test_export import serve

    from tfmeta import export

    meta = getattr(tfmeta, algorithm)(small_mlp(dtype="float32"), num_samples=4, metrics=["mean_squared_error"],
                                      eval_inner_steps=2, likelihood=likelihoods.Normal(0.5),
                                      update_rule=tfmeta.Sgd(0.1))
    meta.log_prior_stddev[0].assign(np.full(meta.log_prior_stddev[0].shape, -1.0))
    episodes = random_episodes(tasks=1, query=75, dtype="float32")
    results = meta.evaluate_tasks(episodes)
    model = meta.adapt(episodes["support_x"][0], episodes["support_y"][0], return_samples=True)
    predicted = model.predict(episodes["query_x"][0], verbose=0)
    assert predicted["samples"].shape == (75, 4, 1)
    assert np.std(predicted["samples"], axis=1).mean() > 1e-3  # the samples differ
    mse = np.mean((predicted["mean"] - episodes["query_y"][0].numpy()) ** 2)
    assert float(results["mean_squared_error"][0, -1]) == pytest.approx(mse, rel=1e-5)
    export.export_meta_learner(meta, str(tmp_path / "model"))
    request = {k: episodes[k][0].numpy() for k in ("support_x", "support_y", "query_x")}
    model_dir = str(tmp_path / "model")
    samples = lambda n, seed: {**request, "num_samples": np.int32(n), "seed": np.int32(seed)}  # noqa: E731
    served, same, other_seed, more, refused = serve(tmp_path, [
        (model_dir, "serving_default", request), (model_dir, "serving_with_samples", samples(4, 0)),
        (model_dir, "serving_with_samples", samples(4, 1)), (model_dir, "serving_with_samples", samples(50, 0)),
        (model_dir, "serving_with_samples", samples(0, 0))])
    np.testing.assert_allclose(served["predictions"], predicted["mean"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(served["stddev"], predicted["stddev"], rtol=1e-5, atol=1e-6)
    for key in ("predictions", "stddev"):  # the learner's own count and seed, as a request's inputs
        np.testing.assert_allclose(same[key], served[key], rtol=1e-6, atol=1e-7)
        assert not np.allclose(other_seed[key], served[key]) and not np.allclose(more[key], served[key])
    with meta.sampling(50, 0):  # the same 50 samples in memory
        np.testing.assert_allclose(more["stddev"], meta.adapt(request["support_x"], request["support_y"]).predict(
            request["query_x"], verbose=0)["stddev"], rtol=1e-5, atol=1e-6)
    assert "num_samples must be >= 1; got 0" in refused
    if algorithm == "PLATIPUS":  # the TF1/C++ loader (TF Serving's) restores the variables too
        run = subprocess.run(["saved_model_cli", "run", "--dir", model_dir, "--tag_set", "serve",
                              "--signature_def", "serving_with_samples", "--input_exprs",
                              "support_x=[[0.,1.],[1.,0.]];support_y=[[0.],[0.8]];query_x=[[0.5,0.5]];"
                              "num_samples=8;seed=3"], check=True, capture_output=True, text=True, timeout=300).stdout
        with meta.sampling(8, 3):
            expected = meta.adapt(np.array([[0.0, 1.0], [1.0, 0.0]], np.float32), np.array([[0.0], [0.8]], np.float32)
                                  ).predict(np.array([[0.5, 0.5]], np.float32), verbose=0)
        value = float(run.split("Result for output key stddev:")[1].split("Result")[0].strip().strip("[]"))
        assert value == pytest.approx(float(expected["stddev"][0, 0]), rel=1e-4)


def test_platipus_arguments_and_config():
    with pytest.raises(ValueError, match=r"PLATIPUS `num_samples` must be an integer >= 1"):
        platipus(samples=0)
    with pytest.raises(ValueError, match=r"`kl_weight` must be a finite number >= 0"):
        platipus(kl_weight=-1.0)
    with pytest.raises(ValueError, match=r"`initial_stddev` must be positive"):
        platipus(initial_stddev=0.0)
    with pytest.raises(ValueError, match=r"PLATIPUS meta-trains with its own objective.*query_step_weights"):
        platipus(inner_steps=2, query_step_weights=[0.5, 0.5])
    meta = platipus(kl_weight=0.1, initial_stddev=0.05, seed=3)
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(meta))
    assert clone.get_config() == meta.get_config() and clone.num_samples == 3
    np.testing.assert_allclose(np.exp(clone.log_prior_stddev[0].numpy()), 0.05, rtol=1e-6)


def test_warm_start_loads_a_runs_learner_and_names_a_mismatch(tmp_path):
    from tfmeta.experiment import warm_start

    maml = tfmeta.MAML(small_mlp())
    maml.compile(keras.optimizers.Adam())
    tf.train.Checkpoint(meta_learner=maml).save(str(tmp_path / "checkpoints" / "ckpt"))
    learner = warm_start(small_mlp(), str(tmp_path))
    for a, b in zip(learner.weights, maml.learner.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        warm_start(small_mlp(), str(tmp_path / "nothing"))
    with pytest.raises(ValueError):
        warm_start(tfmeta.models.mlp(input_shape=(2,), hidden_units=(4,), outputs=1, dtype="float64"), str(tmp_path))


def abml(samples=3, **kwargs):
    return tfmeta.ABML(small_mlp(), num_samples=samples, update_rule=tfmeta.Sgd(0.3), **kwargs)


def randomise_stddevs(meta, seed):
    rng = np.random.default_rng(seed)
    for variable in meta.log_prior_stddev:
        variable.assign(rng.normal(-1.5, 0.3, size=variable.shape))


def test_abml_kl_and_hyperprior_equal_closed_forms():
    meta = abml(hyperprior_concentration=2.0, hyperprior_rate=0.5)
    randomise_stddevs(meta, 8)
    mean, _ = meta.read_params()
    prior = meta.prior_params(mean)
    rng = np.random.default_rng(9)
    posterior = [p + rng.normal(scale=0.1, size=p.shape) for p in prior]
    n = len(mean)
    closed = sum(np.sum(sp - sq + (np.exp(2 * sq) + (mq - mp) ** 2) / (2 * np.exp(2 * sp)) - 0.5)
                 for mq, sq, mp, sp in zip(posterior[:n], posterior[n:], values(prior[:n]), values(prior[n:])))
    assert float(meta.kl(posterior, prior)) == pytest.approx(closed, rel=1e-10)
    tau = [np.exp(-2 * s) for s in values(prior[n:])]
    log_gamma = sum(np.sum(2.0 * np.log(0.5) - math.lgamma(2.0) + np.log(t) - 0.5 * t) for t in tau)
    log_normal = sum(np.sum(-0.5 * m**2 - 0.5 * math.log(2 * math.pi)) for m in values(mean))
    assert float(meta.negative_log_hyperprior(prior)) == pytest.approx(-(log_gamma + log_normal), rel=1e-10)


def abml_objective(meta, episode, seed):
    """ABML's meta-objective for one task, written out from its definition."""
    mean, slow = meta.read_params()
    prior = meta.prior_params(mean)
    tfd = likelihoods.tfd()
    params, n = list(prior), len(mean)
    for step in range(meta.inner_steps):
        with tf.GradientTape() as tape:
            tape.watch(params)
            noise_seed = tf.random.experimental.stateless_fold_in(seed, step)
            draws = [tfd.Normal(m, tf.exp(s)).sample(meta.num_samples, seed=tf.random.experimental.stateless_fold_in(
                noise_seed, i)) for i, (m, s) in enumerate(zip(params[:n], params[n:]))]
            outputs = tf.stack([meta.learner.stateless_call([d[k] for d in draws], [], episode["support_x"])[0]
                                for k in range(meta.num_samples)])
            elbo = tf.reduce_mean((outputs - episode["support_y"]) ** 2) + meta.kl_weight * meta.kl(params, prior) / 5
        params = [p - 0.3 * g for p, g in zip(params, tape.gradient(elbo, params))]
    draws = meta.predictive_samples(params, seed)
    nll = lambda x, y: float(tf.reduce_mean((tf.stack([meta.learner.stateless_call(  # noqa: E731
        [d[k] for d in draws], [], x)[0] for k in range(meta.num_samples)]) - y) ** 2))
    return ((7 * nll(episode["query_x"], episode["query_y"]) + 5 * nll(episode["support_x"], episode["support_y"])
             + meta.kl_weight * float(meta.kl(params, prior))
             + meta.hyperprior_weight * float(meta.negative_log_hyperprior(prior))) / 12)


def test_abml_meta_gradient_through_the_elbo_steps_matches_finite_differences():
    meta = abml(inner_steps=2, kl_weight=0.7, hyperprior_weight=0.01)
    randomise_stddevs(meta, 10)
    episode = {k: v[0] for k, v in random_episodes(tasks=1).items()}  # 5 support and 7 query points
    seed = tf.constant([5, 6])
    grads, logs, _ = meta.task_gradients(episode, [], seed)
    assert float(logs["loss"]) == pytest.approx(abml_objective(meta, episode, seed), rel=1e-10)
    check_directional_derivatives(meta.meta_variables, grads,
                                  lambda: float(meta.task_gradients(episode, [], seed)[1]["loss"]))
    assert all(np.abs(g).max() > 0 for g in grads)  # the means and every prior stddev get a meta-gradient


def test_abml_posterior_starts_at_the_prior_and_its_samples_are_reproducible():
    meta = abml(samples=4)
    randomise_stddevs(meta, 12)
    episodes = random_episodes(tasks=2)
    mean, slow = meta.read_params()
    episode = {k: v[0] for k, v in episodes.items()}
    fitted = meta.posterior(mean, slow, [], episode, 0, training=False, seed=tf.constant([1, 1]))
    for a, b in zip(fitted.params, meta.prior_params(mean)):
        np.testing.assert_array_equal(a, b)
    draws = [meta.adapt_episode(mean, slow, [], {k: v[t] for k, v in episodes.items()}, steps, training=False).params
             for t, steps in ((0, 1), (1, 1), (0, 1), (0, 0), (1, 0))]
    np.testing.assert_array_equal(draws[0][0], draws[2][0])
    assert not np.allclose(draws[0][0], draws[1][0]) and not np.allclose(draws[0][0][0], draws[0][0][1])
    assert not np.allclose(draws[3][0], draws[4][0])  # the same prior: the tasks' noise differs


def test_abml_arguments_and_config():
    with pytest.raises(ValueError, match=r"ABML `num_samples` must be an integer >= 1"):
        abml(samples=0)
    with pytest.raises(ValueError, match=r"ABML `kl_weight` must be a finite number >= 0"):
        abml(kl_weight=float("nan"))
    with pytest.raises(ValueError, match=r"ABML `hyperprior_rate` must be positive"):
        abml(hyperprior_rate=0.0)
    meta = abml(kl_weight=0.1, hyperprior_weight=0.0, seed=2)
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(meta))
    assert clone.get_config() == meta.get_config() and clone.num_samples == 3


@pytest.mark.parametrize("algorithm", ["BMAML", "PLATIPUS"])
def test_predictive_models_save_as_keras_and_reload_alike(algorithm, tmp_path):
    """What `adapt` returns (the adapted particles or samples, with BMAML's per-particle noise) saves as .keras and
    as a SavedModel, and the reloaded model predicts the same distribution."""
    from tfmeta import export

    kwargs = {"num_particles": 3} if algorithm == "BMAML" else {"num_samples": 3, "likelihood": likelihoods.Normal(0.5)}
    meta = getattr(tfmeta, algorithm)(small_mlp(dtype="float32"), eval_inner_steps=2, **kwargs)
    if algorithm == "BMAML":
        meta.log_precisions[1].assign([0.0, 1.0, 2.0])
    episode = {k: v[0] for k, v in random_episodes(tasks=1, query=75, dtype="float32").items()}
    model = meta.adapt(episode["support_x"], episode["support_y"], return_samples=True)
    expected = model.predict(episode["query_x"], verbose=0)
    export.save_adapted(model, str(tmp_path / "adapted"))
    reloaded = keras.models.load_model(tmp_path / "adapted" / "model.keras").predict(episode["query_x"], verbose=0)
    for key in ("mean", "stddev", "samples"):
        np.testing.assert_array_equal(reloaded[key], expected[key])
    served = tf.saved_model.load(str(tmp_path / "adapted" / "saved_model")).signatures["serving_default"]
    np.testing.assert_allclose(served(x=tf.constant(episode["query_x"]))["stddev"], expected["stddev"], rtol=1e-6)
