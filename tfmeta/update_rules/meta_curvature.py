"""Meta-Curvature (Park & Oliva, NeurIPS 2019): meta-learned, Kronecker-factored gradient preconditioners."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import tensorflow as tf

from tfmeta.update_rules.base import Shapes, UpdateRule
from tfmeta.registry import register


def default_modes(shape: Sequence[int]) -> tuple[int, ...]:
    """How a tensor is factored: every axis of vectors, dense kernels and 3-D kernels; a convolution kernel
    [h, w, c_in, c_out] as [h*w, c_in, c_out] (the paper's spatial, input-channel and output-channel modes)."""
    shape = tuple(int(d) for d in shape)
    if len(shape) <= 3:
        return shape
    return (math.prod(shape[:-2]), *shape[-2:])


def mode_product(tensor: tf.Tensor, matrix: tf.Tensor, axis: int) -> tf.Tensor:
    """The mode-`axis` product: multiplies `matrix` into `tensor` along one axis."""
    product = tf.tensordot(matrix, tensor, axes=[[1], [axis]])  # the new axis comes first
    order = list(range(1, axis + 1)) + [0] + list(range(axis + 1, len(tensor.shape)))
    return tf.transpose(product, order)


@register
class MetaCurvature(UpdateRule):
    """`update = -learning_rate * (G ×₁ M₁ ×₂ M₂ ...)` for each fast tensor's gradient G.

    Each tensor gets one meta-learned square matrix per mode (see `default_modes`; a dense kernel [a, b] gets
    [a, a] and [b, b]), initialised to the identity, so that Meta-Curvature starts as MAML. `factorization`
    overrides the modes: one tuple per fast tensor whose product is the tensor's size.
    """

    def __init__(self, learning_rate: float = 0.01, factorization: Optional[Sequence[Sequence[int]]] = None,
                 **kwargs):
        super().__init__(**kwargs)
        self.learning_rate = float(learning_rate)
        self.factorization = None if factorization is None else [tuple(m) for m in factorization]

    def build(self, param_shapes: Shapes) -> None:
        modes = self.factorization or [default_modes(s) for s in param_shapes]
        if len(modes) != len(param_shapes):
            raise ValueError(f"MetaCurvature `factorization` has {len(modes)} entries for {len(param_shapes)} "
                             "fast tensors.")
        for i, (m, shape) in enumerate(zip(modes, param_shapes)):
            if math.prod(m) != math.prod(shape):
                raise ValueError(f"MetaCurvature `factorization` {m} does not match fast tensor {i} of shape "
                                 f"{tuple(shape)}: the modes must multiply to its size.")
        self.modes = modes
        self.matrices = [
            self.add_weight(shape=(d, d), initializer="identity", name=f"curvature_{i}_{axis}")
            for i, m in enumerate(modes) for axis, d in enumerate(m)
        ]
        super().build(param_shapes)

    def update(self, grads, state, params, step, **extra):
        matrices = iter(self.matrices)
        updates = []
        for g, modes in zip(grads, self.modes):
            t = tf.reshape(g, modes)
            for axis in range(len(modes)):
                t = mode_product(t, tf.cast(next(matrices), g.dtype), axis)
            updates.append(-tf.convert_to_tensor(self.learning_rate, g.dtype) * tf.reshape(t, tf.shape(g)))
        return updates, state

    def get_config(self) -> dict:
        return {**super().get_config(), "learning_rate": self.learning_rate, "factorization": self.factorization}
