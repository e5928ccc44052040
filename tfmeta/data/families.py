"""Image task families for learning to meta-learn (`tfmeta.MALTML`, Devos & Dandi, 2020): a family per class
group (an Omniglot alphabet), or a family per sampled subset of the affine augmentation's parameters."""

from __future__ import annotations

from typing import Optional, Sequence

import tensorflow as tf

from tfmeta.data.augment import affine
from tfmeta.data.classes import ClassImages
from tfmeta.data.few_shot import FewShotTasks
from tfmeta.data.omniglot import TEST_ALPHABETS, alphabet_split
from tfmeta.tasks.families import MixtureFamilies, TaskFamilies


def group_families(classes: ClassImages, num_tasks: int = 5, num_goal_tasks: int = 2, ways: int = 5,
                   shots: int = 1, queries: int = 15, rotations: bool = False) -> MixtureFamilies:
    """A family per group of `classes` (e.g. an Omniglot alphabet): its tasks are N-way K-shot episodes over the
    group's classes (`FewShotTasks`). Every group needs at least `ways` classes (with rotations: classes × 4)."""
    families = []
    for group in sorted(set(classes.groups)):
        try:
            families.append(FewShotTasks(classes.select([g == group for g in classes.groups]), ways=ways,
                                         shots=shots, queries=queries, rotations=rotations))
        except ValueError as error:
            raise ValueError(f"family (group) {group!r}: {error}") from None
    return MixtureFamilies(families, num_tasks=num_tasks, num_goal_tasks=num_goal_tasks)


def omniglot_families(split: str = "train", path: Optional[str] = None,
                      test_alphabets: Sequence[str] = TEST_ALPHABETS, num_tasks: int = 5, num_goal_tasks: int = 2,
                      ways: int = 5, shots: int = 1, queries: int = 15, rotations: Optional[bool] = None,
                      image_size: int = 28) -> MixtureFamilies:
    """Omniglot alphabets as task families, over one alphabet-level split (see `tfmeta.data.omniglot_tasks`;
    rotations default to the training split only)."""
    classes = alphabet_split(split, path, test_alphabets, image_size)
    return group_families(classes, num_tasks=num_tasks, num_goal_tasks=num_goal_tasks, ways=ways, shots=shots,
                          queries=queries, rotations=split == "train" if rotations is None else rotations)


class AffineFamilies(TaskFamilies):
    """Families defined by a sampled subset of the random affine augmentation's parameters (the MALTML paper's
    proposal for image families): each family draws a rotation centre in [0, 360) degrees and a scale centre,
    and its images are rotated within ±`rotation_width`/2 of that centre, scaled within ±`scale_width`/2 of
    it and translated by up to `translation` of the image size. Tasks are drawn from `tasks` (without
    augmentation of its own).

    Args:
      tasks: the episodes to transform, e.g. `omniglot_tasks(...)`.
      num_tasks, num_goal_tasks: L and G.
      scale: the range of the scale centres (the multi-shot protocol's [0.8, 1.2] by default).
      scale_width, rotation_width, translation: how much the images of one family vary.
    """

    def __init__(self, tasks: FewShotTasks, num_tasks: int = 5, num_goal_tasks: int = 2,
                 scale: Sequence[float] = (0.8, 1.2), scale_width: float = 0.1, rotation_width: float = 30.0,
                 translation: float = 0.1):
        super().__init__(num_tasks, num_goal_tasks)
        if not isinstance(tasks, FewShotTasks) or tasks.augmentation is not None:
            raise ValueError("`tasks` must be FewShotTasks without an augmentation of its own: the family draws it.")
        low, high = (float(s) for s in scale)
        if not 0 < low <= high or not 0 <= scale_width <= high - low:
            raise ValueError(f"`scale` must be a range (low, high) with 0 < low <= high, and `scale_width` in "
                             f"[0, high - low]; got {scale} and {scale_width}.")
        if not 0 <= rotation_width <= 360 or not 0 <= translation < 1:
            raise ValueError(f"`rotation_width` must lie in [0, 360] and `translation` in [0, 1); got "
                             f"{rotation_width} and {translation}.")
        self.tasks = tasks
        self.scale, self.scale_width = (low, high), float(scale_width)
        self.rotation_width, self.translation = float(rotation_width), float(translation)

    def sample(self, seed, num_tasks):
        task_seed, centre_seed, image_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
        per_family = self.num_tasks + self.num_goal_tasks
        episodes = self.tasks.sample(task_seed, num_tasks * per_family)
        half = self.scale_width / 2
        centres = tf.random.stateless_uniform([num_tasks, 2], centre_seed)
        scale_centre = self.scale[0] + half + centres[:, 0] * (self.scale[1] - self.scale[0] - 2 * half)
        angle_centre = centres[:, 1] * 360.0
        x = tf.concat([episodes["support_x"], episodes["query_x"]], axis=1)  # [families·(L+G), examples, H, W, C]
        per_image = tf.shape(x)[1] * per_family
        noise = tf.random.stateless_uniform([num_tasks, per_image, 4], image_seed, -1.0, 1.0)
        scale = tf.reshape(scale_centre[:, None] + half * noise[..., 0], [-1])
        angle = tf.reshape(angle_centre[:, None] + self.rotation_width / 2 * noise[..., 1], [-1])
        shift = tf.reshape(self.translation * noise[..., 2:], [-1, 2])
        x = affine(x, scale, angle, shift)
        shots = episodes["support_x"].shape[1]
        episodes = dict(episodes, support_x=x[:, :shots], query_x=x[:, shots:])
        split = self.num_tasks
        episodes = {k: tf.reshape(v, [num_tasks, per_family, *v.shape[1:]]) for k, v in episodes.items()}
        return {**{k: v[:, :split] for k, v in episodes.items()},
                **{f"goal_{k}": v[:, split:] for k, v in episodes.items()}}
