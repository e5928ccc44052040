import os
import socket

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # as `import tfmeta` does; TensorFlow reads it once

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)


def random_episodes(tasks=3, support=5, query=7, features=(2,), targets=(1,), dtype="float64", seed=0):
    """Random regression episodes (support and query disjoint draws)."""
    rng = np.random.default_rng(seed)
    return {
        "support_x": tf.constant(rng.normal(size=(tasks, support, *features)), dtype),
        "support_y": tf.constant(rng.normal(size=(tasks, support, *targets)), dtype),
        "query_x": tf.constant(rng.normal(size=(tasks, query, *features)), dtype),
        "query_y": tf.constant(rng.normal(size=(tasks, query, *targets)), dtype),
    }


def classification_episodes(tasks=2, ways=3, shots=2, queries=3, shape=(6, 6, 1), dtype="float64", seed=0):
    rng = np.random.default_rng(seed)
    labels = lambda n: tf.constant(np.tile(np.arange(ways), (tasks, n)), tf.int32)  # noqa: E731
    return {
        "support_x": tf.constant(rng.normal(size=(tasks, ways * shots, *shape)), dtype),
        "support_y": labels(shots),
        "query_x": tf.constant(rng.normal(size=(tasks, ways * queries, *shape)), dtype),
        "query_y": labels(queries),
    }


def free_ports(count):
    """`count` free TCP ports on 127.0.0.1 (for multi-worker clusters on loopback)."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def values(variables):
    return [np.array(tf.convert_to_tensor(v)) for v in variables]


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Datasets: $TFMETA_DATA_DIR, else ../shared/data beside the repository (what tfmeta.data.data_dir() reads).
os.environ.setdefault("TFMETA_DATA_DIR", os.path.join(REPO, "..", "shared", "data"))
OMNIGLOT = os.path.join(os.environ["TFMETA_DATA_DIR"], "omniglot")


@pytest.fixture
def omniglot_dir():
    """The Omniglot archives; skips the test when they are absent."""
    if not os.path.isdir(OMNIGLOT) or not any(f.endswith(".zip") for f in os.listdir(OMNIGLOT)):
        pytest.skip(f"Omniglot archives not found in {OMNIGLOT} (set TFMETA_DATA_DIR to the directory holding "
                    "omniglot/images_background_small1.zip and images_background_small2.zip)")
    return OMNIGLOT


@pytest.fixture
def mnist_file():
    """The 5,000-digit MNIST copy; skips the test when it is absent."""
    path = os.path.join(os.environ["TFMETA_DATA_DIR"], "mnist5k", "mnist_5k.csv.gz")
    if not os.path.exists(path):
        pytest.skip(f"MNIST copy not found at {path} (set TFMETA_DATA_DIR to the directory holding "
                    "mnist5k/mnist_5k.csv.gz)")
    return path


def pytest_configure(config):
    config.addinivalue_line("markers", "faults: slow fault-injection runs (random SIGKILLs, a multi-worker kill), "
                                       "outside the default suite; run with `-m faults` (.ci/run does)")


def pytest_collection_modifyitems(config, items):
    """The default suite leaves out the `faults` tests unless a marker expression names them."""
    if "faults" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="fault-injection run: select it with `-m faults`")
    for item in items:
        if "faults" in item.keywords:
            item.add_marker(skip)


def check_directional_derivatives(variables, grads, objective, directions=2, eps=1e-6, rtol=1e-6, seed=1):
    """The gradient `grads` of `objective()` (a float of the current values of `variables`) along random directions
    against central finite differences; the variables are restored afterwards."""
    rng = np.random.default_rng(seed)
    theta = values(variables)
    for _ in range(directions):
        direction = [rng.normal(size=t.shape) for t in theta]
        sides = []
        for sign in (1, -1):
            for v, t, d in zip(variables, theta, direction):
                v.assign(t + sign * eps * d)
            sides.append(objective())
        for v, t in zip(variables, theta):
            v.assign(t)
        analytic = sum(float(np.sum(np.array(g) * d)) for g, d in zip(grads, direction))
        assert analytic == pytest.approx((sides[0] - sides[1]) / (2 * eps), rel=rtol, abs=1e-9)
