"""A gin-configured meta-training run: what `tools/train.py` and `tools/evaluate.py` execute.

Training checkpoints the meta-learner, its optimizer and the epoch's running logs after every epoch, every
`checkpoint_interval` seconds and when the process receives SIGTERM (which then stops the run). A restarted run
restores the last checkpoint, possibly from the middle of an epoch, and continues the episode stream at the next
batch (episodes depend only on the seed and their index), so a run killed and restarted ends exactly as an
uninterrupted one, having lost at most the meta-steps since the last checkpoint. Checkpoint files are written
by TensorFlow's `CheckpointManager`, which registers a checkpoint only once its files are complete; JSON
outputs are written to a temporary file and renamed.

A run stops with an error naming what went wrong: a non-finite training loss, a non-finite validation or
evaluation result, or an in-graph check of the data or of the inner loop (`tfmeta.inner_loop.check_finite_loss`).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import threading
import time
from typing import Callable, Optional, Sequence, Union

import gin
import keras
import numpy as np
import tensorflow as tf

from tfmeta import checks
from tfmeta import distribute, evaluation
from tfmeta.episodic import EpisodicLearner
from tfmeta.tasks import TaskDistribution


class TrainingInterrupted(RuntimeError):
    """Training stopped on SIGTERM after saving a checkpoint; running the same command again resumes it."""


def check_failure(error: tf.errors.OpError) -> Optional[str]:
    """The message of the tfmeta run-time check (data, labels, inner-loop losses) that `error` reports, or None
    when it reports something else."""
    for line in error.message.splitlines():
        line = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", line)  # the traced function the op ran in
        if "assertion failed:" in line:
            groups = re.findall(r"\[([^\[\]]*)\]", line.split("assertion failed:", 1)[1])
            if groups and groups[0].startswith("tfmeta:"):  # the inner loop's check: its data are the step, task
                return " ".join(groups)[len("tfmeta: "):]
            return groups[0] if groups else line.strip()
        if "holds NaN or infinite values" in line:
            return line.split(" : Tensor had")[0].strip()
    return None


class _Stop(Exception):
    """Raised by `_Checkpoints` to leave `fit` at once after SIGTERM (no validation of a partial epoch)."""


class _Checkpoints(keras.callbacks.Callback):
    """Saves the run after every epoch, every `interval` seconds and on SIGTERM (then leaves `fit` by raising
    `_Stop`), only while the logs are finite; stops training when an epoch's logs (validation included) are not
    finite. Checkpoints are numbered by meta-step and hold the epoch's running logs, so that a run resumed in the
    middle of an epoch reports the same epoch logs as an uninterrupted one."""

    def __init__(self, manager: tf.train.CheckpointManager, epoch_logs: tf.Variable, interval: float):
        super().__init__()
        self.manager, self.epoch_logs, self.interval = manager, epoch_logs, interval
        self.resume_logs = False  # set when the run resumes in the middle of an epoch
        self.terminate = False  # set by the SIGTERM handler
        self.non_finite: list[str] = []
        self.last_save, self.saved_step = time.monotonic(), None

    def _trackers(self) -> list:
        return [v for tracker in self.model.metrics for v in (tracker.total, tracker.count)]

    def on_epoch_begin(self, epoch, logs=None):
        if self.resume_logs:  # after Keras reset the trackers for the epoch
            for variable, value in zip(self._trackers(), tf.unstack(self.epoch_logs)):
                variable.assign(tf.cast(value, variable.dtype))
            self.resume_logs = False

    def save(self) -> None:
        """Saves a checkpoint at the current meta-step (once per step)."""
        step = int(self.model.meta_step())
        if step != self.saved_step:
            self.epoch_logs.assign(tf.stack([tf.cast(v, tf.float64) for v in self._trackers()]))
            self.manager.save(checkpoint_number=step)
            self.saved_step = step
        self.last_save = time.monotonic()

    def on_train_batch_end(self, batch, logs=None):
        finite = np.isfinite((logs or {}).get("loss", np.nan))
        if finite and not self.model.stop_training and (
                self.terminate or time.monotonic() - self.last_save >= self.interval):
            self.save()  # (a non-finite loss: TerminateOnNaN stops the run, the last checkpoint stays the last good)
        if self.terminate:
            raise _Stop()

    def on_epoch_end(self, epoch, logs=None):
        self.non_finite = [name for name, value in (logs or {}).items() if not np.all(np.isfinite(value))]
        if self.non_finite:
            self.model.stop_training = True
        else:
            self.save()
        if self.terminate:
            raise _Stop()


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
      steps_per_epoch: meta-steps between progress lines and validation (and checkpoints).
      checkpoint_interval: seconds between checkpoints within an epoch (a killed run loses at most this much
        meta-training, or an epoch if that is shorter); SIGTERM also saves one. Under a multi-worker strategy
        only the ends of epochs save (every worker must save at the same step).
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
      intra_op_threads, inter_op_threads: TensorFlow's CPU thread pools (0: TensorFlow's choice), set when the
        experiment is built, which must come before TensorFlow runs any op (the tools set them first thing).
        `tfmeta.distribute.set_thread_pools` says when `intra_op_threads = 1` pays: conv learners with several
        tasks per meta-batch.
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
        checkpoint_interval: float = 300.0,
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
        intra_op_threads: int = 0,
        inter_op_threads: int = 0,
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
        checks.integer(eval_every, "eval_every", minimum=1)
        if not checkpoint_interval > 0:
            raise ValueError(f"`checkpoint_interval` must be a positive number of seconds; got "
                             f"{checkpoint_interval!r}.")
        if seed in (eval_seed, eval_seed + 1):
            raise ValueError(f"`seed` ({seed}) must differ from `eval_seed` and `eval_seed + 1` ({eval_seed}).")
        self.meta_learner = meta_learner
        self.tasks = tasks
        self.eval_tasks = tasks if eval_tasks is None else eval_tasks
        self.optimizer = optimizer
        self.meta_batch_size = meta_batch_size
        self.num_steps = num_steps
        self.steps_per_epoch = steps_per_epoch
        self.checkpoint_interval = float(checkpoint_interval)
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
        distribute.set_thread_pools(intra_op_threads, inter_op_threads)

    def distribution(self) -> tf.distribute.Strategy:
        """The run's `tf.distribute` strategy (created once per process)."""
        return distribute.make_strategy(self.strategy, self.tpu, self.devices)

    def build(self) -> EpisodicLearner:
        """The compiled meta-learner, with its optimizer's variables created (so checkpoints can restore them),
        in the scope of the run's strategy."""
        strategy = self.distribution()
        if self.strategy == "multi_worker_mirrored" and self.steps_per_execution > 1:
            raise ValueError(f"`steps_per_execution` ({self.steps_per_execution}) must be 1 under the "
                             "multi_worker_mirrored strategy: Keras' multi-step loop fails there on TF 2.21 ('You must "
                             "feed a value for placeholder tensor ...while/cond/Placeholder').")
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

    def checkpoints(self, meta_learner: EpisodicLearner, model_dir: str
                    ) -> tuple[tf.train.CheckpointManager, Optional[str], tf.Variable]:
        """The run's checkpoint manager, the checkpoint to resume from (None for a new run) and the variable that
        holds the epoch's running logs. Under a multi-worker strategy every worker restores the chief's checkpoint
        and only the chief writes to `model_dir`; the others write to `model_dir/workers/<index>`."""
        epoch_logs = tf.Variable(tf.zeros([2 * len(meta_learner.metrics)], tf.float64), trainable=False)
        # The meta-learner's per-task seed stream (MT-Net masks, WarpGrad's buffer order) is not a Keras weight.
        seeds = {"task_seeds": meta_learner.task_seeds.state} if hasattr(meta_learner, "task_seeds") else {}
        checkpoint = tf.train.Checkpoint(meta_learner=meta_learner, optimizer=meta_learner.optimizer,
                                         epoch_logs=epoch_logs, **seeds)
        directory = os.path.join(model_dir, "checkpoints")
        latest = tf.train.latest_checkpoint(directory)
        if not self.distribution().extended.should_checkpoint:
            _, worker = distribute.worker(self.distribution())
            directory = os.path.join(model_dir, "workers", str(worker), "checkpoints")
        return tf.train.CheckpointManager(checkpoint, directory, max_to_keep=3), latest, epoch_logs

    def train(self, model_dir: str) -> dict:
        """Meta-trains (resuming from the last checkpoint in `model_dir`), evaluates, writes `metrics.json` (and
        `config.gin`, the operative gin configuration). Raises `TrainingInterrupted` after SIGTERM (a checkpoint
        is saved), `FloatingPointError` when a training, validation or evaluation result is not finite and
        `ValueError` when a run-time check of the data fails."""
        if os.path.exists(model_dir) and not os.path.isdir(model_dir):
            raise ValueError(f"`model_dir` {model_dir!r} is a file, not a directory.")
        keras.utils.set_random_seed(self.seed)
        meta_learner = self.build()
        manager, latest, epoch_logs = self.checkpoints(meta_learner, model_dir)
        chief = self.distribution().extended.should_checkpoint
        if chief:
            os.makedirs(model_dir, exist_ok=True)
            if gin.config_str().strip():
                evaluation.write_text(os.path.join(model_dir, "config.gin"), gin.config_str())
        if latest:
            manager.checkpoint.restore(latest).assert_existing_objects_matched()
        done = int(meta_learner.meta_step())
        if done:
            print(f"Resuming from {latest} after {done} meta-steps.")
        # Under several workers a save reads the metrics' variables with collective ops, which every worker must
        # join at once: only the epochs' ends (the same step everywhere) save.
        interval = np.inf if distribute.multi_worker(self.distribution()) else self.checkpoint_interval
        saver = _Checkpoints(manager, epoch_logs, interval)
        callbacks = [keras.callbacks.TerminateOnNaN(), saver]
        if chief:
            callbacks.append(keras.callbacks.TensorBoard(os.path.join(model_dir, "logs")))
        validation = None
        if self.validation_tasks:
            validation = self.eval_tasks.dataset(self.validation_tasks, seed=self.eval_seed + 1, num_batches=1)
        epochs, first_epoch = self.num_steps // self.steps_per_epoch, done // self.steps_per_epoch
        verbose = (1 if sys.stdout.isatty() else 2) if self.verbose == "auto" else self.verbose
        fit = dict(validation_data=validation, callbacks=callbacks, verbose=verbose, shuffle=False)
        history: dict = {}
        multi_worker = distribute.multi_worker(self.distribution())
        with contextlib.nullcontext() if multi_worker else _sigterm_stops(saver):
            try:
                if done % self.steps_per_epoch:  # resumed in the middle of an epoch: finish it first
                    saver.resume_logs = True
                    partial = meta_learner.fit(
                        self.tasks.dataset(self.meta_batch_size, seed=self.seed, start=done), epochs=first_epoch + 1,
                        initial_epoch=first_epoch, steps_per_epoch=(first_epoch + 1) * self.steps_per_epoch - done,
                        **fit)
                    history, first_epoch = partial.history, first_epoch + 1
                    done = int(meta_learner.meta_step())
                if not meta_learner.stop_training and first_epoch < epochs:
                    history = meta_learner.fit(
                        self.tasks.dataset(self.meta_batch_size, seed=self.seed, start=done), epochs=epochs,
                        initial_epoch=first_epoch, steps_per_epoch=self.steps_per_epoch, **fit).history
            except _Stop:
                raise TrainingInterrupted(
                    f"stopped by SIGTERM at meta-step {int(meta_learner.meta_step())}; the last checkpoint is "
                    f"{manager.latest_checkpoint}: run the same command to resume.") from None
            except tf.errors.InvalidArgumentError as error:
                message = check_failure(error)
                if message is None:
                    raise
                steps = int(meta_learner.meta_step())
                kind = FloatingPointError if "non-finite" in message else ValueError
                raise kind(f"meta-training stopped at about meta-step {steps}: {message}. The last checkpoint is "
                           f"{manager.latest_checkpoint}.") from None
        steps = int(meta_learner.meta_step())
        if not manager.latest_checkpoint and not saver.non_finite:  # num_steps = 0: the baseline as initialised
            saver.set_model(meta_learner)
            saver.save()
        if saver.non_finite:
            names = ", ".join(saver.non_finite)
            raise FloatingPointError(
                f"meta-training stopped at meta-step {steps}: {names} {'is' if len(saver.non_finite) == 1 else 'are'} "
                f"not finite. The last good checkpoint is {manager.latest_checkpoint}; lower the learning rates or "
                "inspect the data.")
        results = {
            "meta_steps": steps,
            "train": {k: float(v[-1]) for k, v in history.items()},
            "eval": summarize(self.evaluate(meta_learner)),
        }
        # Every worker fails on non-finite results; the chief writes them (as nulls) first.
        non_finite = (evaluation.write_json(os.path.join(model_dir, "metrics.json"), results) if chief
                      else evaluation.strict(results)[1])
        if non_finite:
            raise FloatingPointError(
                f"the results after {steps} meta-steps are not finite: {', '.join(non_finite[:6])}"
                f"{' ...' if len(non_finite) > 6 else ''} (written as null in metrics.json, which lists them under "
                "'non_finite').")
        return results

    def restore(self, model_dir: str) -> EpisodicLearner:
        """The meta-learner as of the last checkpoint in `model_dir`."""
        meta_learner = self.build()
        manager, latest, _ = self.checkpoints(meta_learner, model_dir)
        if not latest:
            raise FileNotFoundError(f"no checkpoint in {os.path.join(model_dir, 'checkpoints')}: train first.")
        manager.checkpoint.restore(latest).assert_existing_objects_matched()
        return meta_learner

    def evaluate(self, meta_learner: EpisodicLearner) -> dict:
        """The adaptation curve on the held-out tasks (see `evaluation.adaptation_curve`), with a progress line
        per batch of tasks unless `verbose` is 0; for a classifier with a categorical likelihood also its
        calibration after `eval_steps` steps ("calibration": `evaluation.calibration_report`, pooled ECE with a
        bootstrap interval and reliability bins)."""
        try:
            curve = evaluation.adaptation_curve(
                meta_learner, self.eval_tasks, num_tasks=self.eval_num_tasks, steps=self.eval_steps,
                seed=self.eval_seed, batch_size=self.eval_batch_size,
                at_steps=sorted({*range(0, self.eval_steps, self.eval_every), self.eval_steps}),
                progress=self.verbose != 0)
            likelihood = getattr(meta_learner, "likelihood", None)
            if likelihood is not None and likelihood.classifies and hasattr(meta_learner, "predict_tasks"):
                curve["calibration"] = evaluation.calibration_report(
                    meta_learner, self.eval_tasks, num_tasks=self.eval_num_tasks, steps=self.eval_steps,
                    seed=self.eval_seed, batch_size=self.eval_batch_size)
            return curve
        except tf.errors.InvalidArgumentError as error:
            message = check_failure(error)
            if message is None:
                raise
            kind = FloatingPointError if "non-finite" in message else ValueError
            raise kind(f"the evaluation on held-out tasks failed: {message}.") from None


@contextlib.contextmanager
def _sigterm_stops(saver: _Checkpoints):
    """Within: SIGTERM makes `saver` save a checkpoint and stop training at the next meta-step (in the main
    thread; elsewhere signals cannot be handled, and SIGTERM keeps its default action). Not under several workers,
    where one worker cannot save alone (its save would wait for the others' collectives): there SIGTERM ends the
    worker, and all resume from the last epoch's checkpoint."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request_stop(signum, frame):
        del signum, frame
        saver.terminate = True

    previous = signal.signal(signal.SIGTERM, request_stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def summarize(curve: dict) -> dict:
    """An adaptation curve without its per-task values."""
    drop = lambda entry: {k: v for k, v in entry.items() if k != "per_task"}  # noqa: E731
    return {name: drop(entry) if isinstance(entry, dict) else entry for name, entry in curve.items()}


@gin.configurable
def warm_start(learner: keras.Model, model_dir: str) -> keras.Model:
    """`learner` carrying the learner weights of the last checkpoint of the `Experiment` run in `model_dir` (e.g.
    MAML's meta-learned initialisation, to start PLATIPUS from): the two learners must have the same architecture.
    In gin: `PLATIPUS.learner = @warm_start()`, `warm_start.learner = @mlp()`, `warm_start.model_dir = "..."`."""
    path = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
    if path is None:
        raise FileNotFoundError(f"warm_start: no checkpoint in {os.path.join(model_dir, 'checkpoints')} (`model_dir` "
                                "must be the directory of a tfmeta run, e.g. tools/train.py's --model_dir).")
    status = tf.train.Checkpoint(meta_learner=tf.train.Checkpoint(learner=learner)).read(path)
    try:
        status.assert_existing_objects_matched().expect_partial()  # (the run's optimizer and the rest stay unread)
    except AssertionError as error:
        raise ValueError(f"warm_start: the learner of {path} does not match learner '{learner.name}': "
                         f"{error}") from None
    return learner
