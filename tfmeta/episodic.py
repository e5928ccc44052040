"""`EpisodicLearner`: the base of every meta-learner, a Keras model trained with `fit` on batches of episodes.

An episode batch is a dict of one of the kinds of `tfmeta.episodes` (e.g. `support_x`, `support_y`, `query_x`,
`query_y`), each array with a leading task dimension. Subclasses define how a meta-batch trains the model
(`train_step`), how a task is evaluated after adapting to its support set (`evaluate_tasks`) and what `adapt`
returns; this class holds what they share: the learner, the task loss and metrics, episode validation, per-task
mapping, `test_step`, logging and how the learner serves (`serve`, for `tfmeta.export`). Gradient-based
meta-learners derive from `tfmeta.MetaLearner`, metric learners from `tfmeta.MetricLearner`.
"""

from __future__ import annotations

import weakref
from typing import Callable, Optional, Sequence, Union

import keras
import numpy as np
import tensorflow as tf

from tfmeta import episodes as episodes_lib
from tfmeta import distribute, likelihoods, losses
from tfmeta.kernels import batch_matmul

EPISODE_KEYS = episodes_lib.SUPERVISED_KEYS
TASK_PARALLELISM = ("auto", "map_fn", "unrolled", "vectorized_map")
# Layers that `tf.vectorized_map` turns into batched kernels (no while-loop fallback, no state).
VECTORIZABLE_LAYERS = (keras.layers.InputLayer, keras.layers.Dense, keras.layers.Activation, keras.layers.Flatten,
                       keras.layers.Reshape)

Metric = Union[str, Callable[[tf.Tensor, tf.Tensor], tf.Tensor]]


def resolve_metric(metric: Metric) -> tuple[str, Callable]:
    """(name, per-example function) of a metric given as a function or a `keras.metrics` name."""
    if callable(metric):
        return metric.__name__, metric
    fn = getattr(keras.metrics, metric, None) or keras.saving.get_registered_object(metric)
    if not callable(fn) or isinstance(fn, type):
        raise ValueError(
            f"`metrics` entry {metric!r} is not a per-example metric function such as "
            "'sparse_categorical_accuracy' or 'mean_absolute_error'."
        )
    return metric, fn


def vectorizable(learner: keras.Model) -> bool:
    """Whether `tf.vectorized_map` turns copies of `learner` into batched kernels: dense layers and activations
    only (`VECTORIZABLE_LAYERS`), without state."""
    dense = all(isinstance(layer, VECTORIZABLE_LAYERS) or layer is learner
                for layer in learner._flatten_layers(include_self=True))
    return dense and not learner.non_trainable_variables


def specs(tensors) -> list[tf.TensorSpec]:
    """The `tf.TensorSpec`s of `tensors` (for `tf.map_fn` signatures)."""
    return [tf.TensorSpec(t.shape, t.dtype) for t in tensors]


def merge_leading_axes(t: tf.Tensor) -> tf.Tensor:
    """[a, b, ...] -> [a · b, ...], keeping the static shape it can (a stream's batches as one set, a family's
    tasks as one batch)."""
    merged = tf.reshape(t, tf.concat([[-1], tf.shape(t)[2:]], 0))
    merged.set_shape([None, *t.shape[2:]])
    return merged


def with_checks(tensors: dict, checks: list) -> dict:
    """`tensors` made to depend on the run-time `checks` (assertion ops), so that they run before any use."""
    with tf.control_dependencies(checks):
        return {k: tf.identity(v) for k, v in tensors.items()}


class EpisodicLearner(keras.Model):
    """Base class of meta-learners over a Keras `learner` (see the module docstring).

    Args:
      learner: any built Keras model: the learner adapted by gradient-based methods, the embedding of metric
        learners.
      loss: the task loss, a Keras loss name, function or `keras.losses.Loss` (averaged over examples).
      metrics: per-example metric functions or their `keras.metrics` names, reported on the query set.
      task_parallelism: how per-task computations of a meta-batch run: "map_fn" (`tf.map_fn`: fast to trace,
        and the fastest on conv learners; see docs/performance.md), "unrolled" (a Python loop, needs a static
        meta-batch size), "vectorized_map" (`tf.vectorized_map`: batched kernels; the fastest for small dense
        learners) or "auto" (default): "vectorized_map" for algorithms that declare it safe
        (`vectorizes_dense_learners`) on learners made only of dense layers and activations, else "map_fn".
      likelihood: a `tfmeta.likelihoods.Likelihood` (e.g. `Normal(stddev=0.1)` for a learner trained with the mean
        squared error): the query metrics then include its predictive NLL and, for regression, the coverage of
        its central 50% and 90% intervals; the metrics score its point prediction (a heteroscedastic head's
        means). None (default): no probabilistic scores.
    """

    takes_support_streams = False  # Gradient-based learners can take one support batch per inner step.
    vectorizes_dense_learners = False  # Whether "auto" may vectorise this algorithm's tasks over dense learners.
    # The TensorFlow executor of `fit`'s train function: None picks the single-threaded one for tasks mapped with
    # `tf.vectorized_map` and TensorFlow's default ("") otherwise (`make_train_function`).
    step_executor: Optional[str] = None

    def __init__(
        self,
        learner: keras.Model,
        loss: Union[str, Callable] = "mse",
        metrics: Sequence[Metric] = (),
        task_parallelism: str = "auto",
        likelihood: Optional[likelihoods.Likelihood] = None,
        name: Optional[str] = None,
    ):
        super().__init__(name=name)
        if not isinstance(learner, keras.Model):
            raise TypeError(f"`learner` must be a keras.Model; got {type(learner).__name__}.")
        if not learner.built:
            raise ValueError(
                f"`learner` '{learner.name}' is not built: build it (e.g. with keras.Input or by calling it on "
                "a batch) so that its variables exist before meta-learning."
            )
        if task_parallelism not in TASK_PARALLELISM:
            raise ValueError(f"`task_parallelism` must be one of {TASK_PARALLELISM}; got {task_parallelism!r}.")
        self.learner = learner
        self.task_parallelism = task_parallelism
        self.loss_object = losses.get(loss)
        self.task_loss = losses.per_example(self.loss_object)
        self.task_metrics = dict(resolve_metric(m) for m in metrics)
        self.likelihood = likelihoods.get(likelihood)
        self._log_dtype = keras.backend.standardize_dtype(learner.trainable_variables[0].dtype)
        self._trackers = {n: keras.metrics.Mean(name=n) for n in self.log_names()}
        self._checked_layouts: set = set()  # of the episodes `fit` and `evaluate` validated (`_check_data`)
        self._layouts: dict = {}  # the layout each Keras step function was traced for

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Keras' first-batch build, reduced to what a meta-learner needs. Under a strategy Keras reduces a
        first batch over the replicas to trace the model symbolically, which fails across workers for a dict
        of episodes; meta-learners are built already, and only the optimizer's variables are missing."""
        optimizer = getattr(self, "optimizer", None)
        if optimizer is not None and not optimizer.built:
            with self.distribute_strategy.scope():
                optimizer.build(self.meta_variables)

    def log_names(self) -> list[str]:
        """The names `fit` and `evaluate` log: the query loss and metrics after adaptation."""
        return ["loss", *self.metric_names()]

    @property
    def meta_variables(self) -> list[keras.Variable]:
        """What the outer loop learns (the optimizer's variables are built for these)."""
        return self.trainable_variables

    @property
    def metrics(self) -> list[keras.metrics.Metric]:
        return list(self._trackers.values())

    def meta_step(self) -> tf.Tensor:
        """Meta-steps taken so far (by default the optimizer's iteration count; 0 before `compile`): what
        schedules, resumption and reports count."""
        optimizer = getattr(self, "optimizer", None)
        return tf.constant(0, tf.int64) if optimizer is None else tf.cast(optimizer.iterations, tf.int64)

    def read_state(self) -> list[tf.Tensor]:
        """The learner's current non-trainable values (BatchNorm statistics, seed states), as `stateless_call`
        takes them."""
        return [tf.convert_to_tensor(v) for v in self.learner.non_trainable_variables]

    def metric_names(self) -> list[str]:
        """The names of the task metrics the objectives report with the loss: `metrics`' by default; a learner
        whose outer objective reports others (`MetaLearner.outer_objective`) overrides this. With a likelihood,
        its scores follow (`tfmeta.likelihoods.Likelihood.scores`)."""
        scores = self.likelihood.score_names() if self.likelihood is not None else []
        return list(self.task_metrics) + scores

    def loss_value(self, y_true, y_pred) -> tf.Tensor:
        """The task loss averaged over examples."""
        return tf.reduce_mean(self.task_loss(y_true, y_pred))

    def metric_values(self, y_true, y_pred, predictive=None, scores: bool = True) -> dict[str, tf.Tensor]:
        """The task metrics of predictions `y_pred` and, with a likelihood and `scores`, its scores of the
        predictive distribution (`predictive`, by default `self.predictive(y_pred)`)."""
        point = self.point_prediction(y_pred)
        values = {n: tf.reduce_mean(tf.cast(fn(y_true, point), self._log_dtype)) for n, fn in self.task_metrics.items()}
        if self.likelihood is not None and scores:
            predictive = self.predictive(y_pred) if predictive is None else predictive
            scores = self.likelihood.scores(predictive, y_true)
            values.update({n: tf.cast(v, self._log_dtype) for n, v in scores.items()})
        return values

    def predictive(self, outputs):
        """The predictive distribution (`tfp.distributions`) of the targets given the learner's outputs: the
        likelihood's distribution; learners of several models (particles, samples) give the mixture."""
        return self.likelihood.distribution(outputs)

    def point_prediction(self, outputs) -> tf.Tensor:
        """The prediction the task metrics score: the outputs, or with a likelihood its point prediction."""
        return outputs if self.likelihood is None else self.likelihood.point(outputs[None])

    def evaluate_tasks(
        self, episodes: dict, steps: Optional[int] = None, at_steps: Optional[Sequence[int]] = None
    ) -> dict:
        """Adapts to each task's support set and returns, per task, the query loss and metrics as tensors of
        shape `[tasks, len(at_steps)]`: after each of `at_steps` inner steps for gradient-based learners (of
        `steps` in all); learners without inner steps give the same values at every entry."""
        raise NotImplementedError

    def test_step(self, data):
        episodes, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        results = self.evaluate_tasks(episodes)
        logs = {}
        for name, values in results.items():
            logs[name] = tf.reduce_mean(values[:, -1])
            if f"pre_adapt_{name}" in self._trackers:
                logs[f"pre_adapt_{name}"] = tf.reduce_mean(values[:, 0])
        return self._update_trackers(logs)

    def adapt(self, support_x, support_y, steps: Optional[int] = None, batch_norm: str = "batch") -> keras.Model:
        """A Keras model adapted to one task's support set, that `predict`s its queries as `evaluate` scores them
        (`batch_norm`: see `MetaLearner.adapt`)."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------------------- serving
    # How a family of learners serves (`tfmeta.export.export_meta_learner` reads only these).

    serves_inner_steps = False  # whether the adaptation takes a number of inner steps (`serving_with_steps`)
    serves_families = False  # whether a request also holds a family of tasks (`family_support_x`, ...)
    can_regress = True  # False for learners that only classify (metric learners)

    def is_classifier(self) -> bool:
        """Whether the learner classifies (serving takes integer labels and returns logits and classes) rather than
        regresses: by default, whether its loss is a cross-entropy (or relation) loss."""
        name = getattr(self.loss_object, "name", None) or getattr(self.loss_object, "__name__", "")
        return any(word in str(name).lower() for word in ("crossentropy", "cross_entropy", "relation_mse"))

    def serving_ways(self) -> Optional[int]:
        """The number of classes a served classifier's labels must stay below (its head's outputs), or None when a
        request's labels set it."""
        return None

    def serve(self, request: dict, steps) -> tf.Tensor:
        """The outputs for `request["query_x"]` [examples, ...] after adapting to the request's support set
        (`support_x`, `support_y`, one task without the task axis; checked and preprocessed), as `adapt(...).predict`
        gives them; `steps` is the inner steps (an int or an int tensor) for learners that take them."""
        raise NotImplementedError

    def serve_predictive(self, request: dict, steps) -> dict:
        """The likelihood's summary of the predictive distribution of the request's query targets ("mean" and
        "stddev", or "probabilities" and "classes"), as `serve` adapts: what a learner with a likelihood serves."""
        return self.likelihood.summary(self.predictive(self.serve(request, steps)))

    # -------------------------------------------------------------------------------------- utilities

    @property
    def task_mapping(self) -> str:
        """`task_parallelism` with "auto" resolved for this algorithm and learner."""
        if self.task_parallelism != "auto":
            return self.task_parallelism
        return "vectorized_map" if self.vectorizes_dense_learners and vectorizable(self.learner) else "map_fn"

    @staticmethod
    def task_count(episodes: dict) -> tuple[Optional[int], tf.Tensor]:
        """The number of tasks of a batch of episodes of any kind (the leading axis of its arrays): static (or None)
        and as a tensor."""
        first = tf.nest.flatten(episodes)[0]
        return first.shape[0], tf.shape(first)[0]

    def map_tasks(self, fn: Callable, episodes: dict, signature):
        """Applies `fn(task_index, episode)` to every task of a batch and stacks the results."""
        tasks, count = self.task_count(episodes)
        if self.task_mapping == "unrolled":
            if tasks is None:
                raise ValueError(
                    "task_parallelism='unrolled' needs a static number of tasks per meta-batch: batch the "
                    "episodes with drop_remainder=True."
                )
            outputs = [fn(tf.constant(i), {k: v[i] for k, v in episodes.items()}) for i in range(tasks)]
            return tf.nest.map_structure(lambda *xs: tf.stack(xs), *outputs)
        indices = tf.range(count)
        if self.task_mapping == "vectorized_map":
            with batch_matmul.vectorized_products():  # per-task weights' products on one thread
                return tf.vectorized_map(lambda args: fn(*args), (indices, episodes))
        return tf.map_fn(lambda args: fn(*args), (indices, episodes), fn_output_signature=signature)

    def check_episodes(self, episodes: dict) -> dict:
        """Validates a batch of episodes: its static shapes here (errors at trace time), its values in the graph
        (`value_checks`: finite inputs, labels in range); returns the four arrays it uses, which depend on the
        value checks."""
        kind = episodes_lib.kind_of(episodes)
        if kind not in ("supervised", "stream"):
            raise ValueError(f"{type(self).__name__} takes supervised or stream episodes (keys {EPISODE_KEYS}, or "
                             f"{episodes_lib.STREAM_KEYS}; see tfmeta.episodes); got a {kind} episode.")
        if kind == "stream" and not self.takes_support_streams:
            raise ValueError(f"{type(self).__name__} takes one support set per task, not a stream of batches "
                             "(episodes with `stream_x`, `stream_y`).")
        keys = episodes_lib.STREAM_KEYS if kind == "stream" else EPISODE_KEYS
        x_key, y_key = keys[:2]
        e = {k: tf.convert_to_tensor(episodes[k]) for k in keys}
        sx, sy, qx, qy = (e[k].shape for k in keys)
        for key, shape in zip(keys, (sx, sy, qx, qy)):
            if shape.rank is None:
                raise ValueError(
                    f"episodes['{key}'] has an unknown rank: Keras relaxes the traced shapes when one meta-learner "
                    "is given episodes of different ranks; give every call episodes of the same layout (or rebuild "
                    "the meta-learner).")
        lead = 3 if kind == "stream" else 2  # [tasks, steps, batch] or [tasks, examples]
        for x_name, y_name, x, y, axes in ((x_key, y_key, sx, sy, lead), ("query_x", "query_y", qx, qy, 2)):
            leading = "tasks, steps, batch" if axes == 3 else "tasks, examples"
            if x.rank < axes + 1:
                raise ValueError(f"episodes['{x_name}'] must have shape [{leading}, features...]; got {tuple(x)}.")
            if not x[:axes].is_compatible_with(y[:axes]):
                raise ValueError(f"episodes['{x_name}'] and episodes['{y_name}'] disagree on [{leading}]: "
                                 f"{tuple(x)} vs {tuple(y)}.")
        if kind == "stream":
            sx, sy = sx[:2].concatenate(sx[3:]), sy[:2].concatenate(sy[3:])
        if not sx[2:].is_compatible_with(qx[2:]):
            raise ValueError(
                f"support and query features differ: episodes['{x_key}'] has shape {tuple(e[x_key].shape)}, "
                f"episodes['query_x'] has {tuple(qx)}."
            )
        if not sy[2:].is_compatible_with(qy[2:]):
            raise ValueError(
                f"support and query targets differ: episodes['{y_key}'] has shape {tuple(e[y_key].shape)}, "
                f"episodes['query_y'] has {tuple(qy)}."
            )
        if sx[1] == 0:
            raise ValueError(f"episodes['{x_key}'] holds no support example (K must be >= 1).")
        self.check_targets({y_key: (sy[2:], e[y_key].dtype), "query_y": (qy[2:], e["query_y"].dtype)},
                           lambda k: f"episodes['{k}']")
        # TensorFlow escapes quotes in the messages of failed assertions: name the keys without them.
        return with_checks(e, self.value_checks(e, lambda k: f"episodes `{k}`"))

    def check_targets(self, targets: dict, name: Callable[[str], str]) -> None:
        """Static checks of the targets: `targets` maps keys ("support_y", "query_y") to their per-example shape and
        dtype; `name(key)` names the argument in errors. Subclasses check them against their learner; this base
        checks nothing."""

    def value_checks(self, tensors: dict, name: Callable[[str], str]) -> list:
        """Run-time checks of an episode's (or a support set's) values, as ops for `with_checks`: inputs and
        targets finite; subclasses add their label checks. `tensors` holds some of `EPISODE_KEYS` (with their
        leading task axis); `name(key)` names the argument in the errors."""
        return [tf.debugging.assert_all_finite(value, f"{name(key)} holds NaN or infinite values")
                for key, value in tensors.items() if value.dtype.is_floating]

    def _check_data(self, data, function: str) -> None:
        """Validates what `fit` (`function="train"`) or `evaluate` ("test") is given before Keras traces it, and
        gives each layout of episodes (the ranks and dtypes of their arrays) its own Keras step function: Keras
        relaxes a traced step's shapes when it sees new ones, and across ranks a relaxed (unknown-rank) trace would
        serve, and fail on, data of either layout."""
        if isinstance(data, tf.data.Dataset):
            spec = data.element_spec
        elif isinstance(data, dict):
            spec = {k: tf.TensorSpec([None, *np.shape(v)[1:]], tf.as_dtype(getattr(v, "dtype", np.float32)))
                    for k, v in data.items()}
        else:
            return
        spec = spec[0] if isinstance(spec, tuple) else spec  # (x, y, sample_weight) from `train_on_batch` style data
        layout = repr(sorted((k, s.shape.rank, s.dtype.name) for k, s in spec.items())) if isinstance(spec, dict) else (
            repr(spec))
        if layout not in self._checked_layouts:
            tf.function(self.check_episodes, autograph=False).get_concrete_function(spec)
            self._checked_layouts.add(layout)
        if self._layouts.get(function, layout) != layout:
            setattr(self, f"{function}_function", None)  # Keras builds a new one on its next call
        self._layouts[function] = layout

    def make_train_function(self, force: bool = False):
        """Keras' train function, made leaner where that is safe: on the default strategy, one step per call, in graph
        mode, the step reads its batch inside one traced function. Keras' own wraps every step's logs in a
        `tf.experimental.Optional` inside a second function call: on a small learner (the sine MLP) that is a sixth of
        the meta-step (docs/performance.md, issue 21). Each iterator's traced function is called directly, which spares
        matching its types on every call (another tenth there). Tasks mapped with `tf.vectorized_map` make the step a
        chain of small batched ops, which TensorFlow's default executor hands back and forth between its inter-op
        threads at more cost than gain: they run on the calling thread instead (the single-threaded executor; kernels
        still split large ops over the intra-op threads), a tenth faster there. At the end of a finite dataset the read
        raises `OutOfRangeError`, which `fit` takes as the end of the epoch, as with Keras' function. Everything else
        (`train_on_batch`'s generators, strategies, `steps_per_execution`, `run_eagerly`) runs Keras' function."""
        if self.train_function is not None and not force:
            return self.train_function
        super().make_train_function(force=True)
        default_strategy = not tf.distribute.has_strategy() and self.distribute_strategy is tf.distribute.get_strategy()
        if self.run_eagerly or self.steps_per_execution != 1 or not default_strategy:
            return self.train_function
        keras_function = self.train_function
        step = tf.function(self.train_step, jit_compile=self.jit_compile, reduce_retracing=True)
        lean = tf.function(lambda iterator: step(iterator.get_next()), reduce_retracing=True)
        traced = weakref.WeakKeyDictionary()  # iterator -> its traced function, called without re-matching types
        executor = self.step_executor
        if executor is None:
            executor = "SINGLE_THREADED_EXECUTOR" if self.task_mapping == "vectorized_map" else ""

        def function(iterator):
            if not isinstance(iterator, tf.data.Iterator):
                return keras_function(iterator)
            with tf.experimental.function_executor_type(executor):
                if iterator not in traced:
                    traced[iterator] = lean.get_concrete_function(iterator)
                return traced[iterator](iterator)

        self.train_function = function
        return function

    def fit(self, x=None, y=None, *args, **kwargs):
        self._check_data(x, "train")
        validation = kwargs.get("validation_data")
        if validation is not None:
            self._check_data(validation, "test")
        return super().fit(x, y, *args, **kwargs)

    def evaluate(self, x=None, y=None, *args, **kwargs):
        self._check_data(x, "test")
        return super().evaluate(x, y, *args, **kwargs)

    def check_support(self, support_x, support_y) -> tuple[tf.Tensor, tf.Tensor]:
        """Validates one task's support set for `adapt` (shapes, then values: `value_checks`)."""
        support_x = tf.convert_to_tensor(support_x)
        support_y = tf.convert_to_tensor(support_y)
        expected = self.learner.inputs[0].shape[1:] if getattr(self.learner, "inputs", None) else None
        if expected is not None and not tf.TensorShape(expected).is_compatible_with(support_x.shape[1:]):
            raise ValueError(
                f"`support_x` must have shape [examples, {', '.join(map(str, expected))}] for learner "
                f"'{self.learner.name}'; got {tuple(support_x.shape)}."
            )
        if support_x.shape[0] == 0 or support_x.shape[0] != support_y.shape[0]:
            raise ValueError(
                "`support_x` and `support_y` must hold the same number (>= 1) of examples; got shapes "
                f"{tuple(support_x.shape)} and {tuple(support_y.shape)}."
            )
        self.check_targets({"support_y": (support_y.shape[1:], support_y.dtype)}, lambda k: f"`{k}`")
        try:  # eagerly: a failed check raises here
            self.value_checks({"support_x": support_x[None], "support_y": support_y[None]}, lambda k: f"`{k}`")
        except tf.errors.InvalidArgumentError as error:
            raise ValueError(error.message) from None
        return support_x, support_y

    def apply_gradients(self, grads: list, variables: list) -> None:
        """Applies meta-gradients with the compiled optimizer. Under a `tf.distribute` strategy each replica
        holds the mean over its tasks and the optimizer sums the replicas', so each is divided by their count. The
        optimizer is built for all `meta_variables` on the first call, so that updates of subsets of them (WarpGrad's
        warp and initialisation updates) find their slots."""
        if not self.optimizer.built:
            with keras.name_scope(self.optimizer.name, caller=self.optimizer):
                self.optimizer.build(self.meta_variables)
        self.optimizer.apply(distribute.replica_mean(grads), variables)

    def update(self, grads: list, variables: list, state: list) -> None:
        """Applies meta-gradients, then assigns the learner's new non-trainable state (BatchNorm statistics)."""
        self.apply_gradients(grads, variables)
        self.assign_state(self.reduce_state(state, after=variables))

    def reduce_state(self, state: list, after: list) -> list:
        """The learner's new non-trainable state averaged over replicas, all-reduced once the optimizer has
        updated `after`: replicas must issue their collective operations in the same order, and the
        optimizer's gradient all-reduce cannot be ordered from the replica's side."""
        with tf.control_dependencies([tf.convert_to_tensor(v) for v in after[:1]]):
            return distribute.all_reduce_mean([tf.identity(s) for s in state])

    def assign_state(self, values: list) -> None:
        """Assigns the learner's non-trainable state."""
        for variable, value in zip(self.learner.non_trainable_variables, values):
            variable.assign(value)

    @staticmethod
    def global_task_index(index, tasks) -> tf.Tensor:
        """The index of task `index` of this replica's `tasks` in the global meta-batch (for per-task seeds that
        do not depend on how the meta-batch is split across replicas)."""
        _, replica = distribute.replicas()
        return tf.cast(index, tf.int32) + tf.cast(replica, tf.int32) * tf.cast(tasks, tf.int32)

    def _log_spec(self, names) -> dict:
        return {n: tf.TensorSpec([], self._log_dtype) for n in names}

    def _update_trackers(self, logs: dict) -> dict:
        for name, value in logs.items():
            self._trackers[name].update_state(value)
        results = {name: self._trackers[name].result() for name in logs}
        if distribute.multi_worker():  # Keras reduces logs across workers along an axis 0 they must have
            results = {name: tf.reshape(value, [1]) for name, value in results.items()}
        return results

    def get_config(self) -> dict:
        return {
            "learner": keras.saving.serialize_keras_object(self.learner),
            "loss": keras.losses.serialize(self.loss_object),
            "metrics": list(self.task_metrics),
            "task_parallelism": self.task_parallelism,
            "likelihood": None if self.likelihood is None else keras.saving.serialize_keras_object(self.likelihood),
            "name": self.name,
        }

    @classmethod
    def from_config(cls, config: dict):
        config = dict(config)
        config["learner"] = keras.saving.deserialize_keras_object(config["learner"])
        config["loss"] = losses.get(config["loss"])
        config["likelihood"] = likelihoods.get(config.get("likelihood"))
        return cls(**config)
