"""The engine's extension points (docs/architecture.md): the inner step and the update rules' extra arguments,
the inner and outer objectives, the meta-gradient layout."""

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import random_episodes

import tfmeta


def linear_learner(features=2, dtype="float64"):
    inputs = keras.Input((features,), dtype=dtype)
    return keras.Model(inputs, keras.layers.Dense(1, dtype=dtype, name="head")(inputs))


@keras.saving.register_keras_serializable(package="tfmeta_tests")
class LossScaledSgd(tfmeta.update_rules.UpdateRule):
    """update = -rate · loss · grad: a rule that needs the loss the inner step passes."""

    def __init__(self, rate=0.1, **kwargs):
        super().__init__(**kwargs)
        self.rate = rate

    def update(self, grads, state, params, step, *, loss, **extra):
        return [-self.rate * loss * g for g in grads], state


def test_update_rules_receive_the_support_loss():
    meta = tfmeta.MAML(linear_learner(), update_rule=LossScaledSgd(0.1), inner_steps=2)
    episode = {k: v[0] for k, v in random_episodes(tasks=1).items()}
    fast, slow = meta.read_params()
    adaptation = meta.adapt_episode(fast, slow, [], episode, 2, training=True)
    params = [np.array(p) for p in fast]
    for _ in range(2):  # by hand: the mean squared error of a linear model and its gradient
        x, y = np.array(episode["support_x"]), np.array(episode["support_y"])
        residual = x @ params[0] + params[1] - y
        loss = np.mean(residual ** 2)
        grads = [2 * x.T @ residual / len(x), 2 * residual.mean(axis=0)]
        params = [p - 0.1 * loss * g for p, g in zip(params, grads)]
    for got, expected in zip(adaptation.params, params):
        np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_a_rule_whose_update_takes_no_extra_arguments_is_refused_with_the_reason():
    class OldStyle(tfmeta.update_rules.UpdateRule):
        def update(self, grads, state, params, step):
            return [-g for g in grads], state

    with pytest.raises(TypeError, match=r"`update` must accept `\*\*extra`"):
        tfmeta.MAML(linear_learner(), update_rule=OldStyle())


def test_imaml_adapts_and_meta_learns_on_support_streams():
    """iMAML's Hessian is of the support loss on all of the task's support data: on a stream that repeats one
    batch at every step, the meta-gradient is the one of that batch as a plain support set."""
    episodes = random_episodes(tasks=2, support=4)
    stream = {"stream_x": tf.repeat(episodes["support_x"][:, None], 3, axis=1),
              "stream_y": tf.repeat(episodes["support_y"][:, None], 3, axis=1),
              "query_x": episodes["query_x"], "query_y": episodes["query_y"]}
    learner = linear_learner()
    meta = tfmeta.IMAML(learner, update_rule=tfmeta.Sgd(0.1), inner_steps=3, cg_steps=2)
    expected, _, _ = meta.compute_meta_gradients(episodes)
    got, _, _ = meta.compute_meta_gradients(stream)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    assert any(np.any(np.array(g) != 0) for g in got)
    fast, slow = meta.read_params()
    with pytest.raises(ValueError, match="pass `start`"):  # the proximal term needs the adaptation's start
        meta.inner_objective(fast, slow, [], {k: v[0] for k, v in episodes.items()}, 0, training=True)


def test_meta_gradients_for_lays_out_any_subset_of_the_meta_variables():
    meta = tfmeta.MAML(linear_learner(), update_rule=tfmeta.MetaSGD(0.1))
    kernel, rates = meta.learner.get_layer("head").kernel, meta.update_rule.trainable_variables
    grads = meta.meta_gradients_for([rates[1], kernel], [tf.ones(rates[1].shape, "float64"),
                                                         2 * tf.ones(kernel.shape, "float64")])
    assert [tuple(g.shape) for g in grads] == [tuple(v.shape) for v in meta.meta_variables]
    expected = {id(kernel): 2.0, id(rates[1]): 1.0}
    for variable, grad in zip(meta.meta_variables, grads):
        np.testing.assert_array_equal(grad, np.full(variable.shape, expected.get(id(variable), 0.0)))
    with pytest.raises(ValueError, match="not meta-variables"):
        meta.meta_gradients_for([keras.Variable(1.0)], [tf.ones([])])


# ------------------------------------------------------------------------------------------------------------
# Support data produced by the learner: a two-armed bandit meta-learned by a policy-gradient inner step.


def magic_box(x):
    """DiCE's magic box (Foerster et al., 2018): 1 in value, its gradient multiplies by ∇x."""
    return tf.exp(x - tf.stop_gradient(x))


@keras.saving.register_keras_serializable(package="tfmeta_tests")
class BanditMAML(tfmeta.MAML):
    """MAML-RL on a two-armed bandit through the two objective hooks. An episode is a rollout episode
    (`tfmeta.episodes`): the task's expected reward per arm, {"task": [tasks, 2]}; the learner maps a constant input
    to the policy's logits. The inner objective samples `samples` pulls from the current policy and is the
    score-function surrogate −mean(log π(a) r(a)); the outer objective samples one pull from the adapted policy.
    The expected post-adaptation return depends on θ also through the distribution of the pre-update pulls: with
    `dice=True` the outer objective's magic box covers their log-probabilities under the policy that sampled them
    (`start`), which supplies that term (DiCE; ProMP's correct MAML-RL estimator); `dice=False` is the naive
    surrogate that omits it."""

    def __init__(self, learner, samples=2, dice=True, **kwargs):
        super().__init__(learner, **kwargs)
        self.samples, self.dice = samples, dice

    def check_episodes(self, episodes):
        if tfmeta.episodes.kind_of(episodes) != "rollout":
            raise ValueError(f"BanditMAML takes rollout episodes ('task': rewards [tasks, 2]); got {sorted(episodes)}.")
        return {"task": tf.ensure_shape(tf.convert_to_tensor(episodes["task"]), [None, 2])}

    def pulls(self, params, slow, state, seed, count):
        logits, _ = self.forward(params, slow, state, tf.ones([1, 1], params[0].dtype), training=False)
        arms = tf.random.stateless_categorical(logits, count, seed)[0]
        return tf.gather(tf.nn.log_softmax(logits[0]), arms), arms

    def inner_objective(self, fast, slow, state, episode, step, *, training, seed=None, start=None):
        log_probs, arms = self.pulls(fast, slow, state, tf.random.experimental.stateless_fold_in(seed, step),
                                     self.samples)
        return -tf.reduce_mean(log_probs * tf.gather(episode["task"], arms)), state

    def outer_objective(self, fast, slow, state, episode, *, training, step=None, seed=None, start=None):
        log_probs, arms = self.pulls(fast, slow, state, tf.random.experimental.stateless_fold_in(seed, -1), 1)
        if self.dice:  # the pre-update pulls (inner step 0, the same seed), under the policy that drew them
            pre, _ = self.pulls(start, slow, state, tf.random.experimental.stateless_fold_in(seed, 0), self.samples)
            log_probs += tf.reduce_sum(pre)
        rewards = tf.gather(episode["task"], arms)
        return -tf.reduce_mean(magic_box(log_probs) * rewards), {}, state


THETA, REWARDS, ALPHA, PULLS = np.array([[0.3, -0.2]]), np.array([1.0, 0.2]), 1.0, 2


def bandit(dice=True):
    inputs = keras.Input((1,), dtype="float64")
    logits = keras.layers.Dense(2, use_bias=False, dtype="float64", kernel_initializer=keras.initializers.Constant(
        THETA))(inputs)
    return BanditMAML(keras.Model(inputs, logits), samples=PULLS, dice=dice, update_rule=tfmeta.Sgd(ALPHA))


def exact_bandit_meta_gradient():
    """The gradient in θ of the expected post-adaptation loss −E_{a~π_θ}[Σ_b π_θ'(a)(b) r(b)], with
    θ'(a) = θ + α mean_i r(a_i) ∇log π_θ(a_i), by enumerating the 2^PULLS pre-update pulls."""
    theta = tf.Variable(THETA)
    with tf.GradientTape() as tape:
        p = tf.nn.softmax(theta[0])
        expected = 0.0
        for arms in itertools.product([0, 1], repeat=PULLS):
            probability = tf.reduce_prod(tf.gather(p, list(arms)))
            step = tf.add_n([REWARDS[a] * (tf.one_hot(a, 2, dtype=tf.float64) - p) for a in arms]) / PULLS
            expected += probability * tf.reduce_sum(tf.nn.softmax(theta[0] + ALPHA * step) * REWARDS)
        loss = -expected
    return tape.gradient(loss, theta).numpy()[0]


def per_task_meta_gradients(meta, tasks):
    seeds = tf.random.experimental.stateless_split(tf.constant([1, 2], tf.int64), tasks)
    one = tf.function(lambda seed: meta.task_gradients({"task": tf.constant(REWARDS)}, [], seed)[0][0][0])
    return tf.map_fn(one, seeds, fn_output_signature=tf.TensorSpec([2], tf.float64)).numpy()


def test_bandit_meta_gradient_matches_the_enumerated_exact_gradient_including_the_sampling_term():
    exact = exact_bandit_meta_gradient()
    tasks = 8000
    correct, naive = per_task_meta_gradients(bandit(dice=True), tasks), per_task_meta_gradients(bandit(False), tasks)
    for grads in (correct, naive):
        np.testing.assert_allclose(grads.sum(axis=1), 0, atol=1e-12)  # softmax logits: the two coordinates cancel
    error = lambda grads: abs(grads[:, 0].mean() - exact[0]) / (grads[:, 0].std() / np.sqrt(tasks))  # noqa: E731
    assert error(correct) < 4, (correct[:, 0].mean(), exact[0])
    assert error(naive) > 10, (naive[:, 0].mean(), exact[0])  # the naive surrogate misses the sampling term
    # The engine's meta-batch path: the mean over a batch of tasks, each with its own seed.
    grads, _, _ = bandit().compute_meta_gradients({"task": tf.constant(np.tile(REWARDS, (tasks, 1)))})
    assert abs(grads[0][0, 0] - exact[0]) < 4 * correct[:, 0].std() / np.sqrt(tasks)


def imaml_with_a_loss_scaled_rule():
    return tfmeta.IMAML(linear_learner(), update_rule=LossScaledSgd(0.1), inner_steps=2, cg_steps=2)


def fresh_start_with_a_recurrent_rule():
    return FreshStart(linear_learner(), update_rule=RecurrentRule(), inner_steps=2)


@pytest.mark.parametrize("make, xla", [(bandit, False), (imaml_with_a_loss_scaled_rule, True),
                                       (fresh_start_with_a_recurrent_rule, False)],
                         ids=["bandit_objectives", "imaml_inner_objective_and_rule_extra_args",
                              "fresh_start_task_gradients_and_recurrent_rule"])
def test_hooks_give_the_same_meta_gradient_eagerly_in_a_tf_function_and_under_xla(make, xla):
    """Under XLA, TensorFlow's stateless random ops draw other numbers than its CPU kernels, so the hooks that sample
    (the bandit's pulls, fresh parameters) are compared eagerly and in a `tf.function` only."""
    meta = make()
    task = {"task": tf.constant(REWARDS)} if isinstance(meta, BanditMAML) else {
        k: v[0] for k, v in random_episodes(tasks=1).items()}
    seed = tf.constant([3, 4], tf.int64)
    run = lambda: meta.task_gradients(task, [], seed)[0]  # noqa: E731
    eager = [g.numpy() for g in run()]
    modes = [tf.function(run)] + ([tf.function(run, jit_compile=True)] if xla else [])
    for mode in modes:
        for got, expected in zip(mode(), eager):
            np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)
    assert any(np.any(g != 0) for g in eager)


# ------------------------------------------------------------------------------------------------------------
# A learned update rule with per-coordinate recurrent state that receives the loss, meta-learned from fresh
# parameters per task (the initialisation is not meta-learned).


@keras.saving.register_keras_serializable(package="tfmeta_tests")
class RecurrentRule(tfmeta.update_rules.UpdateRule):
    """Per coordinate, h' = tanh(a·g + b·loss + c·h) and update = −exp(s)·(g + d·h'), with meta-learned a, b, c, d, s
    shared by all coordinates."""

    def build(self, param_shapes):
        self.coefficients = self.add_weight(shape=(4,), initializer=keras.initializers.Constant([1.0, 0.5, 0.5, 0.1]),
                                            name="coefficients", dtype="float64")
        self.log_rate = self.add_weight(shape=(), initializer=keras.initializers.Constant(np.log(0.05)),
                                        name="log_rate", dtype="float64")
        super().build(param_shapes)

    def init_state(self, params, *, training=True, seed=None):
        return tuple(tf.zeros_like(p) for p in params)

    def update(self, grads, state, params, step, *, loss, **extra):
        a, b, c, d = tf.unstack(self.coefficients)
        hidden = tuple(tf.tanh(a * g + b * loss + c * h) for g, h in zip(grads, state))
        return [-tf.exp(self.log_rate) * (g + d * h) for g, h in zip(grads, hidden)], hidden


@keras.saving.register_keras_serializable(package="tfmeta_tests")
class FreshStart(tfmeta.MetaLearner):
    """Meta-learns only the update rule: every task starts from fresh parameters drawn with its seed (the per-task
    meta-gradient is what it overrides)."""

    def task_gradients(self, episode, state, seed):
        _, slow = self.read_params()
        fast = [0.5 * tf.random.stateless_normal(v.shape, seed, dtype=v.dtype) for v in self.partitioned_variables()[0]]
        rule_variables = self.update_rule.trainable_variables
        with tf.GradientTape() as tape:
            adaptation = self.adapt_episode(fast, slow, state, episode, self.inner_steps, training=True, seed=seed)
            loss, logs, state = self.outer_objective(adaptation.params, slow, adaptation.state, episode,
                                                     training=True, seed=seed, start=fast)
        return self.meta_gradients_for(rule_variables, tape.gradient(loss, rule_variables)), {"loss": loss}, state

    def train_log_names(self):
        return ["loss"]


def linear_tasks(tasks, seed):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(tasks, 2, 1))
    x = rng.normal(size=(tasks, 20, 2))
    episodes = {"support_x": x[:, :10], "query_x": x[:, 10:]}
    episodes.update(support_y=x[:, :10] @ w, query_y=x[:, 10:] @ w)
    return {k: tf.constant(v) for k, v in episodes.items()}


def test_a_recurrent_rule_that_receives_the_loss_is_meta_learned_from_fresh_parameters():
    meta = FreshStart(linear_learner(), update_rule=RecurrentRule(), inner_steps=3)
    episodes = linear_tasks(4, seed=0)
    rule = meta.update_rule
    meta.task_seeds.state.assign([7, 0])  # the same seeds, hence the same fresh parameters, in every evaluation
    grads, _, _ = meta.compute_meta_gradients(episodes)
    by_variable = dict(zip([id(v) for v in meta.meta_variables], grads))
    assert all(np.all(np.array(by_variable[id(v)]) == 0) for v in meta.learner.trainable_variables)
    analytic = [np.array(by_variable[id(v)]) for v in rule.trainable_variables]

    def loss_at(values):
        for variable, value in zip(rule.trainable_variables, values):
            variable.assign(value)
        meta.task_seeds.state.assign([7, 0])
        return float(meta.compute_meta_gradients(episodes)[1]["loss"])

    base = [np.array(v) for v in rule.trainable_variables]
    eps = 1e-6
    for i, value in enumerate(base):
        for index in np.ndindex(value.shape):
            up, down = [b.copy() for b in base], [b.copy() for b in base]
            up[i][index] += eps
            down[i][index] -= eps
            numeric = (loss_at(up) - loss_at(down)) / (2 * eps)
            np.testing.assert_allclose(analytic[i][index], numeric, rtol=1e-5, atol=1e-9)
    loss_at(base)
    assert analytic[0][1] != 0  # the loss input's coefficient is learned

    held_out = linear_tasks(50, seed=1)
    before = float(tf.reduce_mean(meta.evaluate_tasks(held_out)["loss"][:, -1]))
    meta.compile(keras.optimizers.Adam(0.05))
    meta.fit(tf.data.Dataset.from_tensor_slices(linear_tasks(400, seed=2)).batch(8), epochs=1, verbose=0)
    after = float(tf.reduce_mean(meta.evaluate_tasks(held_out)["loss"][:, -1]))
    assert after < 0.7 * before, (before, after)


# ------------------------------------------------------------------------------------------------------------
# The public functional API, as the README's custom training loop uses it.


def test_the_readme_custom_training_loop_gives_maml_meta_gradient():
    tasks = tfmeta.tasks.SineTasks(num_support=10)
    meta = tfmeta.MAML(tfmeta.models.mlp(hidden_units=(40, 40)), update_rule=tfmeta.Sgd(0.01))
    episodes = next(iter(tasks.dataset(meta_batch_size=4, seed=0)))
    with tf.GradientTape() as tape:  # the README's loop body, verbatim
        fast, slow = meta.read_params()                          # the learner's values, differentiable
        state, loss = meta.read_state(), 0.0
        for i in range(4):
            x, y = episodes["support_x"][i], episodes["support_y"][i]

            def support_loss(params, state, step):               # any loss of the parameters
                outputs, state = meta.forward(params, slow, state, x, training=True)
                return tf.reduce_mean(tf.square(outputs - y)), state

            adapted = tfmeta.inner_loop(support_loss, fast, state, meta.update_rule, steps=1).params
            outputs, _ = meta.forward(adapted, slow, state, episodes["query_x"][i], training=True)
            loss += tf.reduce_mean(tf.square(outputs - episodes["query_y"][i])) / 4
    grads = tape.gradient(loss, meta.meta_variables)
    expected, logs, _ = meta.compute_meta_gradients(episodes)
    np.testing.assert_allclose(loss, logs["loss"], rtol=1e-5)
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_register_makes_an_algorithm_serializable_and_gin_configurable(tmp_path):
    import gin

    @tfmeta.register(package="tfmeta_tests")
    class TwoStepMAML(tfmeta.MAML):
        def __init__(self, learner, **kwargs):
            kwargs.setdefault("inner_steps", 2)
            super().__init__(learner, **kwargs)

    with gin.unlock_config():
        gin.parse_config("TwoStepMAML.eval_inner_steps = 7")
    try:
        meta = gin.get_configurable("tfmeta_tests.TwoStepMAML")(tfmeta.models.mlp(hidden_units=(8,)))
    finally:
        gin.clear_config()
    assert (meta.inner_steps, meta.eval_inner_steps) == (2, 7)
    meta.save(tmp_path / "meta.keras")
    restored = keras.models.load_model(tmp_path / "meta.keras")
    assert type(restored).__name__ == "TwoStepMAML" and restored.eval_inner_steps == 7
