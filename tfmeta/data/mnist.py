"""MNIST for the learned-optimizer problems: the 5,000-digit offline copy (`$TFMETA_DATA_DIR/mnist5k`) with a fixed
train/validation/test split, or the full dataset through TFDS."""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from tfmeta.data.omniglot import data_dir

SPLITS = ("train", "validation", "test")
# The fixed split of the 5,000 digits: a permutation drawn with numpy's default_rng(SPLIT_SEED), then 3,000 images
# for meta-training the optimizers, 1,000 for tuning the baselines and 1,000 for the reported results.
SPLIT_SEED = 0
SPLIT_SIZES = {"train": 3000, "validation": 1000, "test": 1000}


def mnist5k(split: str = "train", path: Optional[str] = None) -> tuple[np.ndarray, np.ndarray]:
    """Images [n, 784] as float32 in [0, 1] and labels [n] (int32) of one split of the 5,000-digit copy
    (`mnist_5k.csv.gz`: 784 pixel values 0-255 then the label, per row; its README gives its source)."""
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {SPLITS}; got {split!r}.")
    path = path or os.path.join(data_dir(), "mnist5k", "mnist_5k.csv.gz")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no MNIST copy at {path}: set $TFMETA_DATA_DIR to the directory that holds "
                                "mnist5k/mnist_5k.csv.gz, or use tfds_mnist for the full dataset.")
    rows = np.loadtxt(path, delimiter=",", dtype=np.int64)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(rows))
    start = sum(SPLIT_SIZES[s] for s in SPLITS[:SPLITS.index(split)])
    rows = rows[order[start:start + SPLIT_SIZES[split]]]
    return (rows[:, :784] / 255.0).astype(np.float32), rows[:, 784].astype(np.int32)


def tfds_mnist(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """The full MNIST through TensorFlow Datasets ("mnist", its "train" or "test" split, 60,000 and 10,000
    images), as `mnist5k` returns them; it needs the dataset prepared in TFDS' data directory."""
    import tensorflow_datasets as tfds

    images, labels = tfds.as_numpy(tfds.load("mnist", split=split, batch_size=-1, as_supervised=True))
    return (images.reshape(len(images), -1) / 255.0).astype(np.float32), labels.astype(np.int32)
