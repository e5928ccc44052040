"""A gin-configured learned-optimizer experiment: meta-train a rule, tune the hand-designed baselines' learning
rates on validation problems, and compare loss curves on held-out test problems (`tools/learned_optimizer_results.py`
runs it)."""

from __future__ import annotations

import os
from typing import Callable, Optional, Sequence, Union

import gin
import numpy as np

from tfmeta import evaluation
from tfmeta.optimizers import evaluation as curves_lib
from tfmeta.optimizers.keras_optimizer import load_rule
from tfmeta.optimizers.policy_training import PolicyTraining
from tfmeta.optimizers.problems import OptimizationProblems
from tfmeta.optimizers.training import OptimizerTraining, meta_train
from tfmeta.update_rules import InnerAdam, InnerRMSprop, Sgd

BASELINES: dict[str, Callable] = {
    "SGD": lambda rate: Sgd(rate),
    "SGD with momentum 0.9": lambda rate: Sgd(rate, momentum=0.9),
    "RMSprop": lambda rate: InnerRMSprop(rate),
    "Adam": lambda rate: InnerAdam(rate),
}
# The baselines' grid: log-spaced, three points per decade from 1e-4 to 10.
LEARNING_RATES = tuple(float(f"{10 ** (k / 3):.3g}") for k in range(-12, 4))


@gin.configurable
class OptimizerExperiment:
    """Meta-trains `trainer`'s rule (an `OptimizerTraining` or a `PolicyTraining`) for `num_steps` meta-steps
    (`meta_train`, resumable), tunes each baseline's
    learning rate over `learning_rates` on `tune_problems` validation problems of `validation_problems`, and
    records the loss curves of the learned rule and of the tuned baselines on `eval_num_problems` test problems of
    `test_problems` over `eval_steps` steps (the same problems for every optimizer).

    `validation_problems` and `test_problems` default to `trainer.problems`; their problems come from other seed
    streams than meta-training's (`tfmeta.optimizers.evaluation`), and for MNIST they should use the validation and
    test images (`MnistMLP(split=...)`), so that the three sets are disjoint.
    """

    def __init__(self, trainer: Callable[[], Union[OptimizerTraining, PolicyTraining]] = gin.REQUIRED,
                 num_steps: int = 10000, steps_per_epoch: int = 100, learning_rate: float = 1e-3,
                 validation_problems: Optional[Callable[[], OptimizationProblems]] = None,
                 test_problems: Optional[Callable[[], OptimizationProblems]] = None,
                 learning_rates: Sequence[float] = LEARNING_RATES, tune_problems: int = 20,
                 eval_num_problems: int = 100, eval_steps: int = 100):
        self.trainer = trainer()
        self.num_steps, self.steps_per_epoch, self.learning_rate = num_steps, steps_per_epoch, learning_rate
        self.validation_problems = validation_problems() if validation_problems else self.trainer.problems
        self.test_problems = test_problems() if test_problems else self.trainer.problems
        self.learning_rates = [float(r) for r in learning_rates]
        self.tune_problems, self.eval_num_problems, self.eval_steps = tune_problems, eval_num_problems, eval_steps

    def run(self, model_dir: str, results_dir: Optional[str] = None) -> dict:
        """Runs (or resumes) the experiment; writes and returns `results.json` in `results_dir` (default
        `model_dir`): per optimizer, its learning rate, the mean curve with its 95% CI, and the final loss as log10
        of the mean over problems (the reference code's "log mean final error") and as the mean of log10 with its
        CI. A finished meta-training is not repeated, so a rule trained once can be evaluated on other problems
        (the paper's generalisation tests) with other `results_dir`s."""
        rule = load_rule(meta_train(self.trainer, model_dir, self.num_steps, self.steps_per_epoch,
                                    self.learning_rate))
        results = {"meta_steps": self.num_steps, "learning_rates": self.learning_rates, "optimizers": {}}
        rules = {f"learned ({type(rule).__name__})": (rule, None)}
        for name, make in BASELINES.items():
            rate, finals = curves_lib.tune_learning_rate(make, self.validation_problems, self.learning_rates,
                                                         self.tune_problems, self.eval_steps)
            rules[name] = (make(rate), {"learning_rate": rate, "validation_final_losses": finals})
        for name, (optimizer, tuning) in rules.items():
            curves = curves_lib.loss_curves(optimizer, self.test_problems, self.eval_num_problems, self.eval_steps)
            logs = np.log10(curves[:, -1])
            stats = [evaluation.mean_confidence_interval(curves[:, k]) for k in range(curves.shape[1])]
            mean_log, ci_log = evaluation.mean_confidence_interval(logs)
            results["optimizers"][name] = {
                **(tuning or {}), "mean": [m for m, _ in stats], "ci95": [c for _, c in stats],
                "log10_mean_final_loss": float(np.log10(curves[:, -1].mean())),
                "mean_log10_final_loss": mean_log, "mean_log10_final_loss_ci95": ci_log}
        os.makedirs(results_dir or model_dir, exist_ok=True)
        evaluation.write_json(os.path.join(results_dir or model_dir, "results.json"), results)
        return results
