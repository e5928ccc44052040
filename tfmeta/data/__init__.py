"""Episodic data: labelled images grouped by class, N-way K-shot episode sampling, augmentation, Omniglot."""

from tfmeta.data.augment import RandomAffine
from tfmeta.data.classes import (ClassImages, from_arrays, from_dataset, from_directory, from_image_folder,
                                 from_tfds)
from tfmeta.data.few_shot import FewShotTasks, rotate90
from tfmeta.data.omniglot import TEST_ALPHABETS, data_dir, load_omniglot, load_omniglot_tfds, omniglot_tasks

__all__ = ["TEST_ALPHABETS", "ClassImages", "FewShotTasks", "RandomAffine", "data_dir", "from_arrays",
           "from_dataset", "from_directory", "from_image_folder", "from_tfds", "load_omniglot", "load_omniglot_tfds",
           "omniglot_tasks", "rotate90"]
