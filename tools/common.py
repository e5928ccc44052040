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
