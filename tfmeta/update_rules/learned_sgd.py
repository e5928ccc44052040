"""Gradient descent with meta-learned step sizes: Meta-SGD (Li et al., 2017) and MAML++'s LSLR
(Antoniou et al., 2019)."""

from __future__ import annotations

import math
from typing import Optional

import tensorflow as tf

from tfmeta import checks
from tfmeta.update_rules.base import Shapes, UpdateRule
from tfmeta.registry import register


@register
class LearnedSgd(UpdateRule):
    """`update = -alpha * grad` with alpha meta-learned, initialised to `initial_learning_rate`.

    per_element: one step size per parameter element (Meta-SGD's α ⊙ ∇L) or one per variable (LSLR).
    shared: one step size for all variables (WarpGrad's ablation of a meta-learned scalar learning rate); needs
      `per_element=False`.
    steps: None to share the step sizes across inner steps, or the number of inner steps, each with its own
      step sizes (LSLR); inner steps past `steps` (e.g. a longer evaluation) reuse the last step's.
    log_space: meta-learn log(alpha) instead of alpha (as the papers do): step sizes stay positive, and an
      Adam meta-step changes them by a relative amount (about the meta learning rate) instead of an absolute
      one, which for Adam 1e-3 and alpha = 0.01 is 10% of alpha per meta-step and can flip its sign.
    """

    def __init__(self, initial_learning_rate: float = 0.01, per_element: bool = True, steps: Optional[int] = None,
                 log_space: bool = False, shared: bool = False, **kwargs):
        super().__init__(**kwargs)
        if shared and per_element:
            raise ValueError("LearnedSgd `shared=True` (one step size for all variables) needs `per_element=False`.")
        if steps is not None:
            checks.integer(steps, "steps", minimum=1, owner="LearnedSgd")
        if log_space and not initial_learning_rate > 0:
            raise ValueError(f"`log_space` needs a positive `initial_learning_rate`; got {initial_learning_rate!r}.")
        self.initial_learning_rate = float(initial_learning_rate)
        self.per_element = per_element
        self.steps = steps
        self.log_space = log_space
        self.shared = bool(shared)

    def build(self, param_shapes: Shapes) -> None:
        leading = (self.steps,) if self.steps else ()
        self.learning_rates = [
            self.add_weight(
                shape=leading + (tuple(shape) if self.per_element else ()),
                initializer=self._initializer,
                name=f"learning_rate_{i}",
            )
            for i, shape in enumerate(param_shapes[:1] if self.shared else param_shapes)
        ]
        super().build(param_shapes)

    def _initializer(self, shape, dtype=None):
        # Not keras.initializers.Constant, which rounds the value through float32 before casting to float64.
        value = math.log(self.initial_learning_rate) if self.log_space else self.initial_learning_rate
        return tf.fill(shape, tf.constant(value, dtype))

    def update(self, grads, state, params, step, **extra):
        rates = [tf.exp(rate) for rate in self.learning_rates] if self.log_space else self.learning_rates
        if self.steps:
            rates = [tf.gather(rate, tf.minimum(step, self.steps - 1)) for rate in rates]
        if self.shared:
            rates = rates * len(grads)
        return [-tf.cast(rate, g.dtype) * g for rate, g in zip(rates, grads)], state

    def get_config(self) -> dict:
        return {**super().get_config(), "initial_learning_rate": self.initial_learning_rate,
                "per_element": self.per_element, "steps": self.steps, "log_space": self.log_space,
                "shared": self.shared}


@register
class MetaSGD(LearnedSgd):
    """Meta-SGD: a meta-learned step size for every parameter element, shared by the inner steps."""

    def __init__(self, initial_learning_rate: float = 0.01, log_space: bool = False, **kwargs):
        super().__init__(initial_learning_rate, per_element=True, steps=None, log_space=log_space, **kwargs)

    def get_config(self) -> dict:
        config = super().get_config()
        del config["per_element"], config["steps"], config["shared"]
        return config


@register
class LSLR(LearnedSgd):
    """MAML++'s learned per-layer per-step learning rates: one step size per variable and inner step."""

    def __init__(self, initial_learning_rate: float = 0.01, steps: int = 1, log_space: bool = False, **kwargs):
        super().__init__(initial_learning_rate, per_element=False, steps=steps, log_space=log_space, **kwargs)

    def get_config(self) -> dict:
        config = super().get_config()
        del config["per_element"], config["shared"]
        return config
