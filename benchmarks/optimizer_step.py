"""The cost of a learned optimizer (issue 23): time per optimizee step on the MNIST MLP with the coordinatewise LSTM
against Adam, split into the optimizee's gradient and the optimizer's update, and the memory of meta-training
against the horizon. `benchmarks/suite.py` runs it; alone:

  python benchmarks/optimizer_step.py --measure=step --steps=50
  python benchmarks/optimizer_step.py --measure=memory --unroll=20 --horizon=400

`step` times, on `MnistMLP` (784-20-10 sigmoid, minibatches of 128; 15,910 parameters): the loss and its
gradient; Adam's update and the learned optimizer's, each through `keras.optimizers.Optimizer.apply` (what `fit`
runs); and the LSTM rule's update alone, without and with XLA. The LSTM's FLOPs per update are its matmuls,
counted analytically (`lstm_update_flops`; the gates' elementwise work is left out), so GFLOP/s is a lower
bound. Medians over `--steps` timed calls after a warm-up. One JSON line.

`memory` meta-trains `CoordinatewiseLSTM` on the MLP (`OptimizerTraining`) for `--meta_steps` meta-steps with
the given unroll and horizon (after one untimed meta-step: tracing), and reports the seconds per meta-step and
the process's peak resident memory: with truncation, it depends on the
unroll, not on the horizon. One JSON line.
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tfmeta  # noqa: E402
from tfmeta.optimizers import LearnedOptimizer, MnistMLP, OptimizerTraining  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import meta_step  # noqa: E402


def lstm_update_flops(rule: tfmeta.CoordinatewiseLSTM, coordinates: int) -> int:
    """The multiply-adds (×2) of the rule's matmuls per update: per coordinate and layer 4·u·(inputs + u), then the
    linear head."""
    inputs = 2 if rule.preprocessing == "log_sign" else 1
    per_coordinate = 0
    for units in rule.hidden_units:
        per_coordinate += 2 * 4 * units * (inputs + units)
        inputs = units
    return coordinates * (per_coordinate + 2 * inputs)


def median_time(fn, steps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        tf.nest.map_structure(lambda t: t.numpy(), fn())
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        tf.nest.map_structure(lambda t: t.numpy(), fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def mnist_lstm() -> tuple:
    problem = MnistMLP()
    params = problem.initial_params({}, tf.constant([0, 1], tf.int64))
    rule = tfmeta.CoordinatewiseLSTM(preprocessing="log_sign", output_scale=0.01)
    rule.check_params([tuple(p.shape) for p in params])
    return problem, params, rule


def measure_step(steps: int) -> dict:
    problem, params, rule = mnist_lstm()
    variables = [keras.Variable(p) for p in params]
    seed = tf.constant([0, 2], tf.int64)

    @tf.function
    def gradient():
        with tf.GradientTape() as tape:
            loss = problem.loss(variables, {}, seed)
        return tape.gradient(loss, variables)

    grads = gradient()
    record = {"kind": "learned_optimizer_step", "problem": "MnistMLP 784-20-10 sigmoid, batch 128",
              "parameters": int(sum(int(tf.size(p)) for p in params)),
              "gradient_s": median_time(gradient, steps)}
    for name, optimizer in (("adam", keras.optimizers.Adam(1e-3)), ("learned", LearnedOptimizer(rule))):
        optimizer.build(variables)
        apply = tf.function(lambda optimizer=optimizer: optimizer.apply(grads, variables) or tf.constant(0))
        record[f"{name}_update_s"] = median_time(apply, steps)
    state = rule.init_state(params)
    for xla in (False, True):
        update = tf.function(lambda: rule.update(grads, state, params, 0), jit_compile=xla)
        record[f"rule_update{'_xla' if xla else ''}_s"] = median_time(update, steps)
    flops = lstm_update_flops(rule, record["parameters"])
    record["lstm_update_mflop"] = flops / 1e6
    for key in ("learned_update_s", "rule_update_s", "rule_update_xla_s"):
        record[key.replace("_s", "_gflops")] = flops / record[key] / 1e9
    return record


def measure_memory(unroll: int, horizon: int, meta_steps: int, xla: bool = False) -> dict:
    problem, _, rule = mnist_lstm()
    trainer = OptimizerTraining(rule, problem, unroll=unroll, horizon=horizon)
    trainer.compile(keras.optimizers.Adam(1e-3), jit_compile=xla)
    trainer.fit(trainer.dataset(), steps_per_epoch=1, epochs=1, verbose=0)  # tracing and compilation, untimed
    start = time.perf_counter()
    trainer.fit(trainer.dataset(), steps_per_epoch=meta_steps, epochs=1, verbose=0)
    return {"kind": "learned_optimizer_memory", "unroll": unroll, "horizon": horizon, "meta_steps": meta_steps,
            "xla": xla,
            "seconds_per_meta_step": (time.perf_counter() - start) / meta_steps,
            "peak_rss_gb": meta_step.peak_rss_gb()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", choices=("step", "memory"), default="step")
    parser.add_argument("--steps", type=int, default=50, help="timed calls per measurement (step)")
    parser.add_argument("--unroll", type=int, default=20)
    parser.add_argument("--horizon", type=int, default=100)
    parser.add_argument("--meta_steps", type=int, default=0, help="memory: timed meta-steps (0: two horizons)")
    parser.add_argument("--xla", action="store_true", help="memory: compile the meta-step with XLA")
    args = parser.parse_args()
    if args.measure == "step":
        record = measure_step(args.steps)
    else:
        meta_steps = args.meta_steps or 2 * args.horizon // args.unroll
        record = measure_memory(args.unroll, args.horizon, meta_steps, args.xla)
    print(json.dumps(record), file=sys.stdout, flush=True)


if __name__ == "__main__":
    main()
