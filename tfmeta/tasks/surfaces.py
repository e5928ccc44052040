"""Synthetic 2-D loss surfaces: WarpGrad's visualisation experiment (Flennerhag et al., 2020, Appendix D)."""

from __future__ import annotations

import keras
import tensorflow as tf

from tfmeta import checks
from tfmeta.tasks.base import TaskDistribution

PARAMETERS = ("s", "a1", "a2", "a3", "b1", "b2", "b3")


@keras.saving.register_keras_serializable(package="tfmeta")
def surface_loss(surface, point):
    """The surface's height at each point: `surface` [..., 7] holds (s, a1, a2, a3, b1, b2, b3), `point` [..., 2]."""
    if surface.shape[-1] != 7 or point.shape[-1] != 2:
        raise ValueError(f"surface_loss takes `surface` of shape [..., 7] (s, a1, a2, a3, b1, b2, b3) and `point` of "
                         f"shape [..., 2]; got {tuple(surface.shape)} and {tuple(point.shape)}.")
    s, a1, a2, a3, b1, b2, b3 = tf.unstack(tf.cast(surface, point.dtype), axis=-1)
    x1, x2 = tf.unstack(point, axis=-1)
    return (b1 * (a1 - x1) ** 2 * tf.exp(-(x1**2) - (x2 + a2) ** 2)
            - b2 * (x1 / s - x1**3 - x2**5) * tf.exp(-(x1**2) - x2**2)
            - b3 * tf.exp(-((x1 + a3) ** 2) - x2**2))


class SurfaceTasks(TaskDistribution):
    """Minimising a random surface f(x1, x2) from a random start (the paper's Appendix D):

      f = b1 (a1 − x1)² exp(−x1² − (x2 + a2)²) − b2 (x1/s − x1³ − x2⁵) exp(−x1² − x2²) − b3 exp(−(x1 + a3)² − x2²)

    with s ~ Cat(1..10), a_i ~ Cat(−1, 0, 1), b_i ~ Cat(−5..5) and the start x ~ U(−3, 3)². The paper prints the
    last exponent as −(x1 + a3)² − x1²; we read the second x1 as x2, which gives the form of MATLAB's `peaks`
    surface (s = 5, a = (1, 1, 1), b = (3, 10, 1/3)) that its figures show.

    An episode's `support_x` and `query_x` are the start point [1, 2]; `support_y` and `query_y` the surface
    parameters [1, 7]; the loss is `surface_loss`. The learner adds its parameters to the start
    (`tfmeta.layers.Offset`), so gradient descent on its parameters moves the point. `starts_per_surface`
    consecutive tasks share a surface (the paper meta-trains on 10 starts per surface).
    """

    def __init__(self, starts_per_surface: int = 1, start_range: float = 3.0):
        checks.integer(starts_per_surface, "starts_per_surface", minimum=1, owner="SurfaceTasks")
        self.starts_per_surface = starts_per_surface
        self.start_range = float(start_range)

    def sample(self, seed, num_tasks):
        if num_tasks % self.starts_per_surface:
            raise ValueError(f"SurfaceTasks: `num_tasks` ({num_tasks}) must be a multiple of starts_per_surface "
                             f"({self.starts_per_surface}).")
        surfaces = num_tasks // self.starts_per_surface
        seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
        s = tf.random.stateless_uniform([surfaces, 1], seeds[0], 1, 11, dtype=tf.int32)
        a = tf.random.stateless_uniform([surfaces, 3], seeds[1], -1, 2, dtype=tf.int32)
        b = tf.random.stateless_uniform([surfaces, 3], seeds[2], -5, 6, dtype=tf.int32)
        surface = tf.repeat(tf.cast(tf.concat([s, a, b], axis=1), tf.float32), self.starts_per_surface, axis=0)
        start = tf.random.stateless_uniform([num_tasks, 1, 2], seeds[3], -self.start_range, self.start_range)
        return {"support_x": start, "support_y": surface[:, None], "query_x": start, "query_y": surface[:, None]}
