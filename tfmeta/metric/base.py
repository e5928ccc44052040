"""`MetricLearner`: a meta-learner that classifies each query by comparing it with the embedded support set."""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import keras
import tensorflow as tf

from tfmeta.adapted import BATCH_NORM_POLICIES
from tfmeta.episodic import EpisodicLearner, Metric
from tfmeta.layers import batch_statistics_layers


class MetricLearner(EpisodicLearner):
    """Base class of metric learners: `learner` embeds every image of an episode and `scores` compares the
    query embeddings with the support embeddings, giving one score per query and class (argmax = prediction).

    Labels are 0..N-1 per episode; N is read off each batch's support labels, so a learner trained with more
    ways than it is tested on (as Prototypical Networks are) needs no change. All images of a meta-batch are
    embedded in one call of the learner, in training mode during `fit` (its batch norm statistics are those
    of the meta-batch and its moving averages are updated) and in inference mode in `evaluate` and `adapt`: its
    batch norm must use moving-average statistics at inference (`conv_net(batch_norm_statistics="running")`), so
    that a query is classified the same whichever images it is embedded with; a learner that normalises with batch
    statistics at inference is refused (`evaluate` embeds all tasks of a batch together, `adapt` one task's support
    set: the two could not agree).

    Args:
      learner: the embedding network, any built Keras model.
      loss: per-example loss of (labels, scores); default: cross-entropy with the scores as logits.
      metrics: default: accuracy.
      likelihood: e.g. `tfmeta.likelihoods.Categorical()`, for the query scores' predictive NLL (see
        `EpisodicLearner`).
    """

    def __init__(
        self,
        learner: keras.Model,
        loss: Union[str, Callable] = "scores_cross_entropy",
        metrics: Sequence[Metric] = ("sparse_categorical_accuracy",),
        likelihood=None,
        name: Optional[str] = None,
    ):
        if not getattr(learner, "outputs", None):
            raise ValueError(f"a metric learner's `learner` must be a functional or Sequential Keras model (its "
                             f"output shape sizes the comparison and `adapt` copies it); '{learner.name}' is a "
                             f"subclassed {type(learner).__name__}: wrap it, e.g. keras.Model(inputs, "
                             "embedding(inputs)).")
        super().__init__(learner, loss=loss, metrics=metrics, likelihood=likelihood, name=name)
        transductive = [layer.name for layer in batch_statistics_layers(learner)]
        if transductive:
            raise ValueError(
                f"learner '{learner.name}' normalises with batch statistics at inference ({', '.join(transductive)}: "
                "statistics='batch'): a metric learner's query scores would depend on the other images embedded "
                "with them, and `adapt` could not predict what `evaluate` scores. Use moving averages, e.g. "
                "conv_net(batch_norm_statistics='running').")
        self.built = True  # Nothing to build: stops `fit` from tracing the model on an episode.

    def get_config(self) -> dict:
        config = super().get_config()
        del config["task_parallelism"]  # tasks are embedded together, not mapped
        return config

    def scores(self, support: tf.Tensor, support_y: tf.Tensor, query: tf.Tensor, ways: tf.Tensor,
               training: bool) -> tf.Tensor:
        """Scores [tasks, queries, ways] from embeddings `support` [tasks, shots, ...], integer `support_y`
        [tasks, shots] and `query` [tasks, queries, ...]. Subclasses implement this."""
        raise NotImplementedError

    def make_head(self, support: tf.Tensor, support_y: tf.Tensor, ways: int) -> keras.layers.Layer:
        """A layer mapping query embeddings [n, ...] to scores [n, ways] for one task's embedded support set
        (what `adapt` stacks on the embedding). Subclasses implement this."""
        raise NotImplementedError

    def check_targets(self, targets: dict, name) -> None:
        """Labels are integers, one per example."""
        for key, (shape, dtype) in targets.items():
            if shape.rank != 0:
                raise ValueError(f"{name(key)} must hold one integer label per example (shape [tasks, examples]); "
                                 f"got {tuple(shape)} per example (one-hot labels: pass their argmax).")
            if not dtype.is_integer:
                raise ValueError(f"{name(key)} must hold integer labels 0..N-1; got dtype {dtype.name}.")

    def value_checks(self, tensors: dict, name) -> list:
        """`EpisodicLearner.value_checks`, and labels 0..N-1 (N: the largest support label + 1) with an example
        of every label in every task's support set (a class without one has no prototype: its scores are NaN)."""
        checks = super().value_checks(tensors, name)
        support = tf.cast(tensors["support_y"], tf.int32)
        ways = tf.reduce_max(support) + 1
        counts = tf.reduce_sum(tf.one_hot(support, ways, dtype=tf.int32), axis=1)  # [tasks, ways]
        checks += [
            tf.debugging.assert_non_negative(support, message=f"{name('support_y')} holds negative labels"),
            tf.debugging.assert_positive(counts, message=(
                f"{name('support_y')} must hold every label 0..N-1 in every task, N being its largest label + 1: a "
                "label below N has no support example")),
        ]
        if "query_y" in tensors:
            query = tf.cast(tensors["query_y"], tf.int32)
            checks += [tf.debugging.assert_non_negative(query, message=f"{name('query_y')} holds negative labels"),
                       tf.debugging.assert_less(query, ways, message=(
                           f"{name('query_y')} holds a label with no support example (labels are 0..N-1, N being "
                           "the largest support label + 1)"))]
        return checks

    def call(self, inputs, training=False):
        """The embedding of a batch of images."""
        return self.learner(inputs, training=training)

    def episode_scores(self, episodes: dict, training: bool) -> tuple[tf.Tensor, list, tf.Tensor]:
        """Embeds all images of a batch of episodes in one call and scores the queries: returns the scores
        [tasks, queries, ways], the embedding's new non-trainable state (BatchNorm statistics), which
        `train_step` assigns (averaged over replicas under a `tf.distribute` strategy), and the Keras losses of
        the call (`kernel_regularizer`, `add_loss`) of the learner and of the other meta-learned layers (e.g. the
        relation module), summed: Keras' `fit` adds them to the loss, and so does `train_step`."""
        sx, qx = episodes["support_x"], episodes["query_x"]
        tasks, shots, queries = tf.shape(sx)[0], tf.shape(sx)[1], tf.shape(qx)[1]
        images = tf.concat([tf.reshape(sx, tf.concat([[-1], tf.shape(sx)[2:]], 0)),
                            tf.reshape(qx, tf.concat([[-1], tf.shape(qx)[2:]], 0))], 0)
        kwargs = {"training": training} if self.learner._call_has_training_arg else {}
        embedded, state, losses = self.learner.stateless_call(
            [tf.convert_to_tensor(v) for v in self.learner.trainable_variables],
            self.read_state(), images, return_losses=True,
            **kwargs)
        feature_shape = tf.shape(embedded)[1:]
        support = tf.reshape(embedded[: tasks * shots], tf.concat([[tasks, shots], feature_shape], 0))
        query = tf.reshape(embedded[tasks * shots:], tf.concat([[tasks, queries], feature_shape], 0))
        support_y = tf.cast(episodes["support_y"], tf.int32)
        ways = tf.reduce_max(support_y) + 1
        scores = self.scores(support, support_y, query, ways, training=training)
        # The other layers (relation module, LSTMs) are called as usual: their losses are those of this call.
        losses += [loss for layer in self._flatten_layers(include_self=False, recursive=False)
                   if layer is not self.learner for loss in layer.losses]
        extra = tf.add_n([tf.cast(loss, scores.dtype) for loss in losses]) if losses else tf.zeros([], scores.dtype)
        return scores, state, extra

    def train_step(self, data):
        episodes, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        episodes = self.check_episodes(episodes)
        with tf.GradientTape() as tape:
            scores, state, extra = self.episode_scores(episodes, training=True)
            loss = self.loss_value(episodes["query_y"], scores) + extra
        self.update(tape.gradient(loss, self.meta_variables), self.meta_variables, state)
        return self._update_trackers({"loss": loss, **self.metric_values(episodes["query_y"], scores)})

    def evaluate_tasks(self, episodes: dict, steps: Optional[int] = None,
                       at_steps: Optional[Sequence[int]] = None) -> dict:
        """Per-task query loss and metrics (no inner steps: the same values at each of `at_steps`)."""
        episodes = self.check_episodes(episodes)
        repeats = 1 if at_steps is None else len(tuple(at_steps))
        scores, _, extra = self.episode_scores(episodes, training=False)
        y = episodes["query_y"]
        results = {"loss": self.task_loss(y, scores) + extra,
                   **{n: fn(y, scores) for n, fn in self.task_metrics.items()}}
        return {n: tf.repeat(tf.reduce_mean(tf.cast(v, self._log_dtype), axis=-1, keepdims=True), repeats, axis=1)
                for n, v in results.items()}

    can_regress = False

    def is_classifier(self) -> bool:
        return True

    def serve(self, request: dict, steps=None) -> tf.Tensor:
        """The query scores against the request's support set (`steps` is ignored)."""
        episode = {"support_x": request["support_x"][None], "support_y": tf.cast(request["support_y"], tf.int32)[None],
                   "query_x": request["query_x"][None]}
        return self.episode_scores(episode, training=False)[0][0]

    def adapt(self, support_x, support_y, steps: Optional[int] = None, batch_norm: str = "batch") -> keras.Model:
        """A Keras classifier for one task: a copy of the embedding followed by the head built from the
        embedded support set (e.g. class prototypes); `predict` gives scores [n, ways]. `steps` is ignored, and so is
        `batch_norm` (checked): metric learners normalise with moving averages at inference."""
        del steps
        if batch_norm not in BATCH_NORM_POLICIES:
            raise ValueError(f"`batch_norm` must be one of {BATCH_NORM_POLICIES}; got {batch_norm!r}.")
        support_x, support_y = self.check_support(support_x, support_y)
        support_y = tf.cast(support_y, tf.int32)
        ways = int(tf.reduce_max(support_y)) + 1
        embedding = copy_model(self.learner)
        head = self.make_head(self.learner(support_x, training=False), support_y, ways)
        return keras.Sequential([keras.Input(support_x.shape[1:]), embedding, head], name=f"{self.name}_adapted")


def class_sums(embeddings: tf.Tensor, labels: tf.Tensor, ways) -> tuple[tf.Tensor, tf.Tensor]:
    """Per-class sums of `embeddings` [tasks, n, d...] by integer `labels` [tasks, n], and the class counts
    [tasks, ways]."""
    one_hot = tf.one_hot(labels, ways, dtype=embeddings.dtype)
    flat = tf.reshape(embeddings, tf.concat([tf.shape(embeddings)[:2], [-1]], 0))
    sums = tf.einsum("tnw,tnd->twd", one_hot, flat)
    sums = tf.reshape(sums, tf.concat([tf.shape(sums)[:2], tf.shape(embeddings)[2:]], 0))
    return sums, tf.reduce_sum(one_hot, axis=1)


def copy_model(model: keras.Model) -> keras.Model:
    """A copy of a built Keras model with its own variables holding the same values."""
    copy = keras.models.clone_model(model)
    if not copy.built:
        copy.build(model.inputs[0].shape)
    copy.set_weights(model.get_weights())
    return copy
