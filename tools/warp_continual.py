"""Continual WarpGrad on sine streams (Flennerhag et al., 2020, Section 4.3): meta-trains the warps, then learns
held-out streams with and without them and plots each sub-task's loss over the stream (their Figure 12).

  python tools/warp_continual.py --model_dir=runs/warp_continual --figure=docs/figures/warp_continual.png

Training is `tools/train.py` with gin_configs/warpgrad/continual_sine.gin (skipped when finished, resumed when
stopped). Plain SGD is the same learner before meta-training (its warps start as the identity), from the same
initialisation. Held-out streams present the sub-tasks in order and in a random order.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402,F401  (defines --gin_file, --gin_bindings, --model_dir; quiets TensorFlow)
import runs  # noqa: E402
from absl import app, flags  # noqa: E402

flags.DEFINE_string("figure", None, "Where to write the figure (PNG); none if unset.")
flags.DEFINE_integer("eval_query_size", 100, "Query points per sub-task of the held-out streams.")
FLAGS = flags.FLAGS
CONFIG = "gin_configs/warpgrad/continual_sine.gin"


def stream_curves(meta_learner, tasks, num_tasks, batch_size, seed):
    """Per-task loss of every sub-task after each stream step: [tasks, steps + 1, sub_tasks]."""
    import numpy as np
    import tensorflow as tf

    losses = tf.function(meta_learner.stream_losses)
    batches = tasks.dataset(batch_size, seed=seed, num_batches=-(-num_tasks // batch_size))
    return np.concatenate([losses(episodes).numpy() for episodes in batches])[:num_tasks]


def main(argv):
    del argv
    experiment, warpgrad, seconds = runs.train_and_restore(CONFIG, FLAGS.model_dir, FLAGS.gin_bindings)
    import keras

    from tfmeta.evaluation import mean_confidence_interval, write_json
    from tfmeta.plotting import figure

    keras.utils.set_random_seed(experiment.seed)
    sgd = experiment.build()  # the initialisation meta-training started from: identity warps
    results, rows = {}, ["| stream order | optimiser | current sub-task | previous sub-tasks (mean) |",
                         "| --- | --- | --- | --- |"]
    for order in ("sequential", "random"):
        tasks = experiment.tasks.__class__(**{**vars(experiment.tasks), "order": order,
                                              "query_size": FLAGS.eval_query_size})
        for name, meta in (("SGD", sgd), ("WarpGrad", warpgrad)):
            curve = stream_curves(meta, tasks, experiment.eval_num_tasks, experiment.eval_batch_size,
                                  experiment.eval_seed)
            results[(order, name)] = curve
            current = mean_confidence_interval(curve[:, -1, -1])
            previous = mean_confidence_interval(curve[:, -1, :-1].mean(axis=1))
            rows.append(f"| {order} | {name} | {current[0]:.4f} ± {current[1]:.4f} | "
                        f"{previous[0]:.4f} ± {previous[1]:.4f} |")
    table = "\n".join(rows)
    print(f"Loss at the end of {experiment.eval_num_tasks} held-out streams (mean ± 95% CI); WarpGrad meta-trained "
          f"for {int(warpgrad.meta_step())} meta-steps in {seconds / 60:.0f} min.\n{table}")
    write_json(os.path.join(FLAGS.model_dir, "comparison.json"),
               {"table": table, "minutes": seconds / 60,
                "mean_curves": {f"{o}/{n}": c.mean(axis=0).tolist() for (o, n), c in results.items()}})
    if FLAGS.figure:
        with figure(FLAGS.figure, 1, 2, figsize=(11, 4), sharey=True) as (_, axes):
            for ax, order in zip(axes, ("sequential", "random")):
                for name, style in (("SGD", "--"), ("WarpGrad", "-")):
                    mean = results[(order, name)].mean(axis=0)
                    for j in range(mean.shape[1]):
                        ax.plot(mean[:, j], style, color=f"C{j}", label=f"{name}, sub-task {j + 1}")
                ax.set_yscale("log")
                ax.set_xlabel("stream step")
                ax.set_title(f"sub-tasks in {order} order")
            axes[0].set_ylabel("query loss (MSE)")
            axes[1].legend(fontsize=7, ncol=2)
        print(f"Figure written to {FLAGS.figure}")


if __name__ == "__main__":
    app.run(main)
