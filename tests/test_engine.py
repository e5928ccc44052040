"""The adaptation engine: functional inner loops, partitions, state threading, adapt, Keras integration."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import classification_episodes, random_episodes, values

import tfmeta


def sine_meta(**kwargs):
    return tfmeta.MAML(tfmeta.models.mlp(), update_rule=tfmeta.Sgd(0.01), **kwargs)


def sine_episodes(tasks=4, seed=0):
    return tfmeta.tasks.SineTasks(10).sample(tf.constant([seed, 0], tf.int64), tasks)


def conv_meta(**kwargs):
    learner = tfmeta.models.conv_net(input_shape=(6, 6, 1), outputs=3, filters=4, blocks=2)
    return tfmeta.MAML(learner, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                       metrics=["sparse_categorical_accuracy"], update_rule=tfmeta.Sgd(0.4), **kwargs)


def test_inner_loops_never_change_the_learner_variables():
    meta = conv_meta(inner_steps=2, eval_inner_steps=3)
    episodes = classification_episodes(dtype="float32")
    before = values(meta.learner.variables)
    meta.compute_meta_gradients(episodes)
    meta.evaluate_tasks(episodes)
    meta.adapt(episodes["support_x"][0], episodes["support_y"][0])
    for a, b in zip(before, values(meta.learner.variables)):
        np.testing.assert_array_equal(a, b)


def test_adapt_returns_a_keras_model_equal_to_the_functional_adapted_forward_pass(tmp_path):
    meta = conv_meta(eval_inner_steps=3)
    episodes = classification_episodes(dtype="float32")
    sx, sy, qx = episodes["support_x"][0], episodes["support_y"][0], episodes["query_x"][0]
    adapted = meta.adapt(sx, sy)
    fast, slow = meta.read_params()
    state = values(meta.learner.non_trainable_variables)
    adaptation = meta.adapt_params(fast, slow, state, sx, sy, 3, training=False)
    expected, _ = meta.forward(adaptation.params, slow, state, qx, training=False)
    np.testing.assert_allclose(adapted.predict(qx, verbose=0), expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(meta.learner.predict(qx, verbose=0), expected)

    path = str(tmp_path / "adapted.keras")
    adapted.save(path)
    np.testing.assert_allclose(keras.models.load_model(path).predict(qx, verbose=0), expected, rtol=1e-5, atol=1e-6)

    adapted.compile(keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    weights = values(adapted.trainable_variables)
    adapted.fit(sx, sy, epochs=1, verbose=0)
    assert any(not np.allclose(a, b) for a, b in zip(weights, values(adapted.trainable_variables)))


def test_partition_limits_adaptation_to_fast_variables():
    learner = tfmeta.models.mlp()
    meta = tfmeta.MAML(learner, partition=tfmeta.Partition(fast="head"), update_rule=tfmeta.Sgd(0.1))
    episodes = sine_episodes()
    adapted = meta.adapt(episodes["support_x"][0], episodes["support_y"][0], steps=2)
    for original, new in zip(learner.trainable_variables, adapted.trainable_variables):
        changed = not np.allclose(np.array(tf.convert_to_tensor(original)), np.array(tf.convert_to_tensor(new)))
        assert changed == original.path.startswith("head/"), original.path
    # Slow variables are still meta-learned: their meta-gradients are non-zero.
    grads, _, _ = meta.compute_meta_gradients(episodes)
    assert all(float(tf.reduce_sum(tf.abs(g))) > 0 for g in grads)


def test_partition_selectors():
    learner = tfmeta.models.mlp()
    paths = [v.path for v in learner.trainable_variables]
    assert paths == ["hidden_0/kernel", "hidden_0/bias", "hidden_1/kernel", "hidden_1/bias", "head/kernel", "head/bias"]
    assert tfmeta.Partition(slow="head").mask(learner) == (True,) * 4 + (False,) * 2
    assert tfmeta.Partition(fast=["hidden_*/kernel"]).mask(learner) == (True, False, True, False, False, False)
    assert tfmeta.Partition(fast=lambda v: v.path.endswith("bias")).mask(learner) == (False, True) * 3
    with pytest.raises(ValueError, match="matches no trainable variable"):
        tfmeta.Partition(fast="body").mask(learner)
    with pytest.raises(ValueError, match="selects no fast variable"):
        tfmeta.Partition(fast="head", slow="head").mask(learner)


def test_batch_norm_statistics_move_and_dropout_masks_differ_per_task_and_step():
    inputs = keras.Input((3,))
    h = keras.layers.Dense(16, activation="relu")(inputs)
    h = keras.layers.Dropout(0.5)(h)
    h = tfmeta.layers.BatchNormalization()(h)
    learner = keras.Model(inputs, keras.layers.Dense(1)(h))
    meta = tfmeta.MAML(learner, update_rule=tfmeta.Sgd(0.1))
    meta.compile(keras.optimizers.SGD(0.0))  # meta-steps that change only the state, not the weights
    one = random_episodes(tasks=1, features=(3,), dtype="float32")
    two = {k: tf.concat([v, v], 0) for k, v in one.items()}
    # Two copies of the same task: equal grads would mean both copies drew the same dropout masks.
    grads_one = meta.compute_meta_gradients(one)[0]
    grads_two = meta.compute_meta_gradients(two)[0]
    assert any(not np.allclose(a, b) for a, b in zip(grads_one, grads_two))
    state = values(learner.non_trainable_variables)
    meta.train_step(two)
    moved = values(learner.non_trainable_variables)
    assert all(not np.array_equal(a, b) for a, b in zip(state, moved))  # the seed and both statistics
    # The next meta-step draws new masks: same weights and data, different meta-gradients.
    second = meta.compute_meta_gradients(two)[0]
    assert any(not np.allclose(a, b) for a, b in zip(grads_two, second))


def test_fit_evaluate_and_callbacks(tmp_path):
    meta = sine_meta(eval_inner_steps=5)
    meta.compile(keras.optimizers.Adam(1e-3))
    data = tfmeta.tasks.SineTasks(10).dataset(8, seed=0)
    callbacks = [
        keras.callbacks.ModelCheckpoint(str(tmp_path / "meta.keras")),
        keras.callbacks.ModelCheckpoint(str(tmp_path / "meta.weights.h5"), save_weights_only=True),
        keras.callbacks.TensorBoard(str(tmp_path / "logs")),
        keras.callbacks.BackupAndRestore(str(tmp_path / "backup"), delete_checkpoint=False),
    ]
    keras.utils.set_random_seed(0)
    twin = sine_meta(eval_inner_steps=5)  # the same initialisation, updated step by step by hand
    twin.compile(keras.optimizers.Adam(1e-3))
    twin.optimizer.build(twin.meta_variables)
    history = meta.fit(data, epochs=2, steps_per_epoch=5, callbacks=callbacks, verbose=0)
    losses = []
    for episodes in data.take(10):
        grads, step_logs, state = twin.compute_meta_gradients(episodes)
        twin.update(grads, twin.meta_variables, state)
        losses.append(float(step_logs["loss"]))
    # fit logs each epoch's mean query loss after adaptation and applies the same meta-updates
    np.testing.assert_allclose(history.history["loss"], [np.mean(losses[:5]), np.mean(losses[5:])], rtol=1e-5)
    for a, b in zip(meta.meta_variables, twin.meta_variables):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-6)
    evaluation_data = tfmeta.tasks.SineTasks(10).dataset(20, seed=1, num_batches=2)
    logs = meta.evaluate(evaluation_data, return_dict=True, verbose=0)
    per_task = [meta.evaluate_tasks(episodes) for episodes in evaluation_data]
    assert set(logs) == {"loss", "pre_adapt_loss"}
    np.testing.assert_allclose([logs["pre_adapt_loss"], logs["loss"]],
                               np.mean([r["loss"].numpy() for r in per_task], axis=(0, 1)), rtol=1e-5)
    assert os.listdir(tmp_path / "logs")
    assert (tmp_path / "backup" / "latest.weights.h5").exists()

    episodes = sine_episodes()
    restored = keras.models.load_model(str(tmp_path / "meta.keras"))
    assert isinstance(restored, tfmeta.MAML) and restored.eval_inner_steps == 5
    np.testing.assert_allclose(restored.evaluate_tasks(episodes)["loss"], meta.evaluate_tasks(episodes)["loss"],
                               rtol=1e-6)
    # BackupAndRestore resumes a new run from the backup: weights and optimizer state.
    resumed = sine_meta(eval_inner_steps=5)
    resumed.compile(keras.optimizers.Adam(1e-3))
    resumed.fit(data, epochs=2, steps_per_epoch=5, verbose=0,
                callbacks=[keras.callbacks.BackupAndRestore(str(tmp_path / "backup"), delete_checkpoint=False)])
    assert int(resumed.optimizer.iterations) == 10
    np.testing.assert_allclose(resumed.evaluate_tasks(episodes)["loss"], meta.evaluate_tasks(episodes)["loss"],
                               rtol=1e-6)


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("optimizer", ["adam", "sgd", "rmsprop", "adamw"])
def test_compiles_with_any_keras_optimizer_with_and_without_xla(optimizer, jit_compile):
    meta = sine_meta(metrics=["mean_absolute_error"])
    meta.compile(keras.optimizers.get({"class_name": optimizer, "config": {"learning_rate": 1e-3}}),
                 jit_compile=jit_compile)
    before = values(meta.meta_variables)
    history = meta.fit(tfmeta.tasks.SineTasks(10).dataset(5, seed=0), epochs=1, steps_per_epoch=3, verbose=0)
    assert set(history.history) == {"loss", "mean_absolute_error"}
    assert all(not np.array_equal(a, b) for a, b in zip(before, values(meta.meta_variables)))


def test_multi_step_query_loss_weights():
    meta = tfmeta.MAML(tfmeta.models.mlp(), inner_steps=3, query_step_weights=[0.0, 0.0, 1.0])
    plain = tfmeta.MAML(meta.learner, inner_steps=3)
    episodes = sine_episodes()
    for a, b in zip(meta.compute_meta_gradients(episodes)[0], plain.compute_meta_gradients(episodes)[0]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    weighted = tfmeta.MAML(meta.learner, inner_steps=3, query_step_weights=[0.2, 0.3, 0.5])
    weighted_grads = weighted.compute_meta_gradients(episodes)[0]
    assert not np.allclose(weighted_grads[0], plain.compute_meta_gradients(episodes)[0][0])


def test_update_rules_compose():
    meta = tfmeta.MAML(tfmeta.models.mlp(), update_rule=tfmeta.Chain([tfmeta.ClipByGlobalNorm(1e-3), tfmeta.Sgd(1.0)]))
    episodes = sine_episodes()
    fast, slow = meta.read_params()
    adaptation = meta.adapt_params(fast, slow, [], episodes["support_x"][0], episodes["support_y"][0], 1, training=True)
    step = tf.linalg.global_norm([a - b for a, b in zip(adaptation.params, fast)])
    assert float(step) == pytest.approx(1e-3, rel=1e-4)
    per_variable = tfmeta.MAML(meta.learner, update_rule=tfmeta.Sgd([0.0] * 5 + [0.1]))
    adaptation = per_variable.adapt_params(fast, slow, [], episodes["support_x"][0], episodes["support_y"][0], 1,
                                           training=True)
    assert [bool(np.any(np.array(a) != np.array(b))) for a, b in zip(adaptation.params, fast)] == [False] * 5 + [True]


def test_batch_norm_test_time_policies():
    x = np.random.default_rng(0).normal(2.0, 3.0, size=(16, 4)).astype("float32")
    batch = tfmeta.layers.BatchNormalization(statistics="batch")
    running = tfmeta.layers.BatchNormalization(statistics="running")
    for layer in (batch, running):
        layer.build((None, 4))
    normalized = np.array(batch(x, training=False))  # MAML's policy: the batch's own statistics
    np.testing.assert_allclose(normalized.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(normalized.std(0), 1.0, atol=1e-3)
    np.testing.assert_array_equal(np.array(tf.convert_to_tensor(batch.moving_mean)), 0.0)  # inference: no update
    np.testing.assert_allclose(running(x, training=False), x / np.sqrt(1 + running.epsilon), rtol=1e-6)
    running(x, training=True)  # training: batch statistics, and the moving averages move
    assert np.all(np.array(tf.convert_to_tensor(running.moving_mean)) > 0)
    with pytest.raises(ValueError, match="statistics"):
        tfmeta.layers.BatchNormalization(statistics="moving")


def test_train_and_test_on_batch():
    meta = sine_meta()
    meta.compile(keras.optimizers.Adam(1e-3))
    episodes = sine_episodes()
    assert set(meta.train_on_batch(episodes, return_dict=True)) == {"loss"}
    assert set(meta.test_on_batch(episodes, return_dict=True)) == {"loss", "pre_adapt_loss"}


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
def test_every_train_function_takes_the_same_meta_steps(jit_compile):
    """`fit`'s lean train function (one step per call, default strategy) and Keras' own (`train_on_batch`,
    `steps_per_execution`) give the same weights after the same episodes; a finite dataset ends each epoch."""
    batches = [sine_episodes(tasks=3, seed=seed) for seed in range(3)]
    dataset = tf.data.Dataset.from_tensor_slices({k: tf.stack([b[k] for b in batches]) for k in batches[0]})
    weights = []
    for run in ("fit", "steps_per_execution", "train_on_batch"):
        keras.utils.set_random_seed(0)
        meta = sine_meta()
        meta.compile(keras.optimizers.Adam(1e-2), jit_compile=jit_compile,
                     steps_per_execution=3 if run == "steps_per_execution" else 1)
        if run == "train_on_batch":
            for _ in range(2):
                for episodes in batches:
                    meta.train_on_batch(episodes)
        else:
            history = meta.fit(dataset, epochs=2, verbose=0)
            assert len(history.history["loss"]) == 2
        assert int(meta.optimizer.iterations) == 6
        weights.append(values(meta.learner.trainable_variables))
    for other in weights[1:]:
        for a, b in zip(weights[0], other):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rule", [tfmeta.Sgd(0.1), tfmeta.InnerAdam(0.05)], ids=["sgd", "adam"])
def test_while_loop_inner_loop_equals_the_unrolled_first_order_one(rule):
    """`unroll=False` (a tf.while_loop) gives the unrolled loop's parameters, losses, trajectory, gradients and
    update-rule states, eagerly and in a tf.function."""
    rng = np.random.default_rng(0)
    params = [tf.constant(rng.normal(size=(3, 2))), tf.constant(rng.normal(size=2))]
    x, y = tf.constant(rng.normal(size=(7, 3))), tf.constant(rng.normal(size=(7, 2)))
    rule.check_params([p.shape for p in params])

    def loss_fn(p, state, step):  # a stream: batch `step` of 7 single examples, cycling
        i = step % 7
        return tf.reduce_mean((x[i:i + 1] @ p[0] + p[1] - y[i:i + 1]) ** 2), state

    def run(unroll):
        a = tfmeta.inner_loop(loss_fn, params, [], rule, 9, first_order=True, keep_trajectory=True, unroll=unroll)
        return [a.params, a.losses, a.trajectory, a.grads, a.rule_states]

    expected = run(True)
    for result in (run(False), tf.function(lambda: run(False))()):
        for a, b in zip(tf.nest.flatten(expected), tf.nest.flatten(result)):
            np.testing.assert_allclose(a, b, rtol=1e-12)


@pytest.mark.parametrize("algorithm", ["Reptile", "Leap"])
def test_meta_learners_agree_with_and_without_unrolled_inner_loops(algorithm):
    """One meta-step and an evaluation curve are the same with `unroll_inner_loop` True and False."""
    def build(unroll):
        keras.utils.set_random_seed(3)
        return getattr(tfmeta, algorithm)(tfmeta.models.mlp(hidden_units=(8, 8), dtype="float64"),
                                          update_rule=tfmeta.Sgd(0.01), inner_steps=4, unroll_inner_loop=unroll)

    episodes = sine_episodes()
    results = []
    for unroll in (True, False):
        meta = build(unroll)
        meta.compile(optimizer=keras.optimizers.SGD(0.1))
        logs = meta.train_on_batch(episodes, return_dict=True)
        curve = tf.function(lambda e, meta=meta: meta.evaluate_tasks(e, steps=6, at_steps=range(7)))(episodes)
        results.append((logs, values(meta.learner.variables), curve))
    for a, b in zip(tf.nest.flatten(results[0]), tf.nest.flatten(results[1])):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_second_order_meta_gradients_need_unrolled_inner_loops():
    with pytest.raises(ValueError, match="needs `unroll_inner_loop=True`"):
        tfmeta.MAML(tfmeta.models.mlp(), unroll_inner_loop=False)
    with pytest.raises(ValueError, match="needs `unroll_inner_loop=True`"):
        tfmeta.WarpGrad(tfmeta.models.mlp(), init_objective="maml", unroll_inner_loop=False)


class _ActivityPenalty(keras.layers.Layer):
    """Adds `weight` times the mean squared activation of its input with `add_loss`."""

    def __init__(self, weight, **kwargs):
        super().__init__(**kwargs)
        self.weight = weight

    def call(self, x):
        self.add_loss(self.weight * tf.reduce_mean(tf.square(x)))
        return x


def regularised_mlp(l2=100.0, activity=0.5):
    inputs = keras.Input((2,), dtype="float64")
    h = keras.layers.Dense(4, activation="tanh", kernel_regularizer=keras.regularizers.L2(l2), dtype="float64",
                           name="hidden")(inputs)
    h = _ActivityPenalty(activity, dtype="float64")(h)
    return keras.Model(inputs, keras.layers.Dense(1, dtype="float64", name="head")(h))


def test_keras_losses_count_in_the_inner_and_outer_objectives():
    """A learner's `kernel_regularizer` and `add_loss` terms are part of the task objective at the adapted
    parameters: the inner step is SGD on loss + penalties, the query loss includes them at the adapted weights,
    and the second-order meta-gradient of the whole matches finite differences."""
    from test_gradients import check_finite_differences

    learner = regularised_mlp()
    episodes = random_episodes(tasks=2)
    meta = tfmeta.MAML(learner, update_rule=tfmeta.Sgd(0.001), inner_steps=1)
    task = {k: v[0] for k, v in episodes.items()}
    fast, slow = meta.read_params()

    def objective(params, x, y):
        kernel, bias, head_kernel, head_bias = params
        h = tf.tanh(x @ kernel + bias)
        mse = tf.reduce_mean(tf.square(h @ head_kernel + head_bias - y))
        return mse + 100.0 * tf.reduce_sum(tf.square(kernel)) + 0.5 * tf.reduce_mean(tf.square(h))

    with tf.GradientTape() as tape:
        tape.watch(fast)
        support = objective(fast, task["support_x"], task["support_y"])
    adapted = [p - 0.001 * g for p, g in zip(fast, tape.gradient(support, fast))]
    result = meta.adapt_params(fast, slow, [], task["support_x"], task["support_y"], 1, training=True)
    assert float(result.losses[0]) == pytest.approx(float(support), rel=1e-12)
    for a, b in zip(result.params, adapted):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    query, _, _ = meta.task_objective(result.params, slow, [], task["query_x"], task["query_y"], training=True)
    assert float(query) == pytest.approx(float(objective(adapted, task["query_x"], task["query_y"])), rel=1e-12)
    grads, logs, _ = meta.compute_meta_gradients(episodes)
    check_finite_differences(meta, episodes, grads)
    # The penalties matter: the same network without them adapts and scores differently.
    plain = tfmeta.MAML(regularised_mlp(l2=0.0, activity=0.0), update_rule=tfmeta.Sgd(0.001))
    plain.learner.set_weights(learner.get_weights())
    assert float(plain.compute_meta_gradients(episodes)[1]["loss"]) < float(logs["loss"]) - 1.0


def test_metric_learners_add_the_embeddings_keras_losses():
    inputs = keras.Input((6, 6, 1))
    flat = keras.layers.Flatten()(inputs)
    penalised = keras.Model(inputs, keras.layers.Dense(4, kernel_regularizer=keras.regularizers.L2(10.0))(flat))
    meta = tfmeta.PrototypicalNetwork(penalised)
    episodes = classification_episodes(dtype="float32")
    scores, _, extra = meta.episode_scores(episodes, training=True)
    kernel = penalised.layers[-1].kernel
    assert float(extra) == pytest.approx(10.0 * float(tf.reduce_sum(tf.square(kernel))), rel=1e-5)
    loss = meta.evaluate_tasks(episodes)["loss"][:, 0]
    np.testing.assert_allclose(loss, meta.task_loss(episodes["query_y"], scores).numpy().mean(-1) + float(extra),
                               rtol=1e-5)


class _NoTrainingArgument(keras.Model):
    """A subclassed learner whose `call` takes no `training` argument, as plain Keras allows."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(8, activation="tanh")
        self.head = keras.layers.Dense(1)

    def call(self, x):
        return self.head(self.hidden(x))


def test_a_subclassed_learner_without_a_training_argument_meta_learns():
    learner = _NoTrainingArgument()
    learner(tf.zeros((1, 1)))
    meta = tfmeta.MAML(learner, update_rule=tfmeta.Sgd(0.01), eval_inner_steps=3)
    meta.compile(keras.optimizers.Adam(1e-3))
    history = meta.fit(tfmeta.tasks.SineTasks(5).dataset(4, seed=0), epochs=1, steps_per_epoch=3, verbose=0)
    assert int(meta.optimizer.iterations) == 3 and np.isfinite(history.history["loss"]).all()
    episodes = sine_episodes(tasks=1)
    functional = meta.evaluate_tasks(episodes, steps=3)["loss"][0, -1]
    adapted = meta.adapt(episodes["support_x"][0], episodes["support_y"][0])
    assert float(meta.loss_value(episodes["query_y"][0], adapted(episodes["query_x"][0]))) == pytest.approx(
        float(functional), rel=1e-5)


def test_partition_can_adapt_meta_only_layers():
    learner = tfmeta.warp.insert_warps(tfmeta.models.mlp(hidden_units=(4,)), tfmeta.warp.WarpDense, after="hidden_*")
    warps = [v.path.startswith("warp_") for v in learner.trainable_variables]
    assert tfmeta.Partition().mask(learner) == tuple(not w for w in warps) and any(warps)
    assert tfmeta.Partition(adapt_meta_only=True).mask(learner) == (True,) * len(warps)
    assert tfmeta.Partition(slow="head", adapt_meta_only=True).get_config()["adapt_meta_only"]
    with pytest.raises(TypeError, match="`adapt_meta_only` must be a bool"):
        tfmeta.Partition(adapt_meta_only="yes")
