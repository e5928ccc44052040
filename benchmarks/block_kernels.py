"""The first block's forward kernel and its gradient kernel alone, at the suite's batch sizes (issue 21).

Times `TfmetaConvBlock` and `TfmetaConvBlockGrad` as single ops, each in its own `tf.function`, with TensorFlow's
thread pools: medians of `--calls` calls after one warm-up. Run it against two commits in turn (e.g. with
`PYTHONPATH` pointing at a worktree of the other) to compare kernel versions; docs/performance.md quotes it.

  python benchmarks/block_kernels.py --calls 15
"""

import argparse
import json
import time

import numpy as np

# (name, batch, height = width, input channels, filters), as in benchmarks/fused_block.py
SHAPES = [("e query", 75, 84, 3, 32), ("e support", 5, 84, 3, 32), ("b-d query", 75, 28, 1, 64)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=15, help="timed calls per op and shape")
    args = parser.parse_args()
    import tensorflow as tf

    from tfmeta import kernels

    ops = kernels.load()
    if ops is None:
        raise SystemExit("tfmeta's kernels are not available on this machine (see the warning above)")
    rng = np.random.default_rng(0)
    for name, n, h, ci, c in SHAPES:
        x = tf.constant(rng.normal(size=(n, h, h, ci)), tf.float32)
        kernel = tf.constant(0.2 * rng.normal(size=(3, 3, ci, c)), tf.float32)
        bias, gamma, beta = (tf.constant(rng.normal(size=c), tf.float32) for _ in range(3))
        forward = tf.function(lambda: ops.tfmeta_conv_block(x, kernel, bias, gamma, beta, epsilon=1e-3))
        outputs = forward()
        dy = tf.constant(rng.normal(size=outputs[0].shape), tf.float32)
        gradient = tf.function(lambda: ops.tfmeta_conv_block_grad(dy, outputs[5], x, outputs[4]))
        gradient()
        times = {"forward": [], "gradient": []}
        for _ in range(args.calls):
            for key, function in (("forward", forward), ("gradient", gradient)):
                start = time.perf_counter()
                function()
                times[key].append(time.perf_counter() - start)
        print(json.dumps({"shape": name, "batch, height, width, in, out": [n, h, h, ci, c],
                          **{f"{key} ms": 1e3 * float(np.median(value)) for key, value in times.items()}}))


if __name__ == "__main__":
    main()
