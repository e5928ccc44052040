"""Figures of evaluation results (matplotlib, imported on first use, non-interactive backend)."""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import numpy as np
import tensorflow as tf


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@contextlib.contextmanager
def figure(path: str, rows: int = 1, columns: int = 1, **subplots_kwargs) -> Iterator[tuple]:
    """`with figure(path, ...) as (fig, axes):` a figure and its axes (`plt.subplots`), laid out, written to `path`
    (PNG, 120 dpi) and closed when the block ends; closed without writing if the block raises."""
    plt = _pyplot()
    fig, axes = plt.subplots(rows, columns, **subplots_kwargs)
    try:
        yield fig, axes
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)


def plot_adaptation_curve(curve: dict, path: str, label: str = "query loss") -> None:
    """Query loss against inner steps with its 95% confidence band (from `evaluation.adaptation_curve`)."""
    steps = np.asarray(curve["steps"])
    mean, ci = np.asarray(curve["loss"]["mean"]), np.asarray(curve["loss"]["ci95"])
    with figure(path, figsize=(5, 3.5)) as (_, ax):
        ax.plot(steps, mean, marker="o")
        ax.fill_between(steps, mean - ci, mean + ci, alpha=0.3)
        ax.set_xlabel("inner steps")
        ax.set_ylabel(label)
        ax.set_title(f"{curve['num_tasks']} held-out tasks (mean, 95% CI)")
        ax.grid(alpha=0.3)


def plot_reliability(report: dict, path: str, label: str = "") -> None:
    """A reliability diagram from `evaluation.calibration_report`: accuracy against confidence per bin, the
    diagonal of perfect calibration, and the ECE with its 95% bootstrap interval in the title."""
    bins = report["reliability"]
    edges, accuracy = np.asarray(bins["edges"]), np.asarray(bins["accuracy"], dtype=float)
    centres, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
    with figure(path, figsize=(4, 4)) as (_, ax):
        ax.bar(centres, np.nan_to_num(accuracy), width=width, edgecolor="k", alpha=0.7, label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="calibrated")
        ax.set_xlabel("confidence (predicted class)")
        ax.set_ylabel("accuracy")
        low, high = report["ece_ci95"]
        ax.set_title(f"{label} ECE {100 * report['ece']:.1f}% [{100 * low:.1f}, {100 * high:.1f}]".strip(), fontsize=9)
        ax.legend(fontsize=7)


def plot_sine_adaptation(meta_learner, tasks, path: str, seed: int, steps: Sequence[int] = (1, 10),
                         num_tasks: int = 4) -> None:
    """A few held-out sine tasks: true curve, support points, predictions before and after adaptation
    (as in Figure 2 of the MAML paper). A learner whose adapted model predicts a distribution (EMAML, BMAML) is
    drawn as its predictive mean with a band of two standard deviations after the last of `steps`, and its
    particles' functions in grey."""
    episodes, parameters = tasks.sample_with_parameters(tf.constant([seed, 0], tf.int64), num_tasks)
    grid = np.linspace(*tasks.input_range, 200, dtype=np.float32)[:, None]
    truth = tasks.function(parameters, tf.constant(np.broadcast_to(grid, (num_tasks, *grid.shape)))).numpy()
    before = np.asarray(meta_learner(grid, training=False))
    with figure(path, 1, num_tasks, figsize=(4 * num_tasks, 3.2), squeeze=False) as (_, axes):
        for i, ax in enumerate(axes[0]):
            ax.plot(grid, truth[i], "k-", label="ground truth")
            ax.plot(grid, before, ":", label="before adaptation")
            for k in steps:
                adapted = meta_learner.adapt(episodes["support_x"][i], episodes["support_y"][i], steps=k,
                                             **_samples_kwargs(meta_learner))
                prediction = adapted(grid, training=False)
                label = f"after {k} step{'s' * (k != 1)}"
                if not isinstance(prediction, dict):
                    ax.plot(grid, np.asarray(prediction), "--", label=label)
                    continue
                mean, stddev = np.asarray(prediction["mean"])[:, 0], np.asarray(prediction["stddev"])[:, 0]
                line = ax.plot(grid[:, 0], mean, "--", label=f"{label} (mean ± 2 sd)")[0]
                if k == steps[-1]:
                    ax.fill_between(grid[:, 0], mean - 2 * stddev, mean + 2 * stddev, color=line.get_color(),
                                    alpha=0.2)
                    ax.plot(grid[:, 0], np.asarray(prediction["samples"])[:, :, 0], color="grey", lw=0.5,
                            alpha=0.5)
            ax.plot(episodes["support_x"][i], episodes["support_y"][i], "^", color="tab:purple", label="support")
            ax.set_xlabel("x")
        axes[0][0].legend(fontsize=7)


def _samples_kwargs(meta_learner) -> dict:
    from tfmeta.algorithms import ParticleLearner

    return {"return_samples": True} if isinstance(meta_learner, ParticleLearner) else {}


def plot_sampled_functions(methods: dict, tasks, path: str, seed: int, num_tasks: int = 4,
                           stddevs: dict | None = None) -> None:
    """Rows of methods, columns of the same held-out tasks: the true function, the support points, each sampled
    adapted function (the particles or posterior samples, grey) and the predictive mean with a band of two
    standard deviations (compare the regression figures of the PLATIPUS paper). `methods` maps a label to a
    meta-learner; a point estimate (MAML) is drawn with the band of its fixed noise level, `stddevs[label]`."""
    episodes, parameters = tasks.sample_with_parameters(tf.constant([seed, 0], tf.int64), num_tasks)
    grid = np.linspace(*tasks.input_range, 200, dtype=np.float32)[:, None]
    truth = tasks.function(parameters, tf.constant(np.broadcast_to(grid, (num_tasks, *grid.shape)))).numpy()
    rows = len(methods)
    with figure(path, rows, num_tasks, figsize=(3.2 * num_tasks, 2.6 * rows), squeeze=False, sharey=True) as (
            _, axes):
        for row, (label, meta_learner) in enumerate(methods.items()):
            for i, ax in enumerate(axes[row]):
                adapted = meta_learner.adapt(episodes["support_x"][i], episodes["support_y"][i],
                                             **_samples_kwargs(meta_learner))
                prediction = adapted(grid, training=False)
                if isinstance(prediction, dict):
                    mean, stddev = np.asarray(prediction["mean"])[:, 0], np.asarray(prediction["stddev"])[:, 0]
                    ax.plot(grid[:, 0], np.asarray(prediction["samples"])[:, :, 0], color="grey", lw=0.6, alpha=0.6)
                else:
                    mean = np.asarray(prediction)[:, 0]
                    stddev = np.full_like(mean, (stddevs or {}).get(label, 0.0))
                ax.plot(grid[:, 0], truth[i][:, 0], "k-", lw=1.2)
                ax.plot(grid[:, 0], mean, "-", color="tab:blue", lw=1.2)
                ax.fill_between(grid[:, 0], mean - 2 * stddev, mean + 2 * stddev, color="tab:blue", alpha=0.15)
                ax.plot(episodes["support_x"][i], episodes["support_y"][i], "^", color="tab:purple")
                kind = "line" if parameters.get("line") is not None and float(parameters["line"][i]) else "sine"
                ax.set_title(f"{label}: task {i + 1} ({kind})", fontsize=8)
                ax.set_ylim(-7, 7)
