"""The bad-input matrix: every public entry point, given wrong ranks, shapes, dtypes, label ranges, impossible
ways/shots/queries, empty or non-finite data, corrupt archives or bad configurations, raises an error that names
the argument and what it expects. Static problems raise `ValueError` before anything runs (at trace time in a
graph); problems with values (NaN, labels) are checked in the graph and raise `InvalidArgumentError` there, or
`ValueError` from `adapt`, which runs eagerly. Learners are small and built once per module."""

import os
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tfmeta
from tfmeta.experiment import Experiment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ERRORS = (ValueError, tf.errors.InvalidArgumentError)


def regression_episodes(tasks=2, support=4, query=5):
    rng = np.random.default_rng(0)
    return {"support_x": rng.normal(size=(tasks, support, 1)).astype("float32"),
            "support_y": rng.normal(size=(tasks, support, 1)).astype("float32"),
            "query_x": rng.normal(size=(tasks, query, 1)).astype("float32"),
            "query_y": rng.normal(size=(tasks, query, 1)).astype("float32")}


def label_episodes(ways=3, shots=2, queries=2, tasks=2, offset=0):
    rng = np.random.default_rng(1)
    labels = lambda n: np.tile(np.repeat(np.arange(ways, dtype=np.int32), n), (tasks, 1)) + offset  # noqa: E731
    return {"support_x": rng.normal(size=(tasks, ways * shots, 4)).astype("float32"), "support_y": labels(shots),
            "query_x": rng.normal(size=(tasks, ways * queries, 4)).astype("float32"), "query_y": labels(queries)}


@pytest.fixture(scope="module")
def learners():
    return {
        "regression": tfmeta.MAML(tfmeta.models.mlp(hidden_units=(8,)), update_rule=tfmeta.Sgd(0.01)),
        "classifier": tfmeta.MAML(tfmeta.models.mlp(input_shape=(4,), hidden_units=(8,), outputs=3),
                                  loss="scores_cross_entropy", update_rule=tfmeta.Sgd(0.1)),
        "metric": tfmeta.PrototypicalNetwork(keras.Sequential([keras.Input((4,)), keras.layers.Dense(5)])),
    }


def replace(episodes, **changes):
    return {**episodes, **changes}


def drop(episodes, key):
    return {k: v for k, v in episodes.items() if k != key}


R, L = regression_episodes(), label_episodes()
EPISODE_CASES = [  # (learner, episodes, expected message)
    ("regression", drop(R, "query_y"), r"episodes must be a dict with the keys of one of the kinds of "
                                        r"tfmeta.episodes .*supervised: support_x, support_y, query_x, query_y.*got "
                                        r"\['query_x', 'support_x'"),
    ("regression", replace(R, support_x=R["support_x"][:, :, 0]),
     r"episodes\['support_x'\] must have shape \[tasks, examples, features...\]; got \(2, 4\)"),
    ("regression", replace(R, support_y=R["support_y"][:, :3]),
     r"episodes\['support_x'\] and episodes\['support_y'\] disagree on \[tasks, examples\]: \(2, 4, 1\) vs "
     r"\(2, 3, 1\)"),
    ("regression", replace(R, support_y=np.concatenate([R["support_y"]] * 2, -1), query_y=np.concatenate(
        [R["query_y"]] * 2, -1)),
     r"episodes\['support_y'\] must hold targets of shape \(1,\) per example .* got \(2,\)"),
    ("regression", replace(R, support_y=R["support_y"][..., 0], query_y=R["query_y"][..., 0]),
     r"episodes\['support_y'\] must hold targets of shape \(1,\) per example .* got \(\) per example"),
    ("regression", replace(R, query_x=np.zeros((2, 5, 2), "float32")), r"support and query features differ"),
    ("regression", replace(R, support_x=R["support_x"][:, :0], support_y=R["support_y"][:, :0]),
     r"holds no support example \(K must be >= 1\)"),
    ("regression", replace(R, support_x=np.where(np.arange(4)[None, :, None] == 2, np.nan, R["support_x"])),
     r"episodes `support_x` holds NaN or infinite values"),
    ("regression", replace(R, query_y=R["query_y"] * np.inf), r"episodes `query_y` holds NaN or infinite values"),
    ("classifier", label_episodes(ways=5), r"episodes `support_y` holds class labels outside 0..2: learner mlp has "
                                           r"3 outputs"),
    ("classifier", label_episodes(offset=-1), r"episodes `support_y` holds negative labels"),
    ("classifier", replace(L, support_y=L["support_y"].astype("float32"), query_y=L["query_y"].astype("float32")),
     r"must hold integer class labels for the loss of learner 'mlp'; got dtype float32"),
    ("classifier", replace(L, support_y=np.eye(3, dtype=np.int32)[L["support_y"]],
                           query_y=np.eye(3, dtype=np.int32)[L["query_y"]]),
     r"must hold integer class labels of shape \(\) per example .* got \(3,\) per example \(one-hot labels: pass"),
    ("metric", label_episodes(offset=5), r"episodes `support_y` must hold every label 0..N-1 in every task"),
    ("metric", replace(L, query_y=np.where(L["query_y"] == 2, 3, L["query_y"]).astype(np.int32)),
     r"episodes `query_y` holds a label with no support example"),
    ("metric", replace(L, support_y=L["support_y"][..., None], query_y=L["query_y"][..., None]),
     r"episodes\['support_y'\] must hold one integer label per example \(shape \[tasks, examples\]\); got \(1,\)"),
    ("metric", replace(L, support_x=L["support_x"] * np.nan), r"episodes `support_x` holds NaN or infinite"),
]
IDS = [f"{learner}-{i}" for i, (learner, _, _) in enumerate(EPISODE_CASES)]


@pytest.mark.parametrize("learner, episodes, message", EPISODE_CASES, ids=IDS)
@pytest.mark.parametrize("entry", ["evaluate_tasks", "fit", "evaluate"])
def test_bad_episodes(learners, learner, episodes, message, entry):
    meta = learners[learner]
    if entry == "evaluate_tasks":
        call = lambda: meta.evaluate_tasks(episodes)  # noqa: E731
    else:
        if not meta.compiled:
            meta.compile(keras.optimizers.SGD(0.0))
        data = tf.data.Dataset.from_tensors({k: tf.constant(v) for k, v in episodes.items()})
        call = lambda: getattr(meta, entry)(data, verbose=0)  # noqa: E731
    with pytest.raises(ERRORS, match=message):
        call()


def test_good_episodes_still_work_after_bad_ones(learners):
    """A bad call must not leave Keras' relaxed (unknown-rank) trace behind for the good data that follows."""
    meta = learners["regression"]
    meta.compile(keras.optimizers.SGD(0.0))
    good = tf.data.Dataset.from_tensors(regression_episodes())
    expected = meta.evaluate(good, verbose=0, return_dict=True)
    bad = tf.data.Dataset.from_tensors(replace(R, support_y=R["support_y"][..., 0], query_y=R["query_y"][..., 0]))
    with pytest.raises(ValueError, match="must hold targets"):
        meta.evaluate(bad, verbose=0)
    other = tf.data.Dataset.from_tensors(regression_episodes(tasks=3, support=6))  # other sizes: a relaxed trace
    assert np.isfinite(meta.evaluate(other, verbose=0, return_dict=True)["loss"])
    assert meta.evaluate(good, verbose=0, return_dict=True) == pytest.approx(expected)


ADAPT_CASES = [  # (learner, support_x, support_y, keyword arguments, expected message)
    ("regression", np.zeros((4, 2), "float32"), np.zeros((4, 1), "float32"), {},
     r"`support_x` must have shape \[examples, 1\] for learner 'mlp'; got \(4, 2\)"),
    ("regression", np.zeros((4, 1), "float32"), np.zeros((3, 1), "float32"), {}, r"the same number \(>= 1\)"),
    ("regression", np.zeros((0, 1), "float32"), np.zeros((0, 1), "float32"), {}, r"the same number \(>= 1\)"),
    ("regression", np.full((4, 1), np.nan, "float32"), np.zeros((4, 1), "float32"), {},
     r"`support_x` holds NaN or infinite values"),
    ("regression", np.zeros((4, 1), "float32"), np.zeros((4,), "float32"), {},
     r"`support_y` must hold targets of shape \(1,\) per example"),
    ("regression", np.zeros((4, 1), "float32"), np.zeros((4, 1), "float32"), {"steps": -1},
     r"`steps` must be an integer >= 0; got -1"),
    ("regression", np.zeros((4, 1), "float32"), np.zeros((4, 1), "float32"), {"batch_norm": "query"},
     r"`batch_norm` must be one of \('batch', 'support'\); got 'query'"),
    ("classifier", np.zeros((4, 4), "float32"), np.array([0, 1, 2, 7], np.int32), {},
     r"`support_y` holds class labels outside 0..2"),
    ("classifier", np.zeros((3, 4), "float32"), np.eye(3, dtype=np.int32), {},
     r"\(one-hot labels: pass their argmax\)"),
    ("metric", np.zeros((3, 4), "float32"), np.array([0, 2, 2], np.int32), {}, r"`support_y` must hold every label"),
]


@pytest.mark.parametrize("learner, x, y, kwargs, message", ADAPT_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(ADAPT_CASES)])
def test_bad_support_sets_for_adapt(learners, learner, x, y, kwargs, message):
    with pytest.raises(ValueError, match=message):
        learners[learner].adapt(x, y, **kwargs)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(-3, 6), min_size=6, max_size=6))
def test_class_labels_are_checked_against_the_head_for_every_label_set(learners, labels):
    """Labels fail exactly when one lies outside 0..2 (the head's 3 classes), whichever they are."""
    episodes = replace(L, support_y=np.array([labels, [0, 1, 2, 0, 1, 2]], np.int32))
    if all(0 <= label < 3 for label in labels):
        learners["classifier"].evaluate_tasks(episodes)
    else:
        with pytest.raises(tf.errors.InvalidArgumentError, match="negative labels|outside 0..2"):
            learners["classifier"].evaluate_tasks(episodes)


def non_finite_support_learner():
    """A loss that is finite on finite data except for support targets above 10: the inner loop's support loss
    goes non-finite while the data checks pass."""
    def loss(y, p):
        return tf.square(y - p) + tf.math.log(10.0 - tf.minimum(y, 10.0)) - tf.math.log(10.0)
    return tfmeta.MAML(tfmeta.models.mlp(hidden_units=(4,)), loss=loss, inner_steps=2, task_parallelism="map_fn")


def test_a_non_finite_inner_loss_names_the_task_and_the_step():
    meta = non_finite_support_learner()
    episodes = replace(R, support_y=np.where(np.arange(2)[:, None, None] == 1, 20.0, R["support_y"]).astype(
        "float32"))
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"non-finite support loss \(NaN or inf\) at inner step\] \[0\] \[of task\] \[1\]"):
        tf.function(meta.compute_meta_gradients)(episodes)


@settings(max_examples=25, deadline=None)
@given(ways=st.integers(1, 8), shots=st.integers(1, 6), queries=st.integers(1, 6))
def test_few_shot_tasks_take_what_the_data_allows_and_name_what_it_does_not(ways, shots, queries):
    """6 classes of 7 examples: N-way K-shot Q-query episodes exist when N <= 6 and K + Q <= 7; otherwise the
    error names the argument and the limit."""
    rng = np.random.default_rng(0)
    classes = tfmeta.data.from_arrays(rng.random((42, 5, 5)), np.repeat(np.arange(6), 7))
    if ways > 6:
        with pytest.raises(ValueError, match=f"`ways`={ways} is more than the 6 classes"):
            tfmeta.data.FewShotTasks(classes, ways, shots, queries)
    elif shots + queries > 7:
        with pytest.raises(ValueError, match=rf"`shots` \+ `queries` = {shots + queries} is more than the 7"):
            tfmeta.data.FewShotTasks(classes, ways, shots, queries)
    else:
        episodes = tfmeta.data.FewShotTasks(classes, ways, shots, queries).sample(tf.constant([0, 0], tf.int64), 2)
        assert episodes["support_x"].shape == (2, ways * shots, 5, 5, 1)
        assert episodes["query_y"].shape == (2, ways * queries)


DATA_CASES = [  # (callable, expected message)
    (lambda: tfmeta.data.from_arrays(np.zeros((4, 5, 5)), np.arange(3)), r"`images` must have shape \[examples >= 1"),
    (lambda: tfmeta.data.from_arrays(np.zeros((0, 5, 5)), np.arange(0)), r"`images` must have shape \[examples >= 1"),
    (lambda: tfmeta.data.from_arrays(np.full((2, 5, 5), np.nan), np.arange(2)), r"`images` holds NaN or infinite"),
    (lambda: tfmeta.data.FewShotTasks(tfmeta.data.from_arrays(np.zeros((4, 5, 5)), np.arange(4)), ways=0),
     r"FewShotTasks `ways` must be an integer >= 1; got 0"),
    (lambda: tfmeta.tasks.SineTasks(num_support=0), r"num_support"),
    (lambda: tfmeta.tasks.SineTasks(amplitude_range=(5.0, 0.1)), r"amplitude_range"),
    (lambda: tfmeta.tasks.SineFamilies(num_tasks=0), r"`num_tasks` must be an integer >= 1; got 0"),
]


@pytest.mark.parametrize("make, message", DATA_CASES, ids=[str(i) for i in range(len(DATA_CASES))])
def test_bad_task_distributions_and_data(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_damaged_omniglot_archives_are_named(tmp_path, damage):
    archive = tmp_path / "images_background_small1.zip"
    with zipfile.ZipFile(archive, "w") as f:
        f.writestr("images_background_small1/Alphabet/character01/0101_01.png", b"\x89PNG" + bytes(200))
    data = archive.read_bytes()
    if damage == "truncated":
        archive.write_bytes(data[: len(data) // 2])
    else:  # the central directory is intact, the file's bytes are not (a CRC error on reading)
        start = data.index(b"\x89PNG")
        archive.write_bytes(data[:start] + b"\x00" * 8 + data[start + 8:])
    with pytest.raises(ValueError, match=f"Omniglot archive '{archive}'.*(truncated or corrupt|cannot be read)"):
        tfmeta.data.load_omniglot(str(archive), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="Omniglot archive .* (truncated or corrupt|cannot be read)"):
        tfmeta.data.load_omniglot(str(tmp_path), cache_dir=str(tmp_path / "cache"))


EXPERIMENT_CASES = [  # (keyword arguments of Experiment, expected message)
    ({"num_steps": 1500, "steps_per_epoch": 1000}, r"`num_steps` \(1500\) must be a non-negative multiple"),
    ({"steps_per_execution": 3, "steps_per_epoch": 10, "num_steps": 10}, r"`steps_per_execution` \(3\) must be a"),
    ({"eval_every": 0}, r"`eval_every` must be an integer >= 1; got 0"),
    ({"checkpoint_interval": 0}, r"`checkpoint_interval` must be a positive number of seconds; got 0"),
    ({"seed": 1_000_000}, r"`seed` \(1000000\) must differ from `eval_seed`"),
    ({"strategy": "gpus"}, r"`strategy` must be one of"),
]


@pytest.mark.parametrize("kwargs, message", EXPERIMENT_CASES, ids=[str(i) for i in range(len(EXPERIMENT_CASES))])
def test_bad_experiment_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Experiment(meta_learner=lambda: None, tasks=tfmeta.tasks.SineTasks(), **kwargs)


def test_export_requests_with_one_hot_labels_or_the_wrong_rank_are_named(tmp_path):
    meta = tfmeta.MAML(tfmeta.models.mlp(input_shape=(4,), hidden_units=(8,), outputs=3), loss="scores_cross_entropy")
    tfmeta.export.export_meta_learner(meta, str(tmp_path / "classifier"))
    serve = tf.saved_model.load(str(tmp_path / "classifier")).signatures["serving_default"]
    x = tf.zeros((3, 4))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"support_y must have shape \[examples\] \(integer "
                                                            r"labels 0..N-1; send one-hot labels as their argmax\)"):
        serve(support_x=x, support_y=tf.eye(3, dtype=tf.int32), query_x=x)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"query_x must have shape \[examples, 4\]; got shape"):
        serve(support_x=x, support_y=tf.range(3), query_x=tf.zeros((3, 5)))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"support_y holds class labels outside 0..2"):
        serve(support_x=x, support_y=tf.constant([0, 1, 3]), query_x=x)


def tool(*args, cwd=REPO):
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", "train.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def test_tool_flags_and_bindings_fail_with_one_line_and_leave_nothing_behind(tmp_path):
    config = "--gin_file=gin_configs/maml_sine_quick.gin"
    afile = tmp_path / "a_file"
    afile.write_text("")
    result = tool(config, f"--model_dir={afile}")
    assert result.returncode == 1 and "--model_dir names a file" in result.stderr
    run = tmp_path / "misspelled"
    result = tool(config, f"--model_dir={run}", "--gin_bindings=MAML.inner_stepz = 5", cwd=tmp_path)
    error = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert result.returncode == 1 and "inner_stepz" in error[0] and "Traceback" not in result.stderr
    assert not run.exists()
    assert "Path not found" not in result.stderr  # run outside the repository, its `include`s resolved quietly
    result = tool("--gin_file=gin_configs/no_such.gin", f"--model_dir={run}")
    assert result.returncode == 1 and "--gin_file 'gin_configs/no_such.gin': no such file" in result.stderr
    result = tool(config, f"--model_dir={run}", "--gin_bindings=Experiment.num_steps = = 3")
    assert result.returncode == 1 and "Error:" in result.stderr and not run.exists()
