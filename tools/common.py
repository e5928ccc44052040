"""Flags, gin set-up and error reporting shared by the tools."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # as `import tfmeta` does; TensorFlow reads it once

import logging as python_logging  # noqa: E402

import gin  # noqa: E402
from absl import app, flags, logging  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INTERRUPTED = 143  # the exit status of a run stopped by SIGTERM (128 + 15), after it saved a checkpoint

flags.DEFINE_multi_string("gin_file", [], "Gin config files, relative to the working directory or the repository.")
flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings that override the files, e.g. 'MAML.inner_steps = 5'.")
flags.DEFINE_string("model_dir", None, "Directory of the run: checkpoints, logs, metrics.", required=True)
flags.register_validator("model_dir", lambda path: not os.path.isfile(path),
                         message="--model_dir names a file; it must be a directory (or not exist yet).")
FLAGS = flags.FLAGS


class _ProbeMisses(python_logging.Filter):
    """Drops gin's "Path not found" lines: gin logs one at error level for every search location that does not
    hold an included file, though it goes on to find it in the next one (and raises if it finds none)."""

    def filter(self, record):
        return not record.getMessage().startswith("Path not found")


def resolve_gin_file(path: str) -> str:
    """A gin file given relative to the working directory or to the repository, as an absolute path."""
    for candidate in (path, os.path.join(REPO, path)):
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    raise FileNotFoundError(f"--gin_file {path!r}: no such file in the working directory or in {REPO}.")


def parse_gin() -> None:
    """Registers tfmeta's configurables and parses --gin_file/--gin_bindings; quiets TensorFlow's INFO logs
    unless --verbosity is given."""
    import tfmeta.configurables  # noqa: F401

    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    python_logging.getLogger().addFilter(_ProbeMisses())  # gin logs through the root logger
    gin.add_config_file_search_path(REPO)  # for the `include` lines, relative to the repository
    gin.parse_config_files_and_bindings([resolve_gin_file(f) for f in FLAGS.gin_file], FLAGS.gin_bindings)


def gin_value(name: str, default):
    """The value bound to a gin parameter, or `default` when the configuration does not bind it."""
    try:
        return gin.query_parameter(name)
    except ValueError:
        return default


def run(main) -> None:
    """`absl.app.run(main)`, reporting the errors of a run (bad configuration or data, a non-finite result, an
    interruption) as one line on stderr with a non-zero exit status instead of a traceback."""
    from tfmeta.experiment import TrainingInterrupted

    def guarded(argv):
        try:
            main(argv)
        except TrainingInterrupted as error:
            print(f"Interrupted: {error}", file=sys.stderr)
            sys.exit(INTERRUPTED)
        except (ValueError, TypeError, FileNotFoundError, FloatingPointError) as error:
            print(f"Error: {error}", file=sys.stderr)
            sys.exit(1)

    app.run(guarded)


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
    if "calibration" in curve:
        report = curve["calibration"]
        low, high = report["ece_ci95"]
        print(f"  calibration after {steps[-1]} inner steps: ECE {report['ece']:.4f} (95% bootstrap interval "
              f"{low:.4f}-{high:.4f}, {report['num_bins']} bins), accuracy {report['accuracy']:.4f}")
