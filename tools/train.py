"""Meta-trains a gin-configured experiment, resuming from the last checkpoint in --model_dir.

  python tools/train.py --gin_file=gin_configs/maml_sine.gin --model_dir=runs/maml_sine

Exit status: 0 when the run finished and its results are finite; 1 with a one-line error for a bad configuration
or data, or a non-finite training, validation or evaluation result (metrics.json then lists the non-finite
fields); 143 after SIGTERM, once a checkpoint is saved: the same command resumes the run.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (sets TF's log level before TensorFlow is imported)

FLAGS = common.FLAGS


def main(argv):
    del argv
    common.parse_gin()
    from tfmeta import distribute
    from tfmeta.experiment import Experiment

    # Thread pools, then multi-worker and TPU strategies, configure the runtime: set them before any other op.
    distribute.set_thread_pools(*(common.gin_value(f"Experiment.{k}_op_threads", 0) for k in ("intra", "inter")))
    distribute.make_strategy(*(common.gin_value(f"Experiment.{k}", None) for k in ("strategy", "tpu", "devices")))

    experiment = Experiment()
    results = experiment.train(FLAGS.model_dir)
    print(f"\nAfter {results['meta_steps']} meta-steps:")
    common.print_curve(results["eval"])
    print(f"Metrics written to {os.path.join(FLAGS.model_dir, 'metrics.json')}")


if __name__ == "__main__":
    common.run(main)
