"""Episodic data: labelled images grouped by class, N-way K-shot episode sampling, augmentation, Omniglot, and image
task families."""

from tfmeta.data.augment import RandomAffine
from tfmeta.data.classes import (ClassImages, ImagePreprocessing, from_arrays, from_dataset, from_directory,
                                 from_image_folder, from_tfds)
from tfmeta.data.families import AffineFamilies, group_families, omniglot_families
from tfmeta.data.few_shot import FewShotTasks, rotate90
from tfmeta.data.multi_shot import MULTI_SHOT_TEST_ALPHABETS, GroupTasks, omniglot_alphabet_tasks
from tfmeta.data.omniglot import (TEST_ALPHABETS, data_dir, load_omniglot, load_omniglot_tfds, omniglot_preprocessing,
                                  omniglot_tasks)

__all__ = ["MULTI_SHOT_TEST_ALPHABETS", "TEST_ALPHABETS", "AffineFamilies", "ClassImages", "FewShotTasks", "GroupTasks",
           "ImagePreprocessing", "RandomAffine", "data_dir", "from_arrays", "from_dataset", "from_directory",
           "from_image_folder", "from_tfds", "group_families", "load_omniglot", "load_omniglot_tfds",
           "omniglot_alphabet_tasks", "omniglot_families", "omniglot_preprocessing", "omniglot_tasks", "rotate90"]
