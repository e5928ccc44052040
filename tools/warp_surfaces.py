"""WarpGrad on synthetic 2-D loss surfaces (Flennerhag et al., 2020, Appendix D): meta-trains the warp, then
compares gradient descent with and without it on held-out surfaces and plots trajectories (their Figure 7).

  python tools/warp_surfaces.py --model_dir=runs/warp_surfaces --figure=docs/figures/warp_surfaces.png

Training is `tools/train.py` with gin_configs/warpgrad/surfaces.gin (skipped when finished, resumed when
stopped). Both optimisers start from the same 600 held-out (surface, start) pairs; the table gives the loss
after 0, 10 and 100 steps (mean ± 95% CI) and the paired difference of the final losses.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402,F401  (defines --gin_file, --gin_bindings, --model_dir; quiets TensorFlow)
import runs  # noqa: E402
from absl import app, flags  # noqa: E402

flags.DEFINE_string("figure", None, "Where to write the trajectory figure (PNG); none if unset.")
flags.DEFINE_integer("plot_surfaces", 3, "Held-out surfaces in the figure.")
FLAGS = flags.FLAGS
CONFIG = "gin_configs/warpgrad/surfaces.gin"


def trajectory(meta_learner, start, surface, steps):
    """The points visited by gradient descent from `start` (in the surface's coordinates)."""
    fast, slow = meta_learner.read_params()
    adaptation = meta_learner.adapt_params(fast, slow, [], start, surface, steps, training=False,
                                           keep_trajectory=True)
    return [meta_learner.forward(params, slow, [], start, training=False)[0][0].numpy()
            for params in adaptation.trajectory]


def plot(warpgrad, sgd, episodes, steps, path):
    import numpy as np
    import tensorflow as tf

    from tfmeta.plotting import figure
    from tfmeta.tasks import surface_loss

    count = FLAGS.plot_surfaces
    grid = np.linspace(-3, 3, 200)
    x1, x2 = np.meshgrid(grid, grid)
    with figure(path, 1, count, figsize=(4 * count, 4), squeeze=False) as (_, axes):
        for i, ax in enumerate(axes[0]):
            surface, start = episodes["support_y"][i], episodes["support_x"][i]
            heights = surface_loss(tf.broadcast_to(surface[0], (200, 200, 7)),
                                   tf.constant(np.stack([x1, x2], -1), tf.float32)).numpy()
            ax.contourf(x1, x2, heights, levels=30, cmap="viridis")
            for meta, colour, label in ((sgd, "black", "gradient descent"), (warpgrad, "magenta", "WarpGrad")):
                points = np.array(trajectory(meta, start, surface, steps))
                ax.plot(points[:, 0], points[:, 1], color=colour, marker=".", markersize=3, label=label)
            ax.plot(*start.numpy()[0], "w*", markersize=12)
            ax.set_xlim(-3, 3)
            ax.set_ylim(-3, 3)
            ax.set_title(f"held-out surface {i + 1}")
        axes[0][0].legend(loc="lower left")


def main(argv):
    del argv
    experiment, warpgrad, seconds = runs.train_and_restore(CONFIG, FLAGS.model_dir, FLAGS.gin_bindings)
    import numpy as np

    import tfmeta
    from tfmeta import evaluation

    steps = experiment.eval_steps
    sgd = tfmeta.MAML(tfmeta.models.point_model(), loss=tfmeta.tasks.surface_loss,
                      update_rule=tfmeta.Sgd(warpgrad.update_rule.learning_rate), eval_inner_steps=steps)
    curves = {name: evaluation.adaptation_curve(meta, experiment.eval_tasks, experiment.eval_num_tasks, steps,
                                                seed=experiment.eval_seed, batch_size=experiment.eval_batch_size)
              for name, meta in (("gradient descent", sgd), ("WarpGrad", warpgrad))}
    final = {name: np.array(curve["loss"]["per_task"])[:, -1] for name, curve in curves.items()}
    difference = evaluation.mean_confidence_interval(final["WarpGrad"] - final["gradient descent"])
    rows = [f"| optimiser | loss at start | after 10 steps | after {steps} steps |", "| --- | --- | --- | --- |"]
    for name, curve in curves.items():
        loss = curve["loss"]
        cells = [f"{loss['mean'][k]:.3f} ± {loss['ci95'][k]:.3f}" for k in (0, 10, steps)]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(rows)
    print(f"{experiment.eval_num_tasks} held-out (surface, start) pairs; WarpGrad meta-trained for "
          f"{int(warpgrad.meta_step())} meta-steps in {seconds / 60:.1f} min.\n{table}")
    print(f"Final loss, WarpGrad minus gradient descent (paired): {difference[0]:.3f} ± {difference[1]:.3f}")
    evaluation.write_json(os.path.join(FLAGS.model_dir, "comparison.json"),
                          {"table": table, "final_difference": difference, "minutes": seconds / 60})
    if FLAGS.figure:
        episodes = next(iter(experiment.eval_tasks.dataset(FLAGS.plot_surfaces, seed=experiment.eval_seed)))
        plot(warpgrad, sgd, episodes, steps, FLAGS.figure)
        print(f"Figure written to {FLAGS.figure}")


if __name__ == "__main__":
    app.run(main)
