"""FLOP/s of the convolutions inside a conv4 meta-step, by layer and batch size: what bounds the conv workloads.

  python benchmarks/conv_rates.py

A MAML task runs each convolution at two batch sizes: the support set (5 images in 5-way 1-shot) and the query
set (75). For each layer shape of workloads b-d (conv4, 64 filters, 28x28x1) and e (32 filters, 84x84x3), this
times the forward convolution and both backward convolutions (input and filter gradients) at those batch sizes
and prints their GFLOP/s (median of 7), against the 64-channel peak measured at batch 600.

  python benchmarks/conv_rates.py --first_layer_forms

times instead the first layer of b-d (one input channel, 64 filters, a task's 75 query images, one intra-op thread)
written in other forms that compute the same convolution, beside a ReLU over its output (one pass over the maps in
and out): milliseconds for the forward pass and the filter gradient.
"""

import argparse
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


def seconds(fn, args: tuple, repeats: int = 21) -> float:
    """The median seconds of `fn(*args)` over `repeats` timed calls after one untimed."""
    fn(*args).numpy()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args).numpy()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def rate(fn, args: tuple, flops: float, repeats: int = 7) -> float:
    """GFLOP/s of `fn(*args)` (`flops` per call): the median of `repeats` timed calls after one untimed."""
    return flops / seconds(fn, args, repeats) / 1e9


def padded(channels: int):
    """The convolution with its input and kernel zero-padded to `channels` input channels."""
    def conv(x, w):
        extra = channels - x.shape[-1]
        return tf.nn.conv2d(tf.pad(x, [[0, 0]] * 3 + [[0, extra]]), tf.pad(w, [[0, 0]] * 2 + [[0, extra], [0, 0]]), 1,
                            "SAME")
    return conv


def patches(x, w):
    """The convolution as nine shifted slices of the padded input and one matrix product."""
    height, width = x.shape[1:3]
    padded_x = tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]])
    columns = tf.concat([padded_x[:, i:i + height, j:j + width] for i in range(3) for j in range(3)], -1)
    return tf.reshape(tf.reshape(columns, [-1, columns.shape[-1]]) @ tf.reshape(w, [-1, w.shape[-1]]),
                      [-1, height, width, w.shape[-1]])


def first_layer_forms():
    tf.config.threading.set_intra_op_parallelism_threads(1)
    x, w = tf.random.normal([75, 28, 28, 1]), tf.random.normal([3, 3, 1, 64])
    dy = tf.random.normal([75, 28, 28, 64])
    forms = {
        "`tf.nn.conv2d`": lambda x, w: tf.nn.conv2d(x, w, 1, "SAME"),
        "depthwise convolution": lambda x, w: tf.nn.depthwise_conv2d(x, w, [1, 1, 1, 1], "SAME"),
        **{f"zero-padded to {c} input channels": padded(c) for c in (4, 8, 16)},
        "nine shifted slices and a matrix product": patches,
    }
    print("| form (batch 75, one thread) | forward ms | filter gradient ms |\n| --- | --- | --- |")
    reference = forms["`tf.nn.conv2d`"](x, w)
    for name, conv in forms.items():
        np.testing.assert_allclose(conv(x, w).numpy(), reference.numpy(), rtol=1e-4, atol=1e-4)

        def filter_gradient(x, w, dy, conv=conv):
            with tf.GradientTape() as tape:
                tape.watch(w)
                y = conv(x, w)
            return tape.gradient(y, w, dy)

        forward = seconds(tf.function(conv), (x, w))
        backward = seconds(tf.function(filter_gradient), (x, w, dy))
        print(f"| {name} | {1e3 * forward:.2f} | {1e3 * backward:.2f} |", flush=True)
    print(f"| (a ReLU over the output) | {1e3 * seconds(tf.function(tf.nn.relu), (dy,)):.2f} | |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--first_layer_forms", action="store_true")
    if parser.parse_args().first_layer_forms:
        return first_layer_forms()
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
