"""Running `tools/train.py` as a subprocess, for the tools that train many configurations."""

import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_once(config: str, model_dir: str, bindings: list) -> float:
    """Runs (or resumes) `tools/train.py` with a gin config (relative to the repository) in a subprocess, unless
    `model_dir` holds a finished run; returns the run's wall time in seconds, accumulated over resumptions."""
    timing = os.path.join(model_dir, "wall_time.json")
    spent = json.load(open(timing))["seconds"] if os.path.exists(timing) else 0.0
    if os.path.exists(os.path.join(model_dir, "metrics.json")):
        return spent
    command = [sys.executable, os.path.join(REPO, "tools", "train.py"), f"--gin_file={config}",
               f"--model_dir={model_dir}", *[f"--gin_bindings={b}" for b in bindings]]
    os.makedirs(model_dir, exist_ok=True)
    start = time.time()
    subprocess.run(command, cwd=REPO, check=True)
    spent += time.time() - start
    with open(timing, "w") as f:
        json.dump({"seconds": spent}, f)
    return spent


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
