"""What `adapt` returns: the learner with adapted weights, as a Keras model that predicts what `evaluate` scores.

A learner whose batch norm normalises with the current batch's statistics at inference (the MAML paper's
test-time policy, `statistics="batch"`) predicts an example differently depending on the examples batched with
it. `evaluate` normalises each task's query set as one batch; Keras' `predict` would cut it into chunks of 32.
So `adapt` returns such a learner wrapped in `TransductiveModel`, whose `predict` and `evaluate` take the whole
input as one batch. `adapt(..., batch_norm="support")` instead fixes the statistics to the support set's
(`tfmeta.layers.freeze_batch_statistics`) and returns a plain copy that predicts every example on its own.
"""

from __future__ import annotations

import keras
import tensorflow as tf

BATCH_NORM_POLICIES = ("batch", "support")


def _examples(x) -> int:
    """The number of examples of an array, a tensor or a nest of them; refuses inputs that come in batches."""
    if isinstance(x, (tf.data.Dataset, keras.utils.PyDataset)) or callable(getattr(x, "__next__", None)):
        raise ValueError(
            "a TransductiveModel normalises over its whole input at once (batch statistics at inference), so it "
            f"takes arrays or tensors, not a {type(x).__name__} that arrives in batches: pass the task's query set "
            "as one array, or adapt with batch_norm='support' for a model that predicts examples one by one.")
    leaves = tf.nest.flatten(x)
    if not leaves:
        raise ValueError("a TransductiveModel needs a non-empty input.")
    return max(int(tf.shape(leaves[0])[0]), 1)


@keras.saving.register_keras_serializable(package="tfmeta")
class TransductiveModel(keras.Model):
    """An adapted learner that normalises with batch statistics at inference: `predict` and `evaluate` run on the
    whole input as one batch, whatever their `batch_size`, as `MetaLearner.evaluate` runs a task's query set;
    calling the model on a tensor does the same. `learner` is the adapted copy of the meta-learner's learner."""

    def __init__(self, learner: keras.Model, **kwargs):
        super().__init__(**kwargs)
        self.learner = learner
        self.built = learner.built

    def call(self, inputs, training=None):
        kwargs = {"training": training} if self.learner._call_has_training_arg else {}
        return self.learner(inputs, **kwargs)

    def predict(self, x, batch_size=None, verbose="auto", steps=None, callbacks=None):
        del batch_size  # the whole input is one batch
        return super().predict(x, batch_size=_examples(x), verbose=verbose, steps=steps, callbacks=callbacks)

    def evaluate(self, x=None, y=None, batch_size=None, **kwargs):
        del batch_size
        return super().evaluate(x, y, batch_size=_examples(x), **kwargs)

    def get_config(self) -> dict:
        return {**super().get_config(), "learner": keras.saving.serialize_keras_object(self.learner)}

    @classmethod
    def from_config(cls, config: dict):
        config = dict(config)
        config["learner"] = keras.saving.deserialize_keras_object(config.pop("learner"))
        return cls(**config)
