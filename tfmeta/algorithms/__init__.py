"""Meta-learning algorithms, each a `MetaLearner` that states only how a task's meta-gradient is computed.

Variants that differ from MAML only in the inner-loop rule, the partition or the learner (Meta-SGD, LSLR,
Meta-Curvature, MT-Nets, ANIL, BOIL, T-Nets) are MAML with an update rule (`tfmeta.update_rules`), a
`tfmeta.Partition` or a layer (`tfmeta.layers`); `gin_configs/` holds one config per method.
"""

from tfmeta.algorithms.abml import ABML
from tfmeta.algorithms.bmaml import BMAML
from tfmeta.algorithms.continual import ContinualWarpGrad
from tfmeta.algorithms.imaml import IMAML
from tfmeta.algorithms.maltml import MALTML
from tfmeta.algorithms.maml import MAML
from tfmeta.algorithms.particles import EMAML, ParticleLearner, PredictiveModel, SamplingLearner
from tfmeta.algorithms.platipus import PLATIPUS
from tfmeta.algorithms.reptile import Reptile
from tfmeta.algorithms.warpgrad import Leap, WarpGrad

__all__ = ["ABML", "BMAML", "EMAML", "ParticleLearner", "PLATIPUS", "PredictiveModel", "SamplingLearner",
           "ContinualWarpGrad", "IMAML", "MALTML", "MAML", "Leap", "Reptile", "WarpGrad"]
