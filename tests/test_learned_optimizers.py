"""Learned optimizers (Andrychowicz et al., 2016): the coordinatewise LSTM rule, checked against hand computations
and, as MAML's inner-loop rule, against finite differences (float64)."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import check_directional_derivatives, random_episodes

import tfmeta
from tfmeta.update_rules.lstm import log_and_sign


def test_log_and_sign_preprocessing_equals_its_piecewise_definition():
    k = 5.0
    grads = np.array([3.0, -0.2, 1e-3, -1e-4, 0.0, 2e-3])[:, None]
    features = log_and_sign(tf.constant(grads), k).numpy()
    large = np.abs(grads[:, 0]) >= np.exp(-k)
    expected = np.where(large[:, None], np.stack([np.log(np.abs(grads[:, 0]) + 1.1920929e-07) / k,
                                                  np.sign(grads[:, 0])], 1),
                        np.stack([-np.ones(6), np.exp(k) * grads[:, 0]], 1))
    np.testing.assert_allclose(features, expected, rtol=1e-6, atol=1e-12)


def lstm_update_by_hand(rule, grad, h, c):
    """One coordinate's update through Keras' LSTM equations written out (gates i, f, c, o; sigmoid and tanh)."""
    cells, head = rule.networks["shared"]
    x = np.array([[grad]])
    states = []
    for cell, (hh, cc) in zip(cells, zip(h, c)):
        kernel, recurrent, bias = (v.numpy() for v in cell.weights)
        z = x @ kernel + hh @ recurrent + bias
        i, f, g, o = np.split(z, 4, axis=-1)
        sigmoid = lambda t: 1 / (1 + np.exp(-t))  # noqa: E731
        cc = sigmoid(f) * cc + sigmoid(i) * np.tanh(g)
        x = hh = sigmoid(o) * np.tanh(cc)
        states.append((hh, cc))
    kernel, bias = (v.numpy() for v in head.weights)
    return (x @ kernel + bias)[0, 0] * rule.output_scale, states


def test_coordinatewise_lstm_shares_weights_keeps_a_state_per_coordinate_and_matches_the_equations():
    rule = tfmeta.CoordinatewiseLSTM(hidden_units=(4, 3), output_scale=0.5, dtype="float64")
    rule.check_params([(2, 2)])
    params = [tf.zeros((2, 2), tf.float64)]
    grads = np.array([[0.3, -1.0], [2.0, 0.0]])
    state = rule.init_state(params)
    first, state = rule.update([tf.constant(grads)], state, params, 0)
    second, _ = rule.update([tf.constant(grads)], state, params, 1)
    for index in np.ndindex(2, 2):
        zeros = [np.zeros((1, u)) for u in (4, 3)]
        expected, states = lstm_update_by_hand(rule, grads[index], zeros, zeros)
        assert float(first[0][index]) == pytest.approx(expected, rel=1e-10)
        again, _ = lstm_update_by_hand(rule, grads[index], [s[0] for s in states], [s[1] for s in states])
        assert float(second[0][index]) == pytest.approx(again, rel=1e-10)  # the state carried per coordinate
    assert not np.allclose(first[0], second[0])


def check_meta_gradient(meta, episodes, rtol=1e-6):
    """The meta-gradient of a batch against finite differences of its meta-loss, every evaluation through one traced
    `tf.function`; returns the meta-gradient."""
    compute = tf.function(meta.compute_meta_gradients)
    grads, _, _ = compute(episodes)
    check_directional_derivatives(meta.meta_variables, grads, lambda: float(compute(episodes)[1]["loss"]),
                                  eps=1e-5, rtol=rtol)
    return grads


def test_coordinatewise_lstm_as_mamls_rule_matches_finite_differences():
    """The same rule is an inner loop of any meta-learner: MAML's second-order meta-gradient through two LSTM
    steps, for the learner's initialisation and the LSTM's weights (on raw gradients: the log-sign preprocessing is
    piecewise, and finite differences across its kinks at |g| = e^-k disagree with the derivative)."""
    from test_gradients import small_mlp

    rule = tfmeta.CoordinatewiseLSTM(hidden_units=(5,), output_scale=0.1, dtype="float64")
    meta = tfmeta.MAML(small_mlp(), update_rule=rule, inner_steps=2)
    grads = check_meta_gradient(meta, random_episodes(tasks=2))
    assert len(rule.trainable_variables) == 5 and all(np.abs(g).max() > 0 for g in grads[-5:])


def test_coordinatewise_lstm_groups_arguments_and_config():
    rule = tfmeta.CoordinatewiseLSTM(groups="by_rank")
    rule.check_params([(3, 3, 1, 4), (4,), (4, 2), (2,)])
    assert sorted(rule.networks) == ["rank_1", "rank_2", "rank_4"] and len(rule.trainable_variables) == 3 * 8
    with pytest.raises(ValueError, match=r"`preprocessing` must be one of"):
        tfmeta.CoordinatewiseLSTM(preprocessing="adam")
    with pytest.raises(ValueError, match=r"CoordinatewiseLSTM `k` must be positive"):
        tfmeta.CoordinatewiseLSTM(k=0.0)
    with pytest.raises(ValueError, match=r"`hidden_units` must be an integer >= 1"):
        tfmeta.CoordinatewiseLSTM(hidden_units=(20, 0))
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(rule))
    assert clone.get_config() == rule.get_config()
    rule = tfmeta.CoordinatewiseLSTM(hidden_units=(3,))
    params = [tf.zeros([2]), tf.zeros([2, 2])]
    rule.check_params([tuple(p.shape) for p in params])
    message = r"gradient of parameter 1 \(shape \(2, 2\)\) is not finite"
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        rule.update([tf.zeros([2]), tf.constant([[0.0, np.nan], [0.0, 0.0]])], rule.init_state(params), params, 0)
    from tfmeta.optimizers import OptimizerTraining, Quadratics

    with pytest.raises(ValueError, match=r"`horizon` \(100\) must be a multiple of `unroll` \(30\)"):
        OptimizerTraining(rule, Quadratics(num_problems=2, dims=2), unroll=30, horizon=100)


def trainer(rule=None, unroll=2, horizon=4, **kwargs):
    from tfmeta.optimizers import OptimizerTraining, Quadratics

    rule = rule or tfmeta.CoordinatewiseLSTM(hidden_units=(4,), dtype="float64")
    model = OptimizerTraining(rule, Quadratics(num_problems=3, dims=3, dtype="float64"), unroll=unroll,
                              horizon=horizon, **kwargs)
    model.compile(keras.optimizers.Adam(1e-2))
    return model


def test_truncated_training_carries_the_optimizee_and_state_across_steps_and_restarts_after_the_horizon():
    model = trainer()
    constants, params, state = model.fresh_problem(tf.constant(0, tf.int64))
    _, _, expected, expected_state = model.unrolled(params, state, constants, tf.constant(0, tf.int64), 0)
    model.fit(model.dataset(), steps_per_epoch=1, verbose=0)
    np.testing.assert_allclose(model.param_variables[0], expected[0], rtol=1e-12)  # carried, not reset
    np.testing.assert_allclose(model.state_variables[0], tf.nest.flatten(expected_state)[0], rtol=1e-12)
    assert int(model.position) == 2 and int(model.problem) == 0
    model.fit(model.dataset(), steps_per_epoch=1, verbose=0)  # the horizon (4 steps) ends: problem 1 starts
    constants, params, _ = model.fresh_problem(tf.constant(1, tf.int64))
    assert int(model.position) == 0 and int(model.problem) == 1
    np.testing.assert_array_equal(model.param_variables[0], params[0])
    np.testing.assert_array_equal(model.constant_variables["w"], constants["w"])
    assert not np.allclose(constants["w"], model.fresh_problem(tf.constant(0, tf.int64))[0]["w"])


def test_training_resumes_from_a_checkpoint_in_the_middle_of_a_horizon(tmp_path):
    straight = trainer(horizon=6)
    resumed = trainer(horizon=6)
    for a, b in zip(resumed.rule.weights, straight.rule.weights):
        a.assign(b)
    straight.fit(straight.dataset(), steps_per_epoch=5, verbose=0)
    resumed.fit(resumed.dataset(), steps_per_epoch=2, verbose=0)  # stops after 4 of the 6 steps of problem 0
    assert int(resumed.position) == 4
    path = tf.train.Checkpoint(model=resumed, optimizer=resumed.optimizer).save(str(tmp_path / "ckpt"))
    fresh = trainer(horizon=6)
    fresh.optimizer.build(fresh.rule.trainable_variables)
    tf.train.Checkpoint(model=fresh, optimizer=fresh.optimizer).restore(path).assert_consumed()
    fresh.fit(fresh.dataset(), steps_per_epoch=3, verbose=0)
    assert int(fresh.problem) == int(straight.problem) == 1
    for a, b in zip(fresh.weights, straight.weights):
        np.testing.assert_allclose(a, b, rtol=1e-10, err_msg=a.path)


def test_truncated_unrolls_equal_one_long_unroll_with_the_gradient_stopped_at_their_boundaries():
    """Three `train_step`s of unrolls of 2 follow the trajectory of one unroll of 6, and each meta-gradient is that
    unroll's segment with its start held constant (truncated backpropagation), not the full unroll's gradient."""
    model = trainer(unroll=2, horizon=6)
    recorded = []
    model.optimizer.apply = lambda grads, variables: recorded.append([tf.convert_to_tensor(g) for g in grads])
    constants, params, state = model.fresh_problem(tf.constant(0, tf.int64))
    variables = model.rule.trainable_variables
    with tf.GradientTape(persistent=True) as tape:
        segments, carried, p, s = [], [], params, state
        for k in range(3):
            loss, _, p, s = model.unrolled(p, s, constants, tf.constant(0, tf.int64), 2 * k)
            carried.append(p)
            segments.append(loss)
        full_loss = tf.add_n(segments)
        stopped = [[tf.stop_gradient(x) for x in params], tf.nest.map_structure(tf.stop_gradient, state)]
        truncated = []
        for k in range(3):
            loss, _, *stopped = model.unrolled(*stopped, constants, tf.constant(0, tf.int64), 2 * k)
            stopped = tf.nest.map_structure(tf.stop_gradient, stopped)
            truncated.append(loss)
    for k in range(3):
        model.train_step(None)
        if k < 2:  # (after the third, the horizon ends and the next problem starts)
            np.testing.assert_allclose(model.param_variables[0], carried[k][0], rtol=1e-12)
        for got, expected in zip(recorded[k], tape.gradient(truncated[k], variables)):
            np.testing.assert_allclose(got, expected, rtol=1e-10)
    full = tape.gradient(full_loss, variables)
    summed = [tf.add_n(g) for g in zip(*recorded)]
    assert not all(np.allclose(a, b, rtol=1e-3) for a, b in zip(full, summed))  # the truncation is real


@pytest.mark.parametrize("second_order", [True, False])
def test_meta_gradient_of_an_unroll_with_and_without_the_second_order_terms(second_order):
    """With `second_order=True` the meta-gradient of an unroll equals finite differences of its meta-loss; without,
    the optimizee's gradients are held constant, and it differs from them."""
    model = trainer(unroll=3, horizon=6, second_order=second_order)
    constants, params, state = model.fresh_problem(tf.constant(0, tf.int64))
    variables = model.rule.trainable_variables
    meta = lambda: model.unrolled(params, state, constants, tf.constant(0, tf.int64), 0)[0]  # noqa: E731
    with tf.GradientTape() as tape:
        loss = meta()
    grads = tape.gradient(loss, variables)
    if second_order:
        check_directional_derivatives(variables, grads, lambda: float(meta()))
    else:
        with pytest.raises(AssertionError):
            check_directional_derivatives(variables, grads, lambda: float(meta()), directions=1)


def trained_rule(dtype="float32"):
    rule = tfmeta.CoordinatewiseLSTM(hidden_units=(4, 3), preprocessing="log_sign", output_scale=0.1, dtype=dtype)
    rule.check_params([(2, 3)])
    rng = np.random.default_rng(3)
    for w in rule.weights:
        w.assign(rng.normal(scale=0.5, size=w.shape))
    return rule


def regression_model(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(1)])


def test_learned_optimizer_applies_the_rule_with_its_state_per_coordinate():
    """`fit` with LearnedOptimizer takes the rule's own steps: each variable moves by learning_rate times the rule's
    update of its gradient, the LSTM state carried from step to step."""
    from tfmeta.optimizers import LearnedOptimizer

    rule = trained_rule()
    model = regression_model()
    x, y = np.random.default_rng(4).normal(size=(16, 3)), np.random.default_rng(5).normal(size=(16, 1))
    params = [tf.convert_to_tensor(v) for v in model.trainable_variables]
    state = rule.init_state(params)
    for _ in range(3):  # the same steps, functionally
        with tf.GradientTape() as tape:
            tape.watch(params)
            loss = tf.reduce_mean((model.stateless_call(params, [], x)[0] - y) ** 2)
        updates, state = rule.update(tape.gradient(loss, params), state, params, 0)
        params = [p + 0.5 * u for p, u in zip(params, updates)]
    model.compile(optimizer=LearnedOptimizer(rule, learning_rate=0.5), loss="mse")
    model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
    for variable, expected in zip(model.trainable_variables, params):
        np.testing.assert_allclose(variable, expected, rtol=1e-5, atol=1e-6)


def test_learned_optimizer_saves_reloads_and_resumes_with_its_state(tmp_path):
    from tfmeta.optimizers import LearnedOptimizer, load_rule, save_rule

    save_rule(trained_rule(), str(tmp_path / "rule.json"))
    x, y = np.random.default_rng(4).normal(size=(16, 3)), np.random.default_rng(5).normal(size=(16, 1))
    straight, stopped = regression_model(), regression_model()
    for model in (straight, stopped):
        model.compile(optimizer=LearnedOptimizer(str(tmp_path / "rule.json")), loss="mse")
    straight.fit(x, y, batch_size=8, epochs=4, shuffle=False, verbose=0)
    stopped.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    stopped.save(tmp_path / "model.keras")
    resumed = keras.models.load_model(tmp_path / "model.keras")
    assert isinstance(resumed.optimizer, LearnedOptimizer) and len(resumed.optimizer.variables) == 2 + 4 * 4
    resumed.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    for a, b in zip(resumed.trainable_variables, straight.trainable_variables):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    checkpointed = regression_model(seed=1)  # and through a TensorFlow checkpoint of model and optimizer
    checkpointed.compile(optimizer=LearnedOptimizer(str(tmp_path / "rule.json")), loss="mse")
    checkpointed.optimizer.build(checkpointed.trainable_variables)
    path = tf.train.Checkpoint(model=stopped, optimizer=stopped.optimizer).save(str(tmp_path / "ckpt"))
    tf.train.Checkpoint(model=checkpointed, optimizer=checkpointed.optimizer).restore(path).assert_consumed()
    checkpointed.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    for a, b in zip(checkpointed.trainable_variables, straight.trainable_variables):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(load_rule(str(tmp_path / "rule.json")).weights, trained_rule().weights):
        np.testing.assert_array_equal(a, b)


def test_learned_optimizer_densifies_sparse_gradients_and_names_untrained_groups():
    from tfmeta.optimizers import LearnedOptimizer

    model = keras.Sequential([keras.Input((2,), dtype="int32"), keras.layers.Embedding(5, 3),
                              keras.layers.Flatten(), keras.layers.Dense(1)])
    model.compile(optimizer=LearnedOptimizer(trained_rule()), loss="mse")
    before = model.layers[0].embeddings.numpy()
    model.fit(np.array([[0, 1], [1, 2]]), np.ones((2, 1)), verbose=0)
    assert not np.allclose(model.layers[0].embeddings.numpy()[:3], before[:3])
    rule = tfmeta.CoordinatewiseLSTM(groups="by_rank")
    rule.check_params([(2, 3)])  # rank 2 only: no network for the biases
    dense = regression_model()
    dense.compile(optimizer=LearnedOptimizer(rule), loss="mse")
    with pytest.raises(ValueError, match=r"no network for the parameter groups \['rank_1'\]"):
        dense.fit(np.zeros((2, 3)), np.zeros((2, 1)), verbose=0)
    with pytest.raises(TypeError, match=r"must be a built \(meta-trained\) tfmeta.CoordinatewiseLSTM"):
        LearnedOptimizer(tfmeta.CoordinatewiseLSTM())


def test_mnist_split_is_fixed_and_disjoint_and_the_mlp_problem_draws_its_minibatches_from_seeds(mnist_file):
    from tfmeta.data.mnist import mnist5k
    from tfmeta.optimizers import MnistMLP

    splits = {s: mnist5k(s, mnist_file) for s in ("train", "validation", "test")}
    assert [len(x) for x, _ in splits.values()] == [3000, 1000, 1000]
    keys = {s: {row.tobytes() for row in x} for s, (x, _) in splits.items()}
    assert not keys["train"] & keys["test"] and not keys["validation"] & keys["test"]
    np.testing.assert_array_equal(mnist5k("test", mnist_file)[1], splits["test"][1])  # the same split every time
    problem = MnistMLP(hidden_units=(40, 20), split="validation")
    params = problem.initial_params({}, tf.constant([1, 2]))
    assert [tuple(p.shape) for p in params] == [(784, 40), (40,), (40, 20), (20,), (20, 10), (10,)]
    losses = [float(problem.loss(params, {}, tf.constant(s))) for s in ([3, 4], [3, 4], [5, 6])]
    assert losses[0] == losses[1] != losses[2] and abs(losses[0] - np.log(10)) < 0.01  # near-uniform at init
    with pytest.raises(ValueError, match=r"`activation` must be one of"):
        MnistMLP(activation="tanh")


def test_mnist_conv_problem_equals_the_keras_network_and_gets_a_network_per_rank(mnist_file):
    from tfmeta.optimizers import MnistConv

    problem = MnistConv(channels=(4, 6), batch_size=16, split="validation")
    params = problem.initial_params({}, tf.constant([1, 2]))
    assert [tuple(p.shape) for p in params] == [(3, 3, 1, 4), (4,), (3, 3, 4, 6), (6,), (294, 10), (10,)]
    model = keras.Sequential([keras.Input((784,)), keras.layers.Reshape((28, 28, 1)),
                              keras.layers.Conv2D(4, 3, padding="same", activation="relu"),
                              keras.layers.MaxPooling2D(padding="same"),
                              keras.layers.Conv2D(6, 3, padding="same", activation="relu"),
                              keras.layers.MaxPooling2D(padding="same"), keras.layers.Flatten(),
                              keras.layers.Dense(10)])
    model.set_weights([p.numpy() for p in params])
    images = problem.images[:16]
    np.testing.assert_allclose(problem.logits(params, images), model(images), rtol=1e-5, atol=1e-5)
    losses = [float(problem.loss(params, {}, tf.constant(s))) for s in ([3, 4], [3, 4], [5, 6])]
    assert losses[0] == losses[1] != losses[2]
    rule = tfmeta.CoordinatewiseLSTM(groups="by_rank")
    rule.check_params([tuple(p.shape) for p in params])
    assert sorted(rule.networks) == ["rank_1", "rank_2", "rank_4"]
    with pytest.raises(ValueError, match=r"MnistConv needs at least one convolution"):
        MnistConv(channels=())


def test_loss_curves_equal_gradient_descent_by_hand_and_tuning_skips_diverging_rates():
    from tfmeta.optimizers import Quadratics, loss_curves, tune_learning_rate
    from tfmeta.optimizers.evaluation import TEST_STREAM

    problems = Quadratics(num_problems=4, dims=3, dtype="float64")
    curves = loss_curves(tfmeta.Sgd(0.05), problems, num_problems=2, steps=6)
    for k in range(2):
        base = tf.constant([0, TEST_STREAM], tf.int64)
        seed = tf.random.experimental.stateless_fold_in(base, tf.constant(k, tf.int64))
        constants = problems.constants(seed)
        w, y = constants["w"].numpy(), constants["y"].numpy()
        theta = problems.initial_params(constants, tf.random.experimental.stateless_fold_in(seed, 1))[0].numpy()
        expected = []
        for _ in range(7):
            residual = np.einsum("pij,pj->pi", w, theta) - y
            expected.append(np.mean(np.sum(residual**2, -1)))
            theta = theta - 0.05 * 2 * np.einsum("pji,pj->pi", w, residual) / 4
        np.testing.assert_allclose(curves[k], expected, rtol=1e-10)
    float32 = Quadratics(num_problems=4, dims=3)  # (where a diverging rate overflows within 20 steps)
    best, finals = tune_learning_rate(tfmeta.Sgd, float32, [1e-3, 0.05, 1e6], num_problems=3, steps=20)
    assert best == 0.05 and not np.isfinite(finals[1e6]) and finals[0.05] < finals[1e-3]
    lstm = loss_curves(trained_rule("float64"), problems, num_problems=2, steps=6)  # a learned rule, the same way
    assert lstm.shape == (2, 7) and np.allclose(lstm[:, 0], curves[:, 0])  # the same problems


def test_meta_train_resumes_a_killed_run_and_writes_the_rule(tmp_path):
    """A run stopped after 4 of 6 meta-steps (in the middle of the second problem's horizon) and resumed by a new
    trainer in the same directory ends where an uninterrupted run ends."""
    from tfmeta.optimizers import load_rule, meta_train

    straight, stopped = trainer(horizon=6), trainer(horizon=6)
    for a, b in zip(stopped.rule.weights, straight.rule.weights):
        a.assign(b)
    meta_train(straight, str(tmp_path / "straight"), num_steps=6, steps_per_epoch=2, verbose=0)
    meta_train(stopped, str(tmp_path / "run"), num_steps=4, steps_per_epoch=2, verbose=0)
    resumed = trainer(horizon=6)  # other initial weights: the checkpoint replaces them
    path = meta_train(resumed, str(tmp_path / "run"), num_steps=6, steps_per_epoch=2, verbose=0)
    assert int(resumed.optimizer.iterations) == 6 and int(resumed.problem) == 2  # 3 unrolls of 2 steps per problem
    for a, b, c in zip(load_rule(path).weights, resumed.rule.weights, straight.rule.weights):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(b, c, rtol=1e-10)


def test_the_quadratic_config_runs_the_experiment_and_reports_every_optimizer(tmp_path):
    import gin

    import tfmeta.configurables  # noqa: F401
    from conftest import REPO
    from tfmeta.optimizers.experiment import BASELINES, OptimizerExperiment

    gin.clear_config()
    gin.parse_config_files_and_bindings(
        [f"{REPO}/gin_configs/learned_optimizers/lstm_quadratic.gin"],
        ["OptimizerExperiment.num_steps = 10", "OptimizerExperiment.steps_per_epoch = 5",
         "OptimizerExperiment.eval_num_problems = 3", "OptimizerExperiment.tune_problems = 2",
         "OptimizerExperiment.eval_steps = 20", "OptimizerExperiment.learning_rates = [0.001, 0.03]",
         "Quadratics.num_problems = 8"])
    experiment = OptimizerExperiment()
    rule = experiment.trainer.rule
    assert rule.hidden_units == [20, 20] and rule.preprocessing == "none" and experiment.trainer.unroll == 20
    results = experiment.run(str(tmp_path), str(tmp_path / "evaluation"))
    assert set(results["optimizers"]) == {"learned (CoordinatewiseLSTM)", *BASELINES}
    for name in BASELINES:
        assert results["optimizers"][name]["learning_rate"] in (0.001, 0.03)
    assert all(len(entry["mean"]) == 21 for entry in results["optimizers"].values())
    assert (tmp_path / "evaluation" / "results.json").exists() and (tmp_path / "rule.json").exists()
    gin.clear_config()


def test_meta_learner_lstm_updates_the_cell_state_as_its_equations_say():
    """θ_t = σ(f_t)θ_{t−1} − σ(i_t)∇_t with f and i from the first layer's h, θ and their previous (pre-sigmoid)
    values, over two steps."""
    from tfmeta.update_rules.lstm import MetaLearnerLSTM

    rule = MetaLearnerLSTM(hidden_units=3, dtype="float64")
    rule.check_params([(2,)])
    assert 4 <= float(rule.forget_bias) <= 5 and -5 <= float(rule.input_bias) <= -4
    theta, grads = np.array([0.5, -1.0]), [np.array([0.2, -3e-5]), np.array([-0.1, 0.4])]
    losses = [0.7, 0.6]
    state = rule.init_state([tf.constant(theta)])
    kernel, recurrent, bias = (v.numpy() for v in rule.lstm.weights)
    w = rule.gate_kernels.numpy()
    sigmoid = lambda t: 1 / (1 + np.exp(-t))  # noqa: E731
    h, c, f, i = (np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((2, 1)), np.zeros((2, 1)))
    for g, loss in zip(grads, losses):
        (update,), state = rule.update([tf.constant(g)], state, [tf.constant(theta)], 0, loss=tf.constant(loss))
        x = np.concatenate([log_and_sign(tf.constant(g[:, None]), 10.0).numpy(),
                            log_and_sign(tf.constant(np.full((2, 1), loss)), 10.0).numpy()], 1)
        gates = x @ kernel + h @ recurrent + bias
        gi, gf, gc, go = np.split(gates, 4, axis=1)
        c = sigmoid(gf) * c + sigmoid(gi) * np.tanh(gc)
        h = sigmoid(go) * np.tanh(c)
        f = np.concatenate([h, theta[:, None], f], 1) @ w[0][:, None] + float(rule.forget_bias)
        i = np.concatenate([h, theta[:, None], i], 1) @ w[1][:, None] + float(rule.input_bias)
        new_theta = sigmoid(f[:, 0]) * theta - sigmoid(i[:, 0]) * g
        np.testing.assert_allclose(update.numpy(), new_theta - theta, rtol=1e-10)
        theta = new_theta
    with pytest.raises(ValueError, match="takes the support loss"):
        rule.update([tf.constant(grads[0])], state, [tf.constant(theta)], 0)


def test_meta_learner_lstm_with_its_gates_fixed_is_gradient_descent():
    """Forget gate 1 and input gate α (gate weights 0, σ(b_F) = 1 in float64, σ(b_I) = α): θ_t = θ_{t−1} − α∇_t,
    the same loss curves as SGD with step α on the same problems."""
    from tfmeta.optimizers import Quadratics, loss_curves
    from tfmeta.update_rules.lstm import MetaLearnerLSTM

    alpha, problems = 0.05, Quadratics(num_problems=4, dims=3, dtype="float64")
    rule = MetaLearnerLSTM(hidden_units=3, dtype="float64")
    rule.check_params([(4, 3)])
    rule.gate_kernels.assign(np.zeros(rule.gate_kernels.shape))
    rule.forget_bias.assign(40.0)
    rule.input_bias.assign(np.log(alpha / (1 - alpha)))
    gated = loss_curves(rule, problems, num_problems=2, steps=8)
    np.testing.assert_allclose(gated, loss_curves(tfmeta.Sgd(alpha), problems, num_problems=2, steps=8), rtol=1e-10)
    assert gated[0, -1] < 0.5 * gated[0, 0]


def test_first_order_inner_loops_hold_the_loss_given_to_the_rule_constant():
    """With `first_order=True`, a rule that steps by the loss itself (θ − c·L(θ), as the Meta-Learner LSTM's loss
    input) gets the same meta-gradient as the same rule fed a constant: the loss, like the gradient, is an input."""
    from test_gradients import small_mlp

    from tfmeta.update_rules.base import UpdateRule

    class LossStep(UpdateRule):
        def __init__(self, stop, **kwargs):
            super().__init__(**kwargs)
            self.stop = stop

        def update(self, grads, state, params, step, loss=None, **extra):
            loss = tf.stop_gradient(loss) if self.stop else loss
            return [-0.1 * loss * tf.ones_like(p) for p in params], state

    episodes = random_episodes(tasks=2)

    def meta_gradient(stop, first_order):
        keras.utils.set_random_seed(0)
        meta = tfmeta.MAML(small_mlp(), update_rule=LossStep(stop, dtype="float64"), first_order=first_order)
        return meta.compute_meta_gradients(episodes)[0]

    for a, b in zip(meta_gradient(False, True), meta_gradient(True, True)):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    assert not all(np.allclose(a, b) for a, b in zip(meta_gradient(False, False), meta_gradient(True, False)))


def test_meta_learner_lstm_in_maml_matches_finite_differences():
    from test_gradients import small_mlp

    from tfmeta.update_rules.lstm import MetaLearnerLSTM

    meta = tfmeta.MAML(small_mlp(), update_rule=MetaLearnerLSTM(hidden_units=4, dtype="float64"), inner_steps=2)
    grads = check_meta_gradient(meta, random_episodes(tasks=2), rtol=1e-5)
    assert np.abs(grads[-1]).max() > 0 and np.abs(grads[-3]).max() > 0  # the biases and gates learn


GENERALISATION = {"lstm_mnist_200steps.gin": ([20], "sigmoid", 200), "lstm_mnist_40units.gin": ([40], "sigmoid", 100),
                  "lstm_mnist_2layers.gin": ([20, 20], "sigmoid", 100), "lstm_mnist_relu.gin": ([20], "relu", 100)}


@pytest.mark.parametrize("config", ["lstm_quadratic.gin", "lstm_mnist.gin", "../omniglot/metalstm_5w1s.gin",
                                    "../omniglot/metalstm_5w5s.gin", *GENERALISATION])
def test_learned_optimizer_configs_build_what_they_state(config, request):
    import gin

    import tfmeta.configurables  # noqa: F401
    from conftest import REPO
    from tfmeta.experiment import Experiment
    from tfmeta.optimizers.experiment import OptimizerExperiment

    request.getfixturevalue("omniglot_dir" if "omniglot" in config else "mnist_file" if "mnist" in config else
                            "tmp_path")
    gin.clear_config()
    gin.add_config_file_search_path(REPO)
    gin.parse_config_files_and_bindings([f"{REPO}/gin_configs/learned_optimizers/{config}"], [])
    if "omniglot" in config:
        meta = Experiment().build()
        steps = 8 if "5w5s" in config else 12
        assert isinstance(meta.update_rule, tfmeta.MetaLearnerLSTM) and meta.first_order and meta.inner_steps == steps
        assert meta.eval_inner_steps == steps
        assert meta.optimizer.global_clipnorm == 0.25
    else:
        experiment = OptimizerExperiment()
        rule = experiment.trainer.rule
        assert rule.hidden_units == [20, 20] and experiment.trainer.horizon == 100
        assert (rule.preprocessing, rule.k, rule.output_scale) == (
            ("log_sign", 5.0, 0.01) if "mnist" in config else ("none", 5.0, 1.0))
        if "mnist" in config:
            assert (experiment.validation_problems.split, experiment.test_problems.split) == ("validation", "test")
            train = experiment.trainer.problems
            assert (train.split, train.hidden_units, train.activation) == ("train", [20], "sigmoid")
            units, activation, steps = GENERALISATION.get(config, ([20], "sigmoid", 100))
            for problems in (experiment.validation_problems, experiment.test_problems):
                assert (problems.hidden_units, problems.activation) == (units, activation)
            assert experiment.eval_steps == steps
    gin.clear_config()


def policy_trainer(batch=4000, **kwargs):
    from tfmeta.optimizers import PolicyTraining, Quadratics
    from tfmeta.update_rules.policy import PolicyOptimizer

    rule = PolicyOptimizer(history=2, hidden_units=(4,), initial_stddev=0.3, output_scale=0.5, dtype="float64")
    problems = Quadratics(num_problems=1, dims=1, dtype="float64", distribution="normal", initial_stddev=1.0)
    return PolicyTraining(rule, problems, horizon=2, batch_problems=batch, **kwargs)


def test_policy_gradient_is_unbiased_on_a_one_step_problem_with_a_known_expected_gradient():
    """One step from θ₀ = 1 on f(θ) = (1.5θ − 0.5)²: with a ~ N(μ, σ²), E f(θ₀ + a) = (1.5(θ₀ + μ) − 0.5)² + 2.25σ²
    in closed form, so its gradient in the policy's weights is known exactly. Ten independent REINFORCE estimates
    (2,000 rollouts each) average to it within four standard errors in every coordinate."""
    from tfmeta.optimizers import PolicyTraining
    from tfmeta.optimizers.problems import OptimizationProblems
    from tfmeta.update_rules.policy import PolicyOptimizer

    class OneQuadratic(OptimizationProblems):
        def constants(self, seed):
            return {}

        def initial_params(self, constants, seed):
            return [tf.ones([1], tf.float64)]

        def loss(self, params, constants, seed):
            return tf.reduce_sum(tf.square(1.5 * params[0] - 0.5))

    rule = PolicyOptimizer(history=2, hidden_units=(4,), initial_stddev=0.3, output_scale=0.5, dtype="float64")
    model = PolicyTraining(rule, OneQuadratic(), horizon=1, batch_problems=2000)
    variables = rule.trainable_variables
    rollouts = tf.function(model.rollouts)

    def estimate(first):
        observations, actions, losses = rollouts(tf.constant(first, tf.int64))
        with tf.GradientTape() as tape:
            surrogate = model.surrogate(observations, actions, losses)
        return np.concatenate([np.ravel(g) for g in tape.gradient(surrogate, variables)]), observations

    estimates, observations = zip(*(estimate(2000 * k) for k in range(10)))
    with tf.GradientTape() as tape:
        (policy,) = rule.policy([tf.reshape(observations[0][0][0], [-1, 4])])
        mean, stddev = policy.mean()[0], policy.stddev()[0]
        expected_loss = tf.square(1.5 * (1.0 + mean) - 0.5) + 2.25 * tf.square(stddev)
    exact = np.concatenate([np.ravel(g) for g in tape.gradient(expected_loss, variables)])
    estimates = np.stack(estimates)
    mean, standard_error = estimates.mean(0), estimates.std(0, ddof=1) / np.sqrt(10)
    varying = standard_error > 0  # (the weights of inputs that are 0 at the first step have no gradient at all)
    assert np.all(np.abs(mean - exact)[varying] < 4 * standard_error[varying]), (mean, exact, standard_error)
    np.testing.assert_allclose(mean[~varying], exact[~varying], atol=1e-12)
    assert varying.sum() >= 10 and np.abs(exact).max() > 0.1


def test_policy_gradient_credits_each_independent_problem_with_its_own_losses():
    """Three one-step problems f_i(θ_i) = (c_i θ_i − b_i)² optimised together (the loss their mean): E loss =
    mean_i (c_i(θ₀ + μ_i) − b_i)² + c_i²σ_i² in closed form. 40 estimates (500 rollouts each) that credit each
    problem's step with its own loss average to its gradient, with the baseline from the same problem's 3 other
    samples or from all other rollouts; the latter spread less than 40 that credit every step with the mean loss
    (the others' steps are noise in it)."""
    from tfmeta.optimizers import PolicyTraining
    from tfmeta.optimizers.problems import OptimizationProblems
    from tfmeta.update_rules.policy import PolicyOptimizer

    c, b = tf.constant([1.5, 0.5, 2.0], tf.float64), tf.constant([0.5, 1.0, -1.0], tf.float64)

    class MeanOnly(OptimizationProblems):
        def constants(self, seed):
            return {}

        def initial_params(self, constants, seed):
            return [tf.ones([3, 1], tf.float64)]

        def loss(self, params, constants, seed):
            return tf.reduce_mean(tf.square(c * params[0][:, 0] - b))

    class Independent(MeanOnly):
        def problem_losses(self, params, constants, seed):
            return tf.square(c * params[0][:, 0] - b)

    rule = PolicyOptimizer(history=2, hidden_units=(4,), initial_stddev=0.3, output_scale=0.5, dtype="float64")

    def estimates(problems, **kwargs):
        model = PolicyTraining(rule, problems, horizon=1, **kwargs)
        rollouts, values = tf.function(model.rollouts), []
        variables = rule.trainable_variables
        for k in range(40):
            observations, actions, losses = rollouts(tf.constant(500 * k, tf.int64))
            with tf.GradientTape() as tape:
                surrogate = model.surrogate(observations, actions, losses)
            values.append(np.concatenate([np.ravel(g) for g in tape.gradient(surrogate, variables)]))
        return np.stack(values), observations

    grouped, observations = estimates(Independent(), batch_problems=125, samples_per_problem=4)
    per_problem, _ = estimates(Independent(), batch_problems=500)
    pooled, _ = estimates(MeanOnly(), batch_problems=500)
    variables = rule.trainable_variables
    with tf.GradientTape() as tape:
        (policy,) = rule.policy([tf.reshape(observations[0][0][0], [-1, 4])])
        expected_loss = tf.reduce_mean(tf.square(c * (1.0 + policy.mean()) - b) + tf.square(c * policy.stddev()))
    exact = np.concatenate([np.ravel(g) for g in tape.gradient(expected_loss, variables)])
    spread = lambda values: values.std(0, ddof=1)  # noqa: E731
    varying = spread(pooled) > 0
    for values in (grouped, per_problem, pooled):
        error = np.abs(values.mean(0) - exact)[varying]
        assert np.all(error < 4 * spread(values)[varying] / np.sqrt(40)), (values.mean(0), exact)
    assert varying.sum() >= 10 and np.abs(exact).max() > 0.1
    ratio = spread(per_problem)[varying] / spread(pooled)[varying]
    assert ratio.mean() < 0.85 and ratio.max() < 1.25, ratio


def test_policy_training_samples_share_their_problem_and_minibatches_not_their_noise_and_check_the_axis():
    from tfmeta.optimizers import PolicyTraining, Quadratics
    from tfmeta.optimizers.problems import OptimizationProblems
    from tfmeta.update_rules.policy import PolicyOptimizer

    rule = PolicyOptimizer(history=2, hidden_units=(4,), dtype="float64")
    model = PolicyTraining(rule, Quadratics(num_problems=5, dims=3, dtype="float64"), horizon=2, batch_problems=2,
                           samples_per_problem=3)
    observations, actions, losses = model.rollouts(tf.constant(0, tf.int64))
    assert losses.shape == (6, 3, 5) and actions[0].shape == (6, 2, 15)
    start = losses[:, 0].numpy()
    np.testing.assert_array_equal(start[0], start[2])  # the same problem (constants and initial parameters) ...
    assert not np.allclose(start[0], start[3])  # ... within a group, another problem in the next
    assert not np.allclose(actions[0][0].numpy(), actions[0][1].numpy())  # different noise
    # The baseline comes from the same problem's samples: a problem's offset in loss does not change the estimate.
    variables = rule.trainable_variables

    def estimate(losses):
        with tf.GradientTape() as tape:
            surrogate = model.surrogate(observations, actions, losses)
        return np.concatenate([np.ravel(g) for g in tape.gradient(surrogate, variables)])

    offset = tf.concat([tf.fill([3, 3, 5], tf.constant(7.0, tf.float64)), tf.zeros([3, 3, 5], tf.float64)], 0)
    np.testing.assert_allclose(estimate(losses + offset), estimate(losses), rtol=1e-9, atol=1e-12)

    class Misaligned(OptimizationProblems):
        def constants(self, seed):
            return {}

        def initial_params(self, constants, seed):
            return [tf.zeros([2, 3], tf.float64)]

        def loss(self, params, constants, seed):
            return tf.reduce_sum(params[0])

        def problem_losses(self, params, constants, seed):
            return tf.reduce_sum(params[0], axis=0)

    with pytest.raises(ValueError, match=r"holds 3 independent problems, so every parameter's leading axis must be 3"):
        PolicyTraining(rule, Misaligned(), horizon=2)

    class Minibatched(OptimizationProblems):  # a loss that depends on its seed, as a minibatch's does
        def constants(self, seed):
            return {}

        def initial_params(self, constants, seed):
            return [tf.zeros([1, 3], tf.float64)]

        def loss(self, params, constants, seed):
            return tf.reduce_sum(tf.square(params[0] - tf.random.stateless_normal([1, 3], seed, dtype=tf.float64)))

    _, actions, losses = PolicyTraining(rule, Minibatched(), horizon=2, batch_problems=2,
                                        samples_per_problem=3).rollouts(tf.constant(0, tf.int64))
    start = losses[:, 0, 0].numpy()  # the same parameters: the losses differ by the minibatch alone
    np.testing.assert_array_equal(start[:3], start[0])  # a problem's samples share their minibatches ...
    assert not np.allclose(start[3], start[0])  # ... another problem draws its own
    assert not np.allclose(actions[0][0].numpy(), actions[0][1].numpy())
    with pytest.raises(ValueError, match="batch_problems"):
        PolicyTraining(rule, Misaligned(), horizon=2, batch_problems=1)


def test_policy_gradient_estimate_agrees_with_the_pathwise_gradient():
    """The REINFORCE estimate (score function, leave-one-out baseline) and the reparameterised pathwise gradient
    of the expected sum of losses, on the same 4,000 rollouts of a one-dimensional quadratic over two steps: two
    unbiased estimators of one gradient, agreeing to Monte Carlo error."""
    model = policy_trainer()
    variables = model.rule.trainable_variables
    observations, actions, losses = tf.function(model.rollouts)(tf.constant(0, tf.int64))
    with tf.GradientTape() as tape:
        surrogate = model.surrogate(observations, actions, losses)
    score = np.concatenate([np.ravel(g) for g in tape.gradient(surrogate, variables)])

    @tf.function
    def pathwise():
        with tf.GradientTape() as tape:
            total = tf.reduce_mean(tf.reduce_sum(model.rollouts(tf.constant(0, tf.int64))[2][:, 1:], axis=1))
        return tape.gradient(total, variables)

    path = np.concatenate([np.ravel(g) for g in pathwise()])
    cosine = score @ path / np.linalg.norm(score) / np.linalg.norm(path)
    assert cosine > 0.98 and abs(np.linalg.norm(score) / np.linalg.norm(path) - 1) < 0.15, (cosine, score, path)


def test_policy_optimizer_observes_gradient_and_objective_windows_and_steps_by_its_mean():
    from tfmeta.update_rules.policy import PolicyOptimizer

    rule = PolicyOptimizer(history=3, hidden_units=(2,), dtype="float64")
    rule.check_params([(2,)])
    params = [tf.constant([1.0, 2.0], tf.float64)]
    state = rule.init_state(params)
    for grad, loss in (([0.1, 0.2], 5.0), ([0.3, 0.4], 4.0)):
        observed, next_state = rule.observe([tf.constant(grad, tf.float64)], state, tf.constant(loss, tf.float64))
        (step,), state = rule.update([tf.constant(grad, tf.float64)], state, params, 0, loss=loss)
        np.testing.assert_allclose(step, 0.1 * rule.mean_network(observed[0])[:, 0], rtol=1e-12)
    np.testing.assert_allclose(observed[0], [[0, 0.1, 0.3, 0, 0, -1.0], [0, 0.2, 0.4, 0, 0, -1.0]])
    assert rule.check_params([(5, 5)]) is None  # once built, any shapes
    with pytest.raises(ValueError, match="observes the objective"):
        rule.update([tf.constant([0.1, 0.2], tf.float64)], state, params, 0)


def test_policy_training_runs_from_its_seed_and_the_configs_build(tmp_path, mnist_file):
    import gin

    import tfmeta.configurables  # noqa: F401
    from conftest import REPO
    from tfmeta.optimizers import meta_train
    from tfmeta.optimizers.experiment import OptimizerExperiment

    first, second = policy_trainer(batch=8), policy_trainer(batch=8)
    for a, b in zip(second.rule.weights, first.rule.weights):
        a.assign(b)
    for model, name in ((first, "a"), (second, "b")):
        meta_train(model, str(tmp_path / name), num_steps=4, steps_per_epoch=2, verbose=0)
    for a, b in zip(first.rule.weights, second.rule.weights):
        np.testing.assert_array_equal(a, b)
    assert int(first.rollouts_done) == 32
    gin.clear_config()
    gin.add_config_file_search_path(REPO)
    for config in ("policy_quadratic.gin", "policy_mnist.gin"):
        gin.parse_config_files_and_bindings([f"{REPO}/gin_configs/learned_optimizers/{config}"], [])
        experiment = OptimizerExperiment()
        assert experiment.trainer.horizon == 20 and experiment.trainer.rule.history == 5
        assert (experiment.trainer.batch_problems, experiment.trainer.samples_per_problem) == (4, 4)
        problems = (experiment.trainer.problems, experiment.validation_problems, experiment.test_problems)
        if "mnist" in config:
            assert [p.split for p in problems] == ["train", "validation", "test"]
            assert experiment.trainer.rule.output_scale == 0.01
        else:
            assert all(isinstance(p, tfmeta.optimizers.Quadratics) for p in problems)
        gin.clear_config()
