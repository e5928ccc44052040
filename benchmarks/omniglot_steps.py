"""Seconds per meta-step through `fit` of Omniglot gin configs with their paper settings, and what the papers'
full schedules cost at that rate (needs the Omniglot archives in $TFMETA_DATA_DIR/omniglot).

  python benchmarks/omniglot_steps.py gin_configs/omniglot/maml_5w1s.gin gin_configs/omniglot/protonet_5w1s.gin

Each config: 2 warm-up steps (tracing), then 4 timed steps; prints one line per config.
"""

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import gin  # noqa: E402

import tfmeta.configurables  # noqa: E402, F401  (registers the gin configurables)
from tfmeta.experiment import Experiment  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(configs):
    gin.add_config_file_search_path(REPO)
    for config in configs:
        gin.clear_config()
        gin.parse_config_files_and_bindings([config], [])
        experiment = Experiment()
        meta = experiment.build()
        dataset = experiment.tasks.dataset(experiment.meta_batch_size, seed=0)
        meta.fit(dataset, steps_per_epoch=2, epochs=1, verbose=0)
        start = time.perf_counter()
        meta.fit(dataset, steps_per_epoch=4, epochs=1, verbose=0)
        seconds = (time.perf_counter() - start) / 4
        hours = seconds * experiment.num_steps / 3600
        print(f"| {os.path.basename(config)[:-4]} | {experiment.meta_batch_size} | {seconds:.2f} | "
              f"{experiment.num_steps:,} | {hours:.1f} h |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
