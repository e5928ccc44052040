"""Labelled images grouped by class, decoded once and kept in memory, from arrays, datasets or directories."""

from __future__ import annotations

import dataclasses
import fnmatch
import os
from typing import Callable, Optional, Sequence

import numpy as np
import tensorflow as tf

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


@dataclasses.dataclass(frozen=True)
class ImagePreprocessing:
    """How a source turns decoded image files into learner inputs: float in [0, 1], resized to `image_shape`
    (height, width, channels) with `resize_method`, optionally inverted (Omniglot's ink as 1.0).

    Loaders record it on their `ClassImages`, and `tfmeta.export` runs the same function inside a SavedModel,
    so that serving takes images as decoded from their files ([n, any height, any width, channels], uint8 or
    float in [0, 1])."""

    image_shape: tuple[int, int, int]
    resize_method: str = "bilinear"
    antialias: bool = True
    invert: bool = False

    def __call__(self, images: tf.Tensor) -> tf.Tensor:
        images = tf.image.convert_image_dtype(images, tf.float32)
        images = tf.image.resize(images, self.image_shape[:2], method=self.resize_method, antialias=self.antialias)
        return 1.0 - images if self.invert else images


@dataclasses.dataclass
class ClassImages:
    """Images grouped by class: `images[c, i]` is example i of class c, for i < `counts[c]`.

    images: float32 array [classes, max examples per class, height, width, channels] (zero padding).
    counts: examples of each class.
    names: a name per class; groups: a grouping key per class (e.g. an Omniglot alphabet) for splits.
    preprocessing: how the images were made from decoded files, when a loader knows it (for export).
    """

    images: np.ndarray
    counts: np.ndarray
    names: list[str]
    groups: list[str]
    preprocessing: Optional[ImagePreprocessing] = None

    def __post_init__(self):
        if self.images.ndim != 5:
            raise ValueError(f"`images` must have shape [classes, examples, height, width, channels]; got "
                             f"{self.images.shape}.")
        if not len(self.counts) == len(self.names) == len(self.groups) == len(self.images):
            raise ValueError("`images`, `counts`, `names` and `groups` must describe the same classes.")
        if len(self.images) == 0:
            raise ValueError("no class: the source holds no labelled image.")

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def select(self, keep: Sequence[bool]) -> "ClassImages":
        """The classes where `keep` is true."""
        keep = np.asarray(keep, bool)
        return ClassImages(self.images[keep], self.counts[keep], [n for n, k in zip(self.names, keep) if k],
                           [g for g, k in zip(self.groups, keep) if k], self.preprocessing)

    def split_by_group(self, **splits: Sequence[str]) -> dict[str, "ClassImages"]:
        """Class-level splits by group (e.g. `train=[...alphabets], test=[...]`); groups may be globs.

        Every group must land in at most one split, so no class is shared between splits.
        """
        result, taken = {}, set()
        for split, patterns in splits.items():
            keep = [any(fnmatch.fnmatchcase(g, p) for p in patterns) for g in self.groups]
            groups = {g for g, k in zip(self.groups, keep) if k}
            if not groups:
                raise ValueError(f"split '{split}' selects no group; groups are {sorted(set(self.groups))}.")
            if groups & taken:
                raise ValueError(f"split '{split}' shares groups {sorted(groups & taken)} with another split.")
            taken |= groups
            result[split] = self.select(keep)
        return result


def from_arrays(images, labels, groups: Optional[dict] = None) -> ClassImages:
    """Groups in-memory `images` [N, H, W, C] (or [N, H, W]) by integer or string `labels` [N].

    `groups` optionally maps a label to its grouping key (default: the label itself).
    """
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or labels.ndim != 1 or len(images) != len(labels) or not len(images):
        raise ValueError(f"`images` must have shape [examples >= 1, height, width(, channels)] with one label each "
                         f"in `labels` [examples]; got images {images.shape} and labels {labels.shape}.")
    if not np.isfinite(images).all():
        raise ValueError(f"`images` holds NaN or infinite values ({int(np.sum(~np.isfinite(images)))} of them).")
    classes = sorted(set(labels.tolist()))
    members = [np.flatnonzero(labels == c) for c in classes]
    counts = np.array([len(m) for m in members], np.int32)
    stacked = np.zeros((len(classes), counts.max() if len(classes) else 0, *images.shape[1:]), np.float32)
    for c, m in enumerate(members):
        stacked[c, : len(m)] = images[m]
    names = [str(c) for c in classes]
    return ClassImages(stacked, counts, names, [str((groups or {}).get(c, c)) for c in classes])


def from_dataset(dataset: tf.data.Dataset, groups: Optional[dict] = None) -> ClassImages:
    """Decodes a `tf.data.Dataset` of (image, label) pairs into memory, grouped by label."""
    images, labels = [], []
    for image, label in dataset.as_numpy_iterator():
        images.append(image)
        labels.append(label.decode() if isinstance(label, bytes) else label)
    if not images:
        raise ValueError("the dataset holds no (image, label) pair.")
    return from_arrays(np.stack(images), np.array(labels), groups)


def from_tfds(name: str, split: str, image_shape: Optional[Sequence[int]] = None, label_key: str = "label",
              data_dir: Optional[str] = None, download: bool = False) -> ClassImages:
    """A TFDS dataset of (image, label) examples, e.g. `from_tfds("omniglot", "train")`; images are converted
    to float in [0, 1] and, if `image_shape` (height, width, channels) is given, resized (and RGB turned to
    grayscale for one channel)."""
    import tensorflow_datasets as tfds

    dataset = tfds.load(name, split=split, data_dir=data_dir, download=download)

    def pair(example):
        image = tf.image.convert_image_dtype(example["image"], tf.float32)
        if image_shape is not None:
            if image_shape[2] == 1 and image.shape[-1] == 3:
                image = tf.image.rgb_to_grayscale(image)
            image = tf.image.resize(image, tuple(image_shape[:2]), antialias=True)
        return image, example[label_key]

    return from_dataset(dataset.map(pair, num_parallel_calls=tf.data.AUTOTUNE))


def from_image_folder(root: str, split: str, image_shape: Sequence[int]) -> ClassImages:
    """An image-folder dataset (`<root>/<split>/<class>/<image>`, the layout of mini-ImageNet-style releases)
    read with `tfds.folder_dataset.ImageFolder`, one class per folder."""
    import tensorflow_datasets as tfds

    builder = tfds.folder_dataset.ImageFolder(root, shape=(None, None, image_shape[2]))
    if split not in builder.info.splits:
        raise ValueError(f"unknown split {split!r} in {root!r}; found {sorted(builder.info.splits)}.")
    names = builder.info.features["label"].names

    preprocessing = ImagePreprocessing(tuple(image_shape))
    classes = from_dataset(builder.as_dataset(split=split, shuffle_files=False).map(
        lambda example: (preprocessing(example["image"]), example["label"])))
    classes.names = [names[int(n)] for n in classes.names]
    classes.groups = list(classes.names)
    classes.preprocessing = preprocessing
    return classes


def from_directory(
    root: str,
    image_shape: Sequence[int],
    depth: int = 1,
    preprocess: Optional[Callable[[tf.Tensor], tf.Tensor]] = None,
) -> ClassImages:
    """Loads a directory tree of images, one class per directory `depth` levels below `root`.

    With `depth=2` (e.g. Omniglot's `<alphabet>/<character>/*.png`) the first level is the group. Images are
    decoded, converted to float in [0, 1] and resized to `image_shape` (height, width, channels), then
    passed through `preprocess`.
    """
    if not os.path.isdir(root):
        raise ValueError(f"`root` {root!r} is not a directory.")
    class_dirs = sorted(_directories(root, depth))
    height, width, channels = image_shape
    images, labels, groups = [], [], {}
    for class_dir in class_dirs:
        files = sorted(f for f in os.listdir(class_dir) if f.lower().endswith(IMAGE_EXTENSIONS))
        relative = os.path.relpath(class_dir, root)
        groups[relative] = relative.split(os.sep)[0]
        for name in files:
            path = os.path.join(class_dir, name)
            images.append(decode_image(tf.io.read_file(path), (height, width, channels), path, preprocess))
            labels.append(relative)
    if not images:
        raise ValueError(f"no image found in {root!r} (looked {depth} directory level(s) down for "
                         f"{', '.join(IMAGE_EXTENSIONS)} files).")
    classes = from_arrays(np.stack(images), np.array(labels), groups)
    if preprocess is None:
        classes.preprocessing = ImagePreprocessing(tuple(image_shape))
    return classes


def decode_image(data: tf.Tensor, image_shape: Sequence[int], name: str,
                 preprocess: Optional[Callable[[tf.Tensor], tf.Tensor]] = None) -> np.ndarray:
    """Decodes encoded image bytes to float32 [height, width, channels] in [0, 1], resized."""
    try:
        image = tf.io.decode_image(data, channels=image_shape[2], expand_animations=False)
    except (tf.errors.InvalidArgumentError, ValueError) as error:
        raise ValueError(f"cannot decode image {name}: {str(error).splitlines()[0]}") from None
    image = ImagePreprocessing(tuple(image_shape))(image)
    if preprocess is not None:
        image = preprocess(image)
    return image.numpy()


def _directories(root: str, depth: int) -> list[str]:
    level = [root]
    for _ in range(depth):
        level = [os.path.join(d, e) for d in level for e in sorted(os.listdir(d)) if os.path.isdir(os.path.join(d, e))]
    return level
