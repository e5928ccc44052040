"""Flags and gin set-up shared by the tools."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import gin  # noqa: E402
from absl import flags, logging  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

flags.DEFINE_multi_string("gin_file", [], "Gin config files, relative to the working directory or the repository.")
flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings that override the files, e.g. 'MAML.inner_steps = 5'.")
flags.DEFINE_string("model_dir", None, "Directory of the run: checkpoints, logs, metrics.", required=True)
FLAGS = flags.FLAGS


def parse_gin() -> None:
    """Registers tfmeta's configurables and parses --gin_file/--gin_bindings; quiets TensorFlow's INFO logs
    unless --verbosity is given."""
    import tfmeta.configurables  # noqa: F401

    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    gin.add_config_file_search_path(REPO)
    gin.parse_config_files_and_bindings(FLAGS.gin_file, FLAGS.gin_bindings)


def gin_value(name: str, default):
    """The value bound to a gin parameter, or `default` when the configuration does not bind it."""
    try:
        return gin.query_parameter(name)
    except ValueError:
        return default


def print_curve(curve: dict) -> None:
    """Prints the query loss and metrics of an adaptation curve (mean ± 95% CI) before adaptation, at the first
    scored inner step and after the last one; a curve without inner steps (metric learners) has one point."""
    names = [n for n, v in curve.items() if isinstance(v, dict) and "mean" in v]
    print(f"On {curve['num_tasks']} held-out tasks (seed {curve['seed']}; mean ± 95% CI):")
    steps = curve["steps"]  # the scored inner steps (see `Experiment.eval_every`)
    for i in sorted({0, min(1, len(steps) - 1), len(steps) - 1}):
        where = "adapted (no inner steps)" if steps[-1] == 0 else f"{steps[i]:2d} inner steps"
        values = ", ".join(f"{n} {curve[n]['mean'][i]:.4f} ± {curve[n]['ci95'][i]:.4f}" for n in names)
        print(f"  {where}: {values}")

