"""The gradient-based family: Meta-SGD, LSLR, Meta-Curvature, T-Nets, MT-Nets, ANIL/BOIL, MAML++, iMAML."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfmeta
from conftest import classification_episodes, random_episodes, values
from test_gradients import check_finite_differences, small_conv, small_mlp


def assert_lists_close(a, b, rtol=1e-10, atol=1e-12):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_allclose(np.array(x), np.array(y), rtol=rtol, atol=atol)


def maml_grads(learner, episodes, **kwargs):
    return tfmeta.MAML(learner, update_rule=tfmeta.Sgd(0.3), inner_steps=2, **kwargs).compute_meta_gradients(
        episodes)[0]


@pytest.mark.parametrize("rule", [
    lambda: tfmeta.MetaSGD(0.3, dtype="float64"),
    lambda: tfmeta.LSLR(0.3, steps=2, dtype="float64"),
    lambda: tfmeta.MetaCurvature(0.3, dtype="float64"),
    lambda: tfmeta.LSLR(0.3, steps=2, log_space=True, dtype="float64"),
], ids=["meta_sgd", "lslr", "meta_curvature", "lslr_log_space"])
def test_learned_rules_start_as_maml_and_their_meta_gradients_match_finite_differences(rule):
    learner = small_mlp()
    episodes = random_episodes()
    meta = tfmeta.MAML(learner, update_rule=rule(), inner_steps=2)
    grads, _, _ = meta.compute_meta_gradients(episodes)
    n = len(learner.trainable_variables)
    assert len(grads) > n  # the rule's meta-parameters are meta-learned too
    assert_lists_close(grads[:n], maml_grads(learner, episodes))
    assert all(float(tf.reduce_sum(tf.abs(g))) > 0 for g in grads[n:])
    check_finite_differences(meta, episodes, grads)


def test_meta_curvature_on_a_conv_net_matches_finite_differences():
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64")
    learner = small_conv()
    meta = tfmeta.MAML(learner, loss=loss, update_rule=tfmeta.MetaCurvature(0.5, dtype="float64"))
    modes = {v.path: m for v, m in zip(learner.trainable_variables, meta.update_rule.modes)}
    assert modes["conv_0/kernel"] == (9, 1, 3) and modes["head/kernel"] == (3, 3)
    episodes = classification_episodes()
    grads, _, _ = tf.function(meta.compute_meta_gradients)(episodes)
    check_finite_differences(meta, episodes, grads, rtol=1e-5)


def test_lslr_uses_one_rate_per_variable_and_step():
    meta = tfmeta.MAML(small_mlp(), update_rule=tfmeta.LSLR(0.1, steps=2, dtype="float64"), inner_steps=2)
    assert [tuple(r.shape) for r in meta.update_rule.learning_rates] == [(2,)] * 6
    meta.update_rule.learning_rates[0].assign([0.1, 0.0])  # second step leaves hidden_0/kernel alone
    episodes = random_episodes()
    fast, slow = meta.read_params()
    adaptation = meta.adapt_params(fast, slow, [], episodes["support_x"][0], episodes["support_y"][0], 2,
                                   training=True, keep_trajectory=True)
    first, second = adaptation.trajectory[1:]
    np.testing.assert_array_equal(first[0], second[0])
    assert not np.allclose(first[1], second[1])


def test_tnet_with_identity_transforms_follows_maml_trajectory():
    tnet_learner = tfmeta.models.mlp(input_shape=(2,), hidden_units=(6, 5), activation="tanh", transforms=True,
                                     dtype="float64")
    plain_learner = small_mlp()
    dense = [v for v in tnet_learner.trainable_variables if not v.path.startswith("transform_")]
    for source, target in zip(dense, plain_learner.trainable_variables):
        target.assign(source)
    tnet = tfmeta.MAML(tnet_learner, update_rule=tfmeta.Sgd(0.3), inner_steps=3)
    plain = tfmeta.MAML(plain_learner, update_rule=tfmeta.Sgd(0.3), inner_steps=3)
    assert tnet.fast_mask == tuple(not v.path.startswith("transform_") for v in tnet_learner.trainable_variables)
    episodes = random_episodes()
    trajectories = []
    for meta in (tnet, plain):
        fast, slow = meta.read_params()
        trajectories.append(meta.adapt_params(fast, slow, [], episodes["support_x"][0], episodes["support_y"][0], 3,
                                              training=True, keep_trajectory=True).trajectory)
    for tnet_params, plain_params in zip(*trajectories):
        assert_lists_close(tnet_params, plain_params, rtol=1e-12)
    grads, _, _ = tnet.compute_meta_gradients(episodes)
    transform_grads = [g for g, v in zip(grads, tnet_learner.trainable_variables) if v.path.startswith("transform_")]
    assert len(transform_grads) == 3 and all(float(tf.reduce_sum(tf.abs(g))) > 0 for g in transform_grads)


def test_mt_net_masks_choose_which_units_adapt():
    learner = tfmeta.models.mlp(input_shape=(2,), hidden_units=(4,), transforms=True, dtype="float64")
    rule = tfmeta.Chain([tfmeta.MTNetMask(temperature=0.5, dtype="float64"), tfmeta.Sgd(0.1)])
    meta = tfmeta.MAML(learner, update_rule=rule)
    mask = rule.rules[0]
    for logit in mask.logits:
        logit.assign(np.where(np.arange(logit.shape[0]) % 2 == 0, 2.0, -2.0))  # even units adapt, odd do not
    episodes = random_episodes()
    adapted = meta.adapt(episodes["support_x"][0], episodes["support_y"][0], steps=2)
    fast_variables = [v for v, fast in zip(learner.trainable_variables, meta.fast_mask) if fast]
    adapted_values = {v.path: np.array(tf.convert_to_tensor(v)) for v in adapted.trainable_variables}
    for variable in fast_variables:
        moved = np.abs(adapted_values[variable.path] - np.array(tf.convert_to_tensor(variable))) > 0
        moved_units = moved.reshape(-1, moved.shape[-1]).any(axis=0)
        np.testing.assert_array_equal(moved_units, np.arange(moved.shape[-1]) % 2 == 0, err_msg=variable.path)
    # In meta-training the relaxed masks give the logits a meta-gradient.
    grads, _, _ = meta.compute_meta_gradients(episodes)
    logit_grads = grads[len(learner.trainable_variables):]
    assert len(logit_grads) == 4 and all(np.isfinite(g).all() for g in logit_grads)
    assert sum(float(tf.reduce_sum(tf.abs(g))) for g in logit_grads) > 0


@pytest.mark.parametrize("method", ["anil", "boil"])
def test_anil_and_boil_adapt_only_the_intended_variables(method):
    learner = small_mlp()
    partition = tfmeta.Partition(fast="head") if method == "anil" else tfmeta.Partition(slow="head")
    meta = tfmeta.MAML(learner, partition=partition, update_rule=tfmeta.Sgd(0.3), inner_steps=2)
    episodes = random_episodes()
    adapted = meta.adapt(episodes["support_x"][0], episodes["support_y"][0])
    for original, new in zip(learner.trainable_variables, adapted.trainable_variables):
        changed = not np.array_equal(np.array(tf.convert_to_tensor(original)), np.array(tf.convert_to_tensor(new)))
        assert changed == (original.path.startswith("head/") == (method == "anil")), original.path
    grads, _, _ = meta.compute_meta_gradients(episodes)
    check_finite_differences(meta, episodes, grads)


def test_multi_step_loss_annealing_moves_from_uniform_to_the_last_step():
    meta = tfmeta.MAML(tfmeta.models.mlp(), inner_steps=4, multi_step_loss_annealing=100)
    meta.compile(keras.optimizers.SGD(0.0))
    np.testing.assert_allclose(meta.step_weights(), [0.25] * 4, rtol=1e-6)
    meta.optimizer.iterations.assign(50)
    np.testing.assert_allclose(meta.step_weights(), [0.125, 0.125, 0.125, 0.625], rtol=1e-6)
    meta.optimizer.iterations.assign(1000)
    np.testing.assert_allclose(meta.step_weights(), [0.0075, 0.0075, 0.0075, 0.9775], rtol=1e-5)


def test_derivative_order_annealing_switches_from_first_to_second_order():
    learner = small_mlp()
    episodes = random_episodes()
    meta = tfmeta.MAML(learner, update_rule=tfmeta.Sgd(0.3), inner_steps=2, first_order_steps=10)
    meta.compile(keras.optimizers.SGD(0.0))
    compute = tf.function(meta.compute_meta_gradients)
    assert_lists_close(compute(episodes)[0], maml_grads(learner, episodes, first_order=True))
    meta.optimizer.iterations.assign(10)
    assert_lists_close(compute(episodes)[0], maml_grads(learner, episodes))


def test_per_step_batch_norm_is_exact_to_second_order_and_keeps_one_set_per_step():
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64")
    learner = tfmeta.models.conv_net(input_shape=(6, 6, 1), outputs=3, filters=3, blocks=2, activation="tanh",
                                     pooling="average", per_step_batch_norm=2, dtype="float64")
    meta = tfmeta.MAML(learner, loss=loss, update_rule=tfmeta.Sgd(0.5), inner_steps=2)
    norm = learner.get_layer("norm_0")
    assert not any(fast for v, fast in zip(learner.trainable_variables, meta.fast_mask) if v.path.startswith("norm"))
    episodes = classification_episodes()
    grads, _, state = tf.function(meta.compute_meta_gradients)(episodes)
    gamma_grad = dict(zip([v.path for v in meta.meta_variables], grads))["norm_0/gamma"]
    assert gamma_grad.shape == (3, 3) and np.all(np.abs(np.array(gamma_grad)).sum(axis=1) > 0)  # every step's set
    moving_mean = dict(zip([v.path for v in learner.non_trainable_variables], state))["norm_0/moving_mean"]
    assert np.all(np.abs(np.array(moving_mean)).sum(axis=1) > 0)  # steps 0, 1 (support) and 2 (query) all moved
    check_finite_differences(meta, episodes, grads, rtol=1e-5)
    assert norm.steps == 2


def test_imaml_matches_the_closed_form_implicit_gradient_on_a_quadratic_inner_problem():
    dim, regularization = 3, 2.0  # the regularised support losses' curvatures lie in [2.06, 6.12]
    learner = keras.Sequential([keras.Input((dim,), dtype="float64"), keras.layers.Dense(1, dtype="float64")])
    episodes = random_episodes(tasks=2, support=6, query=5, features=(dim,))
    meta = tfmeta.IMAML(learner, regularization=regularization, cg_steps=dim + 1, update_rule=tfmeta.Sgd(0.24),
                        inner_steps=35)  # gradient descent contracts by 0.51 a step: 35 reach the optimum to 1e-10
    grads, _, _ = meta.compute_meta_gradients(episodes)

    theta = np.concatenate([np.array(tf.convert_to_tensor(v)).ravel() for v in learner.trainable_variables])
    expected = np.zeros_like(theta)
    for i in range(2):
        augment = lambda x: np.concatenate([np.array(x), np.ones((len(x), 1))], axis=1)  # noqa: E731
        xs, ys = augment(episodes["support_x"][i]), np.array(episodes["support_y"][i])
        xq, yq = augment(episodes["query_x"][i]), np.array(episodes["query_y"][i])
        hessian = 2 * xs.T @ xs / len(xs)
        # argmin_w mean((xs w - ys)^2) + λ/2 |w - θ|^2
        w = np.linalg.solve(hessian + regularization * np.eye(dim + 1), 2 * xs.T @ ys[:, 0] / len(xs) +
                            regularization * theta)
        query_grad = 2 * xq.T @ (xq @ w - yq[:, 0]) / len(xq)
        expected += np.linalg.solve(np.eye(dim + 1) + hessian / regularization, query_grad) / 2
    np.testing.assert_allclose(np.concatenate([np.array(g).ravel() for g in grads]), expected, rtol=1e-6)


def test_imaml_meta_gradient_is_not_taken_through_the_inner_steps():
    """After 3 inner steps, far from the inner optimum, iMAML's meta-gradient is still the implicit formula at the
    end point φ: (I + H(φ)/λ)⁻¹ ∇L_query(φ), with H the exact Hessian of the support loss at φ and the system
    solved exactly. The derivative through the 3 steps (MAML's, of the same regularised inner loop) differs."""
    learner = keras.Sequential([keras.Input((2,), dtype="float64"), keras.layers.Dense(3, activation="tanh",
                                dtype="float64"), keras.layers.Dense(1, dtype="float64")])
    episodes = random_episodes(tasks=1)
    regularization = 20.0  # I + H/λ positive definite, so that conjugate gradient solves it
    size = sum(int(np.prod(v.shape)) for v in learner.trainable_variables)
    meta = tfmeta.IMAML(learner, regularization=regularization, cg_steps=size, update_rule=tfmeta.Sgd(0.1),
                        inner_steps=3)
    grads, logs, _ = tf.function(meta.compute_meta_gradients)(episodes)
    assert float(logs["cg_dropped"]) == float(logs["cg_truncated"]) == 0.0
    task = {k: v[0] for k, v in episodes.items()}
    fast, slow = meta.read_params()
    phi = meta.adapt_params(fast, slow, [], task["support_x"], task["support_y"], 3, training=True).params

    def flat(tensors):
        return tf.concat([tf.reshape(t, [-1]) for t in tensors], 0)

    def unflat(vector):
        sizes = [int(np.prod(p.shape)) for p in phi]
        return [tf.reshape(t, p.shape) for t, p in zip(tf.split(vector, sizes), phi)]

    def loss(vector, split):
        return meta.task_objective(unflat(vector), slow, [], task[f"{split}_x"], task[f"{split}_y"], True)[0]

    point = flat(phi)
    with tf.GradientTape() as outer:
        outer.watch(point)
        with tf.GradientTape() as inner:
            inner.watch(point)
            support = loss(point, "support")
        gradient = inner.gradient(support, point)
    hessian = outer.jacobian(gradient, point).numpy()
    with tf.GradientTape() as tape:
        tape.watch(point)
        query = loss(point, "query")
    expected = np.linalg.solve(np.eye(size) + hessian / regularization, tape.gradient(query, point).numpy())
    np.testing.assert_allclose(flat(grads).numpy(), expected, rtol=1e-7, atol=1e-10)

    with tf.GradientTape() as tape:  # the derivative through the inner steps
        fast, slow = meta.read_params()
        adapted = meta.adapt_params(fast, slow, [], task["support_x"], task["support_y"], 3, training=True).params
        query = meta.task_objective(adapted, slow, [], task["query_x"], task["query_y"], True)[0]
    through_the_steps = flat(tape.gradient(query, learner.trainable_variables)).numpy()
    assert np.linalg.norm(through_the_steps - expected) > 0.05 * np.linalg.norm(expected)


def test_imaml_counts_the_conjugate_gradient_solves_it_stops_early():
    """Conjugate gradient stops at non-positive curvature: at its first iteration (the task's meta-gradient is
    dropped) or later (a truncated solve); iMAML reports the fraction of tasks of each in its logs."""
    def solve(matrix, b, steps):
        matvec = lambda v: [tf.linalg.matvec(tf.constant(matrix), v[0])]  # noqa: E731
        x, stopped = tfmeta.algorithms.imaml.conjugate_gradient(matvec, [tf.constant(b, tf.float64)], steps)
        return x[0].numpy(), int(stopped)

    x, stopped = solve(np.diag([2.0, 3.0]), [1.0, 1.0], 2)
    np.testing.assert_allclose(x, [0.5, 1 / 3])
    assert stopped == 2  # solved: never stopped
    x, stopped = solve(np.diag([2.0, 3.0]), [1.0, 1.0], 4)
    np.testing.assert_allclose(x, [0.5, 1 / 3])
    assert stopped == 4  # converged after 2 of 4 iterations (a zero direction afterwards): not counted
    _, stopped = solve(np.diag([1.0, np.nan]), [1.0, 1.0], 2)
    assert stopped == 0  # non-finite curvature stops too
    x, stopped = solve(np.diag([1.0, -1.0]), [1.0, 1.0], 2)
    assert stopped == 0 and not x.any()  # p·Ap = 0 at the first iteration: dropped
    _, stopped = solve(np.diag([1.0, 4.0, -50.0]), [1.0, 1.0, 0.1], 3)
    assert stopped == 1  # curvature 4.5 at first, then negative: truncated
    # A concave support loss makes I + H/λ indefinite: every task's solve stops at its first iteration.
    concave = tfmeta.IMAML(small_mlp(), loss=lambda y, p: -100.0 * tf.square(y - p), regularization=0.1,
                           inner_steps=1)
    _, logs, _ = concave.compute_meta_gradients(random_episodes())
    assert float(logs["cg_dropped"]) == 1.0 and float(logs["cg_truncated"]) == 0.0


def test_bad_configurations_raise_clear_errors():
    learner = small_mlp()
    with pytest.raises(ValueError, match="regularization"):
        tfmeta.IMAML(learner, regularization=-1.0)
    with pytest.raises(ValueError, match="cg_steps"):
        tfmeta.IMAML(learner, cg_steps=0)
    with pytest.raises(ValueError, match=r"factorization.*\(3, 3\).*does not match fast tensor 0 of shape \(2, 6\)"):
        tfmeta.MAML(learner, update_rule=tfmeta.MetaCurvature(factorization=[(3, 3)] + [(6,), (6, 5), (5,), (5, 1),
                                                                                          (1,)]))
    with pytest.raises(ValueError, match="selects no fast variable"):
        tfmeta.MAML(learner, partition=tfmeta.Partition(fast=lambda v: False))
    with pytest.raises(ValueError, match="steps"):
        tfmeta.LSLR(steps=0)
    with pytest.raises(ValueError, match="temperature"):
        tfmeta.MTNetMask(temperature=0.0)
    with pytest.raises(ValueError, match="multi_step_loss_annealing"):
        tfmeta.MAML(learner, inner_steps=2, query_step_weights=[0.5, 0.5], multi_step_loss_annealing=10)
    with pytest.raises(ValueError, match="needs a per-task `seed`"):
        tfmeta.MTNetMask(dtype="float64").init_state([], training=True, seed=None)


def test_learned_rules_are_saved_with_the_meta_learner(tmp_path):
    meta = tfmeta.MAML(tfmeta.models.mlp(), update_rule=tfmeta.Chain([tfmeta.MTNetMask(), tfmeta.MetaSGD(0.05)]))
    meta.update_rule.rules[1].learning_rates[0].assign(tf.fill([1, 40], 0.123))
    meta.save(str(tmp_path / "meta.keras"))
    restored = keras.models.load_model(str(tmp_path / "meta.keras"))
    assert isinstance(restored.update_rule.rules[0], tfmeta.MTNetMask)
    assert_lists_close(values(restored.meta_variables), values(meta.meta_variables))


def test_imaml_equals_the_true_meta_gradient_when_the_inner_problem_is_solved():
    """On a non-linear learner with a strongly convex inner problem solved to convergence, the implicit
    meta-gradient is the derivative of the query loss at the solution (checked by finite differences)."""
    meta = tfmeta.IMAML(small_mlp(), regularization=4.0, cg_steps=30, update_rule=tfmeta.Sgd(0.15), inner_steps=60)
    episodes = random_episodes(tasks=2)
    grads, _, _ = tf.function(meta.compute_meta_gradients)(episodes)
    check_finite_differences(meta, episodes, grads, directions=2, eps=1e-4, rtol=1e-4)


def test_learned_rules_compose_with_first_order_meta_gradients():
    learner = small_mlp()
    episodes = random_episodes()
    meta = tfmeta.MAML(learner, update_rule=tfmeta.MetaSGD(0.3, dtype="float64"), inner_steps=2, first_order=True)
    grads, _, _ = meta.compute_meta_gradients(episodes)
    n = len(learner.trainable_variables)
    assert_lists_close(grads[:n], maml_grads(learner, episodes, first_order=True))
    # First order stops the gradient through the inner gradients, not through the step sizes.
    assert all(float(tf.reduce_sum(tf.abs(g))) > 0 for g in grads[n:])
