"""Inner-loop update rules: composable transformations of gradients into parameter updates (optax-style).

A rule sees the fast parameters of one task; its meta-parameters are Keras variables owned by the
meta-learner. See `base.UpdateRule` for the interface.
"""

from tfmeta.update_rules.base import Chain, ClipByGlobalNorm, InnerAdam, InnerRMSprop, Sgd, UpdateRule
from tfmeta.update_rules.learned_sgd import LSLR, LearnedSgd, MetaSGD
from tfmeta.update_rules.lstm import CoordinatewiseLSTM, MetaLearnerLSTM
from tfmeta.update_rules.masks import MTNetMask
from tfmeta.update_rules.meta_curvature import MetaCurvature
from tfmeta.update_rules.policy import PolicyOptimizer
from tfmeta.update_rules.svgd import Svgd

__all__ = ["LSLR", "Chain", "ClipByGlobalNorm", "CoordinatewiseLSTM", "InnerAdam", "InnerRMSprop", "LearnedSgd",
           "MTNetMask", "MetaCurvature", "MetaLearnerLSTM", "MetaSGD", "PolicyOptimizer", "Sgd", "Svgd", "UpdateRule"]
