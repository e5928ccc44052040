"""FLOP/s of the convolutions inside a conv4 meta-step, by layer and batch size: what bounds the conv workloads.

  python benchmarks/conv_rates.py

A MAML task runs each convolution at two batch sizes: the support set (5 images in 5-way 1-shot) and the query
set (75). For each layer shape of workloads b-d (conv4, 64 filters, 28x28x1) and e (32 filters, 84x84x3), this
times the forward convolution and both backward convolutions (input and filter gradients) at those batch sizes
and prints their GFLOP/s (median of 7), against the 64-channel peak measured at batch 600.
"""

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

LAYERS = {  # name: (input side, input channels, filters)
    "b-d layer 1 (28x28x1 -> 64)": (28, 1, 64),
    "b-d layer 2 (14x14x64 -> 64)": (14, 64, 64),
    "b-d layer 4 (3x3x64 -> 64)": (3, 64, 64),
    "e layer 1 (84x84x3 -> 32)": (84, 3, 32),
    "e layer 2 (42x42x32 -> 32)": (42, 32, 32),
}


def rate(fn, args: tuple, flops: float, repeats: int = 7) -> float:
    """GFLOP/s of `fn(*args)` (`flops` per call): the median of `repeats` timed calls after one untimed."""
    fn(*args).numpy()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args).numpy()
        times.append(time.perf_counter() - start)
    return flops / float(np.median(times)) / 1e9


def main():
    print("| layer | batch | forward GFLOP/s | input gradient GFLOP/s | filter gradient GFLOP/s |")
    print("| --- | --- | --- | --- | --- |")
    for name, (side, channels, filters) in LAYERS.items():
        for batch in (5, 75, 600):
            x = tf.random.normal([batch, side, side, channels])
            w = tf.random.normal([3, 3, channels, filters])
            dy = tf.random.normal([batch, side, side, filters])
            flops = 2.0 * batch * side * side * 9 * channels * filters
            forward = tf.function(lambda x, w, dy: tf.nn.conv2d(x, w, 1, "SAME"))
            backward_input = tf.function(lambda x, w, dy: tf.nn.conv2d_transpose(dy, w, tf.shape(x), 1, "SAME"))
            backward_filter = tf.function(
                lambda x, w, dy: tf.compat.v1.nn.conv2d_backprop_filter(x, tf.shape(w), dy, [1, 1, 1, 1], "SAME"))
            rates = [rate(f, (x, w, dy), flops) for f in (forward, backward_input, backward_filter)]
            print(f"| {name} | {batch} | " + " | ".join(f"{r:.0f}" for r in rates) + " |", flush=True)


if __name__ == "__main__":
    main()
