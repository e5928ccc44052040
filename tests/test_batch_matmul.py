"""tfmeta's batched product for per-task weights under `tf.vectorized_map` (`tfmeta.kernels.batch_matmul`): its
values, its gradients to second order, and where MAML's vectorised tasks use it."""

import numpy as np
import pytest
import tensorflow as tf
from conftest import random_episodes

import tfmeta
from tfmeta import kernels
from tfmeta.kernels import batch_matmul

ADJOINTS = [(False, False), (False, True), (True, False), (True, True)]


@pytest.fixture(scope="module")
def ops():
    library = kernels.load()
    assert library is not None, "tfmeta's kernels did not build: see the RuntimeWarning above"
    return library


def operands(batch, m, k, n, adj_x, adj_y, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, k, m) if adj_x else (batch, m, k)).astype(dtype)
    y = rng.normal(size=(batch, n, k) if adj_y else (batch, k, n)).astype(dtype)
    return tf.constant(x), tf.constant(y)


@pytest.mark.parametrize("adj_x, adj_y", ADJOINTS)
@pytest.mark.parametrize("sizes", [(25, 10, 40, 40), (25, 10, 1, 40), (3, 1, 7, 1), (2, 4, 0, 3), (8, 128, 128, 130)],
                         ids=["sine-mlp", "outer", "dot", "empty-inner", "split-over-threads"])
def test_products_match_tensorflows(ops, adj_x, adj_y, sizes):
    for dtype in ("float32", "float64"):
        x, y = operands(*sizes, adj_x, adj_y, dtype)
        got = batch_matmul.batch_matmul(ops, x, y, adj_x, adj_y)
        want = tf.matmul(x, y, adjoint_a=adj_x, adjoint_b=adj_y)
        assert got.shape == want.shape == sizes[:2] + sizes[3:]
        tolerance = 1e-5 if dtype == "float32" else 1e-12
        np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance * max(sizes[2], 1))


@pytest.mark.parametrize("adj_x, adj_y", ADJOINTS)
def test_gradients_to_second_order_match_finite_differences(ops, adj_x, adj_y):
    x, y = operands(2, 3, 4, 5, adj_x, adj_y, "float64")
    rng = np.random.default_rng(1)
    weights = tf.constant(rng.normal(size=(2, 3, 5)))
    first = lambda x, y: tf.reduce_sum(tf.sin(batch_matmul.batch_matmul(ops, x, y, adj_x, adj_y)) * weights)  # noqa

    def gradient_along(x, y):  # a scalar of the first-order gradients, so that its gradient is second order
        with tf.GradientTape() as tape:
            tape.watch([x, y])
            value = first(x, y)
        dx, dy = tape.gradient(value, [x, y])
        return tf.reduce_sum(dx * tf.cos(x)) + tf.reduce_sum(dy * y)

    for fn in (first, gradient_along):
        analytic, numeric = tf.test.compute_gradient(fn, [x, y], delta=1e-5)
        for a, n in zip(analytic, numeric):
            np.testing.assert_allclose(a, n, rtol=1e-6, atol=1e-8)


def test_mismatched_operands_name_their_shapes(ops):
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"matching inner size.*\[2,3,4\] and \[2,5,6\]"):
        tf.function(lambda x, y: batch_matmul.batch_matmul(ops, x, y), input_signature=[
            tf.TensorSpec(None, tf.float32)] * 2)(tf.zeros([2, 3, 4]), tf.zeros([2, 5, 6]))


def compute_with_op_counts(meta, episodes):
    compute = tf.function(meta.compute_meta_gradients)
    graph = compute.get_concrete_function(episodes).graph.as_graph_def()
    types = [node.op for f in graph.library.function for node in f.node_def] + [node.op for node in graph.node]
    return compute(episodes), types


def test_maml_vectorised_over_tasks_runs_the_kernel_with_the_same_meta_gradients():
    """A second-order step of MAML on a dense learner: every product of per-task weights (the query pass and both
    orders of gradients) through the kernel, the same meta-gradients as TensorFlow's batched products, and none left
    to TensorFlow; under XLA and while exporting, TensorFlow's."""
    learner = tfmeta.models.mlp(input_shape=(2,), hidden_units=(6, 5), outputs=1, activation="tanh", dtype="float64")
    meta = tfmeta.MAML(learner, update_rule=tfmeta.Sgd(0.3), inner_steps=2)
    episodes = random_episodes(tasks=4)
    (grads, logs, _), types = compute_with_op_counts(meta, episodes)
    assert types.count("TfmetaBatchMatMul") >= 20 and "BatchMatMulV2" not in types
    with kernels.disabled():
        (expected, expected_logs, _), types = compute_with_op_counts(meta, episodes)
    assert "TfmetaBatchMatMul" not in types and "BatchMatMulV2" in types
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    assert float(logs["loss"]) == pytest.approx(float(expected_logs["loss"]), rel=1e-12)
    xla = tf.function(meta.compute_meta_gradients, jit_compile=True)
    for got, want in zip(xla(episodes)[0], expected):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_an_enclosing_vectorized_map_batches_the_kernel(ops):
    x, y = operands(6, 3, 4, 5, False, True, "float64")
    outer = tf.reshape(x, [2, 3, 3, 4]), tf.reshape(y, [2, 3, 5, 4])
    got = tf.function(lambda a, b: tf.vectorized_map(
        lambda ab: batch_matmul.batch_matmul(ops, ab[0], ab[1], adj_y=True), (a, b)))(*outer)
    np.testing.assert_allclose(tf.reshape(got, [6, 3, 5]), tf.matmul(x, y, adjoint_b=True), rtol=1e-12)
