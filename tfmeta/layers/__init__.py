"""Keras layers for meta-learning.

Layers with `meta_only = True` (T-Nets' transforms, MAML++'s per-step batch norm) are meta-learned but never
adapted by an inner loop: `tfmeta.Partition` keeps their variables slow.
"""

from tfmeta.layers.batch_norm import (BatchNormalization, batch_statistics_layers, exact_batch_norm,
                                      freeze_batch_statistics, inexact_batch_norms, warn_inexact_batch_norm)
from tfmeta.layers.per_step_batch_norm import PerStepBatchNormalization
from tfmeta.layers.transforms import LinearTransform, Offset

__all__ = [
    "BatchNormalization",
    "LinearTransform",
    "Offset",
    "PerStepBatchNormalization",
    "batch_statistics_layers",
    "exact_batch_norm",
    "freeze_batch_statistics",
    "inexact_batch_norms",
    "warn_inexact_batch_norm",
]
