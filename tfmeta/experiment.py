"""A gin-configured meta-training run: what `tools/train.py` and `tools/evaluate.py` execute.

Training checkpoints the meta-learner and its optimizer at the end of every epoch. A restarted run restores
the last checkpoint and continues the episode stream at the next batch (episodes depend only on the seed and
their index), so a run killed and restarted ends exactly as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Callable, Optional, Sequence, Union

import gin
import keras
import numpy as np
import tensorflow as tf

from tfmeta import distribute, evaluation
from tfmeta.episodic import EpisodicLearner
from tfmeta.tasks import TaskDistribution


class _CheckpointEachEpoch(keras.callbacks.Callback):
    """Saves a checkpoint after every epoch whose loss is finite."""

    def __init__(self, manager: tf.train.CheckpointManager):
        super().__init__()
        self.manager = manager

    def on_epoch_end(self, epoch, logs=None):
        if np.isfinite((logs or {}).get("loss", np.nan)):
            self.manager.save(checkpoint_number=epoch + 1)


@gin.configurable
class Experiment:
    """Meta-training and evaluation of one meta-learner on one task distribution.

    Args:
      meta_learner: a callable returning the meta-learner, an `EpisodicLearner` (in gin: `@MAML`, configured
        with `MAML.*`).
      tasks: the meta-training task distribution.
      eval_tasks: the held-out task distribution (default: `tasks`, drawn with other seeds).
      optimizer: a callable returning the Keras optimizer of the outer loop.
      meta_batch_size: tasks per meta-step.
      num_steps: meta-steps in total; a multiple of `steps_per_epoch`; 0 evaluates the initialisation as built
        (a baseline without meta-training).
      steps_per_epoch: meta-steps between checkpoints, progress lines and validation.
      seed: seed of the learner's initialisation and of the training episodes.
      validation_tasks: held-out tasks evaluated after every epoch (`val_*` logs).
      eval_num_tasks, eval_steps, eval_seed: the final evaluation: query loss after 0..`eval_steps` inner
        steps on `eval_num_tasks` held-out tasks drawn with `eval_seed` (validation uses `eval_seed + 1`).
      eval_every: score the query every `eval_every` inner steps of the final evaluation (and after the last):
        on long adaptations (100 steps of multi-shot Omniglot) scoring every step costs more than adapting.
      eval_batch_size: held-out tasks evaluated per call (lower it for learners whose evaluation memory
        grows fast with the tasks, e.g. Relation Networks on 20-way episodes).
      jit_compile: passed to `compile`; "auto" means no XLA on CPU. XLA speeds up small learners (1.5x on
        the sine MLP) but slows down the conv4 meta-step 45x on CPU (docs/performance.md).
      steps_per_execution: meta-steps per call of the compiled train function (a divisor of
        `steps_per_epoch`); for small learners Keras' per-step overhead dominates, and 50 makes the sine
        meta-step 2-4x faster. NaN checks and progress updates happen once per execution.
      verbose: `fit`'s progress output (1: progress bar, 2: a line per epoch; "auto": a progress bar on a
        terminal, lines otherwise).
      strategy, tpu, devices: the `tf.distribute` strategy of meta-training (`tfmeta.distribute.make_strategy`:
        "default", "one_device", "mirrored", "multi_worker_mirrored", "tpu"), which splits each meta-batch of
        tasks across its replicas (`meta_batch_size` must be a multiple of their number); XLA is off under a
        strategy with several replicas (it fails there on TF 2.21).
    """

    def __init__(
        self,
        meta_learner: Callable[[], EpisodicLearner] = gin.REQUIRED,
        tasks: TaskDistribution = gin.REQUIRED,
        eval_tasks: Optional[TaskDistribution] = None,
        optimizer: Callable[[], keras.optimizers.Optimizer] = keras.optimizers.Adam,
        meta_batch_size: int = 25,
        num_steps: int = 70_000,
        steps_per_epoch: int = 1000,
        seed: int = 0,
        validation_tasks: int = 100,
        eval_num_tasks: int = 600,
        eval_steps: int = 10,
        eval_seed: int = 1_000_000,
        eval_batch_size: int = 100,
        eval_every: int = 1,
        jit_compile: Union[bool, str] = "auto",
        steps_per_execution: int = 1,
        verbose: Union[int, str] = "auto",
        strategy: str = "default",
        tpu: Optional[str] = None,
        devices: Optional[Sequence[str]] = None,
    ):
        if num_steps < 0 or steps_per_epoch < 1 or num_steps % steps_per_epoch:
            raise ValueError(
                f"`num_steps` ({num_steps}) must be a non-negative multiple of `steps_per_epoch` ({steps_per_epoch})."
            )
        if steps_per_execution < 1 or steps_per_epoch % steps_per_execution:
            raise ValueError(
                f"`steps_per_execution` ({steps_per_execution}) must be a positive divisor of `steps_per_epoch` "
                f"({steps_per_epoch})."
            )
        if isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 1:
            raise ValueError(f"`eval_every` must be a positive integer; got {eval_every!r}.")
        if seed in (eval_seed, eval_seed + 1):
            raise ValueError(f"`seed` ({seed}) must differ from `eval_seed` and `eval_seed + 1` ({eval_seed}).")
        self.meta_learner = meta_learner
        self.tasks = tasks
        self.eval_tasks = tasks if eval_tasks is None else eval_tasks
        self.optimizer = optimizer
        self.meta_batch_size = meta_batch_size
        self.num_steps = num_steps
        self.steps_per_epoch = steps_per_epoch
        self.seed = seed
        self.validation_tasks = validation_tasks
        self.eval_num_tasks = eval_num_tasks
        self.eval_steps = eval_steps
        self.eval_seed = eval_seed
        self.eval_batch_size = eval_batch_size
        self.eval_every = eval_every
        self.jit_compile = jit_compile
        self.steps_per_execution = steps_per_execution
        self.verbose = verbose
        if strategy not in distribute.STRATEGIES:
            raise ValueError(f"`strategy` must be one of {distribute.STRATEGIES}; got {strategy!r}.")
        self.strategy, self.tpu, self.devices = strategy, tpu, devices

    def distribution(self) -> tf.distribute.Strategy:
        """The run's `tf.distribute` strategy (created once per process)."""
        return distribute.make_strategy(self.strategy, self.tpu, self.devices)

    def build(self) -> EpisodicLearner:
        """The compiled meta-learner, with its optimizer's variables created (so checkpoints can restore them),
        in the scope of the run's strategy."""
        strategy = self.distribution()
        replicas = strategy.num_replicas_in_sync
        if self.meta_batch_size % replicas:
            raise ValueError(f"`meta_batch_size` ({self.meta_batch_size}) must be a multiple of the strategy's "
                             f"{replicas} replicas: each replica takes an equal share of the tasks.")
        with strategy.scope():
            meta_learner = self.meta_learner()
            meta_learner.compile(optimizer=self.optimizer(), steps_per_execution=self.steps_per_execution,
                                 jit_compile=self.jit_compile if replicas == 1 else False)
            meta_learner.optimizer.build(meta_learner.meta_variables)
        return meta_learner

    def checkpoints(self, meta_learner: EpisodicLearner, model_dir: str) -> tf.train.CheckpointManager:
        # The meta-learner's per-task seed stream (MT-Net masks, WarpGrad's buffer order) is not a Keras weight.
        seeds = {"task_seeds": meta_learner.task_seeds.state} if hasattr(meta_learner, "task_seeds") else {}
        checkpoint = tf.train.Checkpoint(meta_learner=meta_learner, optimizer=meta_learner.optimizer, **seeds)
        return tf.train.CheckpointManager(checkpoint, os.path.join(model_dir, "checkpoints"), max_to_keep=3)

    def train(self, model_dir: str) -> dict:
        """Meta-trains (resuming from the last checkpoint in `model_dir`), evaluates, writes `metrics.json`."""
        keras.utils.set_random_seed(self.seed)
        meta_learner = self.build()
        manager = self.checkpoints(meta_learner, model_dir)
        if manager.latest_checkpoint:
            manager.checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        done = int(meta_learner.meta_step())
        if done:
            print(f"Resuming from {manager.latest_checkpoint} after {done} meta-steps.")
        validation = None
        if self.validation_tasks:
            validation = self.eval_tasks.dataset(self.validation_tasks, seed=self.eval_seed + 1, num_batches=1)
        history = meta_learner.fit(
            self.tasks.dataset(self.meta_batch_size, seed=self.seed, start=done),
            epochs=self.num_steps // self.steps_per_epoch,
            initial_epoch=done // self.steps_per_epoch,
            steps_per_epoch=self.steps_per_epoch,
            validation_data=validation,
            callbacks=[
                keras.callbacks.TerminateOnNaN(),
                _CheckpointEachEpoch(manager),
                keras.callbacks.TensorBoard(os.path.join(model_dir, "logs")),
            ],
            verbose=(1 if sys.stdout.isatty() else 2) if self.verbose == "auto" else self.verbose,
            shuffle=False,
        )
        steps = int(meta_learner.meta_step())
        if meta_learner.stop_training and steps < self.num_steps:
            raise FloatingPointError(
                f"meta-training stopped at meta-step {steps}: the loss is not finite. The last good checkpoint "
                f"is {manager.latest_checkpoint}; lower the learning rates or inspect the data."
            )
        results = {
            "meta_steps": steps,
            "train": {k: float(v[-1]) for k, v in history.history.items()},
            "eval": summarize(self.evaluate(meta_learner)),
        }
        with open(os.path.join(model_dir, "metrics.json"), "w") as f:
            json.dump(results, f, indent=2)
        return results

    def restore(self, model_dir: str) -> EpisodicLearner:
        """The meta-learner as of the last checkpoint in `model_dir`."""
        meta_learner = self.build()
        manager = self.checkpoints(meta_learner, model_dir)
        if not manager.latest_checkpoint:
            raise FileNotFoundError(f"no checkpoint in {os.path.join(model_dir, 'checkpoints')}: train first.")
        manager.checkpoint.restore(manager.latest_checkpoint).assert_existing_objects_matched()
        return meta_learner

    def evaluate(self, meta_learner: EpisodicLearner) -> dict:
        """The adaptation curve on the held-out tasks (see `evaluation.adaptation_curve`)."""
        return evaluation.adaptation_curve(
            meta_learner, self.eval_tasks, num_tasks=self.eval_num_tasks, steps=self.eval_steps, seed=self.eval_seed,
            batch_size=self.eval_batch_size, at_steps=sorted({*range(0, self.eval_steps, self.eval_every),
                                                              self.eval_steps}),
        )


def summarize(curve: dict) -> dict:
    """An adaptation curve without its per-task values."""
    drop = lambda entry: {k: v for k, v in entry.items() if k != "per_task"}  # noqa: E731
    return {name: drop(entry) if isinstance(entry, dict) else entry for name, entry in curve.items()}
