"""tfmeta's fused CPU kernel for conv_net's first block (`tfmeta.kernels`): the layers' results and exact
meta-gradients to second order, at the size of a 5-way 15-query episode, and only where the kernel may run."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import classification_episodes, values

import tfmeta
from tfmeta import export, kernels

SHAPE = (28, 28, 1)


@pytest.fixture(scope="module", autouse=True)
def built():
    """The kernels build on every test machine (g++ and TensorFlow's headers); a failure here names the cause."""
    assert kernels.load() is not None, "tfmeta's fused kernels did not build: see the RuntimeWarning above"


def learner(dtype, seed=0):
    keras.utils.set_random_seed(seed)
    return tfmeta.models.conv_net(SHAPE, outputs=5, filters=8, blocks=2, dtype=dtype)


def op_types(concrete_function) -> list:
    graph = concrete_function.graph.as_graph_def()
    return [node.op for function in graph.library.function for node in function.node_def] + [
        node.op for node in graph.node]


def episodes(dtype):
    return {k: v if v.dtype.is_integer else tf.cast(v, dtype)
            for k, v in classification_episodes(tasks=2, ways=5, shots=1, queries=15, shape=SHAPE).items()}


@pytest.mark.parametrize("first_order", [False, True])
def test_fused_block_gives_the_float64_layers_meta_gradients(first_order):
    """float32 conv_net runs block 0 as the fused kernel; float64 (the finite-difference-checked layers) cannot.
    Same weights and 75 queries per task: equal meta-gradients, losses and moving statistics, to second order."""
    fused, exact = learner("float32"), learner("float64")
    exact.set_weights(fused.get_weights())
    results = []
    for model, dtype in ((fused, "float32"), (exact, "float64")):
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype=dtype)
        meta = tfmeta.MAML(model, loss=loss, update_rule=tfmeta.Sgd(0.4), inner_steps=2, first_order=first_order)
        compute = tf.function(meta.compute_meta_gradients)
        ops = op_types(compute.get_concrete_function(episodes(dtype)))
        # two support passes and the query pass per task, all through the kernels: the backward kernel for the two
        # inner steps and the query pass, and at second order also for the meta-gradient's way back through the
        # support passes' outputs, and the kernel's own gradient for the inner steps' second derivative
        # (and alike for block 1's batch norm, ReLU and pooling)
        kernel_ops = {"TfmetaConvBlock": 3, "TfmetaConvBlockGrad": 3 if first_order else 5,
                      "TfmetaConvBlockGradGrad": 0 if first_order else 2,
                      "TfmetaNormPoolGrad": 3 if first_order else 5, "TfmetaNormPoolGradGrad": 0 if first_order else 2}
        expected = kernel_ops if model is fused else dict.fromkeys(kernel_ops, 0)
        assert {op: ops.count(op) for op in kernel_ops} == expected
        grads, logs, state = compute(episodes(dtype))
        results.append(([np.asarray(g, "float64") for g in grads], float(logs["loss"]), values(state)))
    (g32, loss32, state32), (g64, loss64, state64) = results
    assert loss32 == pytest.approx(loss64, rel=1e-5)
    for a, b, variable in zip(g32, g64, fused.trainable_variables):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5, err_msg=variable.path)  # conv biases: zero
    for a, b in zip(state32, state64):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(5, 14, 14, 8), (3, 7, 7, 5), (2, 3, 3, 4)])
def test_norm_pool_backward_and_its_gradients_match_float64_ops_to_third_order(shape):
    """The fused backward pass of batch norm, ReLU and pooling (`tfmeta.kernels.norm_pool`), its kernel gradient and
    the recomputed third derivative, in float32, against the same block in float64 ordinary ops (odd sizes too)."""
    from tfmeta.kernels import norm_pool

    rng = np.random.default_rng(0)
    n, h, w, c = shape
    arrays = (rng.normal(size=shape), rng.uniform(0.5, 1.5, c), 0.3 * rng.normal(size=c),
              rng.normal(size=(n, h // 2, w // 2, c)), rng.normal(size=shape), rng.normal(size=c))
    epsilon = 1e-3

    def derivatives(dtype, block):
        z, gamma, beta, dp, v, a = (tf.constant(x, dtype) for x in arrays)
        with tf.GradientTape(persistent=True) as third:
            third.watch([z, gamma, dp])
            with tf.GradientTape() as first:
                first.watch([z, gamma, beta])
                p = block(z, gamma, beta)
            dz, dgamma, dbeta = first.gradient(p, [z, gamma, beta], dp)
            second = third.gradient(tf.reduce_sum(dz * v) + tf.reduce_sum(dgamma * a) + tf.reduce_sum(dbeta * a * a),
                                    [z, gamma, dp])
            objective = tf.reduce_sum(tf.sin(second[0])) + tf.reduce_sum(second[1] ** 2) + tf.reduce_sum(second[2] * dp)
        return [p, dz, dgamma, dbeta, *second, *third.gradient(objective, [z, gamma, dp])]

    ops = kernels.load()
    fused = derivatives(tf.float32, lambda z, g, b: norm_pool.norm_relu_pool(ops, z, g, b, epsilon)[0])
    exact = derivatives(tf.float64, lambda z, g, b: norm_pool._separate(z, g, b, epsilon))
    names = ["output", "dz", "dgamma", "dbeta", "2nd in z", "2nd in gamma", "2nd in dp", "3rd in z", "3rd in gamma",
             "3rd in dp"]
    for name, a, b in zip(names, fused, exact):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()), err_msg=name)


def test_fused_block_forward_input_gradient_and_moving_statistics_match_the_layers():
    """The learner's output, its gradient with respect to the images (the kernel's input-gradient op) and the
    updated moving statistics, in training and at inference, against the layers; a NaN pixel gives the same
    outputs as in them."""
    model = learner("float32")
    x = tf.constant(np.random.default_rng(1).normal(size=(75, *SHAPE)), tf.float32)
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    @tf.function
    def run(x, training):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y, state = model.stateless_call(trainable, non_trainable, x, training=training)
            loss = tf.reduce_sum(tf.sin(y))
        return y, tape.gradient(loss, x), state

    for training in (True, False):
        fused_ops = op_types(run.get_concrete_function(x, training))
        assert "TfmetaConvBlock" in fused_ops and "TfmetaConvBlockInputGrad" in fused_ops
        fused = run(x, training)
        with kernels.disabled():
            layers = tf.function(run.python_function)(x, training)
        for a, b in zip(tf.nest.flatten(fused), tf.nest.flatten(layers)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    bad = tf.tensor_scatter_nd_update(x, [[3, 5, 5, 0]], [np.nan])
    fused_y = run(bad, True)[0]
    with kernels.disabled():
        layers_y = tf.function(run.python_function)(bad, True)[0]
    np.testing.assert_array_equal(np.isnan(fused_y), np.isnan(layers_y))
    # the kernel's own maps are NaN (oneDNN's max pooling in the next block, as in the layers, drops NaN)
    conv, norm = model.get_layer("conv_0"), model.get_layer("norm_0")
    maps = kernels.load().tfmeta_conv_block(bad, conv.kernel, conv.bias, norm.gamma, norm.beta, epsilon=1e-3)[0]
    assert np.isnan(maps).all()


@pytest.mark.parametrize("shape, offset", [((4, 12, 9, 3), 0.0), ((3, 7, 5, 1), 0.0), ((2, 1, 4, 2), 0.0),
                                           ((2, 84, 84, 3), 0.0), ((3, 10, 6, 3), 1000.0)])
def test_block_statistics_match_the_patches_in_float64(shape, offset):
    """The forward kernel's batch statistics, patch mean and covariance (from the image's lag products, not its
    patches) against the explicit zero-padded patches in float64: non-square, odd and one-row images, one to three
    channels, e's size, and pixels around 1000 with unit spread (the patches are shifted before their products)."""
    rng = np.random.default_rng(7)
    n, h, w, ci = shape
    x = (offset + rng.normal(size=shape) * np.arange(1, ci + 1)).astype(np.float32)
    kernel = rng.normal(size=(3, 3, ci, 6)).astype(np.float32)
    bias, gamma, beta = (rng.normal(size=6).astype(np.float32) for _ in range(3))
    _, mean, variance, covariance, patch_mean, _ = kernels.load().tfmeta_conv_block(
        x, kernel, bias, gamma, beta, epsilon=1e-3)
    padded = np.pad(x.astype(np.float64), [(0, 0), (1, 1), (1, 1), (0, 0)])
    patches = np.stack([padded[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], axis=3).reshape(-1, 9 * ci)
    z = patches @ kernel.reshape(9 * ci, 6).astype(np.float64) + bias
    np.testing.assert_allclose(patch_mean, patches.mean(0), rtol=1e-5, atol=1e-5 * (1 + offset))
    expected = np.cov(patches, rowvar=False, bias=True)
    np.testing.assert_allclose(covariance, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    np.testing.assert_allclose(mean, z.mean(0), rtol=1e-5, atol=1e-4 * (1 + offset))
    np.testing.assert_allclose(variance, z.var(0), rtol=1e-4)


@pytest.mark.parametrize("channels", [1, 3])
def test_grad_kernel_and_its_gradient_are_adjoints(channels):
    """TfmetaConvBlockGrad is linear in dy and TfmetaConvBlockGradGrad is its adjoint:
    <Grad(dy), v> = <dy, GradGrad(v)>. The registered gradient of each (of the other order) is the other."""
    rng = np.random.default_rng(4)
    normal = lambda *shape: tf.constant(rng.standard_normal(shape), tf.float32)  # noqa: E731
    ops = kernels.load()
    x, kernel = normal(6, 12, 10, channels), normal(3, 3, channels, 8)
    bias, gamma, beta = normal(8), normal(8), normal(8)
    *_, patch_mean, routes = ops.tfmeta_conv_block(x, kernel, bias, gamma, beta, epsilon=1e-3)
    block = (routes, x, patch_mean)
    dy, dcorrelation, dtotal = normal(6, 6, 5, 8), normal(3, 3, channels, 8), normal(8)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([dy, dcorrelation, dtotal])
        correlation, total = ops.tfmeta_conv_block_grad(dy, *block)
        ddy = ops.tfmeta_conv_block_grad_grad(dcorrelation, dtotal, *block)
        forward = tf.reduce_sum(correlation * dcorrelation) + tf.reduce_sum(total * dtotal)
        backward = tf.reduce_sum(dy * ddy)
    assert float(forward) == pytest.approx(float(backward), rel=1e-5)
    assert float(tf.reduce_max(tf.abs(ddy))) > 0
    np.testing.assert_allclose(tape.gradient(forward, dy), ddy, rtol=1e-6, atol=1e-6)
    for gradient, direct in zip(tape.gradient(backward, [dcorrelation, dtotal]), (correlation, total)):
        np.testing.assert_allclose(gradient, direct, rtol=1e-5, atol=1e-5)


def test_derivatives_in_the_images_stay_exact_where_a_tape_watches_them():
    """The input gradient has no derivative of its own: where a tape watches the images and records the backward
    pass, the block's backward pass is the layers'. A gradient of the filter gradient with respect to the images
    equals the layers' (the kernel's weight gradients would give none)."""
    model = learner("float32")
    x = tf.constant(np.random.default_rng(3).normal(size=(5, *SHAPE)), tf.float32)
    kernel = model.get_layer("conv_0").kernel

    def run(x):
        with tf.GradientTape() as outer:
            outer.watch(x)
            with tf.GradientTape() as inner:
                inner.watch(x)
                loss = tf.reduce_sum(tf.sin(model(x, training=False)))
            penalty = tf.reduce_sum(tf.square(inner.gradient(loss, kernel)))
        return outer.gradient(penalty, x)

    fused = tf.function(run)
    assert "TfmetaConvBlock" in op_types(fused.get_concrete_function(x))
    with kernels.disabled():
        layers = tf.function(run)(x)
    np.testing.assert_allclose(fused(x), layers, rtol=1e-3, atol=1e-4)


def test_kernel_is_not_used_under_xla_disabled_or_in_exports(tmp_path):
    meta = tfmeta.MAML(learner("float32"), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                       update_rule=tfmeta.Sgd(0.4), inner_steps=1)
    data = episodes("float32")
    assert "TfmetaConvBlock" in op_types(tf.function(meta.compute_meta_gradients).get_concrete_function(data))
    xla = tf.function(meta.compute_meta_gradients, jit_compile=True).get_concrete_function(data)
    assert "TfmetaConvBlock" not in op_types(xla)
    with kernels.disabled():
        assert "TfmetaConvBlock" not in op_types(tf.function(meta.compute_meta_gradients).get_concrete_function(data))
    export.export_meta_learner(meta, str(tmp_path / "served"))
    with open(tmp_path / "served" / "saved_model.pb", "rb") as f:
        assert b"TfmetaConvBlock" not in f.read()
    # the served model (TensorFlow's ops) adapts and predicts as the meta-learner (the kernel) does
    served = tf.saved_model.load(str(tmp_path / "served")).signatures["serving_default"]
    task = {k: v[0] for k, v in data.items()}
    logits = served(support_x=task["support_x"], support_y=task["support_y"], query_x=task["query_x"])["logits"]
    adapted = meta.adapt(task["support_x"], task["support_y"])
    np.testing.assert_allclose(logits, adapted.predict(task["query_x"], batch_size=75, verbose=0), rtol=1e-4,
                               atol=1e-4)


def test_without_a_compiler_the_layers_run_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "_library", None)
    monkeypatch.setattr(kernels, "_failed", False)
    monkeypatch.setenv("TFMETA_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(kernels, "_flags", lambda: ["--no-such-flag"])
    with pytest.warns(RuntimeWarning, match="could not build its fused CPU kernels"):
        assert kernels.load() is None
    model = learner("float32")
    call = tf.function(lambda x: model(x, training=True)).get_concrete_function(tf.TensorSpec((5, *SHAPE)))
    assert "TfmetaConvBlock" not in op_types(call)
    monkeypatch.setattr(kernels, "_failed", False)
    monkeypatch.setenv("TFMETA_FUSED_KERNELS", "0")
    assert kernels.load() is None


def test_inputs_of_another_shape_get_the_layers_handling():
    """Inputs that do not match the learner's input shape skip the kernel: Keras then adds a missing channel axis, and
    rejects wrong channels with its error naming the layer and the expected shape, with or without the kernel."""
    model = learner("float32")
    images = np.random.default_rng(2).normal(size=(5, 28, 28)).astype("float32")
    np.testing.assert_allclose(model(images, training=True), model(images[..., None], training=True), rtol=1e-5,
                               atol=1e-6)
    for context in (kernels.disabled, lambda: open(__file__)):
        with context(), pytest.raises(ValueError, match="conv_0.*expected axis -1 of input shape to have value 1"):
            model(np.zeros((5, 28, 28, 3), "float32"), training=True)
