"""The binaries end to end: a killed training run resumes exactly; evaluate.py writes eval.json and plots."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINDINGS = [
    "Experiment.num_steps = 400",
    "Experiment.steps_per_epoch = 50",
    "Experiment.validation_tasks = 20",
    "Experiment.eval_num_tasks = 50",
    "Experiment.eval_steps = 3",
    "Experiment.eval_every = 2",  # scored after 0, 2 and 3 inner steps
]


def command(tool, model_dir):
    args = [sys.executable, os.path.join(REPO, "tools", tool), "--gin_file=gin_configs/maml_sine.gin",
            f"--model_dir={model_dir}"]
    return args + [f"--gin_bindings={b}" for b in BINDINGS]


def run(tool, model_dir):
    result = subprocess.run(command(tool, model_dir), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_killed_run_resumes_where_it_stopped_and_ends_as_an_uninterrupted_one(tmp_path):
    killed = tmp_path / "killed"
    process = subprocess.Popen(command("train.py", killed), cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    state = killed / "checkpoints" / "checkpoint"  # written after a checkpoint's files: it registers the checkpoint
    while not (state.exists() and '"ckpt-100"' in state.read_text()):  # numbered by meta-step: after epoch 2
        assert process.poll() is None and time.time() < deadline, "no checkpoint written"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "metrics.json").exists()

    output = run("train.py", killed)
    resumed_at = int(re.search(r"Resuming from .* after (\d+) meta-steps", output).group(1))
    assert resumed_at >= 100 and resumed_at % 50 == 0
    uninterrupted = tmp_path / "uninterrupted"
    run("train.py", uninterrupted)
    resumed_metrics = json.loads((killed / "metrics.json").read_text())
    reference = json.loads((uninterrupted / "metrics.json").read_text())
    assert resumed_metrics["meta_steps"] == reference["meta_steps"] == 400
    assert resumed_metrics["eval"] == reference["eval"]

    output = run("evaluate.py", uninterrupted)
    evaluation = json.loads((uninterrupted / "eval.json").read_text())
    assert evaluation["steps"] == [0, 2, 3] and evaluation["num_tasks"] == 50
    assert evaluation["loss"]["mean"] == pytest.approx(reference["eval"]["loss"]["mean"])
    assert len(evaluation["loss"]["per_task"]) == 50
    for png in ("eval_curve.png", "eval_tasks.png"):
        assert (uninterrupted / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert " 2 inner steps" in output and " 3 inner steps" in output
