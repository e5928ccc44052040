"""PLATIPUS' ambiguous sine/line regression: MAML, EMAML, PLATIPUS, BMAML and ABML meta-trained with
gin_configs/probabilistic/<method>_ambiguous.gin; prints the results table and draws the sampled functions.

  python tools/ambiguous_results.py --model_dir=runs/ambiguous

Each run is `tools/train.py`; a finished run is skipped, a stopped one resumes. PLATIPUS starts from the MAML
run's meta-learned weights (`--platipus_from_maml`, the re-implementations' advice; its meta-steps then add to
MAML's). The table (query MSE of the predictive mean, predictive NLL and the coverage of the central 50% and 90%
intervals after the 5 inner steps of meta-training, mean ± 95% CI over 600 held-out tasks with 100 query points
each) is written to <model_dir>/table.md, and the figure of sampled adapted functions on the same held-out tasks
to <model_dir>/ambiguous_samples.png.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (defines --gin_bindings; quiets TensorFlow)
import runs  # noqa: E402
from absl import app, flags  # noqa: E402

METHODS = ("MAML", "EMAML", "PLATIPUS", "BMAML", "ABML")

flags.DEFINE_list("methods", list(METHODS), f"Methods to run, of {list(METHODS)}.")
flags.DEFINE_bool("platipus_from_maml", True, "Start PLATIPUS' mean from the MAML run's weights.")
flags.DEFINE_integer("figure_seed", 3, "The seed of the held-out tasks drawn in the figure.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from tfmeta import plotting
    from tfmeta.tasks import SineLineTasks

    rows = ["| method | MSE | NLL | 50% coverage | 90% coverage | meta-steps | training time |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    methods, extra = {}, list(common.FLAGS.gin_bindings)  # (extra bindings for every run, e.g. a shorter schedule)
    for method in FLAGS.methods:
        model_dir = os.path.abspath(os.path.join(FLAGS.model_dir, method.lower()))
        bindings = ["Experiment.verbose = 2", *extra]
        if method == "PLATIPUS" and FLAGS.platipus_from_maml:
            maml_dir = os.path.abspath(os.path.join(FLAGS.model_dir, "maml"))
            runs.train_once("gin_configs/probabilistic/maml_ambiguous.gin", maml_dir, bindings)
            bindings += ["PLATIPUS.learner = @warm_start()", "warm_start.learner = @mlp()",
                         f"warm_start.model_dir = '{maml_dir}'"]
        _, meta_learner, seconds = runs.train_and_restore(
            f"gin_configs/probabilistic/{method.lower()}_ambiguous.gin", model_dir, bindings)
        methods[method] = meta_learner
        results = runs.read_json(os.path.join(model_dir, "metrics.json"))
        curve = results["eval"]
        cells = [runs.cell(curve[n]["mean"][-1], curve[n]["ci95"][-1], digits=3) for n in ("mean_squared_error", "nll")]
        cells += [runs.cell(curve[n]["mean"][-1], curve[n]["ci95"][-1], scale=100, digits=1, unit="%")
                  for n in ("coverage_50", "coverage_90")]
        rows.append(f"| {method} | {' | '.join(cells)} | {results['meta_steps']} | {seconds / 60:.0f} min |")
    table = "\n".join(rows)
    print(table)
    os.makedirs(FLAGS.model_dir, exist_ok=True)
    with open(os.path.join(FLAGS.model_dir, "table.md"), "w") as f:
        f.write(table + "\n")
    tasks = SineLineTasks(num_support=5, num_query=100)
    plotting.plot_sampled_functions(methods, tasks, os.path.join(FLAGS.model_dir, "ambiguous_samples.png"),
                                    seed=FLAGS.figure_seed, stddevs={"MAML": 0.3})


if __name__ == "__main__":
    app.run(main)
