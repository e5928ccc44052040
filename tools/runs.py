"""Running `tools/train.py` as a subprocess, for the tools that train many configurations."""

import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_once(config: str, model_dir: str, bindings: list) -> float:
    """Runs (or resumes) `tools/train.py` with a gin config (relative to the repository) in a subprocess, unless
    `model_dir` holds a finished run; returns the run's wall time in seconds, accumulated over resumptions. A run
    that finished meta-training with non-finite results (metrics.json lists them under "non_finite", e.g. tasks
    that diverge after more inner steps than meta-training used) counts as finished, with a note."""
    timing = os.path.join(model_dir, "wall_time.json")
    spent = 0.0
    if os.path.exists(timing):
        with open(timing) as f:
            spent = json.load(f)["seconds"]
    metrics = os.path.join(model_dir, "metrics.json")
    if os.path.exists(metrics):
        return spent
    command = [sys.executable, os.path.join(REPO, "tools", "train.py"), f"--gin_file={config}",
               f"--model_dir={model_dir}", *[f"--gin_bindings={b}" for b in bindings]]
    start = time.time()  # train.py creates `model_dir` once the configuration builds
    status = subprocess.run(command, cwd=REPO).returncode
    spent += time.time() - start
    if status and not os.path.exists(metrics):
        raise subprocess.CalledProcessError(status, command)
    if status:
        print(f"{model_dir}: finished with non-finite results (see 'non_finite' in its metrics.json).")
    with open(timing, "w") as f:
        json.dump({"seconds": spent}, f)
    return spent


def read_json(path: str) -> dict:
    """A JSON file's contents (the metrics a run wrote)."""
    with open(path) as f:
        return json.load(f)


def cell(mean, ci, scale: float = 1.0, digits: int = 3, unit: str = "") -> str:
    """A table cell "mean ± ci" (scaled), or "not finite" for the null that strict JSON writes for NaN or inf."""
    if mean is None or ci is None:
        return "not finite"
    return f"{scale * mean:.{digits}f} ± {scale * ci:.{digits}f}{unit}"


def train_and_restore(config: str, model_dir: str, bindings: list):
    """`train_once`, then the run's gin configuration parsed in this process: returns the `Experiment`, its
    meta-learner restored from the last checkpoint and the training wall time in seconds."""
    import common
    import gin

    seconds = train_once(config, os.path.abspath(model_dir), bindings)
    common.FLAGS.gin_file, common.FLAGS.gin_bindings = [config], bindings
    gin.clear_config()  # one configuration at a time, for tools that restore several runs
    common.parse_gin()
    from tfmeta.experiment import Experiment

    experiment = Experiment()
    return experiment, experiment.restore(model_dir), seconds
