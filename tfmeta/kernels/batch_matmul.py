"""Products of per-task matrices under `tf.vectorized_map`, as a kernel that keeps small batches on one thread.

Why: vectorising a dense learner over tasks turns each layer's product, once the weights differ per task (after an
inner step, and in the gradients), into a batched product (`BatchMatMulV2`) of small matrices: on the sine MLP, 21
per meta-step of 25 products of at most 10x40 by 40x40. TensorFlow's kernels split so small a batch across the
intra-op threads, and on these machines waking the second thread costs more than the product: 29-51 us per op
against 3-20 us here (docs/performance.md, issue 21). `vectorized_products()` makes `tf.vectorized_map` emit
`TfmetaBatchMatMul` for such products; its gradient is the same kernel, so every order of derivative runs on it.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import tensorflow as tf
from tensorflow.python.ops.parallel_for import pfor

REAL = (tf.float32, tf.float64)


def batch_matmul(ops, x: tf.Tensor, y: tf.Tensor, adj_x: bool = False, adj_y: bool = False) -> tf.Tensor:
    """`op(x[b]) @ op(y[b])` for every b, op(m) = m, or its transpose where `adj_x` (`adj_y`) is set."""
    return ops.tfmeta_batch_mat_mul(x, y, adj_x=adj_x, adj_y=adj_y)


@tf.RegisterGradient("TfmetaBatchMatMul")
def _batch_matmul_grad(op, dz):
    """The product's gradient in x and y, as products of the same kernel (as TensorFlow's BatchMatMulV2 gradient)."""
    from tfmeta import kernels

    ops = kernels.load()
    x, y = op.inputs
    adj_x, adj_y = op.get_attr("adj_x"), op.get_attr("adj_y")
    if not adj_x:
        dx = batch_matmul(ops, dz, y, adj_y=not adj_y)
    else:
        dx = batch_matmul(ops, y, dz, adj_x=adj_y, adj_y=True)
    if not adj_y:
        dy = batch_matmul(ops, x, dz, adj_x=not adj_x)
    else:
        dy = batch_matmul(ops, dz, x, adj_x=True, adj_y=adj_x)
    return dx, dy


@contextlib.contextmanager
def vectorized_products() -> Iterator[None]:
    """While `tf.vectorized_map` converts code inside, a product of two per-task real matrices becomes
    `TfmetaBatchMatMul` where tfmeta's kernels may run (`kernels.usable()`: not under XLA, not on a GPU, not while
    exporting); other products convert as TensorFlow converts them. It swaps the `MatMul` converter of TensorFlow's
    `pfor` module for the time, which is internal API: where that is missing, nothing changes."""
    registry = getattr(pfor, "_pfor_converter_registry", {})
    tensorflows = registry.get("MatMul")
    if tensorflows is None:
        yield
        return

    def convert(pfor_input):
        from tfmeta import kernels

        x, x_stacked, _ = pfor_input.input(0)
        y, y_stacked, _ = pfor_input.input(1)
        ops = kernels.usable()
        if not (x_stacked and y_stacked and x.dtype in REAL) or ops is None:
            return tensorflows(pfor_input)
        product = batch_matmul(ops, x, y, pfor_input.get_attr("transpose_a"), pfor_input.get_attr("transpose_b"))
        return pfor.wrap(product, True)

    registry["MatMul"] = convert
    try:
        yield
    finally:
        registry["MatMul"] = tensorflows


@pfor.RegisterPFor("TfmetaBatchMatMul")
def _convert_batch_matmul(pfor_input):
    """Under an enclosing `tf.vectorized_map` (e.g. a user's map over meta-learners), the kernel over the merged
    batch axes."""
    from tfmeta import kernels

    pfor_input.stack_inputs()
    x, y = pfor_input.stacked_input(0), pfor_input.stacked_input(1)
    outer = tf.shape(x)[:2]
    merge = lambda t: tf.reshape(t, tf.concat([[-1], tf.shape(t)[2:]], 0))  # noqa: E731
    product = batch_matmul(kernels.load(), merge(x), merge(y), pfor_input.get_attr("adj_x"),
                           pfor_input.get_attr("adj_y"))
    return pfor.wrap(tf.reshape(product, tf.concat([outer, tf.shape(product)[1:]], 0)), True)
