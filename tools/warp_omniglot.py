"""Multi-shot Omniglot (WarpGrad, Flennerhag et al., 2020, Section 4.2): Warp-Leap against Leap, Reptile,
fine-tuning and SGD from a random initialisation; prints the table and plots test accuracy over the 100 steps.

  python tools/warp_omniglot.py --model_dir=runs/warp_omniglot --figure=docs/figures/warp_omniglot.png

The runs go to --model_dir/<method>_<schedule>. Each meta-learner is `tools/train.py` with
`gin_configs/warpgrad/omniglot_<method>.gin` (skipped when finished, resumed when stopped). Fine-tuning
pretrains the same conv4 on the joint classification of every training character (training drawers, the same
augmentation) with Keras `fit`, then adapts from its features with a new head, as the SGD baseline does from a
random initialisation. `--schedule=cpu` (default) shortens the official code's schedule (SCHEDULE below;
stated in the table); `--schedule=paper` keeps the configs' settings.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402,F401  (defines --gin_file, --gin_bindings, --model_dir; quiets TensorFlow)
import runs  # noqa: E402
from absl import app, flags  # noqa: E402

METHODS = {"Warp-Leap": "warp_leap", "Leap": "leap", "Reptile": "reptile", "SGD (no meta-training)": "sgd"}
# Two CPU cores: 2 tasks per meta-batch (the official code: 20) and 100 meta-steps (1000), 200 held-out tasks.
# A Warp-Leap meta-step on 5 tasks (500 trajectory points, each a second-order step) took 70-130 s here.
SCHEDULE = ["Experiment.meta_batch_size = 2", "Experiment.num_steps = 100", "Experiment.steps_per_epoch = 10",
            "Experiment.eval_num_tasks = 200"]

flags.DEFINE_string("figure", None, "Where to write the figure (PNG); none if unset.")
flags.DEFINE_enum("schedule", "cpu", ["cpu", "paper"], "The CPU schedule (SCHEDULE) or the configs' settings.")
flags.DEFINE_integer("finetune_steps", 2000, "Pretraining steps of the fine-tuning baseline.")
flags.DEFINE_integer("finetune_batch_size", 64, "Pretraining batch size of the fine-tuning baseline.")
FLAGS = flags.FLAGS


def config(method: str) -> str:
    return f"gin_configs/warpgrad/omniglot_{method}.gin"


def finetuning(model_dir: str, bindings: list) -> dict:
    """Pretrains on every training character jointly, then evaluates adaptation from it on the held-out tasks;
    returns the run's metrics (written to `model_dir`/metrics.json, reused when present)."""
    path = os.path.join(model_dir, "metrics.json")
    if os.path.exists(path):
        return runs.read_json(path)
    import time

    import keras
    import numpy as np
    import tensorflow as tf

    from tfmeta.data import RandomAffine
    from tfmeta.evaluation import write_json
    from tfmeta.experiment import Experiment, summarize

    common.FLAGS.gin_file, common.FLAGS.gin_bindings = [config("sgd")], bindings
    common.parse_gin()
    experiment = Experiment()
    keras.utils.set_random_seed(experiment.seed)
    start = time.time()
    tasks = experiment.tasks
    images = tasks.classes.images[:, tasks.test_examples:tasks.test_examples + tasks.train_examples]
    x = images.reshape(-1, *images.shape[2:])
    y = np.repeat(np.arange(len(images)), tasks.train_examples)
    augment = RandomAffine()
    data = (tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=experiment.seed).repeat()
            .batch(FLAGS.finetune_batch_size).enumerate()
            .map(lambda i, batch: (augment(batch[0], tf.stack([tf.cast(experiment.seed, tf.int64), i])), batch[1]))
            .prefetch(tf.data.AUTOTUNE))
    # The learner's layers up to its head, with a head over every training character: pretraining trains them.
    meta_learner = experiment.build()
    learner = meta_learner.learner
    scores = keras.layers.Dense(len(images), name="pretrain_head")(learner.get_layer("head").input)
    pretrained = keras.Model(learner.input, scores)
    pretrained.compile(optimizer=keras.optimizers.Adam(1e-3), metrics=["sparse_categorical_accuracy"],
                       loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    pretrained.fit(data, steps_per_epoch=FLAGS.finetune_steps, epochs=1, verbose=2)
    results = {"meta_steps": 0, "pretrain_steps": FLAGS.finetune_steps,
               "eval": summarize(experiment.evaluate(meta_learner)), "seconds": time.time() - start}
    os.makedirs(model_dir, exist_ok=True)
    write_json(path, results)
    return results


def main(argv):
    del argv
    import numpy as np

    bindings = (SCHEDULE if FLAGS.schedule == "cpu" else []) + ["Experiment.verbose = 2"] + FLAGS.gin_bindings
    curves, rows = {}, ["| method | test accuracy after adaptation (95% CI) | meta-steps | wall time (training, "
                        "evaluation) |", "| --- | --- | --- | --- |"]
    for name, method in [*METHODS.items(), ("fine-tuning", "finetune")]:
        model_dir = os.path.abspath(os.path.join(FLAGS.model_dir, f"{method}_{FLAGS.schedule}"))
        if method == "finetune":
            metrics = finetuning(model_dir, bindings)
            seconds, steps = metrics["seconds"], f"{metrics['pretrain_steps']} pretraining"
        else:
            no_meta_training = ["Experiment.num_steps = 0"] if method == "sgd" else []
            seconds = runs.train_once(config(method), model_dir, bindings + no_meta_training)
            metrics = runs.read_json(os.path.join(model_dir, "metrics.json"))
            steps = metrics["meta_steps"]
        accuracy = metrics["eval"]["sparse_categorical_accuracy"]
        curves[name] = (metrics["eval"]["steps"], 100 * np.array(accuracy["mean"]))
        rows.append(f"| {name} | {100 * accuracy['mean'][-1]:.1f} ± {100 * accuracy['ci95'][-1]:.1f}% | {steps} | "
                    f"{seconds / 60:.0f} min |")
    table = "\n".join(rows)
    print(table)
    with open(os.path.join(FLAGS.model_dir, f"table_{FLAGS.schedule}.md"), "w") as f:
        f.write(table + "\n")
    if FLAGS.figure:
        from tfmeta.plotting import figure

        with figure(FLAGS.figure, figsize=(6, 4)) as (_, ax):
            for name, (steps, mean) in curves.items():
                ax.plot(steps, mean, label=name)
            ax.set_xlabel("adaptation step (batch of 20)")
            ax.set_ylabel("test accuracy on held-out alphabets (%)")
            ax.legend()
        print(f"Figure written to {FLAGS.figure}")


if __name__ == "__main__":
    app.run(main)
