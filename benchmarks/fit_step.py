"""Time per meta-step through `fit` for sine MAML (workload a), by task mapping, XLA and steps per execution.

  python benchmarks/fit_step.py                      # all combinations, a line each
  python benchmarks/fit_step.py --modes map_fn --xla on --steps_per_execution 1,50

Each combination fits 200 warm-up steps, then times 2,000 steps (2 epochs of 1,000, TerminateOnNaN attached).
"""

import argparse
import itertools
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402

import tfmeta  # noqa: E402


def time_fit(mode: str, xla: bool, steps_per_execution: int, steps: int = 2000) -> float:
    keras.utils.set_random_seed(0)
    meta = tfmeta.MAML(tfmeta.models.mlp(), update_rule=tfmeta.Sgd(0.01), task_parallelism=mode)
    meta.compile(keras.optimizers.Adam(1e-3), jit_compile=xla, steps_per_execution=steps_per_execution)
    data = tfmeta.tasks.SineTasks(10).dataset(25, seed=0)
    meta.fit(data, epochs=1, steps_per_epoch=200, verbose=0)
    start = time.perf_counter()
    meta.fit(data, epochs=2, steps_per_epoch=steps // 2, verbose=0, callbacks=[keras.callbacks.TerminateOnNaN()])
    return (time.perf_counter() - start) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="map_fn,vectorized_map")
    parser.add_argument("--xla", default="off,on")
    parser.add_argument("--steps_per_execution", default="1,50")
    args = parser.parse_args()
    for mode, xla, spe in itertools.product(
        args.modes.split(","), args.xla.split(","), map(int, args.steps_per_execution.split(","))
    ):
        print(f"{mode:15s} xla={xla:3s} steps_per_execution={spe:3d}: "
              f"{time_fit(mode, xla == 'on', spe) * 1e3:.2f} ms per meta-step", flush=True)


if __name__ == "__main__":
    main()
