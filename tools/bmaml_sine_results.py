"""BMAML's sinusoid experiment (Yoon et al., 2018): MAML, EMAML and BMAML meta-trained on finite sets of tasks;
prints the results table.

  python tools/bmaml_sine_results.py --out_dir=runs/bmaml_sine                       # K = 10, |T| = 100
  python tools/bmaml_sine_results.py --out_dir=runs/bmaml_sine --shots=5,10 --task_sets=100,1000

Each run is `tools/train.py` with `gin_configs/probabilistic/<method>_sine.gin` (the official code's settings;
see sine_protocol.gin there); a finished run is skipped, a stopped one resumes. The table (query MSE of the
(ensemble) mean prediction, predictive NLL and the coverage of the central 90% interval after the inner steps of
meta-training (one), and the MSE after 10 steps, the official code's test-time count; each mean ± 95% CI over 600
held-out tasks; and the training time) is printed and written to <out_dir>/table.md. Where the mean over tasks of
the MSE stops being finite (adaptations that diverge), the cell says after how many steps.
"""

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import runs  # noqa: E402
from absl import app, flags  # noqa: E402

METHODS = {"MAML": "maml_sine.gin", "EMAML": "emaml_sine.gin", "BMAML": "bmaml_sine.gin"}

flags.DEFINE_string("out_dir", "runs/bmaml_sine", "Where the runs go.")
flags.DEFINE_list("shots", ["10"], "Values of K (support and query points per meta-training task).")
flags.DEFINE_list("task_sets", ["100"], "Sizes of the finite meta-training set of tasks.")
flags.DEFINE_list("methods", list(METHODS), f"Methods to run, of {list(METHODS)}.")
flags.DEFINE_multi_string("gin_bindings", [], "Extra bindings for every run (e.g. a shorter schedule).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    rows = ["| method | K | tasks | MSE (1 step) | NLL (1 step) | 90% coverage (1 step) | MSE (10 steps) | "
            "parameters | meta-steps | training time |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for shots in map(int, FLAGS.shots):
        for task_set in map(int, FLAGS.task_sets):
            for method in FLAGS.methods:
                name = f"{METHODS[method][:-4]}_k{shots}_t{task_set}"
                model_dir = os.path.abspath(os.path.join(FLAGS.out_dir, name))
                bindings = [f"SineTasks.num_support = {shots}", f"SineTasks.num_query = {shots}",
                            "eval/SineTasks.num_query = 100", f"finite_tasks.num_tasks = {task_set}",
                            "Experiment.verbose = 2", *FLAGS.gin_bindings]
                seconds = runs.train_once(f"gin_configs/probabilistic/{METHODS[method]}", model_dir, bindings)
                results = runs.read_json(os.path.join(model_dir, "metrics.json"))
                curve = results["eval"]
                one = curve["steps"].index(1)
                cells = [runs.cell(curve[n]["mean"][one], curve[n]["ci95"][one], digits=3)
                         for n in ("mean_squared_error", "nll")]
                cells.append(runs.cell(curve["coverage_90"]["mean"][one], curve["coverage_90"]["ci95"][one],
                                       scale=100, digits=1, unit="%"))
                cells.append(_last_mse(curve))
                parameters = "1×" if method == "MAML" else "10×"
                rows.append(f"| {method} | {shots} | {task_set} | {' | '.join(cells)} | {parameters} | "
                            f"{results['meta_steps']} | {seconds / 60:.0f} min |")
    table = "\n".join(rows)
    print(table)
    os.makedirs(FLAGS.out_dir, exist_ok=True)
    with open(os.path.join(FLAGS.out_dir, "table.md"), "w") as f:
        f.write(table + "\n")


def _last_mse(curve: dict) -> str:
    """The MSE after the last scored step, or after how many steps its mean over tasks stops being finite."""
    means = curve["mean_squared_error"]["mean"]
    if means[-1] is not None:
        return runs.cell(means[-1], curve["mean_squared_error"]["ci95"][-1], digits=3)
    first = next(k for k, m in zip(curve["steps"], means) if m is None or not math.isfinite(m))
    return f"diverges (not finite after {first} steps)"


if __name__ == "__main__":
    app.run(main)
