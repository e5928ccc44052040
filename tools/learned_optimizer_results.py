"""Meta-trains a learned optimizer and compares it with tuned hand-designed optimizers on held-out problems.

  python tools/learned_optimizer_results.py --gin_file=gin_configs/learned_optimizers/lstm_quadratic.gin \
      --model_dir=runs/l2o_quadratic

Runs `tfmeta.optimizers.experiment.OptimizerExperiment` (meta-training resumes from the last checkpoint in
--model_dir), prints the table (each optimizer's learning rate, the final loss after the evaluation's steps as
log10 of the mean over problems and as the mean of log10 with its 95% CI) and writes it to <results_dir>/table.md
(default: --model_dir), with the figure of the mean loss against steps (95% CI bands) as <results_dir>/curves.png.
The generalisation tests evaluate a trained rule on other problems: the same --model_dir, another --results_dir,
e.g.

  python tools/learned_optimizer_results.py --gin_file=gin_configs/learned_optimizers/lstm_mnist_relu.gin \
      --model_dir=runs/l2o_mnist --results_dir=runs/l2o_mnist/relu
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from absl import flags  # noqa: E402

flags.DEFINE_string("results_dir", None, "Where the results, table and figure go (default: --model_dir).")
FLAGS = common.FLAGS


def main(argv):
    del argv
    common.parse_gin()
    import numpy as np

    from tfmeta.optimizers.experiment import OptimizerExperiment
    from tfmeta.plotting import figure

    out = FLAGS.results_dir or FLAGS.model_dir
    results = OptimizerExperiment().run(FLAGS.model_dir, out)
    rows = ["| optimizer | learning rate | log10 mean final loss | mean log10 final loss (95% CI) |",
            "| --- | --- | --- | --- |"]
    for name, entry in results["optimizers"].items():
        rate = entry.get("learning_rate")
        rows.append(f"| {name} | {'learned' if rate is None else f'{rate:g}'} | {entry['log10_mean_final_loss']:.2f} | "
                    f"{entry['mean_log10_final_loss']:.2f} ± {entry['mean_log10_final_loss_ci95']:.2f} |")
    table = "\n".join(rows)
    print(table)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table + "\n")
    with figure(os.path.join(out, "curves.png"), figsize=(6, 4)) as (_, ax):
        for name, entry in results["optimizers"].items():
            mean, ci = np.asarray(entry["mean"], dtype=float), np.asarray(entry["ci95"], dtype=float)
            line = ax.plot(mean, label=name)[0]
            ax.fill_between(np.arange(len(mean)), mean - ci, mean + ci, color=line.get_color(), alpha=0.2)
        ax.set_yscale("log")
        ax.set_xlabel("optimizer steps")
        ax.set_ylabel("loss (mean over test problems)")
        ax.legend(fontsize=7)


if __name__ == "__main__":
    common.run(main)
