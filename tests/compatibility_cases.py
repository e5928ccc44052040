"""The meta-learners and episodes whose float64 meta-gradients tests/test_compatibility.py pins to the values the
engine gave before the redesign of issue 20 (tests/fixtures/pre_redesign/)."""

import tensorflow as tf
from conftest import random_episodes

import tfmeta


def small_mlp():
    return tfmeta.models.mlp(input_shape=(2,), hidden_units=(6, 5), outputs=1, activation="tanh", dtype="float64")


def warped_mlp():
    return tfmeta.warp.insert_warps(small_mlp(), lambda layer: tfmeta.warp.WarpDense(
        identity_init=False, dtype="float64", name=f"warp_{layer.name}"), after="hidden_*")


def family_mlp():
    return tfmeta.models.mlp(input_shape=(1,), hidden_units=(4,), outputs=1, activation="tanh", dtype="float64")


CASES = {
    "maml": lambda: tfmeta.MAML(small_mlp(), update_rule=tfmeta.Sgd(0.3), inner_steps=2),
    "metasgd": lambda: tfmeta.MAML(small_mlp(), update_rule=tfmeta.MetaSGD(0.3, dtype="float64"), inner_steps=2),
    "reptile": lambda: tfmeta.Reptile(small_mlp(), update_rule=tfmeta.Sgd(0.1), inner_steps=3),
    "imaml": lambda: tfmeta.IMAML(small_mlp(), regularization=2.0, cg_steps=5, update_rule=tfmeta.Sgd(0.1),
                                  inner_steps=3),
    "warpgrad_leap": lambda: tfmeta.WarpGrad(warped_mlp(), update_rule=tfmeta.Sgd(0.2), inner_steps=3),
    "warpgrad_maml": lambda: tfmeta.WarpGrad(warped_mlp(), update_rule=tfmeta.Sgd(0.2), inner_steps=2,
                                             init_objective="maml"),
    "maltml": lambda: tfmeta.MALTML(family_mlp(), task_rule=tfmeta.Sgd(0.2), family_rule=tfmeta.Sgd(0.1),
                                    update_rule=tfmeta.Sgd(0.2), task_steps=2),
}


def episodes_for(name):
    if name == "maltml":
        episodes = tfmeta.tasks.SineFamilies(2, 2, 3, 4).sample(tf.constant([3, 4], tf.int64), 2)
        return {k: tf.cast(v, "float64") for k, v in episodes.items()}
    return random_episodes(tasks=3)


def SAVED():  # noqa: N802  (a factory, named like the class it makes)
    return tfmeta.MAML(tfmeta.models.mlp(hidden_units=(8, 8)), update_rule=tfmeta.MetaSGD(0.05), eval_inner_steps=2)


def meta_gradients(meta, episodes) -> list:
    """A meta-learner's meta-gradient for its `meta_variables` on `episodes`: `compute_meta_gradients`, or for
    WarpGrad (several updates per meta-step, by its own `train_step`) what one meta-step with an outer SGD step of
    1 subtracts from each variable."""
    if not isinstance(meta, tfmeta.WarpGrad):
        return [tf.convert_to_tensor(g) for g in meta.compute_meta_gradients(episodes)[0]]
    import keras

    meta.compile(optimizer=keras.optimizers.SGD(1.0))
    before = [tf.convert_to_tensor(v) for v in meta.meta_variables]
    meta.train_on_batch(episodes)
    return [b - tf.convert_to_tensor(v) for b, v in zip(before, meta.meta_variables)]
