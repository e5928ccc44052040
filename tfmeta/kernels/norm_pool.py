"""Batch norm (the batch's statistics), ReLU and 2x2 max pooling as CPU kernels whose backward pass has a kernel
gradient too: conv_net's later blocks, after their convolution.

Why: MAML differentiates each support pass's backward pass again. Batch norm's backward pass was about 20 ordinary
ops (so that TensorFlow could differentiate it), its derivative about 40 more, and the ReLU's and pooling's
gradients and their derivatives a few more, each a pass over small maps with a fixed cost per op: 0.62 s of a 5-step
second-order Omniglot meta-step's 4.25 s of op time (docs/performance.md, issue 21). Here the forward pass is one
kernel (`TfmetaNormPool`: statistics, normalisation, ReLU and pooling, writing only the pooled maps and, for the
backward kernels, the statistics and each pooled value's route), the backward pass another (`TfmetaNormPoolGrad`)
and its gradient a third (`TfmetaNormPoolGradGrad`, registered below; `norm_pool.cc` states the formulas). They
run on the calling thread: a meta-batch's tasks keep the cores busy.

Routing the pooled gradient (first maximum of each window, through the ReLU) is piecewise constant, so the third
kernel is the exact derivative of the second. Its own gradient (third order) is the separate ops' third derivative,
recomputed from the inputs.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from tfmeta.layers.batch_norm import BatchNormalization, moments


def fusable(layers: list) -> bool:
    """Whether `layers` start with tfmeta's batch norm over channels, ReLU and 2x2 max pooling, in float32."""
    if len(layers) < 3:
        return False
    norm, act, pool = layers[:3]
    return (
        type(norm) is BatchNormalization and norm.axis in (-1, 3) and not norm.renorm
        and type(act) is keras.layers.Activation and act.activation is keras.activations.relu
        and type(pool) is keras.layers.MaxPooling2D and pool.pool_size == (2, 2) and pool.strides == (2, 2)
        and pool.padding == "valid" and pool.data_format == "channels_last"
        and all(layer.compute_dtype == "float32" for layer in (norm, act, pool)))


def norm_relu_pool(ops, z, gamma, beta, epsilon: float, name: str = "norm_pool"):
    """`(pooled output, batch mean, biased batch variance)` of batch norm, ReLU and pooling on NHWC `z` through the
    kernels; the backward pass's ops are named `<name>_grad/...` (profiles attribute them to the layer)."""

    @tf.custom_gradient
    def forward(z, gamma, beta):
        p, mean, variance, routes = ops.tfmeta_norm_pool(z, gamma, beta, epsilon=epsilon)

        def backward(dp, dmean, dvariance):
            del dmean, dvariance  # the statistics only feed the moving averages, under a stop-gradient
            with tf.name_scope(f"{name}_grad"):
                return ops.tfmeta_norm_pool_grad(dp, z, gamma, beta, mean, variance, routes, epsilon=epsilon)

        return (p, mean, variance), backward

    return forward(z, gamma, beta)


def call_norm_pool(ops, z, norm: BatchNormalization, training: bool) -> tf.Tensor:
    """Batch norm (with the batch's statistics; moving averages updated in training, as `norm` updates them), ReLU
    and 2x2 max pooling on `z`, through the kernels."""
    channels = z.shape[-1]
    gamma = tf.convert_to_tensor(norm.gamma) if norm.scale else tf.ones([channels])
    beta = tf.convert_to_tensor(norm.beta) if norm.center else tf.zeros([channels])
    with tf.name_scope(norm.name):
        y, mean, variance = norm_relu_pool(ops, tf.cast(z, tf.float32), gamma, beta, max(norm.epsilon, 1.001e-5),
                                           name=norm.name)
    if training and norm.trainable:
        norm.update_moving_statistics(mean, variance, tf.cast(tf.size(z) // channels, tf.float32))
    return y


def _separate(z, gamma, beta, epsilon: float):
    """The same block in ordinary ops, whose derivatives of every order TensorFlow gives."""
    mean, variance = moments(z, [0, 1, 2])
    y = (z - mean) * tf.math.rsqrt(variance + epsilon) * gamma + beta
    return tf.nn.max_pool2d(tf.nn.relu(y), 2, 2, "VALID")


def _separate_grad_grad(u, a, b, dp, z, gamma, beta, epsilon: float):
    """TfmetaNormPoolGradGrad in ordinary ops: the gradient of the separate ops' backward pass."""
    with tf.GradientTape() as outer:
        outer.watch([dp, z, gamma])
        with tf.GradientTape() as inner:
            inner.watch([z, gamma, beta])
            p = _separate(z, gamma, beta, epsilon)
        backward = inner.gradient(p, [z, gamma, beta], dp)
    return outer.gradient(backward, [dp, z, gamma], [u, a, b])


@tf.RegisterGradient("TfmetaNormPoolGrad")
def _norm_pool_grad_grad(op, ddz, ddgamma, ddbeta):
    """The backward pass's gradient in dp, z and gamma (none in beta, which only moves the routes; z's statistics
    and routes are inputs only to spare passes over z, and its derivative counts the statistics' dependence on z)."""
    from tfmeta import kernels

    dp, z, gamma, beta, mean, variance, routes = op.inputs
    u = tf.zeros_like(z) if ddz is None else ddz
    a = tf.zeros_like(gamma) if ddgamma is None else ddgamma
    b = tf.zeros_like(gamma) if ddbeta is None else ddbeta
    ddp, dz, dgamma = kernels.load().tfmeta_norm_pool_grad_grad(u, a, b, dp, z, gamma, beta, mean, variance, routes,
                                                                 epsilon=op.get_attr("epsilon"))
    return [ddp, dz, dgamma, None, None, None, None]


@tf.RegisterGradient("TfmetaNormPoolGradGrad")
def _norm_pool_grad_grad_grad(op, dddp, ddz, ddgamma):
    """Third order: the separate ops' derivative of `_separate_grad_grad`, recomputed from the kernel's inputs."""
    inputs = list(op.inputs)[:7]  # u, a, b, dp, z, gamma, beta (then z's statistics and routes, which they determine)
    watched = inputs[:6]  # u, a, b, dp, z, gamma (beta only moves the routes)
    cotangents = [tf.zeros_like(output) if grad is None else grad
                  for output, grad in zip(op.outputs, (dddp, ddz, ddgamma))]
    with tf.GradientTape() as tape:
        tape.watch(watched)
        outputs = _separate_grad_grad(*inputs, op.get_attr("epsilon"))
    return tape.gradient(outputs, watched, cotangents) + [None, None, None, None]
