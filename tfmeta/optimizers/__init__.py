"""Learned optimizers: distributions of optimisation problems and the meta-training of update rules on them
(`tfmeta.CoordinatewiseLSTM` is the rule; `OptimizerTraining` meta-trains it; `LearnedOptimizer` trains any Keras
model with it)."""

from tfmeta.optimizers.keras_optimizer import LearnedOptimizer, load_rule, save_rule
from tfmeta.optimizers.problems import OptimizationProblems, Quadratics
from tfmeta.optimizers.training import OptimizerTraining

__all__ = ["LearnedOptimizer", "OptimizationProblems", "OptimizerTraining", "Quadratics", "load_rule", "save_rule"]
