"""Exports the last checkpoint of a run as a SavedModel that adapts to a new task at serving time.

  python tools/export.py --gin_file=gin_configs/maml_sine.gin --model_dir=runs/maml_sine --export_dir=exports/maml_sine
  saved_model_cli run --dir exports/maml_sine --tag_set serve --signature_def serving_default \\
      --input_exprs 'support_x=[[0.],[1.]];support_y=[[0.],[0.84]];query_x=[[0.5]]'

Signatures (see `tfmeta.export`): `serving_default` (support_x, support_y, query_x -> predictions, or logits and
classes; MALTML also takes the family's tasks, family_support_x etc.), `serving_with_steps` (also inner_steps)
for gradient-based learners, and `serving_float` for image learners, whose other signatures take uint8 images as
decoded from their files and apply the training pipeline's preprocessing (float images in [0, 1] sent to them
arrive as 0s and 1s: send those to serving_float). Every request is checked at run time.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402  (sets TF's log level before TensorFlow is imported)
from absl import flags  # noqa: E402

flags.DEFINE_string("export_dir", None, "Where to write the SavedModel.", required=True)
flags.DEFINE_integer("steps", None, "Inner steps of serving_default (default: the config's eval_inner_steps).")
flags.DEFINE_enum("classifier", "auto", ["auto", "true", "false"],
                  "Serve labels -> logits and classes (true) or targets -> predictions (false); auto infers it "
                  "from the meta-learner and its loss.")
FLAGS = common.FLAGS


def main(argv):
    del argv
    common.parse_gin()
    from tfmeta import export
    from tfmeta.experiment import Experiment

    experiment = Experiment()
    meta_learner = experiment.restore(FLAGS.model_dir)
    classes = getattr(experiment.tasks, "classes", None)
    preprocessing = getattr(classes, "preprocessing", None)
    classifier = {"auto": None, "true": True, "false": False}[FLAGS.classifier]
    # MALTML serves a family of the training distribution's size with each request.
    family_tasks = experiment.tasks.num_tasks if type(meta_learner).__name__ == "MALTML" else None
    signatures = export.export_meta_learner(meta_learner, FLAGS.export_dir, steps=FLAGS.steps,
                                            preprocessing=preprocessing, classifier=classifier,
                                            family_tasks=family_tasks)
    print(f"Exported {type(meta_learner).__name__} after {int(meta_learner.meta_step())} meta-steps to "
          f"{FLAGS.export_dir}:")
    for name, function in signatures.items():
        inputs = ", ".join(f"{s.name} {s.dtype.name}{s.shape}" for s in function.structured_input_signature[0])
        outputs = ", ".join(f"{k} {s.dtype.name}{s.shape}" for k, s in function.structured_outputs.items())
        print(f"  {name}({inputs}) -> {outputs}")


if __name__ == "__main__":
    common.run(main)
