"""Metric learners: scores against NumPy, training, `adapt` classifiers that predict like `evaluate`, saving."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import classification_episodes

import tfmeta
from tfmeta.metric.matching import attention_lstm


def embedding(shape=(6, 6, 1), units=4):
    """A linear embedding, so that scores can be checked by hand."""
    inputs = keras.Input(shape)
    return keras.Model(inputs, keras.layers.Dense(units, use_bias=False)(keras.layers.Flatten()(inputs)))


def embed(model, x):
    return model.predict(x.reshape(-1, *x.shape[2:]), verbose=0).reshape(*x.shape[:2], -1)


def test_prototypical_scores_are_negative_squared_distances_to_class_means():
    episodes = {k: v.numpy() for k, v in classification_episodes(dtype="float32").items()}
    meta = tfmeta.PrototypicalNetwork(embedding())
    scores = meta.episode_scores(episodes, training=False)[0].numpy()
    support, query = embed(meta.learner, episodes["support_x"]), embed(meta.learner, episodes["query_x"])
    for t in range(2):
        prototypes = np.stack([support[t][episodes["support_y"][t] == c].mean(0) for c in range(3)])
        expected = -((query[t][:, None] - prototypes[None]) ** 2).sum(-1)
        np.testing.assert_allclose(scores[t], expected, rtol=1e-4, atol=1e-4)


def test_matching_scores_are_log_attention_over_the_support_labels():
    episodes = {k: v.numpy() for k, v in classification_episodes(dtype="float32").items()}
    meta = tfmeta.MatchingNetwork(embedding(), scale=3.0)
    scores = meta.episode_scores(episodes, training=False)[0].numpy()
    support, query = embed(meta.learner, episodes["support_x"]), embed(meta.learner, episodes["query_x"])
    for t in range(2):
        cosine = (query[t] / np.linalg.norm(query[t], axis=1, keepdims=True)) @ (
            support[t] / np.linalg.norm(support[t], axis=1, keepdims=True)).T
        attention = np.exp(3.0 * cosine) / np.exp(3.0 * cosine).sum(1, keepdims=True)
        expected = np.log(attention @ np.eye(3)[episodes["support_y"][t]])
        np.testing.assert_allclose(scores[t], expected, rtol=1e-4, atol=1e-4)


def test_relation_scores_pair_each_query_with_each_class_sum():
    episodes = {k: v.numpy() for k, v in classification_episodes(dtype="float32", shape=(4, 4, 2)).items()}
    inputs = keras.Input((4, 4, 2))
    maps = keras.Model(inputs, keras.layers.Conv2D(3, 1)(inputs))
    module_inputs = keras.Input((4, 4, 6))
    module = keras.Model(module_inputs, keras.layers.Dense(1, activation="sigmoid")(
        keras.layers.Flatten()(module_inputs)))
    meta = tfmeta.RelationNetwork(maps, module=module)
    scores = meta.episode_scores(episodes, training=False)[0].numpy()
    support = maps.predict(episodes["support_x"].reshape(-1, 4, 4, 2), verbose=0).reshape(2, 6, 4, 4, 3)
    query = maps.predict(episodes["query_x"].reshape(-1, 4, 4, 2), verbose=0).reshape(2, 9, 4, 4, 3)
    t, q, c = 1, 4, 2
    class_map = support[t][episodes["support_y"][t] == c].sum(0)
    expected = module.predict(np.concatenate([query[t, q], class_map], -1)[None], verbose=0)[0, 0]
    np.testing.assert_allclose(scores[t, q, c], expected, rtol=1e-5)


LEARNERS = {
    "prototypical": lambda: tfmeta.PrototypicalNetwork(tfmeta.models.conv_net(
        (6, 6, 1), outputs=None, filters=8, blocks=2, batch_norm_statistics="running", batch_norm_momentum=0.5)),
    "matching": lambda: tfmeta.MatchingNetwork(tfmeta.models.conv_net(
        (6, 6, 1), outputs=None, filters=8, blocks=2, batch_norm_statistics="running"),
        full_context_embeddings=True, processing_steps=2),
    "relation": lambda: tfmeta.RelationNetwork(tfmeta.models.conv_net(
        (6, 6, 1), outputs=None, filters=8, blocks=2, pooled_blocks=1, batch_norm_statistics="running")),
}


@pytest.mark.parametrize("name", list(LEARNERS))
def test_fit_evaluate_adapt_save(name, tmp_path):
    meta = LEARNERS[name]()
    meta.compile(optimizer=keras.optimizers.Adam(0.01))
    episodes = classification_episodes(dtype="float32", tasks=2, ways=3, shots=2, queries=3)
    data = tf.data.Dataset.from_tensors(episodes).repeat()
    history = meta.fit(data, steps_per_epoch=30, epochs=1, verbose=0).history
    assert np.isfinite(history["loss"][0])
    logs = meta.evaluate(data, steps=1, verbose=0, return_dict=True)
    assert set(logs) == {"loss", "sparse_categorical_accuracy"}
    assert logs["sparse_categorical_accuracy"] > 0.5  # memorises the repeated episodes
    results = meta.evaluate_tasks(episodes, at_steps=(0, 1))
    assert results["loss"].shape == (2, 2)
    # The adapted classifier predicts each query's scores as evaluation computed them.
    expected = meta.episode_scores(episodes, training=False)[0][1].numpy()
    classifier = meta.adapt(episodes["support_x"][1], episodes["support_y"][1])
    np.testing.assert_allclose(classifier.predict(episodes["query_x"][1], verbose=0), expected, rtol=1e-4, atol=1e-5)
    # It owns its weights (further meta-training does not move it) and saves and loads as a Keras model.
    meta.fit(data, steps_per_epoch=2, epochs=1, verbose=0)
    np.testing.assert_allclose(classifier.predict(episodes["query_x"][1], verbose=0), expected, rtol=1e-4, atol=1e-5)
    classifier.save(tmp_path / "adapted.keras")
    loaded = keras.models.load_model(tmp_path / "adapted.keras")
    np.testing.assert_allclose(loaded.predict(episodes["query_x"][1], verbose=0), expected, rtol=1e-4, atol=1e-5)


def test_metric_learners_train_with_more_ways_than_they_test():
    meta = LEARNERS["prototypical"]()
    meta.compile(optimizer=keras.optimizers.Adam(0.01))
    meta.train_on_batch(classification_episodes(dtype="float32", ways=6))
    logs = meta.test_on_batch(classification_episodes(dtype="float32", ways=3), return_dict=True)
    assert np.isfinite(logs["loss"])


def test_bad_input():
    with pytest.raises(ValueError, match="must output feature maps"):
        tfmeta.RelationNetwork(embedding())
    meta = tfmeta.PrototypicalNetwork(embedding())
    with pytest.raises(ValueError, match="`support_y` must hold every label 0..N-1 .* a label below N has no support"):
        meta.adapt(np.zeros((2, 6, 6, 1), np.float32), np.array([0, 2]))
    with pytest.raises(ValueError, match="`support_x` must have shape \\[examples, 6, 6, 1\\]"):
        meta.adapt(np.zeros((2, 5, 5, 1), np.float32), np.array([0, 1]))
    with pytest.raises(ValueError, match="`processing_steps` must be >= 1"):
        tfmeta.MatchingNetwork(embedding(), processing_steps=0)


def test_backbones():
    assert tfmeta.models.conv_net(pooling="stride").output.shape == (None, 5)  # MAML's Omniglot network
    assert tfmeta.models.conv_net(outputs=None).output.shape == (None, 1, 1, 64)  # 64-d embedding
    assert tfmeta.models.conv_net((84, 84, 3), outputs=None, filters=32).output.shape == (None, 5, 5, 32)
    assert tfmeta.models.conv_net(outputs=None, pooled_blocks=2).output.shape == (None, 7, 7, 64)
    fc = tfmeta.models.mlp((28, 28, 1), (256, 128, 64, 64), outputs=5, batch_norm=True)  # MAML's FC network
    assert fc.output.shape == (None, 5)
    assert [layer.units for layer in fc.layers if isinstance(layer, keras.layers.Dense)] == [256, 128, 64, 64, 5]
    assert sum(isinstance(layer, tfmeta.layers.BatchNormalization) for layer in fc.layers) == 4


@pytest.mark.parametrize("name", list(LEARNERS))
def test_config_round_trip(name):
    """A metric learner rebuilt from its config, given the same weights, scores every episode the same."""
    meta = LEARNERS[name]()
    clone = type(meta).from_config(meta.get_config())
    assert type(clone) is type(meta) and clone.get_config() == meta.get_config()
    clone.set_weights(meta.get_weights())
    episodes = classification_episodes(dtype="float32")
    np.testing.assert_allclose(clone.episode_scores(episodes, training=False)[0],
                               meta.episode_scores(episodes, training=False)[0], rtol=1e-6)


def test_loss_objects_give_per_task_losses():
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    meta = tfmeta.PrototypicalNetwork(embedding(), loss=loss)
    results = meta.evaluate_tasks(classification_episodes(dtype="float32"))
    assert results["loss"].shape == (2, 1)
    assert type(meta).from_config(meta.get_config()).loss_object.get_config()["from_logits"]


def test_full_context_embeddings_read_the_support_set_from_the_first_step():
    meta = tfmeta.MatchingNetwork(embedding(), full_context_embeddings=True, processing_steps=1)
    episodes = classification_episodes(dtype="float32")
    query = tf.reshape(meta.learner(tf.reshape(episodes["query_x"], (-1, 6, 6, 1))), (2, 9, -1))
    support = meta.embed_support(tf.reshape(meta.learner(tf.reshape(episodes["support_x"], (-1, 6, 6, 1))),
                                            (2, 6, -1)))
    a = attention_lstm(meta.query_cell, query, support, 1)
    b = attention_lstm(meta.query_cell, query, support[::-1], 1)  # the other task's support set
    assert not np.allclose(a, b)


def test_metric_learners_refuse_batch_statistics_at_inference():
    with pytest.raises(ValueError, match=r"normalises with batch statistics at inference \(norm_0: .*"
                                         r"batch_norm_statistics='running'"):
        tfmeta.PrototypicalNetwork(tfmeta.models.conv_net((6, 6, 1), outputs=None, filters=4, blocks=1))


def test_subclassed_learners_get_a_clear_error():
    class Embedding(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(3)

        def call(self, x):
            return self.dense(tf.reshape(x, (tf.shape(x)[0], -1)))

    learner = Embedding()
    learner(np.zeros((1, 6, 6, 1), np.float32))
    with pytest.raises(ValueError, match="functional or Sequential Keras model"):
        tfmeta.MatchingNetwork(learner)
