"""Episode augmentations: `f(images [tasks, n, H, W, C], seed) -> images`, applied inside the pipeline."""

from __future__ import annotations

import math
from typing import Sequence

import tensorflow as tf


class RandomAffine:
    """Random affine transformation of every image: the multi-shot Omniglot protocol of Leap and WarpGrad
    (Flennerhag et al., 2019, 2020): scaling in `scale`, rotation in `rotation` degrees, translation ("cropping")
    by up to `translation` of the image size along each axis; bilinear, empty areas filled with 0."""

    def __init__(self, scale: Sequence[float] = (0.8, 1.2), rotation: Sequence[float] = (0.0, 360.0),
                 translation: float = 0.2):
        if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
            raise ValueError(f"RandomAffine `scale` must be a range (low, high) with 0 < low <= high; got {scale}.")
        if len(rotation) != 2 or rotation[0] > rotation[1]:
            raise ValueError(f"RandomAffine `rotation` must be a range (low, high) in degrees; got {rotation}.")
        if not 0 <= translation < 1:
            raise ValueError(f"RandomAffine `translation` must lie in [0, 1); got {translation}.")
        self.scale, self.rotation, self.translation = tuple(scale), tuple(rotation), translation

    def __call__(self, images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        shape = tf.shape(images)
        n = tf.reduce_prod(shape[:-3])
        seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
        scale = tf.random.stateless_uniform([n], seeds[0], *self.scale)
        angle = tf.random.stateless_uniform([n], seeds[1], *self.rotation)
        shift = tf.random.stateless_uniform([n, 2], seeds[2], -self.translation, self.translation)
        return affine(images, scale, angle, shift)


def affine(images: tf.Tensor, scale: tf.Tensor, angle: tf.Tensor, shift: tf.Tensor) -> tf.Tensor:
    """Scales, rotates (degrees) and translates (fractions of the image size, [x, y]) each image of `images`
    [..., H, W, C] by its entry of `scale`, `angle` and `shift` (flattened over the leading axes: [n], [n],
    [n, 2]); bilinear, empty areas filled with 0."""
    shape = tf.shape(images)
    flat = tf.reshape(images, tf.concat([[-1], shape[-3:]], 0))
    height, width = tf.cast(shape[-3], tf.float32), tf.cast(shape[-2], tf.float32)
    angle = angle * (math.pi / 180.0)
    shift_x, shift_y = shift[:, 0] * width, shift[:, 1] * height
    # The transform maps each output pixel to the input pixel it reads: A (out - centre - shift) + centre.
    a0, a1 = tf.cos(angle) / scale, -tf.sin(angle) / scale
    a3, a4 = tf.sin(angle) / scale, tf.cos(angle) / scale
    cx, cy = (width - 1) / 2, (height - 1) / 2
    a2 = cx - a0 * (cx + shift_x) - a1 * (cy + shift_y)
    a5 = cy - a3 * (cx + shift_x) - a4 * (cy + shift_y)
    zeros = tf.zeros_like(a0)
    transforms = tf.stack([a0, a1, a2, a3, a4, a5, zeros, zeros], axis=1)
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=flat, transforms=transforms, output_shape=shape[-3:-1], fill_value=0.0,
        interpolation="BILINEAR", fill_mode="CONSTANT")
    return tf.reshape(out, shape)
