"""Learning to meta-learn on sine families (Devos & Dandi, 2020): MALTML, first-order MALTML and MAML, evaluated
L-task K-shot on held-out families, with an oracle given each task's amplitude and phase (their Figure 2c).

  python tools/maltml_sine.py --model_dir=runs/maltml_sine --figure=docs/figures/maltml_sine.png

Each method is `tools/train.py` with its config in gin_configs/maltml/ (skipped when finished, resumed when
stopped) in <model_dir>/<method>. All are evaluated on the goal tasks of the same 600 held-out families: MALTML
after meta-finetuning on each family's 5 tasks (and, paired, without that meta-update), MAML from its
initialisation. The oracle is the same network with the amplitude and phase as extra inputs, trained by Keras
`fit` on the training families' tasks. Writes table.md and results.json in --model_dir, and the figure.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402,F401  (defines --gin_file, --gin_bindings, --model_dir; quiets TensorFlow)
import runs  # noqa: E402
from absl import app, flags  # noqa: E402

flags.DEFINE_string("figure", None, "Where to write the figure (PNG); none if unset.")
flags.DEFINE_integer("oracle_steps", 20_000, "Training steps of the oracle (batches of 256 points).")
FLAGS = flags.FLAGS
METHODS = {"MALTML": "maltml", "first-order MALTML": "fomaltml", "MAML": "maml"}
REPORTED_STEPS = (0, 1, 5, 10)


def oracle_mse(experiment, steps: int) -> list:
    """Per held-out family, the goal query MSE of a 1-40-40-1 ReLU network given (x, A, φ) as inputs, trained on
    the training families' tasks with Adam 1e-3."""
    import keras
    import numpy as np
    import tensorflow as tf

    families = experiment.eval_tasks
    keras.utils.set_random_seed(experiment.seed)
    oracle = keras.Sequential([keras.Input((3,)), keras.layers.Dense(40, activation="relu"),
                               keras.layers.Dense(40, activation="relu"), keras.layers.Dense(1)])
    oracle.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")

    def points(seed):  # 256 points of 256 tasks of the training distribution
        x = tf.random.stateless_uniform([256, 1], seed, *families.input_range)
        a = tf.random.stateless_uniform([256, 1], seed + 1, *families.amplitude_range)
        p = tf.random.stateless_uniform([256, 1], seed + 2, *families.phase_range)
        return tf.concat([x, a, p], axis=1), a * tf.sin(x - p)

    data = tf.data.Dataset.counter().map(lambda i: points(tf.stack([tf.cast(experiment.seed, tf.int64), i])))
    oracle.fit(data.prefetch(tf.data.AUTOTUNE), steps_per_epoch=steps, epochs=1, verbose=2, shuffle=False)
    errors = []
    base = tf.constant([experiment.eval_seed, 0], tf.int64)
    for i in range(-(-experiment.eval_num_tasks // experiment.eval_batch_size)):
        seed = tf.random.experimental.stateless_fold_in(base, i)
        episodes, parameters = families.sample_with_parameters(seed, experiment.eval_batch_size)
        x = episodes["goal_query_x"]  # [families, G, points, 1]
        shape = tf.shape(x)
        amplitude = tf.broadcast_to(parameters["goal_amplitude"][:, :, None, None], shape)
        phase = tf.broadcast_to(parameters["phase"][:, None, None, None], shape)
        inputs = tf.reshape(tf.concat([x, amplitude, phase], axis=-1), [-1, 3])
        predictions = tf.reshape(oracle.predict(inputs, verbose=0, batch_size=4096), shape)
        errors.append(np.mean((predictions - episodes["goal_query_y"]) ** 2, axis=(1, 2, 3)))
    return np.concatenate(errors)[:experiment.eval_num_tasks].tolist()


def main(argv):
    del argv
    import numpy as np

    from tfmeta.evaluation import adaptation_curve, mean_confidence_interval, write_json
    from tfmeta.plotting import figure

    curves, minutes = {}, {}
    for method, name in METHODS.items():
        experiment, meta_learner, seconds = runs.train_and_restore(
            f"gin_configs/maltml/{name}_sine.gin", os.path.join(FLAGS.model_dir, name), FLAGS.gin_bindings)
        minutes[method] = seconds / 60
        curve = adaptation_curve(meta_learner, experiment.eval_tasks, num_tasks=experiment.eval_num_tasks,
                                 steps=experiment.eval_steps, seed=experiment.eval_seed,
                                 batch_size=experiment.eval_batch_size)
        curves[method] = np.array(curve["loss"]["per_task"])
        if method == "MALTML":
            curves["MALTML without the meta-update"] = np.array(curve["loss_without_meta_update"]["per_task"])
            maltml = experiment
    oracle = np.array(oracle_mse(maltml, FLAGS.oracle_steps))

    rows = ["| method | " + " | ".join(f"{k} steps" for k in REPORTED_STEPS) + " | training time |",
            "| --- |" + " --- |" * (len(REPORTED_STEPS) + 1)]
    for method, values in curves.items():
        cells = [mean_confidence_interval(values[:, k]) for k in REPORTED_STEPS]
        time = f"{minutes[method]:.0f} min" if method in minutes else "(the MALTML run)"
        rows.append(f"| {method} | " + " | ".join(f"{m:.3f} ± {c:.3f}" for m, c in cells) + f" | {time} |")
    m, c = mean_confidence_interval(oracle)
    rows.append(f"| oracle (given amplitude and phase) | {m:.3f} ± {c:.3f} (no finetuning) |" + " |" *
                len(REPORTED_STEPS))
    gain = mean_confidence_interval(curves["MALTML without the meta-update"][:, 0] - curves["MALTML"][:, 0])
    table = "\n".join(rows)
    summary = (f"Goal-task MSE (mean ± 95% CI over {len(oracle)} held-out families) after 0-10 finetuning steps. "
               f"The meta-update (meta-finetuning on {maltml.eval_tasks.num_tasks} tasks of the family) lowers the "
               f"goal MSE at 0 steps by {gain[0]:.3f} ± {gain[1]:.3f} (paired).")
    print(f"{summary}\n{table}")
    with open(os.path.join(FLAGS.model_dir, "table.md"), "w") as f:
        f.write(f"{summary}\n\n{table}\n")
    write_json(os.path.join(FLAGS.model_dir, "results.json"),
               {"mean_curves": {k: v.mean(axis=0).tolist() for k, v in curves.items()},
                "oracle": float(oracle.mean()), "meta_update_gain": gain, "minutes": minutes})
    if FLAGS.figure:
        steps = np.arange(next(iter(curves.values())).shape[1])
        with figure(FLAGS.figure, figsize=(6, 4)) as (_, ax):
            for method, values in curves.items():
                stats = [mean_confidence_interval(values[:, k]) for k in steps]
                mean, ci = np.array([s[0] for s in stats]), np.array([s[1] for s in stats])
                style = "--" if "without" in method else "-"
                ax.plot(steps, mean, style, marker="o", markersize=3, label=method)
                ax.fill_between(steps, np.maximum(mean - ci, 1e-3), mean + ci, alpha=0.2)
            ax.axhline(oracle.mean(), color="k", linestyle=":", label="oracle (amplitude and phase given)")
            ax.set_yscale("log")
            ax.set_xlabel("goal-task finetuning steps")
            ax.set_ylabel("goal-task MSE (log scale; bands: 95% CI)")
            ax.set_title("5-task 5-shot sine families: 600 held-out families")
            ax.legend(fontsize=8)
        print(f"Figure written to {FLAGS.figure}")


if __name__ == "__main__":
    app.run(main)
