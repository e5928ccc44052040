"""conv_net's first block as one fused CPU kernel: 3x3 convolution, batch norm with the batch's statistics, ReLU and
2x2 max pooling, on inputs with few channels (images: 1 or 3).

Why: with so few input channels the convolution does 9-27 multiply-adds per output value, so the block is bound by
memory, and as separate ops it streams the network's largest feature maps through memory about a dozen times per
forward and backward pass. It took 39-54% of a conv4 meta-step's op time for 3-14% of its FLOPs
(docs/performance.md, issue 21). The kernel (`conv_block.cc`) processes one image at a time in buffers that stay in
cache and writes only the pooled output: on a query pass of 75 Omniglot images, forward and backward, it is 3x
faster than TensorFlow's ops, and at least as accurate.

The backward pass is exact to any order in the block's weights. The forward kernel stores each pooled value's route
through pooling and ReLU (one byte: which of its window's four values, if any, receives its gradient), so that the
backward kernels need not recompute the convolution to find it. The kernel `TfmetaConvBlockGrad` gives the gradient
at batch norm's output (along those routes) correlated with the centred patches, and summed; the gradients of the
filters, scale and offset follow from these two by a few ordinary ops on [9 * channels, filters] tensors, which
TensorFlow differentiates (batch norm's second derivative through its statistics). The kernel's own gradient is its
adjoint kernel `TfmetaConvBlockGradGrad` (registered below); routing through pooling and ReLU is piecewise constant,
so it has no gradient in the weights. MAML's second-order support passes thus stay in fused kernels. The input
gradient (`TfmetaConvBlockInputGrad`) has a first derivative only: where a tape watches the block's input (not in
meta-learning, whose inputs are images) and also records the backward pass, the backward pass is the separate ops'
own gradient, recomputed from the block's inputs, so that every derivative stays exact.
"""

from __future__ import annotations

from typing import Callable, Optional

import keras
import tensorflow as tf
from tensorflow.python.eager import record

from tfmeta.kernels import norm_pool
from tfmeta.layers.batch_norm import BatchNormalization, _fused_batch_norm

MAX_INPUT_CHANNELS = 4  # 1 channel: 3x faster; 3: as fast, less memory (docs/performance.md); more: compute-bound


def fused_conv_block(ops, x, kernel, bias, gamma, beta, epsilon: float, separate: Callable,
                     name: str = "conv_block") -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """`(pooled output, batch mean, biased batch variance)` of the block through the kernels in `ops`, with the
    gradient described in the module docstring; `separate(x, kernel, bias, gamma, beta)` is the pooled output in
    separate, differentiable ops. The backward pass's ops are named `<name>_grad/...` (profiles attribute them)."""
    x_watched = record.should_record_backprop([x])

    @tf.custom_gradient
    def forward(x, kernel, bias, gamma, beta):
        y, mean, variance, covariance, patch_mean, routes = ops.tfmeta_conv_block(x, kernel, bias, gamma, beta,
                                                                                  epsilon=epsilon)
        # functions of x alone, whose derivatives the recomputed backward pass gives where a tape watches x
        covariance, patch_mean = tf.stop_gradient(covariance), tf.stop_gradient(patch_mean)

        def backward(dy, dmean, dvariance):
            del dmean, dvariance  # the statistics only feed the moving averages, under a stop-gradient
            with tf.name_scope(f"{name}_grad"):
                if x_watched and record.could_possibly_record():  # derivatives in x of this backward pass
                    inputs = [x, kernel, bias, gamma, beta]
                    with tf.GradientTape() as tape:
                        tape.watch(inputs)
                        y_separate = separate(*inputs)
                    return tape.gradient(y_separate, inputs, dy)
                correlation, dbeta = ops.tfmeta_conv_block_grad(dy, routes, x, patch_mean)
                dkernel, dgamma = _weight_gradients(correlation, kernel, gamma, covariance, epsilon)
                dx = ops.tfmeta_conv_block_input_grad(dy, x, kernel, bias, gamma, beta, mean, variance, routes,
                                                      dgamma, dbeta, epsilon=epsilon)
                return dx, dkernel, tf.zeros_like(bias), dgamma, dbeta

        return (y, mean, variance), backward

    return forward(x, kernel, bias, gamma, beta)


def _weight_gradients(correlation, kernel, gamma, covariance, epsilon: float) -> tuple[tf.Tensor, tf.Tensor]:
    """The gradients of the filters and of batch norm's scale, from the correlation `a` of the gradient at batch
    norm's output with the centred patches (per filter w, with the patches' covariance C and s = sqrt(w'Cw + eps),
    the batch's standard deviation): dgamma = a'w / s and dw = gamma / s * (a - dgamma / s * Cw). The bias has
    none: batch norm subtracts it again."""
    filters = tf.reshape(kernel, [-1, tf.shape(kernel)[-1]])
    a = tf.reshape(correlation, tf.shape(filters))
    centred = tf.matmul(covariance, filters)
    inverse = tf.math.rsqrt(tf.reduce_sum(filters * centred, axis=0) + epsilon)
    dgamma = tf.reduce_sum(a * filters, axis=0) * inverse
    dkernel = gamma * inverse * (a - dgamma * inverse * centred)
    return tf.reshape(dkernel, tf.shape(kernel)), dgamma


@tf.RegisterGradient("TfmetaConvBlockGrad")
def _conv_block_grad_grad(op, dcorrelation, dtotal):
    """TfmetaConvBlockGrad is linear in dy, along routes that are piecewise constant in the weights: its gradient is
    its adjoint in dy, and none in the routes and patch mean (nor in x: where a tape watches x and records the
    backward pass, this kernel is not used)."""
    from tfmeta import kernels

    dcorrelation = tf.zeros_like(op.outputs[0]) if dcorrelation is None else dcorrelation
    dtotal = tf.zeros_like(op.outputs[1]) if dtotal is None else dtotal
    ddy = kernels.load().tfmeta_conv_block_grad_grad(dcorrelation, dtotal, *op.inputs[1:])
    return [ddy, None, None, None]


@tf.RegisterGradient("TfmetaConvBlockGradGrad")
def _conv_block_grad_grad_grad(op, dddy):
    """TfmetaConvBlockGradGrad is TfmetaConvBlockGrad's adjoint, so its gradient is that kernel."""
    from tfmeta import kernels

    dcorrelation, dtotal = kernels.load().tfmeta_conv_block_grad(dddy, *op.inputs[2:])
    return [dcorrelation, dtotal, None, None, None]


def fusable_layers(layers: list) -> Optional[tuple]:
    """`(conv, norm)` if `layers` start with conv_net's first block in the form the kernel computes (a 3x3 "same"
    convolution with bias and no regularizer, tfmeta's batch norm over channels, ReLU, 2x2 max pooling, all in
    float32, channels last), else None."""
    if len(layers) < 4:
        return None
    conv, norm = layers[:2]
    return (conv, norm) if (
        type(conv) is keras.layers.Conv2D and conv.kernel_size == (3, 3) and conv.strides == (1, 1)
        and conv.padding == "same" and conv.dilation_rate == (1, 1) and conv.groups == 1 and conv.use_bias
        and conv.data_format == "channels_last" and conv.activation is keras.activations.linear
        and conv.kernel_regularizer is None and conv.bias_regularizer is None and conv.activity_regularizer is None
        and conv.compute_dtype == "float32" and norm_pool.fusable(layers[1:4])
        and conv.input.shape[-1] is not None and conv.input.shape[-1] <= MAX_INPUT_CHANNELS
    ) else None


def call_block(ops, x, conv: keras.layers.Conv2D, norm: BatchNormalization, training: bool) -> tf.Tensor:
    """The first block on `x` through the fused kernel, as the four layers would compute it with batch statistics
    (moving averages updated in training, as `norm` updates them)."""
    channels = conv.filters
    kernel, bias = tf.convert_to_tensor(conv.kernel), tf.convert_to_tensor(conv.bias)
    gamma = tf.convert_to_tensor(norm.gamma) if norm.scale else tf.ones([channels])
    beta = tf.convert_to_tensor(norm.beta) if norm.center else tf.zeros([channels])
    epsilon = max(norm.epsilon, 1.001e-5)  # as `_fused_batch_norm`, which the separate ops use

    def separate(x, kernel, bias, gamma, beta):
        z = tf.nn.bias_add(tf.nn.conv2d(x, kernel, 1, "SAME"), bias)
        y, _, _ = _fused_batch_norm(z, gamma, beta, epsilon, name=norm.name)
        return tf.nn.max_pool2d(tf.nn.relu(y), 2, 2, "VALID")

    with tf.name_scope(conv.name):  # profiles attribute its ops to block 0
        y, mean, variance = fused_conv_block(ops, tf.cast(x, tf.float32), kernel, bias, gamma, beta, epsilon, separate,
                                             name=conv.name)
    if training and norm.trainable:
        norm.update_moving_statistics(mean, variance, tf.cast(tf.size(x) // tf.shape(x)[-1], tf.float32))
    return y
