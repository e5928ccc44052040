"""The performance suite: tfmeta's meta-step on the peer benchmark's workloads a-e, side by side with learn2learn.

  python benchmarks/suite.py                                         # tfmeta alone
  python benchmarks/suite.py --peer .venv-peer/bin/python            # and learn2learn, A B A B ...
  python benchmarks/suite.py --workloads b,d --rounds 2 --steps 10 --peer .venv-peer/bin/python

The workloads are specified in ../shared/bench/peer/README.md (same NumPy draws, models, inner and outer steps);
tfmeta runs them through its public API with its defaults (`tfmeta.MAML`, `compile(Adam)`, Keras' compiled
train function as `fit` runs it; `benchmarks/meta_step.py` is the child process). Every run is a fresh process,
so that the first step (tracing and compilation) and the peak resident memory are measured on their own.

With `--peer`, each of `--rounds` rounds runs tfmeta and then learn2learn (`l2l_bench.py`) on the same
workload, so both see the same machine conditions; the timed steps of all rounds are pooled per side and the
ratio is tfmeta's median over learn2learn's. Only ratios measured in one invocation count: these machines are
shared and their absolute speed drifts.

Also measured: the machine's peak float32 FLOP/s (a large matmul, and the 64-channel 3x3 convolution that
dominates the conv4 workloads), the analytic FLOPs per meta-step (`meta_step.meta_step_flops`) and so the
fraction of the convolution peak achieved, and episodes per second of the real Omniglot pipeline (when the
archives are in $TFMETA_DATA_DIR/omniglot). With `--optimizer_steps` > 0, the learned optimizer's cost
(`benchmarks/optimizer_step.py`, needs the MNIST digits): time per optimizee step of the coordinatewise LSTM
against Adam on the MNIST MLP, as a fraction of the matmul peak, and meta-training's peak memory against the
horizon. Output: JSON lines (`--out` appends them to a file too), then Markdown tables.
"""

import argparse
import json
import os
import platform
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PEER_SCRIPT = os.path.join(HERE, "..", "..", "shared", "bench", "peer", "l2l_bench.py")
PEER_FLAGS = {"a": "--sine", "b": "--omniglot", "c": "--omniglot-5step", "d": "--omniglot-fo", "e": "--miniimagenet"}
QUIET = {"TF_CPP_MIN_LOG_LEVEL": "3"}


def emit(record: dict, out) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def last_json(stdout: str):
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def run(command: list, timeout: float) -> tuple:
    """Runs a child; returns (its last JSON line or None, the tail of its stderr)."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env={**os.environ, **QUIET})
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    return last_json(done.stdout), (done.stderr.strip().splitlines() or ["no output"])[-1][:300]


def peak(repeats: int = 7) -> dict:
    """Median float32 FLOP/s of a 4096^3 matmul and of conv4's dominant convolution (64 -> 64 channels, 3x3,
    14x14 maps, a batch of 600 = 8 tasks' queries), and the memory bandwidth an element-wise op reaches (a ReLU
    over conv4's first feature maps for 600 images, 28x28x64 floats: 120 MB read and 120 MB written), with
    TensorFlow's default thread pools."""
    import tensorflow as tf

    sys.path.insert(0, HERE)
    from conv_rates import rate

    a = tf.random.normal([4096, 4096])
    matmul = rate(tf.function(tf.matmul), (a, a), 2 * 4096**3, repeats)
    x, w = tf.random.normal([600, 14, 14, 64]), tf.random.normal([3, 3, 64, 64])
    conv = rate(tf.function(lambda x, w: tf.nn.conv2d(x, w, 1, "SAME")), (x, w), 2 * 600 * 14 * 14 * 64 * 64 * 9,
                repeats)
    maps = tf.random.normal([600, 28, 28, 64])
    bandwidth = rate(tf.function(tf.nn.relu), (maps,), 2 * 4 * maps.shape.num_elements(), repeats)
    return {"kind": "peak", "matmul_gflops": matmul, "conv_gflops": conv, "elementwise_gb_per_s": bandwidth,
            "threads": [tf.config.threading.get_intra_op_parallelism_threads(),
                        tf.config.threading.get_inter_op_parallelism_threads()]}


def pipeline(batches: int) -> dict:
    """Episodes per second of `omniglot_tasks("train", 5-way 1-shot, 15 queries).dataset(32)`, the conv workloads'
    episode shape from the real pipeline, iterated alone after a warm-up."""
    sys.path.insert(0, HERE)
    from episodes import pipeline_rate

    setting = dict(ways=5, shots=1, queries=15, batch=32)
    try:
        rate = pipeline_rate(setting, batches)
    except (FileNotFoundError, ValueError) as error:
        return {"kind": "pipeline", "error": str(error)[:300]}
    return {"kind": "pipeline", "setting": "Omniglot 5-way 1-shot, 15 queries, 32 tasks, rotations",
            "episodes_per_s": rate, "meta_batches_per_s": rate / setting["batch"]}


def versions() -> dict:
    import keras
    import tensorflow as tf

    import tfmeta

    return {"tensorflow": tf.__version__, "keras": keras.__version__, "tfmeta": tfmeta.__version__,
            "python": platform.python_version(), "cpus": os.cpu_count()}


def stats(times: list) -> dict:
    return {"median_s": float(np.median(times)), "p10_s": float(np.percentile(times, 10)),
            "p90_s": float(np.percentile(times, 90)), "steps": len(times)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default="a,b,c,d,e")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per side and round (a: x5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the first one")
    parser.add_argument("--rounds", type=int, default=1, help="A B alternations per workload")
    parser.add_argument("--peer", default="", help="a Python with learn2learn (see the peer README)")
    parser.add_argument("--peer_script", default=DEFAULT_PEER_SCRIPT)
    parser.add_argument("--peer_budget_s", type=float, default=0, help="the peer's --budget-s (0: none)")
    parser.add_argument("--threads", default="default", help="tfmeta's INTRA,INTER thread pools")
    parser.add_argument("--xla", default="auto", help="tfmeta's jit_compile: auto (compile's default), on or off")
    parser.add_argument("--pipeline_batches", type=int, default=100, help="0 skips the pipeline")
    parser.add_argument("--optimizer_steps", type=int, default=50, help="the learned optimizer's timed steps; 0 skips")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--out", default="", help="also append the JSON lines to this file")
    args = parser.parse_args()

    emit({"kind": "machine", **versions()}, args.out)
    machine_peak = peak()
    emit(machine_peak, args.out)
    if args.pipeline_batches:
        emit(pipeline(args.pipeline_batches), args.out)

    rows = []
    for workload in filter(None, args.workloads.split(",")):
        steps = args.steps * (5 if workload == "a" else 1)
        ours, theirs, firsts, rss, record, errors = [], [], [], [], {}, []
        for _ in range(args.rounds):
            child, tail = run([sys.executable, os.path.join(HERE, "meta_step.py"), f"--workload={workload}",
                               "--mode=auto", f"--xla={args.xla}", f"--steps={steps}", f"--warmup={args.warmup}",
                               f"--threads={args.threads}"], args.timeout)
            if child is None:
                errors.append(f"tfmeta: {tail}")
                break
            record = child
            ours += child["times_s"]
            firsts.append(child["first_step_s"])
            rss.append(child["peak_rss_gb"])
            if args.peer:
                peer, tail = run([args.peer, args.peer_script, PEER_FLAGS[workload], "--threads", str(os.cpu_count()),
                                  "--steps", str(steps), "--warmup", str(args.warmup + 1), "--init", "glorot",
                                  "--budget-s", str(args.peer_budget_s), "--min-steps", "3"], args.timeout)
                if peer is None:
                    errors.append(f"peer: {tail}")
                else:
                    theirs += peer["times_s"]
        if not ours:
            row = {"kind": "workload", "workload": workload, "error": "; ".join(errors)}
        else:
            row = {key: record[key] for key in ("workload", "name", "gflop", "tfmeta", "tensorflow", "keras",
                                                "threads", "xla_resolved", "task_mapping")}
            row.update(kind="workload", **stats(ours), first_step_s=max(firsts), peak_rss_gb=max(rss),
                       times_s=ours, rounds=args.rounds)
            row["gflops"] = row["gflop"] / row["median_s"]
            row["conv_peak_fraction"] = row["gflops"] / machine_peak["conv_gflops"]
            if theirs:
                row["peer"] = {**stats(theirs), "times_s": theirs}
                row["ratio"] = row["median_s"] / row["peer"]["median_s"]
            if errors:
                row["errors"] = errors
        emit(row, args.out)
        rows.append(row)

    print(f"\nPeak: matmul {machine_peak['matmul_gflops']:.0f} GFLOP/s, 3x3 conv (64 channels) "
          f"{machine_peak['conv_gflops']:.0f} GFLOP/s; an element-wise op {machine_peak['elementwise_gb_per_s']:.0f} "
          "GB/s.\n")
    print("| workload | tfmeta median s | p10 - p90 | learn2learn median s | tfmeta / learn2learn | GFLOP | GFLOP/s "
          "| of conv peak | first step s | peak RSS GB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['workload']} | failed: {r['error']} | | | | | | | | |")
            continue
        peer = r.get("peer")
        print(f"| {r['workload']} | {r['median_s']:.4g} | {r['p10_s']:.4g} - {r['p90_s']:.4g} | "
              f"{peer['median_s']:.4g} | {r['ratio']:.2f} |" if peer else
              f"| {r['workload']} | {r['median_s']:.4g} | {r['p10_s']:.4g} - {r['p90_s']:.4g} | | |", end="")
        print(f" {r['gflop']:.3g} | {r['gflops']:.1f} | {100 * r['conv_peak_fraction']:.0f}% | "
              f"{r['first_step_s']:.1f} | {r['peak_rss_gb']:.2f} |")
    if args.optimizer_steps:
        learned_optimizer(args, machine_peak)


def learned_optimizer(args, machine_peak: dict) -> None:
    """The learned optimizer's cost (issue 23): one child timing an optimizee step, then one per (unroll, horizon)
    meta-training for its peak memory: truncated unrolls of 20 over horizons of 100 and 400 (flat if truncation
    works), and one untruncated unroll of 100 for contrast."""
    script = os.path.join(HERE, "optimizer_step.py")
    step, tail = run([sys.executable, script, "--measure=step", f"--steps={args.optimizer_steps}"], args.timeout)
    emit(step or {"kind": "learned_optimizer_step", "error": tail}, args.out)
    memory = []
    for unroll, horizon in ((20, 100), (20, 400), (100, 100)):
        record, tail = run([sys.executable, script, "--measure=memory", f"--unroll={unroll}", f"--horizon={horizon}"],
                           args.timeout)
        record = record or {"kind": "learned_optimizer_memory", "unroll": unroll, "horizon": horizon, "error": tail}
        emit(record, args.out)
        memory.append(record)
    if step:
        matmul = machine_peak["matmul_gflops"]
        print(f"\nLearned optimizer on {step['problem']} ({step['parameters']} parameters; the LSTM's matmuls "
              f"{step['lstm_update_mflop']:.0f} MFLOP per update):\n")
        print("| per optimizee step | median ms | GFLOP/s | of matmul peak |\n| --- | --- | --- | --- |")
        print(f"| loss and gradient | {1e3 * step['gradient_s']:.2f} | | |")
        print(f"| Adam update (`Optimizer.apply`) | {1e3 * step['adam_update_s']:.2f} | | |")
        for key, label in (("learned_update", "LearnedOptimizer update (`Optimizer.apply`)"),
                           ("rule_update", "CoordinatewiseLSTM.update"),
                           ("rule_update_xla", "CoordinatewiseLSTM.update, XLA")):
            gflops = step[f"{key}_gflops"]
            print(f"| {label} | {1e3 * step[f'{key}_s']:.2f} | {gflops:.1f} | {100 * gflops / matmul:.0f}% |")
    print("\n| meta-training | s per meta-step | peak RSS GB |\n| --- | --- | --- |")
    for r in memory:
        cells = "failed: " + r["error"] + " |" if "error" in r else \
            f"{r['seconds_per_meta_step']:.2f} | {r['peak_rss_gb']:.2f} |"
        print(f"| unroll {r['unroll']}, horizon {r['horizon']} | {cells}")


if __name__ == "__main__":
    main()
