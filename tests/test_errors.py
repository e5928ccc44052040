"""Bad input raises ValueError/TypeError naming the argument."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import random_episodes

import tfmeta
from tfmeta.experiment import Experiment


@pytest.fixture
def meta():
    return tfmeta.MAML(tfmeta.models.mlp(input_shape=(2,)))


def test_support_and_query_with_different_feature_shapes(meta):
    episodes = random_episodes(dtype="float32")
    episodes["query_x"] = tf.zeros([3, 7, 3])
    with pytest.raises(ValueError, match=r"support and query features differ.*query_x"):
        meta.compute_meta_gradients(episodes)
    with pytest.raises(ValueError, match="query_x"):
        meta.evaluate_tasks(episodes)


def test_mismatched_example_counts_and_missing_keys(meta):
    episodes = random_episodes(dtype="float32")
    episodes["support_y"] = tf.zeros([3, 4, 1])
    with pytest.raises(ValueError, match=r"episodes\['support_x'\] and episodes\['support_y'\]"):
        meta.compute_meta_gradients(episodes)
    with pytest.raises(ValueError, match="keys"):
        meta.compute_meta_gradients({"support_x": tf.zeros([1, 1, 2])})


def test_k_below_one():
    with pytest.raises(ValueError, match="num_support"):
        tfmeta.tasks.SineTasks(num_support=0)
    with pytest.raises(ValueError, match="num_query"):
        tfmeta.tasks.SineTasks(num_support=5, num_query=0)
    meta = tfmeta.MAML(tfmeta.models.mlp(input_shape=(2,)))
    with pytest.raises(ValueError, match="K must be >= 1"):
        meta.compute_meta_gradients(random_episodes(support=0, dtype="float32"))
    with pytest.raises(ValueError, match="support_x"):
        meta.adapt(np.zeros((0, 2), "float32"), np.zeros((0, 1), "float32"))


def test_negative_steps(meta):
    with pytest.raises(ValueError, match="inner_steps"):
        tfmeta.MAML(meta.learner, inner_steps=-1)
    with pytest.raises(ValueError, match="eval_inner_steps"):
        tfmeta.MAML(meta.learner, eval_inner_steps=-3)
    with pytest.raises(ValueError, match="steps"):
        meta.adapt(np.zeros((4, 2), "float32"), np.zeros((4, 1), "float32"), steps=-1)
    with pytest.raises(ValueError, match="steps"):
        meta.evaluate_tasks(random_episodes(dtype="float32"), steps=-2)
    with pytest.raises(ValueError, match="inner_steps"):
        tfmeta.Reptile(meta.learner, inner_steps=0)


def test_unbuilt_or_wrong_learner():
    with pytest.raises(ValueError, match="`learner` 'sequential.*' is not built"):
        tfmeta.MAML(keras.Sequential([keras.layers.Dense(1)]))
    with pytest.raises(TypeError, match="learner"):
        tfmeta.MAML(lambda x: x)


def test_update_rule_that_does_not_match_the_partition(meta):
    with pytest.raises(ValueError, match=r"`update_rule` does not match.*2 values of `learning_rate`.*6 fast"):
        tfmeta.MAML(meta.learner, update_rule=tfmeta.Sgd([0.1, 0.1]))
    rule = tfmeta.Sgd(0.1)
    tfmeta.MAML(meta.learner, update_rule=rule)
    with pytest.raises(ValueError, match="`update_rule` does not match.*built for parameters of shapes"):
        tfmeta.MAML(meta.learner, update_rule=rule, partition=tfmeta.Partition(fast="head"))
    with pytest.raises(TypeError, match="update_rule"):
        tfmeta.MAML(meta.learner, update_rule=keras.optimizers.SGD(0.1))
    with pytest.raises(ValueError, match="learning_rate"):
        tfmeta.Sgd(-0.1)
    with pytest.raises(ValueError, match=r"Sgd `momentum` must be in \[0, 1\); got 1.0"):
        tfmeta.Sgd(0.1, momentum=1.0)
    with pytest.raises(ValueError, match="`shared=True`.*needs `per_element=False`"):
        tfmeta.LearnedSgd(0.1, shared=True)


def test_adapt_with_wrong_feature_shape(meta):
    with pytest.raises(ValueError, match=r"`support_x` must have shape \[examples, 2\]"):
        meta.adapt(np.zeros((4, 3), "float32"), np.zeros((4, 1), "float32"))
    with pytest.raises(ValueError, match="same number"):
        meta.adapt(np.zeros((4, 2), "float32"), np.zeros((3, 1), "float32"))


def test_other_bad_arguments(meta):
    with pytest.raises(ValueError, match="query_step_weights"):
        tfmeta.MAML(meta.learner, inner_steps=2, query_step_weights=[1.0])
    with pytest.raises(ValueError, match="task_parallelism"):
        tfmeta.MAML(meta.learner, task_parallelism="threads")
    with pytest.raises(ValueError, match="metrics"):
        tfmeta.MAML(meta.learner, metrics=["no_such_metric"])
    with pytest.raises(ValueError, match="meta_batch_size"):
        tfmeta.tasks.SineTasks().dataset(0)
    with pytest.raises(ValueError, match="amplitude_range"):
        tfmeta.tasks.SineTasks(amplitude_range=(5.0, 0.1))
    with pytest.raises(ValueError, match="num_steps"):
        Experiment(meta_learner=lambda: meta, tasks=tfmeta.tasks.SineTasks(), num_steps=1500, steps_per_epoch=1000)
    with pytest.raises(ValueError, match="`eval_every` must be an integer >= 1; got 0"):
        Experiment(meta_learner=lambda: meta, tasks=tfmeta.tasks.SineTasks(), eval_every=0)


class _ScaledTasks(tfmeta.tasks.SineTasks):
    """Sine tasks whose query targets are multiplied by `scale`: 1e30 overflows the float32 query loss."""

    def __init__(self, scale, **kwargs):
        super().__init__(**kwargs)
        self.scale = scale

    def sample(self, seed, num_tasks):
        episodes = super().sample(seed, num_tasks)
        return {**episodes, "query_y": episodes["query_y"] * self.scale}


@pytest.mark.parametrize("scale, error, message", [
    (1e30, FloatingPointError, r"meta-step \d: non-finite meta-objective \(NaN or inf\) of task 0 of the meta-batch"),
    (np.nan, ValueError, r"at about meta-step \d: episodes `query_y` holds NaN or infinite values"),
])
def test_non_finite_loss_or_data_stops_training_with_a_message(tmp_path, scale, error, message):
    experiment = Experiment(
        meta_learner=lambda: tfmeta.MAML(tfmeta.models.mlp()), tasks=_ScaledTasks(scale), num_steps=20,
        steps_per_epoch=10, validation_tasks=0, verbose=0,
    )
    with pytest.raises(error, match=message):
        experiment.train(str(tmp_path))
    assert not (tmp_path / "checkpoints" / "checkpoint").exists()


def test_a_subclassed_learner_takes_support_streams():
    """Episodes declare a stream by their keys (`tfmeta.episodes`), never by a tensor's rank, so a learner without
    symbolic inputs takes streams too: a stream of copies of the support set meta-learns as the support set does."""
    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(1)

        def call(self, x):
            return self.dense(x)

    learner = Subclassed()
    learner(np.zeros((1, 2), "float32"))
    episodes = random_episodes(dtype="float32")
    stream = {"stream_x": tf.stack([episodes["support_x"]] * 3, axis=1),  # [tasks, steps, batch, features]
              "stream_y": tf.stack([episodes["support_y"]] * 3, axis=1),
              "query_x": episodes["query_x"], "query_y": episodes["query_y"]}
    meta = tfmeta.MAML(learner, inner_steps=3)
    for got, expected in zip(meta.compute_meta_gradients(stream)[0], meta.compute_meta_gradients(episodes)[0]):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="keys of one of the kinds of tfmeta.episodes"):
        meta.compute_meta_gradients({"support_x": episodes["support_x"], "query_x": episodes["query_x"]})


def test_surface_loss_with_wrong_shapes():
    with pytest.raises(ValueError, match=r"`surface` of shape \[..., 7\].*got \(1, 6\) and \(1, 2\)"):
        tfmeta.tasks.surface_loss(tf.zeros([1, 6]), tf.zeros([1, 2]))
    with pytest.raises(ValueError, match=r"`point` of\s+shape \[..., 2\]"):
        tfmeta.tasks.surface_loss(tf.zeros([1, 7]), tf.zeros([1, 3]))
