"""Episodes per second of the Omniglot pipeline against the episodes per second a meta-step consumes.

  python benchmarks/episodes.py            # needs the Omniglot archives ($TFMETA_DATA_DIR/omniglot)

For each setting the pipeline (`omniglot_tasks(...).dataset(meta_batch_size)`, prefetched) is iterated alone
for `--batches` batches after a warm-up; the meta-step rate is `fit` on the same pipeline with the config's
learner (MAML: the strided conv4; ProtoNets: the conv4 embedding). Prints medians of `--repeats` runs.
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402

import tfmeta  # noqa: E402
from tfmeta import data  # noqa: E402

SETTINGS = {
    "5-way 1-shot, 32 tasks, rotations (MAML)": dict(ways=5, shots=1, queries=1, batch=32, learner="maml"),
    "5-way 1-shot, 32 tasks, 15 queries, rotations": dict(ways=5, shots=1, queries=15, batch=32, learner="maml"),
    "20-way 1-shot, 16 tasks, 15 queries, rotations": dict(ways=20, shots=1, queries=15, batch=16, learner="maml"),
    "60-way 1-shot, 1 task, 5 queries (ProtoNets)": dict(ways=60, shots=1, queries=5, batch=1, learner="protonet"),
    "5-way 1-shot, 32 tasks, 15 queries, random affine": dict(ways=5, shots=1, queries=15, batch=32,
                                                               learner="maml", affine=True),
}


def pipeline_rate(setting: dict, batches: int) -> float:
    tasks = data.omniglot_tasks("train", ways=setting["ways"], shots=setting["shots"], queries=setting["queries"],
                                affine=setting.get("affine", False))
    iterator = iter(tasks.dataset(setting["batch"], seed=0))
    for _ in range(5):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * setting["batch"] / (time.perf_counter() - start)


def meta_step_rate(setting: dict, steps: int) -> float:
    keras.utils.set_random_seed(0)
    if setting["learner"] == "maml":
        learner = tfmeta.models.conv_net(outputs=setting["ways"], pooling="stride")
        meta = tfmeta.MAML(learner, loss="scores_cross_entropy", update_rule=tfmeta.Sgd(0.4))
    else:
        learner = tfmeta.models.conv_net(outputs=None, batch_norm_statistics="running")
        meta = tfmeta.PrototypicalNetwork(learner)
    meta.compile(keras.optimizers.Adam(1e-3))
    tasks = data.omniglot_tasks("train", ways=setting["ways"], shots=setting["shots"], queries=setting["queries"],
                                affine=setting.get("affine", False))
    dataset = tasks.dataset(setting["batch"], seed=0)
    meta.fit(dataset, epochs=1, steps_per_epoch=2, verbose=0)
    start = time.perf_counter()
    meta.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0)
    return steps * setting["batch"] / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print("| setting | pipeline episodes/s | meta-step episodes/s | pipeline / meta-step |")
    print("| --- | --- | --- | --- |")
    for name, setting in SETTINGS.items():
        pipeline = statistics.median(pipeline_rate(setting, args.batches) for _ in range(args.repeats))
        step = meta_step_rate(setting, args.steps)
        print(f"| {name} | {pipeline:,.0f} | {step:,.1f} | {pipeline / step:,.0f}x |", flush=True)


if __name__ == "__main__":
    main()
