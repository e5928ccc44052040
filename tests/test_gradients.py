"""Meta-gradients checked against finite differences and hand computations (float64)."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import classification_episodes, random_episodes, values

import tfmeta


def small_mlp():
    return tfmeta.models.mlp(input_shape=(2,), hidden_units=(6, 5), outputs=1, activation="tanh", dtype="float64")


def small_conv(activation="tanh", pooling="average", dtype="float64"):
    return tfmeta.models.conv_net(
        input_shape=(6, 6, 1), outputs=3, filters=3, blocks=2, activation=activation, pooling=pooling, dtype=dtype
    )


def meta_loss(meta, episodes):
    return float(meta.compute_meta_gradients(episodes)[1]["loss"])


def check_finite_differences(meta, episodes, grads, directions=3, eps=1e-5, rtol=1e-6):
    """The directional derivative along random directions equals a central finite difference."""
    rng = np.random.default_rng(1)
    theta = values(meta.meta_variables)
    for _ in range(directions):
        direction = [rng.normal(size=t.shape) for t in theta]
        for sign, target in ((1, "plus"), (-1, "minus")):
            for v, t, d in zip(meta.meta_variables, theta, direction):
                v.assign(t + sign * eps * d)
            if target == "plus":
                plus = meta_loss(meta, episodes)
            else:
                minus = meta_loss(meta, episodes)
        for v, t in zip(meta.meta_variables, theta):
            v.assign(t)
        numeric = (plus - minus) / (2 * eps)
        analytic = sum(float(np.sum(np.array(g) * d)) for g, d in zip(grads, direction))
        assert analytic == pytest.approx(numeric, rel=rtol, abs=1e-9)


@pytest.mark.parametrize("mode", ["eager", "function", "xla"])
def test_second_order_mlp_matches_finite_differences(mode):
    meta = tfmeta.MAML(small_mlp(), update_rule=tfmeta.Sgd(0.3), inner_steps=2)
    episodes = random_episodes()
    compute = {
        "eager": meta.compute_meta_gradients,
        "function": tf.function(meta.compute_meta_gradients),
        "xla": tf.function(meta.compute_meta_gradients, jit_compile=True),
    }[mode]
    grads, _, _ = compute(episodes)
    check_finite_differences(meta, episodes, grads)


def test_second_order_conv_with_exact_batch_norm_matches_finite_differences():
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64")
    meta = tfmeta.MAML(small_conv(), loss=loss, update_rule=tfmeta.Sgd(0.5))
    episodes = classification_episodes()
    grads, _, _ = tf.function(meta.compute_meta_gradients)(episodes)
    check_finite_differences(meta, episodes, grads, rtol=1e-5)


def test_fused_float32_batch_norm_equals_exact_float64_to_second_order():
    """float32 batch norm runs as TensorFlow's fused kernel; float64 (checked above by finite differences) does not.
    Same weights and data: equal meta-gradients, losses and moving statistics, with ReLU, max-pooling and a
    dense batch norm."""
    def learner(dtype):
        conv = tfmeta.models.conv_net((6, 6, 1), outputs=None, filters=4, blocks=2, dtype=dtype)
        x = keras.layers.Flatten(dtype=dtype)(conv.output)
        x = tfmeta.layers.BatchNormalization(momentum=0.5, dtype=dtype)(keras.layers.Dense(6, dtype=dtype)(x))
        return keras.Model(conv.input, keras.layers.Dense(3, dtype=dtype)(x))

    fused, exact = learner("float32"), learner("float64")
    exact.set_weights(fused.get_weights())
    episodes32 = {k: v if v.dtype.is_integer else tf.cast(v, tf.float32) for k, v in classification_episodes().items()}
    results = []
    for model, episodes in ((fused, episodes32), (exact, classification_episodes())):
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype=model.dtype)
        meta = tfmeta.MAML(model, loss=loss, update_rule=tfmeta.Sgd(0.5), inner_steps=2)
        compute = tf.function(meta.compute_meta_gradients)
        graph = str(compute.get_concrete_function(episodes).graph.as_graph_def())
        assert ("FusedBatchNormV3" in graph) == (model is fused)
        grads, logs, state = compute(episodes)
        results.append(([np.asarray(g, "float64") for g in grads], float(logs["loss"]), values(state)))
    (g32, loss32, state32), (g64, loss64, state64) = results
    assert loss32 == pytest.approx(loss64, rel=1e-5)
    for a, b in zip(g32, g64):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)  # conv biases before batch norm: zero
    for a, b in zip(state32, state64):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_fused_backward_kernel_only_where_no_tape_differentiates_the_backward():
    """The meta-gradient runs every batch norm's backward pass through TensorFlow's fused kernel, once per forward
    pass; the support passes' gradients, which MAML differentiates again, run in ordinary ops (with the fused kernel
    there, oneDNN's rewrite made cyclic graphs: see `batch_norm._fused_batch_norm`)."""
    meta = tfmeta.MAML(small_conv(activation="relu", pooling="max", dtype="float32"), update_rule=tfmeta.Sgd(0.5),
                       inner_steps=2, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    episodes = {k: v if v.dtype.is_integer else tf.cast(v, tf.float32) for k, v in classification_episodes().items()}
    with tfmeta.kernels.disabled():  # block 0 as batch norm layers (its fused kernel: tests/test_kernels.py)
        graph = tf.function(meta.compute_meta_gradients).get_concrete_function(episodes).graph.as_graph_def()
    ops = [node.op for function in graph.library.function for node in function.node_def] + [n.op for n in graph.node]
    forward, backward = ops.count("FusedBatchNormV3"), ops.count("FusedBatchNormGradV3")
    assert forward == 2 * 3  # two blocks, each in two support passes and one query pass
    assert backward == forward


def test_keras_batch_norm_warns_and_exact_copy_does_not():
    learner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.BatchNormalization(),
                                keras.layers.Dense(1)])
    with pytest.warns(UserWarning, match="exact_batch_norm"):
        tfmeta.MAML(learner)
    exact = tfmeta.layers.exact_batch_norm(learner)
    assert not tfmeta.layers.inexact_batch_norms(exact)
    x = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
    np.testing.assert_allclose(exact(x, training=False), learner(x, training=False), rtol=1e-6)
    np.testing.assert_allclose(exact(x, training=True), learner(x, training=True), rtol=1e-5, atol=1e-6)
    with warnings_as_errors():
        tfmeta.MAML(exact)
        tfmeta.MAML(learner, first_order=True)


def warnings_as_errors():
    import warnings

    context = warnings.catch_warnings()
    context.__enter__()
    warnings.simplefilter("error")

    class _Exit:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            context.__exit__(*exc)

    return _Exit()


def test_relu_max_pool_batch_norm_conv_gets_finite_second_order_gradients():
    meta = tfmeta.MAML(small_conv("relu", "max", dtype="float32"),
                       loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), update_rule=tfmeta.Sgd(0.4))
    grads, logs, _ = tf.function(meta.compute_meta_gradients)(classification_episodes(dtype="float32"))
    assert all(np.isfinite(g).all() for g in grads)
    assert np.isfinite(logs["loss"])
    assert sum(float(np.abs(g).sum()) for g in grads) > 0


def manual_adapt(learner, x, y, lr, steps):
    """Plain gradient descent written with variable assignments, independent of tfmeta's functional path."""
    for _ in range(steps):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(learner(x) - y))
        for v, g in zip(learner.trainable_variables, tape.gradient(loss, learner.trainable_variables)):
            v.assign_sub(lr * g)


def test_first_order_equals_analytic_formula_and_differs_from_second_order():
    learner = small_mlp()
    episodes = random_episodes()
    second = tfmeta.MAML(learner, update_rule=tfmeta.Sgd(0.3), inner_steps=2)
    first = tfmeta.MAML(learner, update_rule=tfmeta.Sgd(0.3), inner_steps=2, first_order=True)
    first_grads, _, _ = first.compute_meta_gradients(episodes)
    second_grads, _, _ = second.compute_meta_gradients(episodes)

    theta = values(learner.trainable_variables)
    expected = [np.zeros_like(t) for t in theta]
    for i in range(3):
        manual_adapt(learner, episodes["support_x"][i], episodes["support_y"][i], 0.3, 2)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(learner(episodes["query_x"][i]) - episodes["query_y"][i]))
        for e, g in zip(expected, tape.gradient(loss, learner.trainable_variables)):
            e += np.array(g) / 3
        for v, t in zip(learner.trainable_variables, theta):
            v.assign(t)
    for got, want in zip(first_grads, expected):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    difference = sum(np.abs(np.array(f) - np.array(s)).sum() for f, s in zip(first_grads, second_grads))
    assert difference > 1e-3 * sum(np.abs(np.array(s)).sum() for s in second_grads)


def test_reptile_update_equals_hand_computation():
    learner = small_mlp()
    episodes = random_episodes()
    epsilon, alpha, steps = 0.5, 0.1, 3
    meta = tfmeta.Reptile(learner, update_rule=tfmeta.Sgd(alpha), inner_steps=steps)
    meta.compile(keras.optimizers.SGD(epsilon))
    theta = values(learner.trainable_variables)
    expected = [t.copy() for t in theta]
    for i in range(3):
        x = tf.concat([episodes["support_x"][i], episodes["query_x"][i]], 0)
        y = tf.concat([episodes["support_y"][i], episodes["query_y"][i]], 0)
        manual_adapt(learner, x, y, alpha, steps)
        for e, t, phi in zip(expected, theta, values(learner.trainable_variables)):
            e += epsilon * (phi - t) / 3
        for v, t in zip(learner.trainable_variables, theta):
            v.assign(t)
    meta.train_step(episodes)
    for got, want in zip(values(learner.trainable_variables), expected):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["unrolled", "vectorized_map"])
def test_task_parallelism_modes_agree(mode):
    learner = small_mlp()
    reference = tfmeta.MAML(learner, update_rule=tfmeta.Sgd(0.3), inner_steps=2)
    other = tfmeta.MAML(learner, update_rule=tfmeta.Sgd(0.3), inner_steps=2, task_parallelism=mode)
    episodes = random_episodes()
    expected = reference.compute_meta_gradients(episodes)[0]
    for a, b in zip(expected, tf.function(other.compute_meta_gradients)(episodes)[0]):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_auto_task_parallelism_vectorises_maml_over_dense_learners_only():
    assert tfmeta.MAML(small_mlp()).task_mapping == "vectorized_map"
    assert tfmeta.MAML(small_conv()).task_mapping == "map_fn"  # convolutions and batch norm state
    assert tfmeta.Reptile(small_mlp()).task_mapping == "map_fn"  # not declared safe to vectorise
    assert tfmeta.MAML(small_mlp(), task_parallelism="map_fn").task_mapping == "map_fn"


@pytest.mark.parametrize("case", ["conv_batch_norm_meta_sgd", "mlp_inner_adam_xla"])
def test_rematerialized_inner_steps_give_the_same_meta_gradients(case):
    """Recomputing inner steps in the backward pass changes memory, not values: learned step sizes (variables read
    inside the step), rule state (Adam moments), batch-norm state and XLA go through it."""
    if case == "conv_batch_norm_meta_sgd":
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64")
        learner, episodes, extra = small_conv(), classification_episodes(), dict(loss=loss)
        rule = lambda: tfmeta.MetaSGD(0.3, dtype="float64")  # noqa: E731
    else:
        learner, episodes, extra = small_mlp(), random_episodes(), {}
        rule = lambda: tfmeta.InnerAdam(0.1)  # noqa: E731
    function = tf.function(jit_compile=case == "mlp_inner_adam_xla")
    results, forward_ops = [], []
    for rematerialize in (False, True):
        meta = tfmeta.MAML(learner, update_rule=rule(), inner_steps=2, rematerialize_inner_steps=rematerialize,
                           task_parallelism="map_fn", **extra)
        compute = function(meta.compute_meta_gradients)
        results.append(compute(episodes))
        graph = compute.get_concrete_function(episodes).graph.as_graph_def()
        nodes = list(graph.node) + [n for f in graph.library.function for n in f.node_def]
        forward_ops.append(sum(n.op in ("Conv2D", "MatMul") for n in nodes))
    assert forward_ops[1] > forward_ops[0]  # the recomputation is in the graph: rematerialisation is on
    (grads, logs, state), (remat_grads, remat_logs, remat_state) = results
    assert len(grads) == len(remat_grads)
    if case == "conv_batch_norm_meta_sgd":  # the step sizes' meta-gradient comes through the recomputation
        assert all(np.any(g != 0) for g in remat_grads[len(learner.trainable_variables):])
    for a, b in zip(grads + state, remat_grads + remat_state):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    assert float(logs["loss"]) == pytest.approx(float(remat_logs["loss"]), rel=1e-12)
