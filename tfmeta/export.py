"""SavedModel export: a meta-learner whose serving signature adapts to each request's support set, and adapted
learners as plain Keras models.

`export_meta_learner` writes a SavedModel whose `serving_default` signature takes `support_x`, `support_y` and
`query_x` and returns `predictions` (regression) or `logits` and `classes` (classification). The adaptation
the meta-learner learned runs inside the graph: its inner loop with its (learned) update rule for gradient-based
meta-learners, the support-set classifier (prototypes, ...) for metric learners, meta-finetuning on the request's
family of tasks (`family_support_x`, ...) then finetuning for MALTML. The support-set size may vary per request.
`serving_with_steps` also takes `inner_steps`, overriding the step count fixed at export. A learner with a
likelihood (`tfmeta.likelihoods`) serves its predictive distribution: `predictions` (the predictive mean) and
`stddev` for regression; `probabilities` (averaged over particles or samples), `logits` (their logs) and
`classes` for classification. Learners that draw their models per task (`SamplingLearner`: PLATIPUS, ABML) also
get `serving_with_samples`, which takes `num_samples` and `seed` (int32 scalars): a request draws that many
samples from that seed (folded with the support set's hash, so that the same request gets the same answer);
`serving_default` draws the learner's own `num_samples` from its `seed`, as `evaluate` and `adapt` do. (It needs
`particle_parallelism` "vectorized_map", where the number of samples may be a tensor.)

The signatures declare unknown shapes and check every request at run time (TensorFlow does not enforce a
signature's shapes on the tensors a loaded SavedModel is called with): ranks and sizes, support sets of equal
lengths, finite values, labels within the learner's classes; a bad request fails with an error naming the input and
the shape or range expected. Expected shapes: `support_x`, `query_x` [examples, *learner input]; `support_y`
[examples] integer labels 0..N-1 for classifiers (send one-hot labels as their argmax), [examples, *learner output]
for regression.

For image learners the signatures take images as decoded from their files (uint8, any size, the trained
channels) and apply the training pipeline's `ImagePreprocessing`; `serving_float` takes float images in [0, 1]
instead. TensorFlow converts a request's arguments to the signature's dtype before the graph runs, so float
images in [0, 1] sent to the uint8 `serving_default` arrive as 0s and 1s: send them to `serving_float`.
"""

from __future__ import annotations

import os
from typing import Optional

import keras
import tensorflow as tf

from tfmeta import checks, kernels
from tfmeta import losses
from tfmeta.algorithms.particles import SamplingLearner
from tfmeta.data.classes import ImagePreprocessing
from tfmeta.episodic import EpisodicLearner
from tfmeta.tasks.families import TASK_KEYS

def is_classifier(meta_learner: EpisodicLearner) -> bool:
    """Whether a meta-learner classifies rather than regresses (`EpisodicLearner.is_classifier`)."""
    return meta_learner.is_classifier()


def _require(tensors: dict, ok: tf.Tensor, template: str, *values: tf.Tensor) -> dict:
    """`tensors`, made data-dependent on the run-time condition `ok`: the request fails with the message
    `template` (its `{}` filled with `values`) unless it holds. Neither an assertion nor a control dependency:
    when a SavedModel is called, Grappler folds the shapes it then knows, and it ran ops that control-dependent
    assertions were to guard (a wrongly shaped request failed in a gather or a shape check instead). The failure
    is a string-to-number conversion of the message (0 when `ok`), added to every tensor."""
    text = tf.strings.format(f"request rejected: {template}", list(values))
    guard = tf.strings.to_number(tf.where(ok, tf.constant("0"), text), tf.float32)
    return {k: v + tf.cast(guard, v.dtype) for k, v in tensors.items()}


def _checked(x: tf.Tensor, name: str, lead: list, shape: list, what: str = "") -> tf.Tensor:
    """`x` after a run-time check of its rank and of the sizes `shape` fixes (None: any), with the static shape
    `lead` + `shape`. `lead` holds the leading axes' sizes (None: any) and names, e.g. [(None, "examples")]."""
    described = [axis if size is None else f"{axis} = {size}" for size, axis in lead]
    described += ["any" if d is None else str(d) for d in shape]
    shape = [size for size, _ in lead] + list(shape)
    fixed = [i for i, d in enumerate(shape) if d is not None]
    sizes = tf.concat([tf.shape(x), tf.zeros([len(shape)], tf.int32)], 0)  # padded: no gather out of range
    ok = tf.logical_and(tf.equal(tf.rank(x), len(shape)),
                        tf.reduce_all(tf.equal(tf.gather(sizes, tf.constant(fixed, tf.int32)),
                                               tf.constant([shape[i] for i in fixed], tf.int32))))
    x = _require({name: x}, ok, f"{name} must have shape [{', '.join(described)}]{what}; got shape {{}}",
                 tf.shape(x))[name]
    return tf.ensure_shape(x, shape)


class _Adaptation:
    """What a serving signature runs: request checks, preprocessing and the meta-learner's adaptation."""

    def __init__(self, meta_learner: EpisodicLearner, steps: int, preprocessing: Optional[ImagePreprocessing],
                 classifier: bool, family_tasks: Optional[int]):
        self.meta_learner = meta_learner
        self.steps = steps
        self.preprocessing = preprocessing
        self.classifier = classifier
        self.family_tasks = family_tasks
        learner = meta_learner.learner
        self.input_shape = list(learner.inputs[0].shape[1:])
        self.request_shape = self.input_shape if preprocessing is None else [None, None, self.input_shape[-1]]
        self.target_shape = [] if classifier else list(learner.outputs[0].shape[1:])
        self.ways = meta_learner.serving_ways() if classifier else None

    def check(self, request: dict) -> dict:
        """The request's tensors after their run-time checks (see the module docstring), preprocessed."""
        checked = {}
        labels = " (integer labels 0..N-1; send one-hot labels as their argmax)" if self.classifier else ""
        for key, value in request.items():
            lead = [(None, "examples")]
            if key.startswith("family_"):
                lead = [(self.family_tasks, "tasks")] + lead
            inputs = key.endswith("_x")
            checked[key] = _checked(value, key, lead, self.request_shape if inputs else self.target_shape,
                                    "" if inputs else labels)
        for x_key, y_key, axis in (("support_x", "support_y", 0),
                                   *[(f"family_{k}_x", f"family_{k}_y", 1) for k in ("support", "query")]):
            if x_key not in checked:
                continue
            examples, targets = tf.shape(checked[x_key])[axis], tf.shape(checked[y_key])[axis]
            ok = tf.logical_and(tf.equal(examples, targets), examples > 0)
            checked.update(_require({x_key: checked[x_key], y_key: checked[y_key]}, ok, (
                f"{x_key} and {y_key} must hold the same number (>= 1) of examples; got {{}} and {{}}"), examples,
                targets))
        if self.preprocessing is not None:
            checked = {k: self.preprocessing(v) if k.endswith("_x") else v for k, v in checked.items()}
        checks = []
        meta = self.meta_learner
        task = {k: checked[k][None] for k in ("support_x", "support_y", "query_x")}
        checks += meta.value_checks(task, lambda k: k)  # finite values; labels (for the losses it knows)
        if self.ways is not None and losses.target_kind(meta.loss_object) != "labels":
            checks.append(tf.debugging.assert_less(
                tf.cast(checked["support_y"], tf.int64), tf.constant(self.ways, tf.int64),
                message=f"support_y holds labels outside 0..{self.ways - 1} (the learner's classes)"))
        if self.family_tasks:
            family = {k: checked[f"family_{k}"] for k in TASK_KEYS}
            checks += meta.value_checks(family, lambda k: f"family_{k}")
        with tf.control_dependencies(checks):
            return {k: tf.identity(v) for k, v in checked.items()}

    def run(self, request: dict, steps):
        if self.meta_learner.likelihood is not None:
            summary = self.meta_learner.serve_predictive(self.check(request), steps)
            if self.classifier:
                return {"logits": tf.math.log(summary["probabilities"]), **summary}
            return {"predictions": summary["mean"], "stddev": summary["stddev"]}
        outputs = self.meta_learner.serve(self.check(request), steps)
        if self.classifier:
            return {"logits": outputs, "classes": tf.argmax(outputs, axis=-1, output_type=tf.int32)}
        return {"predictions": outputs}


def export_meta_learner(meta_learner: EpisodicLearner, export_dir: str, steps: Optional[int] = None,
                        preprocessing: Optional[ImagePreprocessing] = None,
                        classifier: Optional[bool] = None, family_tasks: Optional[int] = None) -> dict:
    """Writes a SavedModel to `export_dir` that adapts at serving time (see the module docstring).

    Args:
      meta_learner: a gradient-based meta-learner (MALTML included) or a metric learner.
      steps: inner steps of `serving_default` (default: the meta-learner's `eval_inner_steps`).
      preprocessing: for image learners, the training pipeline's `ImagePreprocessing` (e.g.
        `tasks.classes.preprocessing`); None feeds inputs to the learner as they come.
      classifier: whether the signatures take integer labels and return `logits` and `classes` (True) or take
        targets and return `predictions` (False); None infers it with `is_classifier` (metric learners and
        cross-entropy losses classify), which a custom classification loss needs to override.
      family_tasks: for MALTML, the number L of meta-finetuning tasks a request's family holds (e.g. the task
        distribution's `num_tasks`): the signatures then also take `family_support_x`, `family_support_y`,
        `family_query_x`, `family_query_y` of shape [L, examples, ...].

    Returns the concrete functions of the signatures, by name.
    """
    if not isinstance(meta_learner, EpisodicLearner):
        raise TypeError("export_meta_learner exports a tfmeta meta-learner (a MetaLearner or a MetricLearner); got "
                        f"{type(meta_learner).__name__}.")
    families = meta_learner.serves_families
    if families != (family_tasks is not None):
        raise ValueError("`family_tasks` (the meta-finetuning tasks per family) must be given for MALTML and any "
                         "learner whose adaptation starts with a family of tasks, and only for one; got "
                         f"family_tasks={family_tasks!r} for {type(meta_learner).__name__}.")
    if families:
        checks.integer(family_tasks, "family_tasks", minimum=1)
    learner = meta_learner.learner
    if not getattr(learner, "inputs", None):
        raise ValueError(f"the learner '{learner.name}' has no symbolic inputs to size the serving signature: "
                         "export a functional or Sequential learner.")
    input_shape = tuple(learner.inputs[0].shape[1:])
    if preprocessing is not None and tuple(preprocessing.image_shape) != input_shape:
        raise ValueError(f"`preprocessing` makes images of shape {preprocessing.image_shape}, but the learner takes "
                         f"{input_shape}.")
    if meta_learner.serves_inner_steps:
        steps = checks.integer(meta_learner.eval_inner_steps if steps is None else steps, "steps")
    if classifier is not None and not isinstance(classifier, bool):
        raise TypeError(f"`classifier` must be True, False or None (inferred); got {classifier!r}.")
    if classifier is False and not meta_learner.can_regress:
        raise ValueError(f"`classifier=False`: {type(meta_learner).__name__} is a metric learner, which classifies.")
    module = _Adaptation(meta_learner, steps or 0, preprocessing,
                         is_classifier(meta_learner) if classifier is None else classifier, family_tasks)
    dtype = keras.backend.standardize_dtype(learner.inputs[0].dtype)
    label_dtype = tf.int32 if module.classifier else dtype
    names = ["support_x", "support_y", "query_x"]
    if families:
        names += [f"family_{k}" for k in TASK_KEYS]

    def inputs(image_dtype=None):  # shapes are checked at run time (see `_Adaptation.check`)
        x_dtype = dtype if preprocessing is None else image_dtype
        return [tf.TensorSpec(None, x_dtype if name.endswith("_x") else label_dtype, name=name) for name in names]

    image_dtype = tf.uint8 if preprocessing is not None else None
    # keras.export.ExportArchive, not tf.saved_model.save on a tf.Module: the latter leaves Keras 3 variables
    # unrestorable by the TF1/C++ loaders that TF Serving and `saved_model_cli run` use.
    archive = keras.export.ExportArchive()
    archive.track(meta_learner)

    def adapt(*request):
        return module.run(dict(zip(names, request)), module.steps)

    def adapt_with_steps(*request):
        *request, inner_steps = request
        return module.run(dict(zip(names, request)), inner_steps)

    endpoints = {"serving_default": (adapt, inputs(image_dtype))}
    if preprocessing is not None:
        endpoints["serving_float"] = (adapt, inputs(tf.float32))
    if meta_learner.serves_inner_steps:
        steps_spec = tf.TensorSpec([], tf.int32, name="inner_steps")
        endpoints["serving_with_steps"] = (adapt_with_steps, [*inputs(image_dtype), steps_spec])
    if isinstance(meta_learner, SamplingLearner) and meta_learner.particle_mapping == "vectorized_map":

        def adapt_with_samples(*request):
            *request, num_samples, seed = request
            ok = num_samples >= 1
            num_samples = _require({"n": num_samples}, ok, "num_samples must be >= 1; got {}", num_samples)["n"]
            with meta_learner.sampling(num_samples, seed):
                return module.run(dict(zip(names, request)), module.steps)

        endpoints["serving_with_samples"] = (adapt_with_samples, [
            *inputs(image_dtype), tf.TensorSpec([], tf.int32, name="num_samples"),
            tf.TensorSpec([], tf.int32, name="seed")])
    with kernels.disabled():  # a served model must load without tfmeta: TensorFlow's own ops only
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
    inputs = getattr(model, "inputs", None) or model.learner.inputs  # a TransductiveModel wraps the learner
    spec = tf.TensorSpec([None, *inputs[0].shape[1:]], inputs[0].dtype, name="x")
    with kernels.disabled():  # as in `export_meta_learner`
        archive.add_endpoint("serving_default", lambda x: model(x, training=False), input_signature=[spec])
        archive.write_out(os.path.join(directory, "saved_model"), verbose=False)
