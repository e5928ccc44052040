"""Learned optimizers: distributions of optimisation problems and the meta-training of update rules on them
(`tfmeta.CoordinatewiseLSTM` is the rule; `OptimizerTraining` meta-trains it)."""

from tfmeta.optimizers.problems import OptimizationProblems, Quadratics
from tfmeta.optimizers.training import OptimizerTraining

__all__ = ["OptimizationProblems", "OptimizerTraining", "Quadratics"]
