"""MT-Nets' learned update masks (Lee & Choi, ICML 2018)."""

from __future__ import annotations

import keras
import tensorflow as tf

from tfmeta.update_rules.base import Shapes, UpdateRule
from tfmeta.registry import register


@register
class MTNetMask(UpdateRule):
    """Masks the gradient so that the inner loop updates only some units of each fast tensor.

    One meta-learned logit ζ per output unit (last axis) of each fast tensor: the mask of a unit multiplies
    its whole column of a kernel and its bias. In meta-training each task samples its mask from a relaxed
    Bernoulli (binary Gumbel-softmax with `temperature`), so that ζ gets gradients; in evaluation the mask is
    the most likely one, 1 where ζ > 0. Chain it with a step-size rule: `Chain([MTNetMask(), Sgd(0.01)])`;
    with T-Nets' transforms in the learner this is an MT-Net.
    """

    def __init__(self, temperature: float = 1.0, initial_logit: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        if not temperature > 0:
            raise ValueError(f"MTNetMask `temperature` must be positive; got {temperature!r}.")
        self.temperature = float(temperature)
        self.initial_logit = float(initial_logit)

    def build(self, param_shapes: Shapes) -> None:
        self.logits = [
            self.add_weight(shape=tuple(shape[-1:]), initializer=keras.initializers.Constant(self.initial_logit),
                            name=f"mask_logit_{i}")
            for i, shape in enumerate(param_shapes)
        ]
        super().build(param_shapes)

    def init_state(self, params, *, training=True, seed=None):
        if not training:
            return tuple(tf.cast(logit > 0, p.dtype) for logit, p in zip(self.logits, params))
        if seed is None:
            raise ValueError("MTNetMask samples its masks in meta-training and needs a per-task `seed`.")
        masks = []
        for i, (logit, p) in enumerate(zip(self.logits, params)):
            u = tf.random.stateless_uniform(logit.shape, tf.random.experimental.stateless_fold_in(seed, i),
                                            minval=1e-6, maxval=1 - 1e-6, dtype=p.dtype)
            noise = tf.math.log(u) - tf.math.log1p(-u)
            masks.append(tf.sigmoid((tf.cast(logit, p.dtype) + noise) / self.temperature))
        return tuple(masks)

    def update(self, grads, state, params, step, **extra):
        return [g * mask for g, mask in zip(grads, state)], state

    def get_config(self) -> dict:
        return {**super().get_config(), "temperature": self.temperature, "initial_logit": self.initial_logit}
