"""Trains and evaluates the few-shot learners on Omniglot's held-out alphabets; prints the results table.

  python tools/omniglot_results.py --out_dir=runs/omniglot_results
  python tools/omniglot_results.py --methods=ProtoNets,MAML --settings=5w1s --schedule=paper

Each run is `tools/train.py` with `gin_configs/omniglot/<method>_<setting>.gin`; a finished run is skipped, a
stopped one resumes. `--schedule=cpu` (default) shortens the papers' schedules to what two CPU cores train in
minutes to an hour (SCHEDULES below; stated in the table); `--schedule=paper` keeps the configs' settings.
The table (accuracy after adaptation, mean ± 95% CI over 600 held-out episodes, inner steps at test, meta-steps
and training time) is printed and written to <out_dir>/table_<methods>_<schedule>.md.
"""

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import runs  # noqa: E402
from absl import app, flags  # noqa: E402

METHODS = {"MAML": "maml", "first-order MAML": "fomaml", "Reptile": "reptile", "Meta-SGD": "metasgd",
           "ANIL": "anil", "ProtoNets": "protonet", "Matching": "matching", "Relation": "relation",
           "Warp-MAML": "warp_maml", "MAML on the warped network (all layers adapted)": "maml_warped",
           "Warp-MAML (5 inner steps)": "warp_maml5", "Meta-Learner LSTM": "metalstm"}
SETTINGS = ("5w1s", "5w5s", "20w1s")
# The CPU schedule: fewer meta-steps and smaller meta-batches than the papers (per method family), so that a
# run takes 5-50 minutes on two cores (the papers' schedules take 3-340 hours there: docs/performance.md).
# 5-way 5-shot episodes cost 2-3x more per meta-step: they get half the meta-steps. 20-way 1-shot meta-steps cost
# 5-10x more (MAML: five inner steps on 20 classes, 1.7-2.4 s; Reptile: ten on 200 examples, 4-5 s): 1/8.
# Every run logs and checkpoints every 25 meta-steps, which divides all of these step counts (the 5-way runs in
# docs/results.md did so every 250; the results do not depend on it).
SCHEDULES = {
    "gradient": ["Experiment.num_steps = {2000}", "Experiment.meta_batch_size = 8"],
    "reptile": ["Experiment.num_steps = {3000}", "PolynomialDecay.decay_steps = {3000}"],
    "metric": ["Experiment.num_steps = {2000}", "Experiment.meta_batch_size = 1",
               "ExponentialDecay.decay_steps = {500}"],
}
STEP_SCALE = {"5w1s": 1.0, "5w5s": 0.5, "20w1s": 0.125}


def cpu_schedule(method: str, setting: str) -> list:
    """The CPU schedule's bindings for one run: its family's, with step counts scaled for the setting."""
    scale = lambda match: str(int(int(match.group(1)) * STEP_SCALE[setting]))  # noqa: E731
    return [re.sub(r"\{(\d+)\}", scale, b) for b in SCHEDULES[FAMILY[method]]]
FAMILY = {"maml": "gradient", "fomaml": "gradient", "metasgd": "gradient", "anil": "gradient", "reptile": "reptile",
          "warp_maml": "gradient", "maml_warped": "gradient", "warp_maml5": "gradient", "metalstm": "gradient",
          "protonet": "metric", "matching": "metric", "relation": "metric"}

flags.DEFINE_string("out_dir", "runs/omniglot_results", "Where the runs go.")
flags.DEFINE_list("methods", list(METHODS), f"Methods to run, of {list(METHODS)}.")
flags.DEFINE_list("settings", list(SETTINGS), f"Settings to run, of {list(SETTINGS)}.")
flags.DEFINE_enum("schedule", "cpu", ["cpu", "paper"], "The CPU schedule (SCHEDULES) or the papers' settings.")
flags.DEFINE_multi_string("gin_bindings", [], "Extra bindings for every run.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    rows = ["| method | setting | accuracy (95% CI) | inner steps at test | meta-steps | training time |",
            "| --- | --- | --- | --- | --- | --- |"]
    for method in FLAGS.methods:
        for setting in FLAGS.settings:
            name = f"{METHODS[method]}_{setting}"
            config = f"gin_configs/omniglot/{name}.gin"
            if not os.path.exists(os.path.join(runs.REPO, config)):  # e.g. Warp-MAML at 20-way already takes 5 steps
                print(f"No config {config}: {method} is not run at {setting}.")
                continue
            model_dir = os.path.abspath(os.path.join(FLAGS.out_dir, f"{name}_{FLAGS.schedule}"))
            bindings = ["Experiment.verbose = 2", "Experiment.validation_tasks = 0"]
            if FLAGS.schedule == "cpu":
                bindings += ["Experiment.steps_per_epoch = 25", *cpu_schedule(METHODS[method], setting)]
            seconds = runs.train_once(config, model_dir, bindings + FLAGS.gin_bindings)
            metrics = runs.read_json(os.path.join(model_dir, "metrics.json"))
            accuracy = metrics["eval"]["sparse_categorical_accuracy"]
            score = runs.cell(accuracy["mean"][-1], accuracy["ci95"][-1], scale=100, digits=1, unit="%")
            rows.append(f"| {method} | {setting} | {score} | {metrics['eval']['steps'][-1]} | "
                        f"{metrics['meta_steps']} | {seconds / 60:.0f} min |")
    table = "\n".join(rows)
    print(table)
    suffix = "_".join(METHODS[m] for m in FLAGS.methods)
    with open(os.path.join(FLAGS.out_dir, f"table_{suffix}_{FLAGS.schedule}.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    app.run(main)
