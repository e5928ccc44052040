"""tfmeta: meta-learning ("learning to learn") for TensorFlow and Keras 3.

Pipeline: a task distribution (`tfmeta.tasks`) yields batches of episodes as a `tf.data.Dataset`; a
`MetaLearner` (a `keras.Model`, e.g. `MAML` or `Reptile`) meta-trains any Keras learner on them with `fit`,
reports pre/post-adaptation metrics with `evaluate`, and returns an adapted Keras model with `adapt`.
"""

import importlib
import os

# TensorFlow turns its oneDNN kernels on by default only on some Intel CPUs; elsewhere (e.g. AMD EPYC with AVX2)
# its own kernels run meta-steps 1.5x slower (docs/performance.md). Only effective when tfmeta is imported before
# TensorFlow; an explicit TF_ENABLE_ONEDNN_OPTS wins.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

from tfmeta import data, distribute, episodes, kernels, layers, likelihoods, metric, models, tasks, warp
from tfmeta.adapted import TransductiveModel
from tfmeta.algorithms import (ABML, BMAML, EMAML, IMAML, MALTML, MAML, PLATIPUS, ContinualWarpGrad, Leap, Reptile,
                               WarpGrad)
from tfmeta.episodic import EpisodicLearner
from tfmeta.inner_loop import Adaptation, inner_loop, inner_step
from tfmeta.meta_learner import MetaLearner
from tfmeta.metric import MatchingNetwork, MetricLearner, PrototypicalNetwork, RelationNetwork
from tfmeta.partition import Partition
from tfmeta.registry import register
from tfmeta.update_rules import (LSLR, Chain, ClipByGlobalNorm, CoordinatewiseLSTM, InnerAdam, LearnedSgd,
                                 MetaCurvature, MetaLearnerLSTM, MetaSGD, MTNetMask, PolicyOptimizer, Sgd, Svgd,
                                 UpdateRule)

__version__ = "0.1.0"
# Imported on first use: `tfmeta.export`, `tfmeta.evaluation`, `tfmeta.calibration` (TensorFlow Probability) and
# `tfmeta.plotting` (matplotlib) cost import time.
_LAZY_MODULES = ("calibration", "evaluation", "experiment", "export", "plotting")


def __getattr__(name: str):
    if name in _LAZY_MODULES:
        return importlib.import_module(f"tfmeta.{name}")
    raise AttributeError(f"module 'tfmeta' has no attribute {name!r}")


__all__ = [
    "ABML",
    "BMAML",
    "EMAML",
    "PLATIPUS",
    "Svgd",
    "IMAML",
    "likelihoods",
    "MALTML",
    "ContinualWarpGrad",
    "Leap",
    "WarpGrad",
    "warp",
    "LSLR",
    "CoordinatewiseLSTM",
    "MetaLearnerLSTM",
    "PolicyOptimizer",
    "MAML",
    "LearnedSgd",
    "MTNetMask",
    "MetaCurvature",
    "MetaSGD",
    "Adaptation",
    "inner_step",
    "register",
    "InnerAdam",
    "Chain",
    "ClipByGlobalNorm",
    "MetaLearner",
    "EpisodicLearner",
    "MetricLearner",
    "PrototypicalNetwork",
    "MatchingNetwork",
    "RelationNetwork",
    "Partition",
    "Reptile",
    "Sgd",
    "UpdateRule",
    "TransductiveModel",
    "calibration",
    "data",
    "episodes",
    "distribute",
    "evaluation",
    "experiment",
    "export",
    "inner_loop",
    "layers",
    "metric",
    "models",
    "plotting",
    "tasks",
]
