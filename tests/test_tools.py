"""The binaries end to end: a run killed with SIGKILL in the middle of an epoch resumes from its last time-based
checkpoint and ends as an uninterrupted one; SIGTERM saves, exits with 143 and resumes the same way;
evaluate.py writes eval.json and plots. (Random kills in a loop and a multi-worker kill are in test_faults.py.)"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One epoch of 500 meta-steps (about 3 s of training here), executions of 10 steps, a checkpoint every 0.3 s: a
# killed run usually dies in the middle of an epoch.
BINDINGS = [
    "Experiment.num_steps = 1000",
    "Experiment.steps_per_epoch = 500",
    "Experiment.steps_per_execution = 10",
    "Experiment.checkpoint_interval = 0.3",
    "Experiment.validation_tasks = 20",
    "Experiment.eval_num_tasks = 50",
    "Experiment.eval_steps = 3",
    "Experiment.eval_every = 2",  # scored after 0, 2 and 3 inner steps
]


def command(tool, model_dir, *extra):
    args = [sys.executable, os.path.join(REPO, "tools", tool), "--gin_file=gin_configs/maml_sine.gin",
            f"--model_dir={model_dir}"]
    return args + [f"--gin_bindings={b}" for b in BINDINGS + list(extra)]


def run(tool, model_dir, *extra):
    result = subprocess.run(command(tool, model_dir, *extra), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def registered(model_dir) -> list[int]:
    """The meta-steps of the checkpoints the state file registers (written after a checkpoint's files)."""
    state = model_dir / "checkpoints" / "checkpoint"
    return [int(n) for n in re.findall(r'all_model_checkpoint_paths: ".*ckpt-(\d+)"', state.read_text())] if (
        state.exists()) else []


def checkpoint_times(model_dir) -> list[float]:
    """When the registered checkpoints were written (seconds since the epoch)."""
    state = (model_dir / "checkpoints" / "checkpoint").read_text()
    return [float(t) for t in re.findall(r"all_model_checkpoint_timestamps: ([\d.e+]+)", state)]


def start_and_wait(model_dir, until, deadline=300):
    """Starts train.py and waits until `until(registered checkpoints)` holds; returns the process."""
    process = subprocess.Popen(command("train.py", model_dir), cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    end = time.time() + deadline
    while not until(registered(model_dir)):
        assert process.poll() is None and time.time() < end, "no checkpoint written"
        time.sleep(0.01)
    return process


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: its directory, metrics and output."""
    directory = tmp_path_factory.mktemp("uninterrupted")
    result = run("train.py", directory)
    return directory, json.loads((directory / "metrics.json").read_text()), result


def test_an_uninterrupted_run_reports_progress_and_checkpoints_on_time(reference):
    directory, metrics, result = reference
    assert metrics["meta_steps"] == 1000 and "non_finite" not in metrics
    assert "Evaluated 50/50 held-out tasks" in result.stdout
    assert "Path not found" not in result.stderr and "Error" not in result.stderr
    times = checkpoint_times(directory)
    assert len(times) == 3 and max(b - a for a, b in zip(times, times[1:])) < 0.3 + 2.0  # the interval, + a step


def test_a_run_killed_mid_epoch_resumes_from_its_last_checkpoint_and_ends_as_an_uninterrupted_one(tmp_path,
                                                                                                  reference):
    killed = tmp_path / "killed"
    process = start_and_wait(killed, lambda steps: any(s % 500 for s in steps))  # a mid-epoch checkpoint
    time.sleep(0.7)  # training goes on, checkpointing every 0.3 s
    process.send_signal(signal.SIGKILL)
    killed_at = time.time()
    process.wait()
    assert not (killed / "metrics.json").exists()
    last = max(registered(killed))
    assert killed_at - max(checkpoint_times(killed)) < 0.3 + 2.0  # what the kill lost: the interval, + a step
    output = run("train.py", killed).stdout
    resumed_at = int(re.search(r"Resuming from .*ckpt-(\d+) after (\d+) meta-steps", output).group(2))
    assert resumed_at == last  # nothing is lost beyond the last checkpoint, at most `checkpoint_interval` old
    resumed = json.loads((killed / "metrics.json").read_text())
    assert resumed == reference[1]  # the epoch's logs included, though the first epoch was resumed midway


def test_sigterm_saves_exits_with_143_and_resumes(tmp_path, reference):
    stopped = tmp_path / "stopped"
    process = start_and_wait(stopped, lambda steps: bool(steps))
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-2000:]
    match = re.search(r"Interrupted: stopped by SIGTERM at meta-step (\d+); the last checkpoint is .*ckpt-(\d+)",
                      stderr)
    assert match[1] == match[2] and max(registered(stopped)) == int(match[1]) and "Traceback" not in stderr
    run("train.py", stopped)
    assert json.loads((stopped / "metrics.json").read_text()) == reference[1]


def test_evaluate_writes_the_curve_and_plots(reference):
    directory, metrics, _ = reference
    output = run("evaluate.py", directory).stdout
    evaluation = json.loads((directory / "eval.json").read_text())
    assert evaluation["steps"] == [0, 2, 3] and evaluation["num_tasks"] == 50
    assert evaluation["loss"]["mean"] == pytest.approx(metrics["eval"]["loss"]["mean"])
    assert len(evaluation["loss"]["per_task"]) == 50
    for png in ("eval_curve.png", "eval_tasks.png"):
        assert (directory / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert " 2 inner steps" in output and " 3 inner steps" in output


def test_a_diverging_run_fails_and_writes_strict_json(tmp_path):
    """An inner learning rate that diverges after more steps than meta-training took: training is finite, the
    final evaluation is not. The run exits 1 naming the fields, and metrics.json is valid JSON with nulls."""
    diverging = ["Experiment.num_steps = 10", "Experiment.steps_per_epoch = 10", "Experiment.eval_steps = 30",
                 "Experiment.validation_tasks = 0", "Sgd.learning_rate = 3.0", "MAML.inner_steps = 0"]
    result = subprocess.run(command("train.py", tmp_path, *diverging), cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Error: the results after 10 meta-steps are not finite: eval.loss.mean" in result.stderr
    text = (tmp_path / "metrics.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    metrics = json.loads(text)
    assert "eval.loss.mean" in metrics["non_finite"] and None in metrics["eval"]["loss"]["mean"]
