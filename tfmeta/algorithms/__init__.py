"""Meta-learning algorithms, each a `MetaLearner` that states only how a task's meta-gradient is computed."""

from tfmeta.algorithms.maml import MAML
from tfmeta.algorithms.reptile import Reptile

__all__ = ["MAML", "Reptile"]
