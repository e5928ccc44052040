"""Loss curves of update rules (learned or hand-designed) on held-out optimisation problems, and the tuning of the
hand-designed baselines' learning rates on validation problems."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

from tfmeta import checks
from tfmeta.optimizers.problems import OptimizationProblems
from tfmeta.update_rules.base import UpdateRule

# The problems' seed streams: meta-training draws problem k from OptimizerTraining's seed folded with k; the
# baselines are tuned on the validation stream and every rule is reported on the test stream, so the three sets of
# problems (and, for MnistMLP, their images: use its "validation" and "test" splits) are disjoint.
VALIDATION_STREAM, TEST_STREAM = 1_000_003, 2_000_003


def loss_curves(rule: UpdateRule, problems: OptimizationProblems, num_problems: int = 100, steps: int = 100,
                stream: int = TEST_STREAM, seed: int = 0) -> np.ndarray:
    """The loss of `num_problems` problems before each of `steps` steps of `rule` and after the last: an array
    [num_problems, steps + 1]. Problem k of a `stream` draws its constants, initial parameters and minibatches from
    (`seed`, `stream`) folded with k, the same for every rule: curves of different rules pair up problem by
    problem."""
    checks.integer(num_problems, "num_problems", minimum=1)
    checks.integer(steps, "steps", minimum=1)

    def start(index):
        seed_k = tf.random.experimental.stateless_fold_in(tf.constant([seed, stream], tf.int64), index)
        constants = problems.constants(seed_k)
        initial = problems.initial_params(constants, tf.random.experimental.stateless_fold_in(seed_k, 1))
        return seed_k, constants, initial

    rule.check_params([tuple(p.shape) for p in start(tf.constant(0, tf.int64))[2]])  # (builds it, outside the graph)

    @tf.function(autograph=False)
    def one_problem(index):
        seed_k, constants, params = start(index)
        state = rule.init_state(params, training=False)

        def body(step, params, state, losses):
            step_seed = tf.random.experimental.stateless_fold_in(seed_k, 2 + tf.cast(step, tf.int64))
            with tf.GradientTape() as tape:
                tape.watch(params)
                loss = problems.loss(params, constants, step_seed)
            updates, state = rule.update(tape.gradient(loss, params), state, params, step, loss=loss)
            return step + 1, [p + u for p, u in zip(params, updates)], state, losses.write(step, loss)

        losses = tf.TensorArray(params[0].dtype, size=steps + 1)
        _, params, _, losses = tf.while_loop(lambda step, *_: step < steps, body,
                                             (tf.constant(0), params, state, losses))
        final_seed = tf.random.experimental.stateless_fold_in(seed_k, 2 + steps)
        return losses.write(steps, problems.loss(params, constants, final_seed)).stack()

    return np.stack([one_problem(tf.constant(k, tf.int64)).numpy() for k in range(num_problems)])


def tune_learning_rate(make_rule: Callable[[float], UpdateRule], problems: OptimizationProblems,
                       learning_rates: Sequence[float], num_problems: int = 20, steps: int = 100,
                       seed: int = 0) -> tuple[float, dict]:
    """The learning rate of `learning_rates` whose rule (`make_rule(lr)`) reaches the lowest mean final loss on
    `num_problems` validation problems, and the mean final loss of each (non-finite for rates that diverge)."""
    finals = {}
    for rate in learning_rates:
        curves = loss_curves(make_rule(rate), problems, num_problems, steps, stream=VALIDATION_STREAM, seed=seed)
        finals[float(rate)] = float(np.mean(curves[:, -1]))
    finite = {r: f for r, f in finals.items() if np.isfinite(f)}
    if not finite:
        raise FloatingPointError(f"every learning rate of {list(learning_rates)} diverged on the validation problems.")
    return min(finite, key=finite.get), finals
