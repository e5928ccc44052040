"""Few-shot Omniglot 5-way 1-shot with the probabilistic learners: MAML (with a categorical likelihood, the MAML row
of docs/results.md), EMAML, BMAML, PLATIPUS and ABML on the same episodes and CPU schedule; prints the table of
accuracy, predictive NLL and expected calibration error, and draws a reliability diagram per method.

  python tools/probabilistic_omniglot.py --out_dir=runs/probabilistic_omniglot

Each run is `tools/train.py` with gin_configs/probabilistic/<method>_omniglot_5w1s.gin (MAML:
omniglot_5w1s.gin) and the CPU schedule of tools/omniglot_results.py (2,000 meta-steps of 8 tasks; the papers
train 60,000 of 32); a finished run is skipped, a stopped one resumes. PLATIPUS starts from the MAML run's weights
(`--platipus_from_maml`). Accuracy and NLL are means ± 95% CI over the 600 held-out episodes after 10 inner steps;
the ECE (15 bins) pools the episodes' predictions, with a bootstrap 95% interval over episodes.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import runs  # noqa: E402
from absl import app, flags  # noqa: E402

METHODS = {"MAML": "omniglot_5w1s", "EMAML": "emaml_omniglot_5w1s", "BMAML": "bmaml_omniglot_5w1s",
           "PLATIPUS": "platipus_omniglot_5w1s", "ABML": "abml_omniglot_5w1s"}
CPU_SCHEDULE = ["Experiment.num_steps = 2000", "Experiment.meta_batch_size = 8", "Experiment.steps_per_epoch = 25",
                "Experiment.validation_tasks = 0"]

flags.DEFINE_string("out_dir", "runs/probabilistic_omniglot", "Where the runs go.")
flags.DEFINE_list("methods", list(METHODS), f"Methods to run, of {list(METHODS)}.")
flags.DEFINE_bool("platipus_from_maml", True, "Start PLATIPUS' mean from the MAML run's weights.")
flags.DEFINE_multi_string("gin_bindings", [], "Extra bindings for every run.")
FLAGS = flags.FLAGS


def config(method: str) -> str:
    return f"gin_configs/probabilistic/{METHODS[method]}.gin"


def main(argv):
    del argv
    from tfmeta import plotting

    rows = ["| method | accuracy | NLL | ECE (95% CI) | parameters | meta-steps | training time |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    bindings = ["Experiment.verbose = 2", *CPU_SCHEDULE, *FLAGS.gin_bindings]
    parameters = {"MAML": "1×", "EMAML": "5×", "BMAML": "5×", "PLATIPUS": "3×", "ABML": "2×"}
    for method in FLAGS.methods:
        model_dir = os.path.abspath(os.path.join(FLAGS.out_dir, method.lower()))
        extra = []
        if method == "PLATIPUS" and FLAGS.platipus_from_maml:
            maml_dir = os.path.abspath(os.path.join(FLAGS.out_dir, "maml"))
            runs.train_once(config("MAML"), maml_dir, bindings)
            extra = ["PLATIPUS.learner = @warm_start()", "warm_start.learner = @conv_net()",
                     f"warm_start.model_dir = '{maml_dir}'"]
        seconds = runs.train_once(config(method), model_dir, bindings + extra)
        results = runs.read_json(os.path.join(model_dir, "metrics.json"))
        curve, report = results["eval"], results["eval"]["calibration"]
        accuracy = runs.cell(curve["sparse_categorical_accuracy"]["mean"][-1],
                             curve["sparse_categorical_accuracy"]["ci95"][-1], scale=100, digits=1, unit="%")
        nll = runs.cell(curve["nll"]["mean"][-1], curve["nll"]["ci95"][-1], digits=3)
        low, high = report["ece_ci95"]
        ece = f"{100 * report['ece']:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"
        rows.append(f"| {method} | {accuracy} | {nll} | {ece} | {parameters[method]} | {results['meta_steps']} | "
                    f"{seconds / 60:.0f} min |")
        plotting.plot_reliability(report, os.path.join(FLAGS.out_dir, f"reliability_{method.lower()}.png"),
                                  label=method)
    table = "\n".join(rows)
    print(table)
    with open(os.path.join(FLAGS.out_dir, "table.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    app.run(main)
