"""The update-rule interface and the basic rules: SGD, clipping, composition.

A rule sees the fast parameters of one task. `build(param_shapes)` creates its meta-parameters (learned step
sizes, preconditioners, masks, ...) as Keras variables, so they are meta-trained and checkpointed with the
meta-learner that owns the rule. `init_state(params, training=..., seed=...)` gives per-task state (momentum
buffers, sampled masks, ...), and `update(grads, state, params, step, **extra)` returns `(updates, state)`; the
inner loop then sets `params <- params + updates`. `step` is the index of the inner step, for rules that differ
per step: a Python int in the unrolled inner loop, an int tensor in a `tf.while_loop` or when WarpGrad replays a
stored step. `extra` holds what else the inner step knows, as optax's `GradientTransformationExtraArgs` passes
it: `loss`, the support loss at `params` (for learned optimizers that take it as an input). A rule takes the
extras it needs and ignores the rest, so every rule accepts `**extra`.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Optional, Sequence

import keras
import tensorflow as tf

from tfmeta.registry import register

Shapes = Sequence[Sequence[int]]


class UpdateRule(keras.layers.Layer):
    """Base class of inner-loop update rules. Subclasses implement `update` and, if they learn, `build`."""

    def build(self, param_shapes: Shapes) -> None:
        self.param_shapes = [tuple(s) for s in param_shapes]

    def init_state(
        self, params: Sequence[tf.Tensor], *, training: bool = True, seed: Optional[tf.Tensor] = None
    ) -> Any:
        """Per-task state threaded through the inner steps; stateless rules keep `()`. `training` tells
        meta-training from evaluation; `seed` is a stateless per-task seed for rules that sample."""
        return ()

    def update(self, grads: list[tf.Tensor], state: Any, params: list[tf.Tensor], step: int, **extra):
        """Returns `(updates, state)` for one inner step; `extra`: see the module docstring (e.g. `loss`)."""
        raise NotImplementedError

    def check_params(self, param_shapes: Shapes) -> None:
        """Builds the rule for these fast parameters, or checks that it was built for the same shapes."""
        if not any(p.kind is p.VAR_KEYWORD for p in inspect.signature(self.update).parameters.values()):
            raise TypeError(f"update rule '{self.name}': `update` must accept `**extra` (the inner step passes extra "
                            "arguments such as `loss=`; see tfmeta.update_rules.base).")
        shapes = [tuple(s) for s in param_shapes]
        if not self.built:
            self.build(shapes)
        elif self.param_shapes != shapes:
            raise ValueError(
                f"update rule '{self.name}' was built for parameters of shapes {self.param_shapes}, but the "
                f"partition's fast variables have shapes {shapes}."
            )


@register
class Sgd(UpdateRule):
    """Gradient descent, `update = -learning_rate * grad`: MAML's inner rule.

    `learning_rate` is one step size for all fast variables, or a list with one per fast variable
    (fixed, not meta-learned). With `momentum` > 0 the update is Keras SGD's heavy-ball velocity,
    `velocity = momentum * velocity - learning_rate * grad`, kept per task (WarpGrad's offline buffer stores it).
    """

    def __init__(self, learning_rate: float | Sequence[float] = 0.01, momentum: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        rates = list(learning_rate) if isinstance(learning_rate, (list, tuple)) else [learning_rate]
        if not all(isinstance(r, (int, float)) and math.isfinite(r) and r >= 0 for r in rates):
            raise ValueError(f"Sgd `learning_rate` must be finite and non-negative; got {learning_rate!r}.")
        if not 0 <= momentum < 1:
            raise ValueError(f"Sgd `momentum` must be in [0, 1); got {momentum!r}.")
        self.learning_rate, self.momentum = learning_rate, float(momentum)

    def build(self, param_shapes: Shapes) -> None:
        rates = self.learning_rate
        if not isinstance(rates, (list, tuple)):
            rates = [rates] * len(param_shapes)
        if len(rates) != len(param_shapes):
            raise ValueError(
                f"Sgd has {len(rates)} values of `learning_rate` but there are {len(param_shapes)} fast parameters."
            )
        self._rates = rates
        super().build(param_shapes)

    def init_state(self, params, *, training=True, seed=None):
        return tuple(tf.zeros_like(p) for p in params) if self.momentum else ()

    def update(self, grads, state, params, step, **extra):
        steps = [-tf.convert_to_tensor(rate, g.dtype) * g for rate, g in zip(self._rates, grads)]
        if not self.momentum:
            return steps, state
        velocity = tuple(self.momentum * v + s for v, s in zip(state, steps))
        return list(velocity), velocity

    def get_config(self) -> dict:
        return {**super().get_config(), "learning_rate": self.learning_rate, "momentum": self.momentum}


@register
class ClipByGlobalNorm(UpdateRule):
    """Rescales the updates so that their global norm is at most `max_norm` (stabilises large inner steps)."""

    def __init__(self, max_norm: float = 10.0, **kwargs):
        super().__init__(**kwargs)
        if not max_norm > 0:
            raise ValueError(f"ClipByGlobalNorm `max_norm` must be positive; got {max_norm!r}.")
        self.max_norm = max_norm

    def update(self, grads, state, params, step, **extra):
        clipped, _ = tf.clip_by_global_norm(grads, self.max_norm)
        return clipped, state

    def get_config(self) -> dict:
        return {**super().get_config(), "max_norm": self.max_norm}


@register
class Chain(UpdateRule):
    """Applies rules in order, each to the previous one's output: `Chain([ClipByGlobalNorm(1.0), Sgd(0.4)])`."""

    def __init__(self, rules: Sequence[UpdateRule], **kwargs):
        super().__init__(**kwargs)
        rules = [keras.saving.deserialize_keras_object(r) if isinstance(r, dict) else r for r in rules]
        if not rules or not all(isinstance(r, UpdateRule) for r in rules):
            raise TypeError(f"Chain `rules` must be a non-empty list of UpdateRule; got {rules!r}.")
        self.rules = rules

    def build(self, param_shapes: Shapes) -> None:
        for rule in self.rules:
            rule.check_params(param_shapes)
        super().build(param_shapes)

    def init_state(self, params, *, training=True, seed=None):
        return tuple(rule.init_state(params, training=training, seed=seed) for rule in self.rules)

    def update(self, grads, state, params, step, **extra):
        new_state = []
        for rule, rule_state in zip(self.rules, state):
            grads, rule_state = rule.update(grads, rule_state, params, step, **extra)
            new_state.append(rule_state)
        return grads, tuple(new_state)

    def get_config(self) -> dict:
        return {**super().get_config(), "rules": [keras.saving.serialize_keras_object(r) for r in self.rules]}


@register
class InnerAdam(UpdateRule):
    """Adam in the inner loop (Kingma & Ba, 2015), with moments kept per task and reset for every task: Reptile's
    inner optimiser (Nichol et al., 2018 use `beta_1=0` on Omniglot and Mini-ImageNet)."""

    def __init__(self, learning_rate: float = 0.001, beta_1: float = 0.9, beta_2: float = 0.999,
                 epsilon: float = 1e-8, **kwargs):
        super().__init__(**kwargs)
        if not learning_rate >= 0 or not 0 <= beta_1 < 1 or not 0 <= beta_2 < 1 or not epsilon > 0:
            raise ValueError("InnerAdam needs learning_rate >= 0, beta_1 and beta_2 in [0, 1) and epsilon > 0; got "
                             f"{learning_rate}, {beta_1}, {beta_2}, {epsilon}.")
        self.learning_rate, self.beta_1, self.beta_2, self.epsilon = learning_rate, beta_1, beta_2, epsilon

    def init_state(self, params, *, training=True, seed=None):
        return tuple((tf.zeros_like(p), tf.zeros_like(p)) for p in params)

    def update(self, grads, state, params, step, **extra):
        updates, new_state = [], []
        for g, (m, v) in zip(grads, state):
            t = tf.cast(step + 1, g.dtype)
            correction = tf.sqrt(1 - self.beta_2**t) / (1 - self.beta_1**t)
            m = self.beta_1 * m + (1 - self.beta_1) * g
            v = self.beta_2 * v + (1 - self.beta_2) * tf.square(g)
            updates.append(-self.learning_rate * correction * m / (tf.sqrt(v) + self.epsilon))
            new_state.append((m, v))
        return updates, tuple(new_state)

    def get_config(self) -> dict:
        return {**super().get_config(), "learning_rate": self.learning_rate, "beta_1": self.beta_1,
                "beta_2": self.beta_2, "epsilon": self.epsilon}


@register
class InnerRMSprop(UpdateRule):
    """RMSprop (Tieleman & Hinton, 2012) as Keras writes it (`rho`, `epsilon` outside the square root, no
    momentum), with the mean square kept per task: a hand-designed baseline of the learned optimizers."""

    def __init__(self, learning_rate: float = 0.001, rho: float = 0.9, epsilon: float = 1e-7, **kwargs):
        super().__init__(**kwargs)
        if not learning_rate >= 0 or not 0 <= rho < 1 or not epsilon > 0:
            raise ValueError("InnerRMSprop needs learning_rate >= 0, rho in [0, 1) and epsilon > 0; got "
                             f"{learning_rate}, {rho}, {epsilon}.")
        self.learning_rate, self.rho, self.epsilon = learning_rate, rho, epsilon

    def init_state(self, params, *, training=True, seed=None):
        return tuple(tf.zeros_like(p) for p in params)

    def update(self, grads, state, params, step, **extra):
        mean_squares = tuple(self.rho * v + (1 - self.rho) * tf.square(g) for g, v in zip(grads, state))
        updates = [-self.learning_rate * g / (tf.sqrt(v) + self.epsilon) for g, v in zip(grads, mean_squares)]
        return updates, mean_squares

    def get_config(self) -> dict:
        return {**super().get_config(), "learning_rate": self.learning_rate, "rho": self.rho, "epsilon": self.epsilon}
