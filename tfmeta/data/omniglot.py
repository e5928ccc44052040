"""Omniglot (Lake, Salakhutdinov & Tenenbaum, 2015) from its official archives or from TFDS.

The archives (`images_background.zip`, `images_evaluation.zip`, and the `images_background_small1/2.zip`
subsets) hold `<top>/<Alphabet>/<character>/<id>_<drawer>.png`: 105x105 black ink on white. Classes are
characters (`"<Alphabet>/<character>"`), grouped by alphabet for alphabet-level splits. Images are resized
to `image_size` and inverted so that ink is 1.0 and background 0.0.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import zipfile
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from tfmeta.data.augment import RandomAffine
from tfmeta.data.classes import ClassImages, ImagePreprocessing, from_arrays
from tfmeta.data.few_shot import FewShotTasks

ARCHIVES = ("images_background.zip", "images_evaluation.zip", "images_background_small1.zip",
            "images_background_small2.zip")


def load_omniglot(paths: str | Sequence[str], image_size: int = 28, cache_dir: Optional[str] = None) -> ClassImages:
    """Characters of one or more Omniglot archives or extracted archive directories, merged.

    `paths` are zip archives, directories of an extracted archive (holding `<Alphabet>/<character>/`), or
    directories holding archives (every file of `ARCHIVES` found there is used). A character present in
    several sources (Greek and Latin are in both small archives) is kept once. Decoded images are cached in
    `cache_dir` (default `~/.cache/tfmeta`), keyed by the image size and the sources' files (path, size and
    modification time of each archive, or of every file inside an extracted directory).
    """
    sources = _sources([paths] if isinstance(paths, str) else list(paths))
    cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "tfmeta")
    key = hashlib.sha256(repr([_fingerprint(s) for s in sources] + [image_size]).encode()).hexdigest()[:16]
    cache = os.path.join(cache_dir, f"omniglot_{key}.npz")
    if os.path.exists(cache):
        with np.load(cache) as data:
            return ClassImages(data["images"], data["counts"], [str(n) for n in data["names"]],
                               [str(g) for g in data["groups"]], omniglot_preprocessing(image_size))
    files: dict[str, dict[str, bytes]] = {}
    for source in sources:
        for character, drawings in _read_source(source).items():
            files.setdefault(character, drawings)
    if not files:
        raise ValueError(f"no Omniglot character found in {paths!r}: expected <Alphabet>/<character>/*.png.")
    names, blobs, labels = [], [], []
    for character in sorted(files):
        names.append(character)
        for name in sorted(files[character]):
            blobs.append((f"{character}/{name}", files[character][name]))
            labels.append(character)
    images = _decode_all(blobs, image_size)
    classes = from_arrays(images, np.array(labels), {c: c.split("/")[0] for c in names})
    classes.preprocessing = omniglot_preprocessing(image_size)
    os.makedirs(cache_dir, exist_ok=True)
    temporary = f"{cache}.{os.getpid()}.tmp.npz"  # per process: concurrent first loads do not collide
    np.savez(temporary, images=classes.images, counts=classes.counts, names=np.array(classes.names),
             groups=np.array(classes.groups))
    os.replace(temporary, cache)
    return classes


# The held-out alphabets of the small archives' 8 (one from each archive); the other 6 are for meta-training.
TEST_ALPHABETS = ("Balinese", "Tagalog")
SPLITS = ("train", "test")


def data_dir() -> str:
    """Where datasets are looked for: $TFMETA_DATA_DIR, else `../shared/data` (relative to the working
    directory, i.e. beside the repository when run from its root)."""
    return os.environ.get("TFMETA_DATA_DIR", os.path.join("..", "shared", "data"))


def omniglot_tasks(
    split: str = "train",
    path: Optional[str] = None,
    test_alphabets: Sequence[str] = TEST_ALPHABETS,
    ways: int = 5,
    shots: int = 1,
    queries: int = 15,
    rotations: Optional[bool] = None,
    affine: bool = False,
    image_size: int = 28,
) -> FewShotTasks:
    """N-way K-shot Omniglot episodes of one alphabet-level split.

    Args:
      split: "train" (every alphabet not in `test_alphabets`) or "test" (`test_alphabets`).
      path: archives or an extracted archive directory (see `load_omniglot`); default `<data_dir()>/omniglot`.
      test_alphabets: the held-out alphabets (globs allowed), e.g. the 20 of `images_evaluation.zip` when
        `path` holds the full archives.
      rotations: rotations by multiples of 90 degrees as new classes; default: for "train" only.
      affine: the random affine augmentation of the multi-shot Omniglot protocol (`RandomAffine`).
    """
    return FewShotTasks(alphabet_split(split, path, test_alphabets, image_size), ways=ways, shots=shots,
                        queries=queries, rotations=split == "train" if rotations is None else rotations,
                        augmentation=RandomAffine() if affine else None)


def alphabet_split(split: str, path: Optional[str], test_alphabets: Sequence[str], image_size: int) -> ClassImages:
    """The characters of one alphabet-level split: "train" (every alphabet not in `test_alphabets`, globs
    allowed) or "test" (`test_alphabets`); `path` defaults to `<data_dir()>/omniglot`."""
    if split not in SPLITS:
        raise ValueError(f"unknown Omniglot split {split!r}; expected one of {SPLITS}.")
    path = path or os.path.join(data_dir(), "omniglot")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no Omniglot data at {path!r}: set the path (or $TFMETA_DATA_DIR) to the directory "
                                f"holding {', '.join(ARCHIVES)}.")
    alphabets = load_omniglot(path, image_size=image_size)
    everything = sorted(set(alphabets.groups))
    held_out = [g for g in everything if any(fnmatch.fnmatchcase(g, p) for p in test_alphabets)]
    splits = alphabets.split_by_group(train=[g for g in everything if g not in held_out], test=held_out)
    return splits[split]


TFDS_SPLITS = ("train", "test", "small1", "small2")


def load_omniglot_tfds(split: str = "train", image_size: int = 28, data_dir: Optional[str] = None,
                       download: bool = True) -> ClassImages:
    """Omniglot from TensorFlow Datasets (`tfds.load('omniglot')`: splits "train" = background,
    "test" = evaluation, "small1", "small2"), grouped by alphabet, with the same preprocessing as
    `load_omniglot`."""
    import tensorflow_datasets as tfds

    if split not in TFDS_SPLITS:
        raise ValueError(f"unknown Omniglot split {split!r}; TFDS has {TFDS_SPLITS}.")
    dataset, info = tfds.load("omniglot", split=split, data_dir=data_dir, download=download, with_info=True)
    alphabets = info.features["alphabet"].names
    images, labels, preprocessing = [], [], omniglot_preprocessing(image_size)
    for example in dataset.as_numpy_iterator():
        images.append(preprocessing(tf.image.rgb_to_grayscale(example["image"])).numpy())
        labels.append(f"{alphabets[example['alphabet']]}/character{example['alphabet_char_id'] + 1:02d}")
    if not images:
        raise ValueError(f"TFDS Omniglot split {split!r} holds no example.")
    names = sorted(set(labels))
    classes = from_arrays(np.stack(images), np.array(labels), {c: c.split("/")[0] for c in names})
    classes.preprocessing = preprocessing
    return classes


def _sources(paths: list[str]) -> list[str]:
    sources = []
    for path in paths:
        if os.path.isdir(path) and any(os.path.isfile(os.path.join(path, a)) for a in ARCHIVES):
            found = [os.path.join(path, a) for a in ARCHIVES if os.path.isfile(os.path.join(path, a))]
            sources += [os.path.abspath(f) for f in found]
        elif os.path.isdir(path) or zipfile.is_zipfile(path):
            sources.append(os.path.abspath(path))
        elif os.path.isfile(path):
            raise ValueError(f"Omniglot archive {path!r} is not a readable zip file (truncated or corrupt?).")
        else:
            raise ValueError(f"Omniglot path {path!r} is neither a zip archive nor a directory.")
    return sources


def _fingerprint(source: str) -> list:
    """(path, size, modification time) of an archive, or of every file under a directory."""
    files = [source] if os.path.isfile(source) else sorted(
        os.path.join(root, name) for root, _, names in os.walk(source) for name in names)
    return [(f, os.path.getsize(f), os.path.getmtime(f)) for f in files]


def _read_source(source: str) -> dict[str, dict[str, bytes]]:
    """{"<Alphabet>/<character>": {file name: PNG bytes}} of an archive or an extracted directory."""
    characters: dict[str, dict[str, bytes]] = {}
    if os.path.isdir(source):
        for root, _, names in os.walk(source):
            for name in names:
                if name.lower().endswith(".png"):
                    parts = os.path.relpath(os.path.join(root, name), source).split(os.sep)
                    with open(os.path.join(root, name), "rb") as f:
                        characters.setdefault("/".join(parts[-3:-1]), {})[name] = f.read()
        return characters
    try:
        with zipfile.ZipFile(source) as archive:
            for info in archive.infolist():
                parts = info.filename.split("/")
                if info.filename.lower().endswith(".png") and len(parts) >= 3:
                    characters.setdefault("/".join(parts[-3:-1]), {})[parts[-1]] = archive.read(info)
    except (zipfile.BadZipFile, EOFError, OSError) as error:
        raise ValueError(f"Omniglot archive {source!r} cannot be read (truncated or corrupt?): {error}") from None
    return characters


def omniglot_preprocessing(image_size: int = 28) -> ImagePreprocessing:
    """Omniglot's drawings (white background) to [size, size, 1] with ink 1.0: area-resized and inverted."""
    return ImagePreprocessing((image_size, image_size, 1), resize_method="area", antialias=False, invert=True)


def _decode_all(blobs: list[tuple[str, bytes]], image_size: int) -> np.ndarray:
    """Decodes (name, PNG bytes) pairs in parallel to float32 [n, size, size, 1] with ink 1.0."""
    preprocessing = omniglot_preprocessing(image_size)

    def decode(data):
        return preprocessing(tf.io.decode_png(data, channels=1))

    try:
        images = tf.data.Dataset.from_tensor_slices([b for _, b in blobs]).map(
            decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(1024)
        decoded = np.concatenate([batch.numpy() for batch in images])
    except tf.errors.InvalidArgumentError:
        for name, data in blobs:  # find the culprit for the message
            try:
                tf.io.decode_png(data)
            except tf.errors.InvalidArgumentError:
                raise ValueError(f"cannot decode Omniglot image {name}: not a valid PNG file.") from None
        raise
    return decoded

