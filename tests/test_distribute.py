"""tf.distribute: MirroredStrategy over two logical CPU devices gives the meta-updates of a single device, two
MultiWorkerMirroredStrategy workers on this machine stay in sync, and a run checkpointed under one strategy
resumes under another. The scripts run in a fresh process, which splits
the CPU into two logical devices before TensorFlow starts."""

import os
import subprocess
import sys

import pytest
import tensorflow as tf
from conftest import free_ports

import tfmeta

PRELUDE = """
import json, sys, numpy as np, tensorflow as tf
tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
                                           [tf.config.LogicalDeviceConfiguration()] * 2)
import keras, tfmeta
from tfmeta import distribute
MIRRORED = distribute.make_strategy("mirrored", devices=["/cpu:0", "/cpu:1"])
assert MIRRORED.num_replicas_in_sync == 2
"""

SAME_UPDATES = PRELUDE + """
def train(strategy, make, episodes, steps=3):
    keras.utils.set_random_seed(0)
    with strategy.scope():
        meta = make()
        meta.compile(keras.optimizers.SGD(0.05))
    meta.fit(tf.data.Dataset.from_tensors(episodes).repeat(steps), epochs=1, steps_per_epoch=steps, verbose=0)
    return [np.array(v) for v in meta.variables]

rng = np.random.default_rng(0)
labels = np.tile(np.arange(3, dtype=np.int32), (4, 2))
images = {"support_x": rng.random((4, 6, 12, 12, 1), np.float32), "support_y": labels,
          "query_x": rng.random((4, 6, 12, 12, 1), np.float32), "query_y": labels}
learners = {
    # A conv learner with batch norm: MAML normalises each task with its own statistics, and the moving
    # averages are averaged over tasks (and replicas).
    "maml": (lambda: tfmeta.MAML(tfmeta.models.conv_net(input_shape=(12, 12, 1), outputs=3, filters=4, blocks=2),
                                 loss="scores_cross_entropy", update_rule=tfmeta.Sgd(0.1)), images),
    # Metric learners embed a replica's share of the meta-batch together: batch-norm statistics would be
    # per replica, so the embedding here has none.
    "protonet": (lambda: tfmeta.PrototypicalNetwork(tfmeta.models.conv_net(
        input_shape=(12, 12, 1), outputs=None, filters=4, blocks=2, batch_norm=False)), images),
}
differences = {}
for name, (make, episodes) in learners.items():
    single, mirrored = train(tf.distribute.get_strategy(), make, episodes), train(MIRRORED, make, episodes)
    assert len(single) == len(mirrored)
    differences[name] = max(float(np.max(np.abs(a - b))) for a, b in zip(single, mirrored))
print(json.dumps(differences))
"""

RESUME = PRELUDE + """
from tfmeta.experiment import Experiment

def experiment(steps, strategy):
    return Experiment(
        meta_learner=lambda: tfmeta.MAML(tfmeta.models.mlp(hidden_units=(16, 16)), update_rule=tfmeta.Sgd(0.01)),
        tasks=tfmeta.tasks.SineTasks(num_support=5), meta_batch_size=4, num_steps=steps, steps_per_epoch=2,
        validation_tasks=0, eval_num_tasks=4, eval_steps=1, verbose=0, strategy=strategy,
        devices=["/cpu:0", "/cpu:1"] if strategy == "mirrored" else None)

directory = sys.argv[1]
experiment(2, "default").train(directory + "/resumed")
experiment(4, "mirrored").train(directory + "/resumed")   # resumes the default-strategy checkpoint
experiment(4, "default").train(directory + "/straight")
resumed = experiment(4, "default").restore(directory + "/resumed")
straight = experiment(4, "default").restore(directory + "/straight")
print(json.dumps({"meta_steps": int(resumed.meta_step()), "difference": max(
    float(np.max(np.abs(np.array(a) - np.array(b)))) for a, b in zip(resumed.variables, straight.variables))}))
"""


WORKER = """
import os, sys, numpy as np
from tfmeta import distribute
strategy = distribute.make_strategy("multi_worker_mirrored")  # before any other op: it configures the runtime
import keras, tensorflow as tf, tfmeta
keras.utils.set_random_seed(0)
with strategy.scope():
    meta = tfmeta.MAML(tfmeta.models.mlp(hidden_units=(16, 16)), update_rule=tfmeta.Sgd(0.01))
    meta.compile(keras.optimizers.Adam(1e-3))
meta.fit(tfmeta.tasks.SineTasks(num_support=5).dataset(4, seed=0), epochs=1, steps_per_epoch=5, verbose=0)
np.savez(sys.argv[1], meta_step=int(meta.meta_step()), *[np.array(v) for v in meta.variables])
"""


def run(script, *args):
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    return json.loads(result.stdout.strip().splitlines()[-1])


def test_mirrored_strategy_gives_the_single_device_meta_updates():
    differences = run(SAME_UPDATES)
    assert differences["maml"] < 1e-5 and differences["protonet"] < 1e-5


def test_checkpoint_from_one_strategy_resumes_under_another(tmp_path):
    result = run(RESUME, str(tmp_path))
    assert result["meta_steps"] == 4 and result["difference"] < 1e-5


def test_multi_worker_mirrored_workers_end_with_identical_weights(tmp_path):
    import json

    import numpy as np

    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    processes = []
    for index in range(2):
        config = json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})
        processes.append(subprocess.Popen(
            [sys.executable, "-c", WORKER, str(tmp_path / f"worker{index}.npz")], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env={**os.environ, "TF_CONFIG": config, "TF_CPP_MIN_LOG_LEVEL": "3"}))
    try:
        for process in processes:
            _, stderr = process.communicate(timeout=300)
            assert process.returncode == 0, stderr[-3000:]
    finally:
        for process in processes:
            process.kill()
    first, second = np.load(tmp_path / "worker0.npz"), np.load(tmp_path / "worker1.npz")
    assert int(first["meta_step"]) == int(second["meta_step"]) == 5
    for key in first.files:
        np.testing.assert_array_equal(first[key], second[key])


def test_strategy_errors():
    with pytest.raises(ValueError, match="unknown strategy 'gpus'"):
        tfmeta.distribute.make_strategy("gpus")
    with pytest.raises(ValueError, match="TF_CONFIG"):
        os.environ.pop("TF_CONFIG", None)
        tfmeta.distribute.make_strategy("multi_worker_mirrored")


def test_thread_pools_are_set_before_the_first_op_and_refused_after_it():
    pools = run("""
import json
from tfmeta import distribute
import tensorflow as tf
distribute.set_thread_pools(intra_op=1, inter_op=3)
distribute.set_thread_pools(intra_op=1)  # the same pools again, after nothing ran: a no-op
tf.constant(1.0) + 1.0
distribute.set_thread_pools(1, 3)  # unchanged after the first op: a no-op too
c = tf.config.threading
print(json.dumps([c.get_intra_op_parallelism_threads(), c.get_inter_op_parallelism_threads()]))
""")
    assert pools == [1, 3]
    tf.constant(1.0) + 1.0  # this process now runs ops with TensorFlow's own pools: a change is refused
    with pytest.raises(RuntimeError, match="cannot set `intra_op` to 1: TensorFlow has already run an op"):
        tfmeta.distribute.set_thread_pools(intra_op=1)
    with pytest.raises(ValueError, match="`inter_op` must be an integer >= 0"):
        tfmeta.distribute.set_thread_pools(inter_op=-2)
