"""Fault injection (`pytest -m faults`, the second command of .ci/run): a training run killed with SIGKILL at
random moments, over and over, resumes every time from an intact checkpoint and ends with exactly the metrics of
an uninterrupted run; a two-worker run on loopback with one worker killed restarts from the chief's last
checkpoint and ends as an uninterrupted two-worker run."""

import json
import os
import subprocess
import time

import numpy as np
import pytest
import tensorflow as tf
from conftest import free_ports
from test_tools import REPO, command, registered, run

pytestmark = pytest.mark.faults


LONG = ["Experiment.num_steps = 3000"]  # room for six kills, each after a little more progress


def test_random_sigkills_never_lose_a_checkpoint_and_the_run_ends_as_an_uninterrupted_one(tmp_path):
    reference = tmp_path / "reference"
    run("train.py", reference, *LONG)
    killed = tmp_path / "killed"
    rng = np.random.default_rng(0)  # seeded kill delays: a failure reproduces
    progress = []
    for _ in range(6):
        process = subprocess.Popen(command("train.py", killed, *LONG), cwd=REPO, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while max(registered(killed), default=-1) <= max(progress, default=-1):  # new progress, then a kill
            assert process.poll() is None and time.time() < deadline, "the run made no progress"
            time.sleep(0.01)
        time.sleep(float(rng.uniform(0.0, 0.5)))  # checkpoints come every 0.3 s: some kills land in a save
        process.kill()
        process.wait()
        latest = max(registered(killed))
        reader = tf.train.load_checkpoint(str(killed / "checkpoints" / f"ckpt-{latest}"))  # complete: it reads
        assert int(reader.get_tensor("optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE")) == latest
        progress.append(latest)
    assert f"after {progress[-1]} meta-steps" in run("train.py", killed, *LONG).stdout
    assert progress == sorted(progress) and len(set(progress)) == 6 and progress[-1] < 3000
    assert json.loads((killed / "metrics.json").read_text()) == json.loads((reference / "metrics.json").read_text())


MULTI_WORKER = ["Experiment.strategy = 'multi_worker_mirrored'", "Experiment.meta_batch_size = 24",
                "Experiment.validation_tasks = 0", "Experiment.steps_per_execution = 1", "Experiment.num_steps = 300",
                "Experiment.steps_per_epoch = 150"]


def start_workers(model_dir):
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    processes = []
    for index in range(2):
        config = json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})
        processes.append(subprocess.Popen(command("train.py", model_dir, *MULTI_WORKER), cwd=REPO,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                          env={**os.environ, "TF_CONFIG": config}))
    return processes


def finish(processes) -> list[str]:
    """Waits for the workers to succeed; returns their standard outputs."""
    outputs = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-3000:]
        outputs.append(stdout)
    return outputs


def test_a_multi_worker_run_with_a_worker_killed_restarts_from_the_last_checkpoint(tmp_path):
    reference = tmp_path / "reference"
    finish(start_workers(reference))
    crashed = tmp_path / "crashed"
    processes = start_workers(crashed)
    deadline = time.time() + 300
    while not registered(crashed):  # the chief's first checkpoint
        assert all(p.poll() is None for p in processes) and time.time() < deadline, "no checkpoint written"
        time.sleep(0.01)
    processes[1].kill()  # worker 1 dies; the chief then waits for it in the next all-reduce
    processes[1].wait()
    time.sleep(2)
    processes[0].kill()
    processes[0].wait()
    last = max(registered(crashed))
    assert last < 300 and not (crashed / "metrics.json").exists()  # the chief waited for worker 1: it did not finish
    restarted = start_workers(crashed)
    outputs = finish(restarted)
    assert all(f"after {last} meta-steps" in output for output in outputs)  # both restore the chief's checkpoint
    assert json.loads((crashed / "metrics.json").read_text()) == json.loads((reference / "metrics.json").read_text())
