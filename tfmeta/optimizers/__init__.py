"""Learned optimizers: distributions of optimisation problems and the meta-training of update rules on them
(`tfmeta.CoordinatewiseLSTM` is the rule; `OptimizerTraining` meta-trains it; `LearnedOptimizer` trains any Keras
model with it)."""

from tfmeta.optimizers.evaluation import loss_curves, tune_learning_rate
from tfmeta.optimizers.keras_optimizer import LearnedOptimizer, load_rule, save_rule
from tfmeta.optimizers.policy_training import PolicyTraining
from tfmeta.optimizers.problems import MnistConv, MnistMLP, OptimizationProblems, Quadratics
from tfmeta.optimizers.training import OptimizerTraining, meta_train

__all__ = ["LearnedOptimizer", "MnistConv", "MnistMLP", "OptimizationProblems", "OptimizerTraining", "PolicyTraining",
           "Quadratics", "load_rule", "loss_curves", "meta_train", "save_rule", "tune_learning_rate"]
