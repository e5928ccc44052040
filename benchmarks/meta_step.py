"""Times tfmeta meta-steps on the peer benchmark's workloads (../shared/bench/peer/README.md).

Each configuration (workload x task parallelism x XLA) runs in its own process, so that the first step
(tracing and compilation) and the peak resident memory are measured cleanly. A step is Keras' own compiled
train function (`make_train_function`, as `fit` runs it) on episodes drawn with NumPy as the peer does.

  python benchmarks/meta_step.py --workloads a,b --modes map_fn,unrolled,vectorized_map --xla off,on

Prints one JSON line per configuration and a Markdown table at the end. Memory is reported as the process's
peak resident set (which includes TensorFlow itself and tracing) and as the peak of TensorFlow's CPU allocator
(the tensors alone: `tf.config.experimental.get_memory_info`). `--algorithms` and `--inner_steps`
override the workload's algorithm (MAML by default; iMAML solves the inner problem with the same steps and
5 CG steps) and its number of inner steps, e.g. for memory against inner steps:

  python benchmarks/meta_step.py --workloads b --modes map_fn --xla off --algorithms maml,imaml \
      --inner_steps 1,5,10,20 --tasks 4 --steps 3 --warmup 1 --remat off,on

`--remat on` recomputes inner steps in the backward pass (`rematerialize_inner_steps=True`). `--algorithms
emaml,bmaml` time EMAML and BMAML with `--particles` particles (10; BMAML with SVGD's step size 1e-3) on the same
workload, their particles batched as `--particle_mappings` says (a list of `particle_parallelism` values); their
FLOPs are not counted (NaN).

`--xla auto` is what `compile()` does without the argument; `--threads INTRA,INTER` sets TensorFlow's thread
pools (default: TensorFlow's own). Each line also carries the analytic FLOPs of the meta-step
(`meta_step_flops`). `benchmarks/suite.py` runs these configurations side by side with learn2learn.
"""

import argparse
import itertools
import json
import os
import subprocess
import sys
import time

WORKLOADS = {
    "a": dict(name="sine MLP, 25 tasks, 1 step, 2nd order", model="mlp", tasks=25, support=10, query=10,
              steps=1, lr=0.01, first_order=False),
    "b": dict(name="conv4(64) 28x28x1, 5w1s, 32 tasks, 1 step, 2nd order", model="conv", shape=(28, 28, 1),
              filters=64, tasks=32, ways=5, shots=1, queries=15, steps=1, lr=0.4, first_order=False),
    "c": dict(name="conv4(64) 28x28x1, 5w1s, 32 tasks, 5 steps, 2nd order", model="conv", shape=(28, 28, 1),
              filters=64, tasks=32, ways=5, shots=1, queries=15, steps=5, lr=0.4, first_order=False),
    "d": dict(name="conv4(64) 28x28x1, 5w1s, 32 tasks, 1 step, 1st order", model="conv", shape=(28, 28, 1),
              filters=64, tasks=32, ways=5, shots=1, queries=15, steps=1, lr=0.4, first_order=True),
    "e": dict(name="conv4(32) 84x84x3, 5w1s, 4 tasks, 5 steps, 2nd order", model="conv", shape=(84, 84, 3),
              filters=32, tasks=4, ways=5, shots=1, queries=15, steps=5, lr=0.01, first_order=False),
}


def episodes(config, rng, np):
    """The peer's NumPy draws (sine: amplitude, phase, x; conv: support then query images), channels-last."""
    b = config["tasks"]
    if config["model"] == "mlp":
        k, q = config["support"], config["query"]
        amplitude = rng.uniform(0.1, 5.0, size=b)
        phase = rng.uniform(0.0, np.pi, size=b)
        x = rng.uniform(-5.0, 5.0, size=(b, k + q, 1))
        y = (amplitude[:, None, None] * np.sin(x - phase[:, None, None])).astype(np.float32)
        x = x.astype(np.float32)
        return {"support_x": x[:, :k], "support_y": y[:, :k], "query_x": x[:, k:], "query_y": y[:, k:]}
    n, k, q = config["ways"], config["shots"], config["queries"]
    h, w, c = config["shape"]
    xs = rng.standard_normal((b, n * k, c, h, w), dtype=np.float32).transpose(0, 1, 3, 4, 2)
    xq = rng.standard_normal((b, n * q, c, h, w), dtype=np.float32).transpose(0, 1, 3, 4, 2)
    labels = lambda m: np.tile(np.repeat(np.arange(n, dtype=np.int32), m), (b, 1))  # noqa: E731
    return {"support_x": xs, "support_y": labels(k), "query_x": xq, "query_y": labels(q)}


def layer_flops(learner) -> list:
    """Forward FLOPs per example of each convolution and dense layer of a flat Keras model (2 per multiply-add)."""
    import keras

    costs = []
    for layer in learner.layers:
        if isinstance(layer, keras.layers.Conv2D):
            height, width, channels_out = layer.output.shape[1:]
            costs.append(2 * height * width * layer.kernel_size[0] * layer.kernel_size[1]
                         * layer.input.shape[-1] * channels_out)
        elif isinstance(layer, keras.layers.Dense):
            costs.append(2 * layer.input.shape[-1] * layer.units)
    return costs


def meta_step_flops(costs: list, tasks: int, support: int, query: int, steps: int, first_order: bool) -> float:
    """Analytic FLOPs of the convolutions and matrix products of one MAML meta-step (elementwise ops, batch norm
    and pooling not counted), from the per-example forward cost f of each layer:

    - a forward pass costs f; its backward f for the weight gradient plus f for the input gradient, except in
      the first layer, whose input is data;
    - second order differentiates each inner step's forward and backward pass once more: through the forward
      pass as a backward (2f, f in the first layer); through the input-gradient op, bilinear in the output
      gradient and the weights (2f, none in the first layer); through the weight-gradient op, bilinear in the
      layer input and the output gradient (2f, f in the first layer).
    Per example: first order 3f (2f in the first layer); a second-order inner step 9f (4f)."""
    first, rest = costs[0], sum(costs[1:])
    forward_backward = 3 * rest + 2 * first
    inner = (9 * rest + 4 * first) if not first_order else forward_backward
    return float(tasks * (support * steps * inner + query * forward_backward))


def others_cpu():
    """Machine-wide busy CPU seconds minus our own, to report contention from other processes."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    busy = (fields[0] + fields[1] + fields[2] + fields[5] + fields[6]) / os.sysconf("SC_CLK_TCK")
    own = sum(os.times()[:4])
    return busy - own


def peak_rss_gb() -> float:
    """This process's peak resident set (VmHWM) in GB. Not `getrusage`'s `ru_maxrss`: Linux keeps that across
    `exec`, so a child started by a large parent (the suite, after its peak measurements) reports the parent's."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**20


def cpu_model() -> str:
    """The CPU's model name: TensorFlow turns oneDNN on by default only on some CPUs, so results depend on it."""
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")


def peak_tensor_gb(tf):
    """The CPU allocator's peak in GB, or None where TensorFlow keeps no allocator statistics (without oneDNN,
    e.g. on AMD CPUs, unless TF_CPU_ALLOCATOR_USE_BFC=1)."""
    try:
        return tf.config.experimental.get_memory_info("CPU:0")["peak"] / 2**30
    except ValueError:
        return None


def build(args):
    """The compiled meta-learner of `args.workload` and an iterator over its pre-drawn episode batches."""
    import tfmeta  # first, so that its default TF_ENABLE_ONEDNN_OPTS applies, as in a user's script

    import tensorflow as tf

    if args.threads != "default":
        intra, inter = (int(n) for n in args.threads.split(","))
        tf.config.threading.set_intra_op_parallelism_threads(intra)
        tf.config.threading.set_inter_op_parallelism_threads(inter)
    import keras
    import numpy as np

    config = dict(WORKLOADS[args.workload])
    config["steps"] = int(args.inner_steps) if args.inner_steps else config["steps"]
    config["tasks"] = args.tasks or config["tasks"]
    keras.utils.set_random_seed(args.seed)
    if config["model"] == "mlp":
        learner = tfmeta.models.mlp()
        loss = "mse"
    else:
        learner = tfmeta.models.conv_net(config["shape"], outputs=config["ways"], filters=config["filters"])
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    common = dict(loss=loss, update_rule=tfmeta.Sgd(config["lr"]), inner_steps=config["steps"],
                  task_parallelism=args.mode, rematerialize_inner_steps=args.rematerialize == "on")
    if args.algorithm == "imaml":
        meta = tfmeta.IMAML(learner, cg_steps=5, **common)
    elif args.algorithm in ("emaml", "bmaml"):
        cls = tfmeta.EMAML if args.algorithm == "emaml" else tfmeta.BMAML
        if args.algorithm == "bmaml":
            common["update_rule"] = tfmeta.Svgd(1e-3)
        meta = cls(learner, num_particles=args.particles, first_order=config["first_order"],
                   particle_parallelism=args.particle_mapping, **common)
    else:
        meta = tfmeta.MAML(learner, first_order=config["first_order"], **common)
    meta.compile(keras.optimizers.Adam(1e-3), jit_compile="auto" if args.xla == "auto" else args.xla == "on")
    rng = np.random.default_rng(args.seed)
    batches = [episodes(config, rng, np) for _ in range(1 + args.warmup + args.steps)]
    stacked = {k: np.stack([b[k] for b in batches]) for k in batches[0]}
    iterator = iter(tf.data.Dataset.from_tensor_slices(stacked))
    meta.make_train_function()
    return meta, iterator, config


def run_one(args):
    """Child process: one configuration, one JSON line."""
    import keras
    import numpy as np
    import tensorflow as tf

    import tfmeta

    meta, iterator, config = build(args)
    train_function = meta.train_function
    learner = meta.learner

    times, others = [], []
    for i in range(1 + args.warmup + args.steps):
        other0, t0 = others_cpu(), time.perf_counter()
        logs = train_function(iterator)
        float(logs["loss"])
        elapsed = time.perf_counter() - t0
        if i == 0:
            first_step = elapsed
        elif i > args.warmup:
            times.append(elapsed)
            others.append((others_cpu() - other0) / (elapsed * os.cpu_count()))
    times = np.array(times)
    if config["model"] == "mlp":
        support, query = config["support"], config["query"]
    else:
        support, query = config["ways"] * config["shots"], config["ways"] * config["queries"]
    flops = meta_step_flops(layer_flops(learner), config["tasks"], support, query, config["steps"],
                            config["first_order"]) if args.algorithm in ("maml", "imaml") else float("nan")
    print(json.dumps({
        "workload": args.workload, "name": config["name"], "algorithm": args.algorithm,
        "inner_steps": config["steps"], "tasks": config["tasks"], "task_parallelism": args.mode, "xla": args.xla,
        "rematerialize": args.rematerialize,
        "median_s": float(np.median(times)), "p10_s": float(np.percentile(times, 10)),
        "p90_s": float(np.percentile(times, 90)), "steps": len(times), "first_step_s": first_step,
        "peak_rss_gb": peak_rss_gb(),
        "peak_tensor_gb": peak_tensor_gb(tf),
        "times_s": [round(float(t), 6) for t in times], "gflop": flops / 1e9,
        "gflops": flops / 1e9 / float(np.median(times)), "xla_resolved": bool(meta.jit_compile),
        "task_mapping": meta.task_mapping, "particles": getattr(meta, "num_particles", None),
        "particle_parallelism": getattr(meta, "particle_parallelism", None),
        "others_cpu_frac": float(np.median(others)), "cpus": os.cpu_count(), "cpu_model": cpu_model(),
        "onednn_opts": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "TensorFlow's default"),
        "threads": [tf.config.threading.get_intra_op_parallelism_threads(),
                    tf.config.threading.get_inter_op_parallelism_threads()],
        "tensorflow": tf.__version__, "keras": keras.__version__, "tfmeta": tfmeta.__version__,
    }), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="a,b")
    parser.add_argument("--modes", default="map_fn,unrolled,vectorized_map")
    parser.add_argument("--xla", default="off,on")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--algorithms", default="maml", help="maml (as the workload says), imaml, emaml or bmaml")
    parser.add_argument("--particles", type=int, default=10, help="EMAML's and BMAML's particles")
    parser.add_argument("--particle_mappings", default="auto", help="EMAML's and BMAML's particle_parallelism (a list)")
    parser.add_argument("--particle_mapping", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--inner_steps", default="", help="override the workloads' inner steps (a list)")
    parser.add_argument("--tasks", type=int, default=0, help="override the tasks per meta-batch")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    parser.add_argument("--threads", default="default", help="INTRA,INTER thread pools, or default")
    parser.add_argument("--remat", default="off", help="rematerialise inner steps: off, on or off,on")
    parser.add_argument("--rematerialize", default="off", help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--algorithm", default="maml", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.workload:
        return run_one(args)

    rows = []
    inner_steps_list = args.inner_steps.split(",") if args.inner_steps else [""]
    configurations = itertools.product(
        args.workloads.split(","), args.algorithms.split(","), inner_steps_list, args.modes.split(","),
        args.xla.split(","), args.remat.split(","), args.particle_mappings.split(","),
    )
    for workload, algorithm, inner_steps, mode, xla, remat, particle_mapping in configurations:
        command = [sys.executable, __file__, f"--workload={workload}", f"--mode={mode}", f"--xla={xla}",
                   f"--algorithm={algorithm}", f"--steps={args.steps}", f"--warmup={args.warmup}",
                   f"--seed={args.seed}", f"--tasks={args.tasks}", f"--threads={args.threads}",
                   f"--rematerialize={remat}", f"--particles={args.particles}",
                   f"--particle_mapping={particle_mapping}"]
        if inner_steps:
            command.append(f"--inner_steps={inner_steps}")
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        failed = {"workload": workload, "algorithm": algorithm, "task_parallelism": mode, "xla": xla,
                  "inner_steps": inner_steps, "rematerialize": remat, "particle_parallelism": particle_mapping}
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, env=env)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            row = json.loads(lines[-1]) if lines else {
                **failed, "error": (done.stderr.strip().splitlines() or ["no output"])[-1][:200]}
        except subprocess.TimeoutExpired:
            row = {**failed, "error": f"timed out after {args.timeout:.0f} s"}
        print(json.dumps(row), flush=True)
        rows.append(row)
    print("\n| workload | algorithm | inner steps | tasks computed with | XLA | remat | median s/step | p10-p90 "
          "| first step s | peak RSS GB | peak tensors GB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        algorithm = r["algorithm"] + (f" ({r['particle_parallelism']})" if r["algorithm"] in ("emaml", "bmaml") else "")
        head = (f"| {r['workload']} | {algorithm} | {r['inner_steps']} | {r['task_parallelism']} | {r['xla']} "
                f"| {r['rematerialize']} |")
        if "error" in r:
            print(f"{head} failed: {r['error']} | | | | |")
        else:
            print(f"{head} {r['median_s']:.4f} | {r['p10_s']:.4f}-{r['p90_s']:.4f} | {r['first_step_s']:.1f} | "
                  f"{r['peak_rss_gb']:.2f} | {r['peak_tensor_gb'] or float('nan'):.3f} |")


if __name__ == "__main__":
    main()
