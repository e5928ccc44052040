"""conv_net's first block as one fused CPU kernel against TensorFlow's ops, at the workloads' sizes (issue 21).

Block 0 of conv4 (3x3 convolution of 1 or 3 input channels, batch norm, ReLU, 2x2 max pooling) took 39-54% of
the meta-step's op time on workloads b, c and e for 3-14% of its FLOPs (docs/performance.md): its maps are the
largest of the network, and each of its ops streams them through memory. `tfmeta/kernels/conv_block.cc` does the
whole block, forward and backward, one image at a time in buffers that stay in cache, with a backward pass that
TensorFlow differentiates again (`tfmeta.kernels.conv_block`). This script checks it against the same block in
float64 and times it against TensorFlow's ops as tfmeta runs them without it (`keras.layers.Conv2D`,
`tfmeta.layers.BatchNormalization`, ReLU, max pooling), alternating, in one process: forward and the gradients of
the kernel, bias, scale and offset (first order), and, as MAML's second-order support passes need, also the
gradient of those gradients (times a direction) in the weights and in the gradient arriving from above:

  python benchmarks/fused_block.py --threads 1 --rounds 5
"""

import argparse
import json
import sys
import time

# (name, batch, height, width, input channels, filters): query and support batches of the suite's workloads
SHAPES = [("b-d query", 75, 28, 28, 1, 64), ("b-d support", 5, 28, 28, 1, 64),
          ("e query", 75, 84, 84, 3, 32), ("e support", 5, 84, 84, 3, 32)]
EPSILON = 1e-3  # Keras' BatchNormalization default, which conv_net uses


def batch_norm(filters: int, dtype: str):
    """tfmeta's batch norm layer, built (its fused kernels in float32)."""
    from tfmeta.layers import BatchNormalization

    norm = BatchNormalization(epsilon=EPSILON, dtype=dtype)
    norm.build((None, None, None, filters))
    return norm


def composite_block(tf, norm, x, kernel, bias, gamma, beta):
    """The block in TensorFlow's ops, with tfmeta's batch norm layer `norm`."""
    import keras

    z = tf.nn.bias_add(tf.nn.conv2d(x, kernel, 1, "SAME"), bias)
    # stateless, with this scale and offset (and no moving-average update): as a meta-step's adapted weights
    y, _ = norm.stateless_call([gamma, beta], [v.value for v in norm.non_trainable_variables], z, training=True)
    return keras.ops.max_pool(tf.nn.relu(y), 2, 2, "valid")


def fused_block(tf, ops, x, kernel, bias, gamma, beta):
    """The block through the library's fused kernels and their gradients (`separate` is used only where a tape
    watches x and records the backward pass: not here)."""
    from tfmeta.kernels import conv_block

    separate = lambda *a: composite_block(tf, batch_norm(kernel.shape[-1], "float32"), *a)  # noqa: E731
    return conv_block.fused_conv_block(ops, x, kernel, bias, gamma, beta, EPSILON, separate)[0]


def check(tf, ops, rng, shape) -> tuple[dict, dict]:
    """Largest errors of the fused kernel's outputs and gradients, and of TensorFlow's ops in float32, against the
    block in float64, each relative to the largest value of that output (the bias gradient is zero in exact
    arithmetic: its absolute error is reported). A pooling window whose two largest values are within rounding of
    each other can route its gradient to either: such flips dominate the input gradient's error on e's 75 queries,
    in both float32 computations."""
    _, n, h, w, ci, c = shape
    x, kernel, bias, gamma, beta, dy = inputs(rng, n, h, w, ci, c)
    wide = [tf.constant(v, tf.float64) for v in (x, kernel, bias, gamma, beta)]
    with tf.GradientTape() as tape:
        tape.watch(wide)
        y64 = composite_block(tf, batch_norm(c, "float64"), *wide)
    reference = [y64, *tape.gradient(y64, wide, tf.constant(dy, tf.float64))]
    narrow = [tf.constant(v) for v in (x, kernel, bias, gamma, beta)]
    results = []
    for block in (lambda *a: composite_block(tf, batch_norm(c, "float32"), *a), lambda *a: fused_block(tf, ops, *a)):
        with tf.GradientTape() as tape:
            tape.watch(narrow)
            y32 = block(*narrow)
        results.append([y32, *tape.gradient(y32, narrow, tf.constant(dy))])
    separate, fused = results

    def errors(outputs):
        found = {}
        for name, ours, exact in zip(("y", "dx", "dkernel", "dbias", "dgamma", "dbeta"), outputs, reference):
            error = float(tf.reduce_max(tf.abs(tf.cast(ours, tf.float64) - exact)))
            found[name] = error if name == "dbias" else error / float(tf.reduce_max(tf.abs(exact)))
        return found

    return errors(fused), errors(separate)


def inputs(rng, n, h, w, ci, c):
    import numpy as np

    normal = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    return normal(n, h, w, ci), normal(3, 3, ci, c) * 0.3, normal(c), 1 + 0.1 * normal(c), normal(c), normal(
        n, h // 2, w // 2, c)


def timings(tf, ops, rng, shape, rounds: int, repeats: int) -> dict:
    """Median seconds of forward + the weights' gradients (and, second order, their gradients in turn), TensorFlow's
    ops and the fused kernels alternating."""
    import numpy as np

    _, n, h, w, ci, c = shape
    x, kernel, bias, gamma, beta, dy = (tf.constant(v) for v in inputs(rng, n, h, w, ci, c))
    norm = batch_norm(c, "float32")

    blocks = {"separate": lambda *a: composite_block(tf, norm, *a), "fused": lambda *a: fused_block(tf, ops, *a)}
    weights = lambda kernel, bias, gamma, beta: [kernel, bias, gamma, beta]  # noqa: E731

    def first_order(block):
        def gradients(x, kernel, bias, gamma, beta, dy):
            with tf.GradientTape() as tape:
                tape.watch(weights(kernel, bias, gamma, beta))
                y = block(x, kernel, bias, gamma, beta)
            return tape.gradient(y, weights(kernel, bias, gamma, beta), dy)
        return tf.function(gradients)

    def second_order(block):
        def gradients(x, kernel, bias, gamma, beta, dy):  # d/d(weights, dy) of <gradients, direction>
            with tf.GradientTape() as outer:
                outer.watch([*weights(kernel, bias, gamma, beta), dy])
                with tf.GradientTape() as inner:
                    inner.watch(weights(kernel, bias, gamma, beta))
                    y = block(x, kernel, bias, gamma, beta)
                grads = inner.gradient(y, weights(kernel, bias, gamma, beta), dy)
                projection = tf.add_n([tf.reduce_sum(tf.sin(g)) for g in grads])
            return outer.gradient(projection, [*weights(kernel, bias, gamma, beta), dy],
                                  unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return tf.function(gradients)

    @tf.function
    def fused_forward(x, kernel, bias, gamma, beta, dy):
        return ops.tfmeta_conv_block(x, kernel, bias, gamma, beta, epsilon=EPSILON)[0]

    functions = {"separate": first_order(blocks["separate"]), "fused": first_order(blocks["fused"]),
                 "fused forward": fused_forward, "separate second order": second_order(blocks["separate"]),
                 "fused second order": second_order(blocks["fused"])}
    times = {name: [] for name in functions}
    for name, f in functions.items():
        tf.nest.map_structure(lambda t: t.numpy(), f(x, kernel, bias, gamma, beta, dy))  # trace
    for _ in range(rounds):
        for name, f in functions.items():
            for _ in range(repeats):
                start = time.perf_counter()
                tf.nest.map_structure(lambda t: t.numpy(), f(x, kernel, bias, gamma, beta, dy))
                times[name].append(time.perf_counter() - start)
    return {f"{name} s": float(np.median(t)) for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: TensorFlow's default)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per side and round")
    parser.add_argument("--out", default="", help="also append the JSON lines to this file")
    args = parser.parse_args()
    import tfmeta  # first: its TF_ENABLE_ONEDNN_OPTS default, as in meta_step.py

    import numpy as np
    import tensorflow as tf

    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    ops = tfmeta.kernels.load()
    if ops is None:
        raise SystemExit("tfmeta's fused kernels are off or did not build (see the warning above)")
    rows = []
    for shape in SHAPES:
        rng = np.random.default_rng(0)
        fused_error, separate_error = check(tf, ops, rng, shape)
        row = {"shape": shape[0], "batch, height, width, in, out": shape[1:], "threads": args.threads or "default",
               "max_error": fused_error, "separate_max_error": separate_error,
               **timings(tf, ops, rng, shape, args.rounds, args.repeats),
               "tensorflow": tf.__version__}
        row["speed-up"] = row["separate s"] / row["fused s"]
        row["second-order speed-up"] = row["separate second order s"] / row["fused second order s"]
        print(json.dumps(row), flush=True)
        rows.append(row)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    print("\n| shape | TensorFlow's ops | fused kernel | of which forward | speed-up | "
          "second order: TensorFlow's ops | fused | speed-up | "
          "largest relative error against float64: fused / TensorFlow's (input gradient) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        worst = lambda e: max(v for k, v in e.items() if k not in ("dbias", "dx"))  # noqa: E731
        print(f"| {r['shape']} {tuple(r['batch, height, width, in, out'])} | {1e3 * r['separate s']:.2f} ms | "
              f"{1e3 * r['fused s']:.2f} ms | {1e3 * r['fused forward s']:.2f} ms | {r['speed-up']:.2f}x | "
              f"{1e3 * r['separate second order s']:.2f} ms | {1e3 * r['fused second order s']:.2f} ms | "
              f"{r['second-order speed-up']:.2f}x | "
              f"{worst(r['max_error']):.1e} / {worst(r['separate_max_error']):.1e} "
              f"({r['max_error']['dx']:.1e} / {r['separate_max_error']['dx']:.1e}) |")


if __name__ == "__main__":
    sys.exit(main())
