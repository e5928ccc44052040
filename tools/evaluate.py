"""Evaluates the last checkpoint of a run on held-out tasks: eval.json and PNG plots in --model_dir.

  python tools/evaluate.py --gin_file=gin_configs/maml_sine.gin --model_dir=runs/maml_sine
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (sets TF's log level before TensorFlow is imported)

FLAGS = common.FLAGS


def main(argv):
    del argv
    common.parse_gin()
    from tfmeta import evaluation, plotting
    from tfmeta.experiment import Experiment
    from tfmeta.tasks import SineTasks

    experiment = Experiment()
    meta_learner = experiment.restore(FLAGS.model_dir)
    curve = experiment.evaluate(meta_learner)
    curve["meta_steps"] = int(meta_learner.meta_step())
    non_finite = evaluation.write_json(os.path.join(FLAGS.model_dir, "eval.json"), curve)
    if non_finite:
        raise FloatingPointError(f"the evaluation is not finite ({', '.join(non_finite)}): eval.json lists the "
                                 "fields under 'non_finite', with null values.")
    plotting.plot_adaptation_curve(curve, os.path.join(FLAGS.model_dir, "eval_curve.png"))
    if "calibration" in curve:
        plotting.plot_reliability(curve["calibration"], os.path.join(FLAGS.model_dir, "eval_reliability.png"),
                                  label=type(meta_learner).__name__)
    if isinstance(experiment.eval_tasks, SineTasks):
        plotting.plot_sine_adaptation(
            meta_learner, experiment.eval_tasks, os.path.join(FLAGS.model_dir, "eval_tasks.png"),
            seed=experiment.eval_seed, steps=(1, experiment.eval_steps),
        )
    common.print_curve(curve)
    print(f"Wrote eval.json, eval_curve.png and plots to {FLAGS.model_dir}")


if __name__ == "__main__":
    common.run(main)
