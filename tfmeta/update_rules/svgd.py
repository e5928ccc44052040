"""Stein variational gradient descent (Liu & Wang, 2016) over particles: BMAML's inner loop (Yoon et al., 2018)."""

from __future__ import annotations

import math

import tensorflow as tf

from tfmeta.registry import register
from tfmeta.update_rules.base import UpdateRule


def median_bandwidth(squared_distances: tf.Tensor) -> tf.Tensor:
    """BMAML's bandwidth h = med² / log M: the median of the M×M matrix of squared distances between particles
    (its zero diagonal included, the two middle values averaged, as the official code does), over log M; held
    constant for differentiation."""
    from tensorflow_probability import stats

    particles = squared_distances.shape[0]
    median = stats.percentile(squared_distances, 50.0, interpolation="midpoint")
    return tf.stop_gradient(median / math.log(particles))


@register
class Svgd(UpdateRule):
    """Stein variational gradient descent on particles stacked on the leading axis of every parameter [M, ...].

    The inner loop's gradient of particle i is that of its loss, the negative log-density of the target
    posterior, -∇ log p(θ_i). With θ_i the flattened parameters of particle i, the RBF kernel
    k(θ, θ') = exp(-‖θ - θ'‖² / h) and the bandwidth h of `median_bandwidth`, the update is `learning_rate` times
        φ(θ_i) = 1/M Σ_j [k(θ_j, θ_i) ∇ log p(θ_j) + ∇_{θ_j} k(θ_j, θ_i)],
    where ∇_{θ_j} k(θ_j, θ_i) = (2 / h) (θ_i - θ_j) k(θ_j, θ_i) pushes the particles apart (the exact derivative;
    the official BMAML code scales this term by 1/h). With one particle it is gradient descent. The kernel is
    differentiated (second-order BMAML), the bandwidth is not.
    """

    def __init__(self, learning_rate: float = 1e-3, **kwargs):
        super().__init__(**kwargs)
        if not (isinstance(learning_rate, (int, float)) and math.isfinite(learning_rate) and learning_rate >= 0):
            raise ValueError(f"Svgd `learning_rate` must be finite and non-negative; got {learning_rate!r}.")
        self.learning_rate = float(learning_rate)

    def build(self, param_shapes):
        particles = {tuple(s)[:1] for s in param_shapes}
        if len(particles) != 1 or not all(len(s) >= 1 for s in param_shapes):
            raise ValueError("Svgd needs every fast parameter stacked over the same particles on its leading axis "
                             f"[particles, ...] (a particle learner such as BMAML); got shapes {list(param_shapes)}.")
        super().build(param_shapes)

    def update(self, grads, state, params, step, **extra):
        particles = params[0].shape[0]
        flat = lambda tensors: tf.concat([tf.reshape(t, [particles, -1]) for t in tensors], axis=1)  # noqa: E731
        theta, score = flat(params), -flat(grads)  # score: ∇ log p
        if particles == 1:
            phi = score
        else:
            squared_distances = tf.reduce_sum(tf.square(theta[:, None] - theta[None]), axis=2)
            bandwidth = median_bandwidth(squared_distances)
            kernel = tf.exp(-squared_distances / bandwidth)  # symmetric
            repulsion = (2.0 / bandwidth) * (theta * tf.reduce_sum(kernel, axis=1, keepdims=True)
                                             - tf.matmul(kernel, theta))
            phi = (tf.matmul(kernel, score) + repulsion) / particles
        phi = self.learning_rate * phi
        sizes = [math.prod(p.shape[1:]) for p in params]
        return [tf.reshape(u, p.shape) for u, p in zip(tf.split(phi, sizes, axis=1), params)], state

    def get_config(self) -> dict:
        return {**super().get_config(), "learning_rate": self.learning_rate}
