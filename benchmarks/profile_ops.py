"""Where a meta-step's time goes: TensorFlow's profiler over a few steps of a workload, summed by op type.

  python benchmarks/profile_ops.py --workload b --steps 3
  python benchmarks/profile_ops.py --workload e --steps 2 --remat on
  python benchmarks/profile_ops.py --workload c --steps 2 --threads 1,2

Builds the workload exactly as `benchmarks/meta_step.py` does (tfmeta's defaults), runs `--warmup` untimed steps,
then profiles `--steps` steps with `tf.profiler.experimental` and reads the trace (`*.xplane.pb`): the time of
every op event on the host's threads, summed by op type, by group (convolution forward, its input and filter
gradients, matrix products, batch norm, pooling, tfmeta's kernels, the rest) and by conv_net block. With 2 cores, op time can reach
2 x wall time; the ratio of op time to wall x cores is the share of the machine the step kept busy. Prints one JSON line (`--out`
appends it to a file) and a Markdown table. The trace stays in `--logdir` for TensorBoard's profile plugin.
Vectorised steps (workload a) are profiled on TensorFlow's default executor: the single-threaded one that tfmeta
runs them on records no op events.
"""

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import meta_step  # noqa: E402

GROUPS = {  # op type -> group; everything else is "other (elementwise, reductions, control flow, copies)"
    "Conv2D": "conv forward", "FusedConv2D": "conv forward", "DepthwiseConv2dNative": "conv forward",
    "Conv2DBackpropInput": "conv input gradient", "Conv2DBackpropFilter": "conv filter gradient",
    "Conv2DBackpropFilterWithBias": "conv filter gradient",  # oneDNN's, with the bias gradient fused
    "MatMul": "matmul", "FusedMatMul": "matmul", "BatchMatMulV2": "matmul", "BatchMatMulV3": "matmul",
    "FusedBatchNormV3": "batch norm forward", "FusedBatchNormEx": "batch norm forward",
    "FusedBatchNormGradV3": "batch norm gradient",
    "MaxPool": "pooling", "MaxPoolGrad": "pooling", "MaxPoolGradGrad": "pooling",
    # tfmeta's fused first block (tfmeta.kernels): convolution, batch norm, ReLU and pooling in one op
    "TfmetaConvBlock": "fused block 0", "TfmetaConvBlockGrad": "fused block 0",
    "TfmetaConvBlockGradGrad": "fused block 0", "TfmetaConvBlockInputGrad": "fused block 0",
    # tfmeta's kernels for the later blocks' batch norm, ReLU and pooling (tfmeta.kernels.norm_pool)
    "TfmetaNormPool": "fused norm-pool", "TfmetaNormPoolGrad": "fused norm-pool",
    "TfmetaNormPoolGradGrad": "fused norm-pool",
}
OTHER = "other (elementwise, reductions, control flow, copies)"
LAYER = re.compile(r"(?:conv|norm|act|pool)_(\d+)")  # conv_net's layer names: block i's conv_i, norm_i, act_i, pool_i
EVENT = re.compile(r"^([^:]+):(\w+)$")  # "scope/name:OpType"; not "Executor::Process" spans
# Ops whose events enclose the events of the ops they run (function calls, loops, conditionals): not counted.
CONTAINERS = {"While", "StatelessWhile", "If", "StatelessIf", "PartitionedCall", "StatefulPartitionedCall",
              "__inference", "Case", "StatelessCase"}


def op_type(event_name: str):
    """The op type of a profiler event ("scope/name:_MklFusedConv2D" -> "FusedConv2D"), or None if the event is
    not an op or encloses other ops."""
    match = EVENT.match(event_name)
    if not match:
        return None
    kind = re.sub(r"^_Mkl(Native)?", "", match.group(2)).lstrip("_")
    return None if kind in CONTAINERS else kind


def block_of(event_name: str) -> str:
    """The conv_net block whose layer an op event belongs to ("block 0", ...), or "other" (the head, the loss, the
    optimizer, batch norm's fused backward, whose custom-gradient scope names no layer)."""
    match = LAYER.search(event_name)
    return f"block {match.group(1)}" if match else "other"


def op_times(logdir: str) -> tuple[collections.Counter, collections.Counter, collections.Counter]:
    """Seconds and counts by op type, and seconds by conv_net block, of the op events in the newest trace under
    `logdir`."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    paths = sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    if not paths:
        raise FileNotFoundError(f"no *.xplane.pb trace under {logdir}")
    space = xplane_pb2.XSpace()
    with open(paths[-1], "rb") as f:
        space.ParseFromString(f.read())
    seconds, counts, blocks = collections.Counter(), collections.Counter(), collections.Counter()
    for plane in space.planes:
        if "tf_op" in plane.name:  # a per-op summary plane would count every op twice
            continue
        for line in plane.lines:
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                kind = op_type(name)
                if kind:
                    seconds[kind] += event.duration_ps / 1e12
                    counts[kind] += 1
                    blocks[block_of(name)] += event.duration_ps / 1e12
    return seconds, counts, blocks


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="b", choices=sorted(meta_step.WORKLOADS))
    parser.add_argument("--steps", type=int, default=3, help="profiled meta-steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the first one")
    parser.add_argument("--mode", default="auto", help="task parallelism (auto: tfmeta's default)")
    parser.add_argument("--xla", default="auto")
    parser.add_argument("--remat", default="off", help="rematerialise inner steps: on or off")
    parser.add_argument("--tasks", type=int, default=0, help="override the tasks per meta-batch")
    parser.add_argument("--threads", default="default", help="INTRA,INTER thread pools, as in meta_step.py")
    parser.add_argument("--top", type=int, default=15, help="op types listed")
    parser.add_argument("--logdir", default="", help="where the trace goes (default: a temporary directory)")
    parser.add_argument("--out", default="", help="also append the JSON line to this file")
    args = parser.parse_args()
    build_args = argparse.Namespace(workload=args.workload, inner_steps="", tasks=args.tasks, seed=0,
                                    threads=args.threads, mode=args.mode, xla=args.xla, rematerialize=args.remat,
                                    algorithm="maml", warmup=args.warmup, steps=args.steps)
    import tensorflow as tf

    meta, iterator, config = meta_step.build(build_args)
    if meta.task_mapping == "vectorized_map":  # the single-threaded executor records no op events
        meta.step_executor = ""  # TensorFlow's default executor instead (about a tenth slower on workload a)
        meta.make_train_function(force=True)
    for _ in range(1 + args.warmup):
        float(meta.train_function(iterator)["loss"])
    logdir = args.logdir or tempfile.mkdtemp(prefix="tfmeta_profile_")
    tf.profiler.experimental.start(logdir)
    start = time.perf_counter()
    for _ in range(args.steps):
        float(meta.train_function(iterator)["loss"])
    wall = (time.perf_counter() - start) / args.steps
    tf.profiler.experimental.stop()

    seconds, counts, blocks = op_times(logdir)
    total = sum(seconds.values())
    groups = collections.Counter()
    for kind, s in seconds.items():
        groups[GROUPS.get(kind, OTHER)] += s
    record = {
        "workload": args.workload, "name": config["name"], "task_mapping": meta.task_mapping,
        "xla": bool(meta.jit_compile), "rematerialize": args.remat, "threads": args.threads, "steps": args.steps,
        "wall_s_per_step": wall, "op_s_per_step": total / args.steps, "cpus": os.cpu_count(),
        "busy_fraction": total / args.steps / (wall * os.cpu_count()),
        "groups_s_per_step": {g: s / args.steps for g, s in groups.most_common()},
        "ops_s_per_step": {t: s / args.steps for t, s in seconds.most_common(args.top)},
        "ops_count_per_step": {t: counts[t] / args.steps for t, _ in seconds.most_common(args.top)},
        "blocks_s_per_step": {b: s / args.steps for b, s in sorted(blocks.items())},
        "logdir": logdir, "tensorflow": tf.__version__,
    }
    line = json.dumps(record)
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")
    print(f"\nWorkload {args.workload} ({config['name']}): {wall:.3f} s wall per step; op time "
          f"{total / args.steps:.3f} s per step = {100 * record['busy_fraction']:.0f}% of {os.cpu_count()} cores.\n")
    print("| group | s per step | share of op time |")
    print("| --- | --- | --- |")
    for group, s in groups.most_common():
        print(f"| {group} | {s / args.steps:.3f} | {100 * s / total:.1f}% |")
    print("\n| conv_net block (its conv, batch norm, activation, pooling and their gradients) | s per step | share |")
    print("| --- | --- | --- |")
    for block, s in sorted(blocks.items()):
        print(f"| {block} | {s / args.steps:.3f} | {100 * s / total:.1f}% |")
    print("\n| op type | s per step | share | calls per step |")
    print("| --- | --- | --- | --- |")
    for kind, s in seconds.most_common(args.top):
        print(f"| {kind} | {s / args.steps:.3f} | {100 * s / total:.1f}% | {counts[kind] / args.steps:.0f} |")


if __name__ == "__main__":
    main()
