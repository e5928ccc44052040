"""What the engine computed and wrote before the redesign of issue 20 (tests/fixtures/pre_redesign, written by
its make.py at that commit) it still computes and reads: float64 meta-gradients of MAML, Meta-SGD, Reptile,
iMAML, WarpGrad and MALTML on the same weights and episodes to 1e-10, and the checkpoint, `.keras` file and
SavedModel of a meta-learner, which restore and predict what they did."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from compatibility_cases import CASES, SAVED, episodes_for, meta_gradients

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "pre_redesign")


@pytest.fixture(scope="module")
def recorded():
    return dict(np.load(os.path.join(FIXTURES, "meta_gradients.npz")))


@pytest.mark.parametrize("name", list(CASES))
def test_meta_gradients_equal_the_pre_redesign_values(name, recorded):
    meta = CASES[name]()
    assert len(meta.meta_variables) == sum(k.startswith(f"{name}/weight/") for k in recorded)
    for i, variable in enumerate(meta.meta_variables):
        variable.assign(recorded[f"{name}/weight/{i}"])
    grads = meta_gradients(meta, episodes_for(name))
    for i, grad in enumerate(grads):
        np.testing.assert_allclose(np.array(grad), recorded[f"{name}/grad/{i}"], rtol=1e-10, atol=1e-12)


def test_checkpoints_keras_files_and_saved_models_from_before_the_redesign_restore():
    episode = dict(np.load(os.path.join(FIXTURES, "saved_predictions.npz")))
    expected = episode.pop("predictions")
    meta = SAVED()
    meta.compile(keras.optimizers.Adam(1e-3))
    meta.optimizer.build(meta.meta_variables)
    tf.train.Checkpoint(meta_learner=meta, optimizer=meta.optimizer).read(
        os.path.join(FIXTURES, "checkpoint", "ckpt")).assert_existing_objects_matched()
    assert int(meta.optimizer.iterations) == 3
    loaded = keras.models.load_model(os.path.join(FIXTURES, "meta.keras"))
    for model in (meta, loaded):
        predictions = model.adapt(episode["support_x"], episode["support_y"]).predict(episode["query_x"], verbose=0)
        np.testing.assert_allclose(predictions, expected, rtol=1e-6, atol=1e-6)
    served = tf.saved_model.load(os.path.join(FIXTURES, "saved_model")).signatures["serving_default"]
    outputs = served(**{k: tf.constant(episode[k]) for k in ("support_x", "support_y", "query_x")})
    np.testing.assert_allclose(outputs["predictions"], expected, rtol=1e-6, atol=1e-6)
