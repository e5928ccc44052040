"""Keras layers for meta-learning."""

from tfmeta.layers.batch_norm import BatchNormalization, exact_batch_norm, inexact_batch_norms, warn_inexact_batch_norm

__all__ = ["BatchNormalization", "exact_batch_norm", "inexact_batch_norms", "warn_inexact_batch_norm"]
