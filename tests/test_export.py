"""SavedModel export: adaptation at serving time, reloaded in a fresh process, against the in-memory meta-learner."""

import os
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import omniglot_dir  # noqa: F401  (a fixture)

import tfmeta
from tfmeta import export

# Runs requests against SavedModels in a fresh Python process: argv = requests.npz results.npz; each request
# names its export directory, signature and inputs; a failing request records its error message.
SERVE = """
import sys, numpy as np, tensorflow as tf
requests = np.load(sys.argv[1], allow_pickle=True)["requests"]
results = {}
for i, (directory, signature, inputs) in enumerate(requests):
    function = tf.saved_model.load(directory).signatures[signature]
    try:
        outputs = function(**{k: tf.constant(v) for k, v in inputs.items()})
        results.update({f"{i}/{k}": v.numpy() for k, v in outputs.items()})
    except Exception as error:  # the message is what the test checks
        results[f"{i}/error"] = np.array(f"{type(error).__name__}: {error}")
np.savez(sys.argv[2], **results)
"""


def serve(tmp_path, requests):
    """Each request's outputs (dict) or error message (str), from a fresh process."""
    np.savez(tmp_path / "requests.npz", requests=np.array(requests, dtype=object), allow_pickle=True)
    subprocess.run([sys.executable, "-c", SERVE, str(tmp_path / "requests.npz"), str(tmp_path / "results.npz")],
                   check=True, timeout=600, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    results = np.load(tmp_path / "results.npz")
    answers = []
    for i in range(len(requests)):
        if f"{i}/error" in results:
            answers.append(str(results[f"{i}/error"]))
        else:
            answers.append({k.split("/", 1)[1]: results[k] for k in results if k.startswith(f"{i}/")})
    return answers


def sine_request(seed, shots):
    episode = tfmeta.tasks.SineTasks(num_support=shots, num_query=9).sample(tf.constant([seed, 0], tf.int64), 1)
    return {k: np.array(v[0]) for k, v in episode.items()}


def test_maml_sine_adapts_at_serving_time_with_any_support_size_and_step_override(tmp_path):
    meta = tfmeta.MAML(tfmeta.models.mlp(hidden_units=(16, 16)), update_rule=tfmeta.Sgd(0.05), eval_inner_steps=4)
    export.export_meta_learner(meta, str(tmp_path / "sine"))
    five, eleven = sine_request(1, 5), sine_request(2, 11)
    inputs = lambda e: {k: e[k] for k in ("support_x", "support_y", "query_x")}  # noqa: E731
    answers = serve(tmp_path, [
        (str(tmp_path / "sine"), "serving_default", inputs(five)),
        (str(tmp_path / "sine"), "serving_default", inputs(eleven)),
        (str(tmp_path / "sine"), "serving_with_steps", {**inputs(eleven), "inner_steps": np.int32(7)}),
        (str(tmp_path / "sine"), "serving_default", {**inputs(five), "support_y": five["support_y"][:3]}),
        (str(tmp_path / "sine"), "serving_default", {**inputs(five), "support_x": five["support_x"][None]}),
    ])
    for answer, episode, steps in ((answers[0], five, 4), (answers[1], eleven, 4), (answers[2], eleven, 7)):
        expected = meta.adapt(episode["support_x"], episode["support_y"], steps=steps).predict(
            episode["query_x"], verbose=0)
        np.testing.assert_allclose(answer["predictions"], expected, rtol=1e-5, atol=1e-5)
    assert "support_x and support_y must hold the same number (>= 1) of examples; got 5 and 3" in answers[3]
    assert "support_x must have shape [examples, 1]; got shape [1 5 1]" in answers[4]
    # The TF1/C++ loader (TF Serving's) restores the variables too.
    run = subprocess.run(["saved_model_cli", "run", "--dir", str(tmp_path / "sine"), "--tag_set", "serve",
                          "--signature_def", "serving_default",
                          "--input_exprs", "support_x=[[0.],[1.]];support_y=[[0.],[0.8]];query_x=[[0.5]]"],
                         check=True, capture_output=True, text=True, timeout=300).stdout
    expected = meta.adapt(np.array([[0.0], [1.0]]), np.array([[0.0], [0.8]])).predict(np.array([[0.5]]), verbose=0)
    value = float(run.split("Result for output key predictions:")[1].strip().strip("[]"))
    assert value == pytest.approx(float(expected[0, 0]), abs=1e-5)


def raw_omniglot_request(path, ways=5, shots=1, queries=2):
    """A 5-way episode of held-out characters as decoded from the archive's PNG files: uint8 [n, 105, 105, 1]."""
    with zipfile.ZipFile(os.path.join(path, "images_background_small1.zip")) as archive:
        names = sorted(n for n in archive.namelist() if n.endswith(".png") and "/Balinese/" in n)
        characters = sorted({n.rsplit("/", 1)[0] for n in names})[:ways]
        images = [[tf.io.decode_png(archive.read(n), channels=1).numpy() for n in names
                   if n.startswith(c + "/")][:shots + queries] for c in characters]
    split = lambda a, b: np.array([image for drawings in images for image in drawings[a:b]])  # noqa: E731
    labels = lambda n: np.repeat(np.arange(ways, dtype=np.int32), n)  # noqa: E731
    return {"support_x": split(0, shots), "support_y": labels(shots), "query_x": split(shots, shots + queries),
            "query_y": labels(queries)}


def test_omniglot_maml_and_prototypical_network_serve_raw_images(tmp_path, omniglot_dir):  # noqa: F811
    preprocessing = tfmeta.data.omniglot_preprocessing()
    maml = tfmeta.MAML(tfmeta.models.conv_net(outputs=5, filters=8, pooling="stride"), loss="scores_cross_entropy",
                       update_rule=tfmeta.Sgd(0.4), eval_inner_steps=3)
    protonet = tfmeta.PrototypicalNetwork(tfmeta.models.conv_net(outputs=None, filters=8,
                                                                 batch_norm_statistics="running"))
    for name, meta in (("maml", maml), ("protonet", protonet)):
        signatures = export.export_meta_learner(meta, str(tmp_path / name), preprocessing=preprocessing)
        assert set(signatures) >= {"serving_default", "serving_float"}
    request = raw_omniglot_request(omniglot_dir)
    inputs = {k: request[k] for k in ("support_x", "support_y", "query_x")}
    as_float = {**inputs, **{k: (request[k] / 255.0).astype(np.float32) for k in ("support_x", "query_x")}}
    bad_labels = {**inputs, "support_y": np.array([0, 1, 2, 3, 7], np.int32)}
    missing_label = {**inputs, "support_y": np.array([0, 1, 2, 4, 4], np.int32)}
    answers = serve(tmp_path, [
        (str(tmp_path / "maml"), "serving_default", inputs),
        (str(tmp_path / "protonet"), "serving_default", inputs),
        (str(tmp_path / "protonet"), "serving_float", as_float),
        (str(tmp_path / "maml"), "serving_default", bad_labels),
        (str(tmp_path / "protonet"), "serving_default", missing_label),
    ])
    support_x, query_x = preprocessing(request["support_x"]), preprocessing(request["query_x"])
    for answer, meta in ((answers[0], maml), (answers[1], protonet), (answers[2], protonet)):
        expected = meta.adapt(support_x, request["support_y"]).predict(query_x, verbose=0)
        np.testing.assert_allclose(answer["logits"], expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(answer["classes"], expected.argmax(-1))
    assert "support_y holds class labels outside 0..4" in answers[3] and "has 5 outputs" in answers[3]
    assert "support_y must hold every label 0..N-1" in answers[4]
    shown = subprocess.run(["saved_model_cli", "show", "--dir", str(tmp_path / "maml"), "--all"], check=True,
                           capture_output=True, text=True, timeout=300).stdout
    for expected in ("serving_default", "serving_float", "serving_with_steps", "support_x", "support_y", "query_x",
                     "inner_steps", "logits", "classes", "DT_UINT8"):
        assert expected in shown


def test_adapted_learner_saves_as_keras_and_as_a_saved_model(tmp_path):
    meta = tfmeta.MAML(tfmeta.models.mlp(hidden_units=(8,)), update_rule=tfmeta.Sgd(0.1), eval_inner_steps=2)
    episode = sine_request(3, 5)
    adapted = meta.adapt(episode["support_x"], episode["support_y"])
    export.save_adapted(adapted, str(tmp_path / "adapted"))
    expected = adapted.predict(episode["query_x"], verbose=0)

    reloaded = keras.models.load_model(tmp_path / "adapted" / "model.keras")
    np.testing.assert_allclose(reloaded.predict(episode["query_x"], verbose=0), expected, rtol=1e-6)
    served = tf.saved_model.load(str(tmp_path / "adapted" / "saved_model")).signatures["serving_default"]
    outputs = served(x=tf.constant(episode["query_x"]))
    np.testing.assert_allclose(next(iter(outputs.values())), expected, rtol=1e-6)


def test_warpgrad_and_an_explicit_classifier_serve_what_adapt_gives(tmp_path):
    """A WarpGrad learner adapts its task layers at serving time with its warp layers fixed; `classifier=True`
    serves labels for a classification loss that `is_classifier` cannot recognise by name."""
    warped = tfmeta.warp.insert_warps(
        tfmeta.models.mlp(hidden_units=(8, 8)), after="hidden_*",
        warp=lambda layer: tfmeta.warp.ResidualWarp(depth=1, identity_init=False, name=f"warp_{layer.name}"))
    warpgrad = tfmeta.WarpGrad(warped, update_rule=tfmeta.Sgd(0.05), eval_inner_steps=3)
    export.export_meta_learner(warpgrad, str(tmp_path / "warpgrad"))

    def labels_loss(y, logits):
        return tf.keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)

    classifier = tfmeta.MAML(tfmeta.models.mlp(input_shape=(2,), hidden_units=(8,), outputs=3), loss=labels_loss,
                             update_rule=tfmeta.Sgd(0.5), eval_inner_steps=2)
    assert not export.is_classifier(classifier)
    export.export_meta_learner(classifier, str(tmp_path / "classifier"), classifier=True)
    sine = sine_request(3, 5)
    rng = np.random.default_rng(0)
    points = {"support_x": rng.normal(size=(6, 2)).astype("float32"), "support_y": np.int32([0, 1, 2, 0, 1, 2]),
              "query_x": rng.normal(size=(4, 2)).astype("float32")}
    sine_answer, labels_answer = serve(tmp_path, [
        (str(tmp_path / "warpgrad"), "serving_default", {k: sine[k] for k in points}),
        (str(tmp_path / "classifier"), "serving_default", points),
    ])
    expected = warpgrad.adapt(sine["support_x"], sine["support_y"]).predict(sine["query_x"], verbose=0)
    np.testing.assert_allclose(sine_answer["predictions"], expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(expected, warpgrad.learner.predict(sine["query_x"], verbose=0), atol=1e-4)
    logits = classifier.adapt(points["support_x"], points["support_y"]).predict(points["query_x"], verbose=0)
    np.testing.assert_allclose(labels_answer["logits"], logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(labels_answer["classes"], np.argmax(logits, axis=-1))


def test_export_rejects_what_it_cannot_serve(tmp_path):
    meta = tfmeta.MAML(tfmeta.models.conv_net(outputs=5, filters=4, blocks=1), loss="scores_cross_entropy")
    with pytest.raises(ValueError, match="preprocessing.*makes images of shape"):
        export.export_meta_learner(meta, str(tmp_path / "x"), preprocessing=tfmeta.data.omniglot_preprocessing(32))
    maltml = tfmeta.MALTML(tfmeta.models.mlp(hidden_units=(4,)))
    with pytest.raises(ValueError, match="`family_tasks` .* must be given for MALTML"):
        export.export_meta_learner(maltml, str(tmp_path / "y"))
    with pytest.raises(ValueError, match="and only for one; got family_tasks=3 for MAML"):
        export.export_meta_learner(meta, str(tmp_path / "y"), family_tasks=3)
    with pytest.raises(TypeError, match="MetaLearner or a MetricLearner"):
        export.export_meta_learner(keras.Model(), str(tmp_path / "y"))
    assert export.is_classifier(meta) and not export.is_classifier(maltml)
    with pytest.raises(TypeError, match="`classifier` must be True, False or None"):
        export.export_meta_learner(meta, str(tmp_path / "z"), classifier="yes")
    protonet = tfmeta.PrototypicalNetwork(tfmeta.models.conv_net(outputs=None, filters=4, blocks=1, batch_norm=False))
    with pytest.raises(ValueError, match="`classifier=False`: PrototypicalNetwork is a metric learner"):
        export.export_meta_learner(protonet, str(tmp_path / "w"), classifier=False)


# ------------------------------------------------------------------------------------------------- agreement

def _classification_tasks(ways=5, shots=1, queries=15, tasks=2, seed=0):
    """Image-like 5-way episodes (random 28x28 images, labels 0..ways-1): 75 queries per task, more than Keras'
    predict batch of 32, so that batch-dependent layers show."""
    rng = np.random.default_rng(seed)
    labels = lambda n: np.tile(np.repeat(np.arange(ways, dtype=np.int32), n), (tasks, 1))  # noqa: E731
    return {"support_x": rng.random((tasks, ways * shots, 28, 28, 1), np.float32), "support_y": labels(shots),
            "query_x": rng.random((tasks, ways * queries, 28, 28, 1), np.float32), "query_y": labels(queries)}


def _agreement_case(family):
    """(meta-learner, episodes, inner steps, export keyword arguments) for one learner family."""
    conv = dict(outputs=5, filters=8, pooling="stride")
    if family == "maml":  # batch norm with the current batch's statistics at test time (the MAML paper's policy)
        meta = tfmeta.MAML(tfmeta.models.conv_net(**conv), loss="scores_cross_entropy", update_rule=tfmeta.Sgd(0.4),
                           eval_inner_steps=3)
        return meta, _classification_tasks(), 3, {}
    if family == "maml++":  # per-step batch norm, scored after 1 of its 3 steps
        learner = tfmeta.models.conv_net(per_step_batch_norm=3, **conv)
        for layer in learner.layers:  # sets that differ from step to step, as meta-training makes them
            if isinstance(layer, tfmeta.layers.PerStepBatchNormalization):
                layer.gamma.assign(np.random.default_rng(0).uniform(0.5, 1.5, layer.gamma.shape))
                layer.beta.assign(np.random.default_rng(1).normal(0, 0.5, layer.beta.shape))
        meta = tfmeta.MAML(learner, loss="scores_cross_entropy", update_rule=tfmeta.LSLR(0.4, steps=3), inner_steps=3)
        return meta, _classification_tasks(), 1, {}
    if family == "warpgrad":
        warped = tfmeta.warp.insert_warps(tfmeta.models.conv_net(**conv), tfmeta.warp.WarpConv2D, after="act_*")
        meta = tfmeta.WarpGrad(warped, loss="scores_cross_entropy", update_rule=tfmeta.Sgd(0.4), eval_inner_steps=2)
        return meta, _classification_tasks(), 2, {}
    if family == "protonet":
        meta = tfmeta.PrototypicalNetwork(tfmeta.models.conv_net(outputs=None, filters=8,
                                                                 batch_norm_statistics="running"))
        return meta, _classification_tasks(), 0, {}
    # MALTML on sine families through an MLP with batch norm (batch statistics at test time), 75 goal queries.
    families = tfmeta.tasks.SineFamilies(num_tasks=2, num_goal_tasks=1, num_support=10, num_goal_query=75)
    meta = tfmeta.MALTML(tfmeta.models.mlp(hidden_units=(16, 16), batch_norm=True), family_rule=tfmeta.Sgd(0.01),
                         update_rule=tfmeta.Sgd(0.05), eval_inner_steps=3)
    return meta, families.sample(tf.constant([0, 0], tf.int64), 2), 3, {"family_tasks": 2}


@pytest.mark.parametrize("family", ["maml", "maml++", "warpgrad", "protonet", "maltml"])
def test_evaluate_adapt_and_the_saved_model_agree(family, tmp_path):
    """For each learner family, on the same tasks: the query loss `evaluate` reports, that of the model `adapt`
    returns (predicting 75 queries in Keras' batches of 32) and that of the served SavedModel are the same."""
    keras.utils.set_random_seed(1)
    meta, episodes, steps, options = _agreement_case(family)
    meta.compile(keras.optimizers.Adam(1e-3))
    def task(episodes, i):  # MALTML: the family's (only) goal task
        keys = ("support_x", "support_y", "query_x", "query_y")
        if family == "maltml":
            return {k: np.asarray(episodes[f"goal_{k}"][i, 0]) for k in keys}
        return {k: np.asarray(episodes[k][i]) for k in keys}

    evaluated = meta.evaluate_tasks(episodes, steps=steps, at_steps=(steps,))["loss"][:, -1].numpy()
    logs = meta.evaluate(tf.data.Dataset.from_tensors(episodes), verbose=0, return_dict=True)
    if family != "maml++":  # `evaluate` scores after eval_inner_steps
        np.testing.assert_allclose(logs["loss"], evaluated.mean(), rtol=1e-5)
    export.export_meta_learner(meta, str(tmp_path / family), **options)
    requests = []
    for i in range(2):
        t = task(episodes, i)
        inputs = {k: t[k] for k in ("support_x", "support_y", "query_x")}
        if family == "maltml":
            inputs.update({f"family_{k}": np.asarray(episodes[k][i]) for k in ("support_x", "support_y", "query_x",
                                                                                "query_y")})
        if family == "maml++":
            requests.append((str(tmp_path / family), "serving_with_steps", {**inputs, "inner_steps": np.int32(steps)}))
        else:
            requests.append((str(tmp_path / family), "serving_default", inputs))
    answers = serve(tmp_path, requests)
    loss = meta.loss_value
    for i, answer in enumerate(answers):
        t = task(episodes, i)
        family_tasks = {"family": {k: episodes[k][i] for k in ("support_x", "support_y", "query_x", "query_y")}}
        adapted = meta.adapt(t["support_x"], t["support_y"], steps=steps,
                             **(family_tasks if family == "maltml" else {}))
        predicted = adapted.predict(t["query_x"], verbose=0)  # in batches of 32, as Keras does
        served = answer["predictions" if family == "maltml" else "logits"]
        np.testing.assert_allclose(float(loss(t["query_y"], predicted)), evaluated[i], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(served, predicted, rtol=1e-4, atol=1e-5)


def test_adapt_with_the_support_sets_batch_statistics_predicts_each_example_alone(tmp_path):
    """`batch_norm="support"` fixes batch norm to the support set's statistics at the adapted weights: the model
    then predicts the support set as the transductive model does (which normalises it with those statistics)
    and predicts every query alone as it does among the others; it saves and reloads as a plain Keras model."""
    meta, episodes, steps, _ = _agreement_case("maml")
    t = {k: np.asarray(v[0]) for k, v in episodes.items()}
    transductive = meta.adapt(t["support_x"], t["support_y"], steps=steps)
    inductive = meta.adapt(t["support_x"], t["support_y"], steps=steps, batch_norm="support")
    assert isinstance(transductive, tfmeta.TransductiveModel) and not isinstance(inductive, tfmeta.TransductiveModel)
    np.testing.assert_allclose(inductive.predict(t["support_x"], verbose=0),
                               transductive.predict(t["support_x"], verbose=0), rtol=1e-4, atol=1e-4)
    together = inductive.predict(t["query_x"], verbose=0)
    alone = np.concatenate([inductive.predict(t["query_x"][i:i + 1], verbose=0) for i in range(5)])
    np.testing.assert_allclose(alone, together[:5], rtol=1e-5, atol=1e-5)
    assert not np.allclose(together, transductive.predict(t["query_x"], verbose=0), atol=1e-3)
    export.save_adapted(inductive, str(tmp_path / "inductive"))
    export.save_adapted(transductive, str(tmp_path / "transductive"))
    for name, model in (("inductive", inductive), ("transductive", transductive)):
        reloaded = keras.models.load_model(tmp_path / name / "model.keras")
        np.testing.assert_allclose(reloaded.predict(t["query_x"], verbose=0), model.predict(t["query_x"], verbose=0),
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="`batch_norm` must be one of"):
        meta.adapt(t["support_x"], t["support_y"], batch_norm="query")
    with pytest.raises(ValueError, match="takes arrays or tensors, not a .*Dataset"):
        transductive.predict(tf.data.Dataset.from_tensor_slices(t["query_x"]).batch(8))


@pytest.mark.parametrize("algorithm", ["EMAML", "BMAML"])
def test_particle_learners_serve_their_ensemble_mean(algorithm, tmp_path):
    meta = getattr(tfmeta, algorithm)(tfmeta.models.mlp(hidden_units=(16, 16)), num_particles=3, eval_inner_steps=2)
    export.export_meta_learner(meta, str(tmp_path / "sine"))
    episode = sine_request(3, 5)
    inputs = {k: episode[k] for k in ("support_x", "support_y", "query_x")}
    answer = serve(tmp_path, [(str(tmp_path / "sine"), "serving_default", inputs)])[0]
    expected = meta.adapt(episode["support_x"], episode["support_y"]).predict(episode["query_x"], verbose=0)
    assert answer["predictions"].shape == expected["mean"].shape == (9, 1)
    np.testing.assert_allclose(answer["predictions"], expected["mean"], rtol=1e-5, atol=1e-5)
