"""SavedModel export: a meta-learner whose serving signature adapts to each request's support set, and adapted
learners as plain Keras models.

`export_meta_learner` writes a SavedModel whose `serving_default` signature takes `support_x`, `support_y` and
`query_x` and returns `predictions` (regression) or `logits` and `classes` (classification). The adaptation
the meta-learner learned runs inside the graph: its inner loop with its (learned) update rule for gradient-based
meta-learners, the support-set classifier (prototypes, ...) for metric learners. The support-set size may vary
per request. `serving_with_steps` also takes `inner_steps`, overriding the step count fixed at export. For image
learners the signatures take images as decoded from their files (uint8, any size, the trained channels;
`serving_float` takes float images in [0, 1]) and apply the training pipeline's `ImagePreprocessing`. Bad
requests (support sets of different lengths, labels outside 0..N-1) fail with an error naming the problem.
"""

from __future__ import annotations

import os
from typing import Optional

import keras
import tensorflow as tf

from tfmeta.data.classes import ImagePreprocessing
from tfmeta.episodic import EpisodicLearner
from tfmeta.meta_learner import MetaLearner, check_steps
from tfmeta.metric.base import MetricLearner

_CLASSIFICATION_LOSSES = ("crossentropy", "cross_entropy", "relation_mse")


def is_classifier(meta_learner: EpisodicLearner) -> bool:
    """Whether a meta-learner classifies (metric learners, cross-entropy losses) rather than regresses."""
    if isinstance(meta_learner, MetricLearner):
        return True
    name = getattr(meta_learner.loss_object, "name", None) or getattr(meta_learner.loss_object, "__name__", "")
    return any(word in str(name).lower() for word in _CLASSIFICATION_LOSSES)


class _Adaptation:
    """What a serving signature runs: request checks, preprocessing and the meta-learner's adaptation."""

    def __init__(self, meta_learner: EpisodicLearner, steps: int, preprocessing: Optional[ImagePreprocessing],
                 classifier: bool):
        self.meta_learner = meta_learner
        self.steps = steps
        self.preprocessing = preprocessing
        self.classifier = classifier
        self.ways = meta_learner.learner.outputs[0].shape[-1] if (
            self.classifier and isinstance(meta_learner, MetaLearner)) else None

    def check(self, support_x, support_y, query_x):
        """Run-time checks of a request (a served signature does not enforce its input shapes)."""
        shape = self.meta_learner.learner.inputs[0].shape[1:]
        if self.preprocessing is not None:
            shape = [None, None, shape[-1]]
        checks = []
        for name, x in (("support_x", support_x), ("query_x", query_x)):
            expected = ", ".join("any" if d is None else str(d) for d in shape)
            message = f"{name} must have shape [examples, {expected}]"
            checks.append(tf.debugging.assert_rank(x, len(shape) + 1, message=message))
            with tf.control_dependencies(checks[-1:]):
                fixed = [i + 1 for i, d in enumerate(shape) if d is not None]
                checks.append(tf.debugging.assert_equal(tf.gather(tf.shape(x), fixed), [shape[i - 1] for i in fixed],
                                                        message=message))
        rank = 1 if self.classifier else len(self.meta_learner.learner.outputs[0].shape)
        checks.append(tf.debugging.assert_rank(support_y, rank, message=f"support_y must have rank {rank}"))
        checks.append(tf.debugging.assert_equal(
            tf.shape(support_x)[0], tf.shape(support_y)[0],
            message="support_x and support_y must hold the same number of examples"))
        checks.append(tf.debugging.assert_positive(tf.shape(support_x)[0], message="the support set is empty"))
        if self.classifier:
            labels = tf.cast(support_y, tf.int32)
            checks.append(tf.debugging.assert_non_negative(labels, message="support_y labels must be >= 0"))
            if self.ways is not None:
                checks.append(tf.debugging.assert_less(
                    labels, self.ways, message=f"support_y labels must lie in 0..{self.ways - 1} (the learner's ways)"))
            else:
                counts = tf.math.bincount(labels, minlength=1)
                checks.append(tf.debugging.assert_positive(
                    counts, message="support_y must hold every label 0..N-1 (a label below its maximum is missing)"))
        return checks

    def run(self, support_x, support_y, query_x, steps):
        with tf.control_dependencies(self.check(support_x, support_y, query_x)):
            if self.preprocessing is not None:
                support_x, query_x = self.preprocessing(support_x), self.preprocessing(query_x)
            meta = self.meta_learner
            if isinstance(meta, MetricLearner):
                episode = {"support_x": support_x[None], "support_y": tf.cast(support_y, tf.int32)[None],
                           "query_x": query_x[None]}
                outputs = meta.episode_scores(episode, training=False)[0][0]
            else:
                fast, slow = meta.read_params()
                state = [tf.convert_to_tensor(v) for v in meta.learner.non_trainable_variables]
                adaptation = meta.adapt_params(fast, slow, state, support_x, support_y, steps, training=False)
                outputs, _ = meta.forward(adaptation.params, slow, state, query_x, training=False,
                                          step=steps if isinstance(steps, int) else None)
        if self.classifier:
            return {"logits": outputs, "classes": tf.argmax(outputs, axis=-1, output_type=tf.int32)}
        return {"predictions": outputs}


def export_meta_learner(meta_learner: EpisodicLearner, export_dir: str, steps: Optional[int] = None,
                        preprocessing: Optional[ImagePreprocessing] = None,
                        classifier: Optional[bool] = None) -> dict:
    """Writes a SavedModel to `export_dir` that adapts at serving time (see the module docstring).

    Args:
      meta_learner: a gradient-based or metric meta-learner (not MALTML, whose adaptation needs a family).
      steps: inner steps of `serving_default` (default: the meta-learner's `eval_inner_steps`).
      preprocessing: for image learners, the training pipeline's `ImagePreprocessing` (e.g.
        `tasks.classes.preprocessing`); None feeds inputs to the learner as they come.
      classifier: whether the signatures take integer labels and return `logits` and `classes` (True) or take
        targets and return `predictions` (False); None infers it with `is_classifier` (metric learners and
        cross-entropy losses classify), which a custom classification loss needs to override.

    Returns the concrete functions of the signatures, by name.
    """
    if not isinstance(meta_learner, (MetaLearner, MetricLearner)) or type(meta_learner).__name__ == "MALTML":
        raise TypeError(f"export_meta_learner exports a MetaLearner or a MetricLearner; got "
                        f"{type(meta_learner).__name__}.")
    learner = meta_learner.learner
    if not getattr(learner, "inputs", None):
        raise ValueError(f"the learner '{learner.name}' has no symbolic inputs to size the serving signature: "
                         "export a functional or Sequential learner.")
    input_shape = tuple(learner.inputs[0].shape[1:])
    if preprocessing is not None and tuple(preprocessing.image_shape) != input_shape:
        raise ValueError(f"`preprocessing` makes images of shape {preprocessing.image_shape}, but the learner takes "
                         f"{input_shape}.")
    if isinstance(meta_learner, MetaLearner):
        steps = check_steps(meta_learner.eval_inner_steps if steps is None else steps, "steps")
    if classifier is not None and not isinstance(classifier, bool):
        raise TypeError(f"`classifier` must be True, False or None (inferred); got {classifier!r}.")
    if classifier is False and isinstance(meta_learner, MetricLearner):
        raise ValueError(f"`classifier=False`: {type(meta_learner).__name__} is a metric learner, which classifies.")
    module = _Adaptation(meta_learner, steps or 0, preprocessing,
                         is_classifier(meta_learner) if classifier is None else classifier)
    dtype = keras.backend.standardize_dtype(learner.inputs[0].dtype)
    label = tf.TensorSpec([None], tf.int32 if module.classifier else dtype, name="support_y")
    if not module.classifier:
        label = tf.TensorSpec([None, *learner.outputs[0].shape[1:]], dtype, name="support_y")

    def inputs(image_dtype=None):
        shape = [None, *input_shape] if preprocessing is None else [None, None, None, input_shape[-1]]
        x_dtype = dtype if preprocessing is None else image_dtype
        return [tf.TensorSpec(shape, x_dtype, name="support_x"), label, tf.TensorSpec(shape, x_dtype, name="query_x")]

    image_dtype = tf.uint8 if preprocessing is not None else None
    # keras.export.ExportArchive, not tf.saved_model.save on a tf.Module: the latter leaves Keras 3 variables
    # unrestorable by the TF1/C++ loaders that TF Serving and `saved_model_cli run` use.
    archive = keras.export.ExportArchive()
    archive.track(meta_learner)

    def adapt(support_x, support_y, query_x):
        return module.run(support_x, support_y, query_x, module.steps)

    def adapt_with_steps(support_x, support_y, query_x, inner_steps):
        return module.run(support_x, support_y, query_x, inner_steps)

    endpoints = {"serving_default": (adapt, inputs(image_dtype))}
    if preprocessing is not None:
        endpoints["serving_float"] = (adapt, inputs(tf.float32))
    if isinstance(meta_learner, MetaLearner):
        steps_spec = tf.TensorSpec([], tf.int32, name="inner_steps")
        endpoints["serving_with_steps"] = (adapt_with_steps, [*inputs(image_dtype), steps_spec])
    functions = {name: archive.add_endpoint(name, fn, input_signature=signature)
                 for name, (fn, signature) in endpoints.items()}
    archive.write_out(export_dir, verbose=False)
    return {name: function.get_concrete_function() for name, function in functions.items()}


def save_adapted(model: keras.Model, directory: str) -> None:
    """Saves an adapted learner (the result of `adapt`) as `<directory>/model.keras` and as a SavedModel in
    `<directory>/saved_model` whose `serving_default` signature takes `x` (for TF Serving)."""
    os.makedirs(directory, exist_ok=True)
    model.save(os.path.join(directory, "model.keras"))
    archive = keras.export.ExportArchive()
    archive.track(model)
    spec = tf.TensorSpec([None, *model.inputs[0].shape[1:]], model.inputs[0].dtype, name="x")
    archive.add_endpoint("serving_default", lambda x: model(x, training=False), input_signature=[spec])
    archive.write_out(os.path.join(directory, "saved_model"), verbose=False)
