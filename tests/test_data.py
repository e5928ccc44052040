"""Episodic pipelines: episode invariants (property-based), sources, augmentation and bad input."""

import os

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from tfmeta import data


def tagged_classes(num_classes=12, per_class=(6, 9), size=4, seed=0):
    """Classes whose images carry their identity: pixel (0, 0) = class + 1, pixel (0, 1) = example + 1."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for c in range(num_classes):
        for i in range(int(rng.integers(*per_class, endpoint=True))):
            image = np.zeros((size, size, 1), np.float32)
            image[0, 0], image[0, 1] = c + 1, i + 1
            images.append(image)
            labels.append(c)
    return data.from_arrays(np.stack(images), np.array(labels), groups={c: f"group{c % 3}" for c in range(num_classes)})


CLASSES = tagged_classes()


def identities(x):
    """(class, example) of each image of episodes [tasks, n, H, W, C]."""
    return x[..., 0, 0, 0].astype(int) - 1, x[..., 0, 1, 0].astype(int) - 1


@settings(max_examples=30, deadline=None)
@given(ways=st.integers(1, 12), shots=st.integers(1, 3), queries=st.integers(1, 3), tasks=st.integers(1, 4),
       seed=st.integers(0, 2**31 - 1))
def test_episode_invariants(ways, shots, queries, tasks, seed):
    sampler = data.FewShotTasks(CLASSES, ways=ways, shots=shots, queries=queries)
    episodes = {k: v.numpy() for k, v in sampler.sample(tf.constant([seed, 1], tf.int64), tasks).items()}
    assert episodes["support_x"].shape == (tasks, ways * shots, 4, 4, 1)
    assert episodes["query_x"].shape == (tasks, ways * queries, 4, 4, 1)
    assert episodes["support_x"].dtype == np.float32 and episodes["support_y"].dtype == np.int32
    for t in range(tasks):
        s_class, s_example = identities(episodes["support_x"][t])
        q_class, q_example = identities(episodes["query_x"][t])
        classes = np.concatenate([s_class, q_class])
        labels = np.concatenate([episodes["support_y"][t], episodes["query_y"][t]])
        # N distinct classes (no replacement), labelled 0..N-1, one label per class across support and query.
        assert len(set(classes)) == ways
        assert sorted(set(labels)) == list(range(ways))
        assert all(len(set(labels[classes == c])) == 1 for c in set(classes))
        assert np.bincount(episodes["support_y"][t], minlength=ways).tolist() == [shots] * ways
        assert np.bincount(episodes["query_y"][t], minlength=ways).tolist() == [queries] * ways
        # Support and query share no example, and every example exists in its class.
        pairs = list(zip(classes, np.concatenate([s_example, q_example])))
        assert len(set(pairs)) == len(pairs)
        assert all(0 <= e < CLASSES.counts[c] for c, e in pairs)


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_same_seed_same_episodes(seed):
    sampler = data.FewShotTasks(CLASSES, ways=5, shots=1, queries=2)
    first = list(sampler.dataset(3, seed=seed, num_batches=2).as_numpy_iterator())
    again = list(sampler.dataset(3, seed=seed, num_batches=2).as_numpy_iterator())
    other = list(sampler.dataset(3, seed=seed + 1, num_batches=2).as_numpy_iterator())
    for a, b, c in zip(first, again, other):
        assert all(np.array_equal(a[k], b[k]) for k in a)
        assert not np.array_equal(a["support_x"], c["support_x"])
    # A resumed stream continues with the same batches.
    resumed = list(sampler.dataset(3, seed=seed, start=1, num_batches=1).as_numpy_iterator())
    assert all(np.array_equal(resumed[0][k], first[1][k]) for k in first[1])


def test_labels_are_permuted_per_episode():
    sampler = data.FewShotTasks(CLASSES, ways=5, shots=1, queries=1)
    episodes = sampler.sample(tf.constant([0, 0], tf.int64), 200)
    classes, _ = identities(episodes["support_x"].numpy())
    # The class with the smallest index gets every label about equally often.
    smallest = np.argmin(classes, axis=1)
    counts = np.bincount(episodes["support_y"].numpy()[np.arange(200), smallest], minlength=5)
    assert counts.min() > 20, counts


def test_rotations_are_distinct_classes():
    rng = np.random.default_rng(0)
    images = rng.random((3, 4, 5, 5, 1)).astype(np.float32)
    classes = data.ClassImages(images, np.full(3, 4), ["a", "b", "c"], ["g", "g", "g"])
    sampler = data.FewShotTasks(classes, ways=12, shots=1, queries=1, rotations=True)
    episode = {k: v.numpy()[0] for k, v in sampler.sample(tf.constant([3, 4], tf.int64), 1).items()}
    # All 12 = 3 classes x 4 rotations appear, each a rotation of a stored image.
    found = set()
    for image in episode["support_x"]:
        matches = [(c, k) for c in range(3) for i in range(4) for k in range(4)
                   if np.allclose(np.rot90(images[c, i], k), image)]
        assert len(matches) == 1
        found.add(matches[0])
    assert len(found) == 12
    np.testing.assert_allclose(data.rotate90(tf.constant(images[0]), tf.constant([0, 1, 2, 3])).numpy(),
                               np.stack([np.rot90(images[0, i], i) for i in range(4)]))


def test_random_affine():
    image = np.zeros((1, 2, 28, 28, 1), np.float32)
    image[..., 8:20, 12:16, :] = 1.0
    identity = data.RandomAffine(scale=(1, 1), rotation=(0, 0), translation=0.0)
    np.testing.assert_allclose(identity(tf.constant(image), tf.constant([0, 1])), image, atol=1e-6)
    quarter = data.RandomAffine(scale=(1, 1), rotation=(90, 90), translation=0.0)
    rotated = quarter(tf.constant(image), tf.constant([0, 1])).numpy()[0, 0, ..., 0]
    assert min(np.abs(rotated - np.rot90(image[0, 0, ..., 0], k)).max() for k in (1, 3)) < 1e-5
    augment = data.RandomAffine()
    a = augment(tf.constant(image), tf.constant([0, 1])).numpy()
    assert a.shape == image.shape and 0 <= a.min() and a.max() <= 1 + 1e-6
    assert not np.allclose(a[0, 0], a[0, 1])  # each image draws its own transformation
    np.testing.assert_array_equal(a, augment(tf.constant(image), tf.constant([0, 1])).numpy())
    with pytest.raises(ValueError, match="scale"):
        data.RandomAffine(scale=(1.2, 0.8))
    # In a pipeline: same seed, same augmented episodes.
    sampler = data.FewShotTasks(CLASSES, ways=3, shots=1, queries=1, augmentation=augment)
    a, b = (sampler.sample(tf.constant([5, 5], tf.int64), 2)["support_x"] for _ in range(2))
    np.testing.assert_array_equal(a, b)


def test_sources_agree(tmp_path):
    rng = np.random.default_rng(0)
    images = (rng.random((6, 8, 8, 3)) * 255).astype(np.uint8)
    labels = np.array(["cat", "cat", "dog", "dog", "emu", "emu"])
    for split in ("train",):
        for i, (image, label) in enumerate(zip(images, labels)):
            os.makedirs(tmp_path / split / label, exist_ok=True)
            tf.io.write_file(str(tmp_path / split / label / f"{i}.png"), tf.io.encode_png(image))
    expected = data.from_arrays(images / 255.0, labels)
    from_dir = data.from_directory(str(tmp_path / "train"), (8, 8, 3))
    from_folder = data.from_image_folder(str(tmp_path), "train", (8, 8, 3))
    from_ds = data.from_dataset(tf.data.Dataset.from_tensor_slices((images / 255.0, labels)))
    for classes in (from_dir, from_folder, from_ds):
        assert classes.names == ["cat", "dog", "emu"] and classes.counts.tolist() == [2, 2, 2]
        np.testing.assert_allclose(np.sort(classes.images.ravel()), np.sort(expected.images.ravel()), atol=1e-6)


def test_split_by_group():
    splits = CLASSES.split_by_group(train=["group0", "group1"], test=["group2"])
    assert splits["train"].num_classes == 8 and splits["test"].num_classes == 4
    assert not set(splits["train"].names) & set(splits["test"].names)
    with pytest.raises(ValueError, match="shares groups"):
        CLASSES.split_by_group(a=["group0"], b=["group*"])
    with pytest.raises(ValueError, match="selects no group"):
        CLASSES.split_by_group(a=["nothing"])


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="`ways`=13 is more than the 12 classes"):
        data.FewShotTasks(CLASSES, ways=13)
    with pytest.raises(ValueError, match=r"`shots` \+ `queries` = 7 is more than the 6 examples"):
        data.FewShotTasks(CLASSES, ways=2, shots=2, queries=5)
    with pytest.raises(ValueError, match="`queries` must be an integer >= 1"):
        data.FewShotTasks(CLASSES, queries=0)
    with pytest.raises(ValueError, match="unknown Omniglot split 'validation'"):
        data.omniglot_tasks("validation")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="no image found"):
        data.from_directory(str(tmp_path / "empty"), (8, 8, 1))
    (tmp_path / "corrupt" / "a").mkdir(parents=True)
    (tmp_path / "corrupt" / "a" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot decode image .*broken.png"):
        data.from_directory(str(tmp_path / "corrupt"), (8, 8, 1))
    with pytest.raises(ValueError, match="neither a zip archive nor a directory"):
        data.load_omniglot(str(tmp_path / "missing.zip"))


def test_tfds_sources_with_mock_data():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=30, policy=tfds.testing.MockPolicy.USE_CODE):
        omniglot = data.load_omniglot_tfds("train", download=False)
        generic = data.from_tfds("omniglot", "train", image_shape=(28, 28, 1))
    assert omniglot.images.shape[2:] == (28, 28, 1) and omniglot.counts.sum() == 30
    assert all(name.startswith(group + "/") for name, group in zip(omniglot.names, omniglot.groups))
    assert generic.images.shape[2:] == (28, 28, 1) and generic.counts.sum() == 30
    with pytest.raises(ValueError, match="unknown Omniglot split 'validation'"):
        data.load_omniglot_tfds("validation")


def grouped_classes():
    """Tagged classes in groups of 5, 3 and 4 classes (8 or 9 examples each)."""
    classes = tagged_classes(num_classes=12, per_class=(8, 9))
    classes.groups = ["a"] * 5 + ["b"] * 3 + ["c"] * 4
    return classes


@settings(max_examples=20, deadline=None)
@given(steps=st.integers(1, 12), batch=st.integers(1, 7), tasks=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
def test_group_task_invariants(steps, batch, tasks, seed):
    """A task is `ways` classes of one group; its stream draws training examples only, a pass over them at a time
    without replacement; its query holds every class's test examples; labels are consistent."""
    classes = grouped_classes()
    sampler = data.GroupTasks(classes, ways=4, train_examples=5, test_examples=2, steps=steps, batch_size=batch)
    assert sampler.groups == ["a", "c"] and sampler.dropped == ["b"]
    episodes = {k: v.numpy() for k, v in sampler.sample(tf.constant([seed, 3], tf.int64), tasks).items()}
    assert episodes["stream_x"].shape == (tasks, steps, batch, 4, 4, 1)
    assert episodes["query_x"].shape == (tasks, 8, 4, 4, 1) and episodes["stream_y"].shape == (tasks, steps, batch)
    for t in range(tasks):
        s_class, s_example = (v.ravel() for v in identities(episodes["stream_x"][t]))
        q_class, q_example = identities(episodes["query_x"][t])
        chosen = sorted(set(q_class))
        assert len(chosen) == 4 and len({classes.groups[c] for c in chosen}) == 1
        assert set(s_class) <= set(chosen) and set(q_example) == {0, 1} and set(s_example) <= set(range(2, 7))
        labels = np.concatenate([episodes["stream_y"][t].ravel(), episodes["query_y"][t]])
        all_classes = np.concatenate([s_class, q_class])
        assert all(len(set(labels[all_classes == c])) == 1 for c in chosen)
        assert sorted(set(episodes["query_y"][t])) == list(range(4))
        # Each full pass of 20 stream draws covers the 4 x 5 training examples once.
        pairs = list(zip(s_class, s_example))
        for start in range(0, len(pairs) - 19, 20):
            assert len(set(pairs[start:start + 20])) == 20


def test_group_tasks_bad_input():
    with pytest.raises(ValueError, match="no group has `ways`=6 classes"):
        data.GroupTasks(grouped_classes(), ways=6, train_examples=5, test_examples=2)
    with pytest.raises(ValueError, match="`train_examples` \\+ `test_examples` = 10 is more than the 8"):
        data.GroupTasks(grouped_classes(), ways=4, train_examples=8, test_examples=2)
    with pytest.raises(ValueError, match="`steps` must be an integer >= 1"):
        data.GroupTasks(grouped_classes(), ways=4, train_examples=5, test_examples=2, steps=0)


def test_omniglot_cache_sees_edits_inside_an_extracted_directory(tmp_path):
    """The decoded-image cache is keyed by every file of an extracted archive, not just the directory."""
    root, cache = tmp_path / "images_background", str(tmp_path / "cache")

    def draw(character, drawer):
        path = root / "Alpha" / character / f"0001_{drawer:02d}.png"
        os.makedirs(path.parent, exist_ok=True)
        tf.io.write_file(str(path), tf.io.encode_png(np.full((10, 10, 1), 255, np.uint8)))

    for character in ("character01", "character02"):
        for drawer in (1, 2):
            draw(character, drawer)
    assert data.load_omniglot(str(root), cache_dir=cache).counts.tolist() == [2, 2]
    draw("character02", 3)  # a new drawing: the directory's own modification time does not change
    assert data.load_omniglot(str(root), cache_dir=cache).counts.tolist() == [2, 3]
