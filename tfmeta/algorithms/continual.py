"""Continual WarpGrad (Flennerhag et al., 2020, Algorithm 3): warps meta-learned on streams of sub-tasks."""

from __future__ import annotations

from typing import Optional, Sequence

import keras
import tensorflow as tf

from tfmeta import checks
from tfmeta import episodes as episodes_lib
from tfmeta.algorithms.warpgrad import WarpGrad
from tfmeta.episodic import specs
from tfmeta.inner_loop import inner_step
from tfmeta.registry import register


@register
class ContinualWarpGrad(WarpGrad):
    """WarpGrad on streams (e.g. `tfmeta.tasks.ContinualSineTasks`): each task is a sequence of sub-tasks seen
    one after another, one batch per inner step; the warps learn to make such learning not forget.

    At stream step s, in sub-task j(s), the task learner takes a step of the update rule on the step's batch
    and the warp objective is the meta loss after that step, the mean query loss over sub-tasks 0..j(s) (the
    current one and all previous ones). Warp meta-gradients are accumulated over the tasks of a meta-batch,
    which run side by side, and applied every `warp_interval` stream steps (Algorithm 3's continual
    meta-training), so later steps of a stream already see the updated warps. The task parameters start
    every stream from the learner's (fixed) initialisation; update rules must be stateless (e.g. `Sgd`).

    Episodes: streams (`tfmeta.episodes`), `stream_x`/`stream_y` [tasks, steps, batch, ...], `query_x`/`query_y`
    [tasks, sub_tasks, points, ...], with `steps` a multiple of `sub_tasks`.

    Args:
      warp_interval: stream steps between warp updates.
      **kwargs: see `WarpGrad` (objective, update_rule, ...); the initialisation is not meta-learned.
    """

    def __init__(self, learner: keras.Model, warp_interval: int = 20, **kwargs):
        kwargs.setdefault("init_objective", "none")
        if kwargs["init_objective"] != "none":
            raise ValueError(f"ContinualWarpGrad keeps a fixed initialisation: `init_objective` must be 'none'; "
                             f"got {kwargs['init_objective']!r}.")
        if kwargs.get("meta_batch", "query") != "query":
            raise ValueError("ContinualWarpGrad's meta loss is on the query sets of the current and previous "
                             f"sub-tasks: `meta_batch` must be 'query'; got {kwargs['meta_batch']!r}.")
        kwargs.setdefault("inner_steps", 1)
        super().__init__(learner, **kwargs)
        checks.integer(warp_interval, "warp_interval", minimum=1, owner="ContinualWarpGrad")
        if tf.nest.flatten(self.update_rule.init_state([tf.convert_to_tensor(v) for v in self._fast_variables],
                                                       training=False)):
            raise ValueError(f"ContinualWarpGrad needs a stateless update rule; '{self.update_rule.name}' keeps "
                             "per-task state.")
        self.warp_interval = warp_interval

    def check_episodes(self, episodes: dict) -> dict:
        if episodes_lib.kind_of(episodes) != "stream":
            raise ValueError(f"ContinualWarpGrad takes stream episodes with keys {episodes_lib.STREAM_KEYS} (see "
                             f"tfmeta.episodes); got keys {sorted(episodes)}.")
        e = {k: tf.convert_to_tensor(episodes[k]) for k in episodes_lib.STREAM_KEYS}
        sx, qx = e["stream_x"].shape, e["query_x"].shape
        if sx.rank is None or sx.rank < 4 or qx.rank is None or qx.rank < 4:
            raise ValueError(f"continual episodes need stream_x [tasks, steps, batch, features...] and query_x "
                             f"[tasks, sub_tasks, points, features...]; got {tuple(sx)} and {tuple(qx)}.")
        if sx[1] is None or qx[1] is None or sx[1] % qx[1]:
            raise ValueError(f"the stream's steps ({sx[1]}) must be a known multiple of its sub-tasks ({qx[1]}).")
        return e

    # -------------------------------------------------------------------------------------------- streams

    @staticmethod
    def sub_task(episode: dict, j: int) -> dict:
        """Sub-task `j` of a stream episode as the outer objective sees a task: its query set."""
        return {"query_x": episode["query_x"][j], "query_y": episode["query_y"][j]}

    def _meta_loss(self, params, slow, state, episode, sub_task: int):
        """The mean query loss over sub-tasks 0..`sub_task` (the current one and all previous ones)."""
        losses = [self.outer_objective(params, slow, state, self.sub_task(episode, j), training=True)[0]
                  for j in range(sub_task + 1)]
        return tf.add_n(losses) / len(losses)

    def _stream_step(self, theta, episode, step, state, sub_task: int):
        """One stream step of one task in sub-task `sub_task`: the warp gradients and the next task parameters."""
        grads, _, adapted = self.warp_step(
            theta, (), step, state, episode,
            lambda params, slow: self._meta_loss(params, slow, state, episode, sub_task))
        return grads, [tf.stop_gradient(p) for p in adapted]

    def _map(self, fn, theta: list, episodes: dict, signature):
        """`fn(theta_i, episode_i)` over the tasks (`map_tasks`), with task i's parameters `theta_i` from `theta`
        (a leading task axis)."""
        def one_task(_, mapped):
            return fn(mapped["theta"], {k: v for k, v in mapped.items() if k != "theta"})

        return self.map_tasks(one_task, {**episodes, "theta": theta}, signature)

    def meta_update(self, episodes: dict) -> dict:
        episodes = self.check_episodes(episodes)
        steps = episodes["stream_x"].shape[1]
        _, tasks = self.task_count(episodes)
        state = self.read_state()
        theta = [tf.repeat(tf.convert_to_tensor(v)[None], tasks, axis=0) for v in self._fast_variables]
        signature = (specs(self.warp_variables), specs(self._fast_variables))
        steps_per_sub_task = steps // episodes["query_x"].shape[1]
        # Segments between warp updates (Algorithm 3: every `warp_interval` steps) and sub-task boundaries, so
        # that each segment's meta loss is a static sum over the sub-tasks seen so far.
        bounds = sorted({0, steps, *range(0, steps, self.warp_interval), *range(0, steps, steps_per_sub_task)})
        total = [tf.zeros(v.shape, v.dtype) for v in self.warp_variables]
        accumulated = 0
        for start, end in zip(bounds[:-1], bounds[1:]):
            sub_task = start // steps_per_sub_task

            def body(step, theta, total, sub_task=sub_task):
                grads, theta = self._map(lambda th, ep: self._stream_step(th, ep, step, state, sub_task),
                                         theta, episodes, signature)
                return step + 1, theta, [t + tf.reduce_mean(g, axis=0) for t, g in zip(total, grads)]

            _, theta, total = tf.while_loop(lambda step, *_, end=end: step < end, body,
                                            (tf.constant(start), theta, total))
            accumulated += end - start
            if end % self.warp_interval == 0 or end == steps:
                self.apply_gradients([t / accumulated for t in total], self.warp_variables)
                total, accumulated = [tf.zeros_like(t) for t in total], 0
        self.meta_steps.assign_add(1)
        _, slow = self.read_params()
        final = self._map(lambda th, ep: self._meta_loss(th, slow, state, ep, ep["query_x"].shape[0] - 1),
                          theta, episodes, tf.TensorSpec([], self._log_dtype))
        return {"loss": tf.reduce_mean(final)}

    def train_log_names(self) -> list[str]:
        return ["loss"]

    # ---------------------------------------------------------------------------------------- evaluation

    def stream_losses(self, episodes: dict) -> tf.Tensor:
        """Learns each task's stream with the current warps (no meta-updates) and returns the query loss of every
        sub-task before the stream and after each step: shape [tasks, steps + 1, sub_tasks]."""
        episodes = self.check_episodes(episodes)
        steps, sub_tasks = episodes["stream_x"].shape[1], episodes["query_x"].shape[1]
        state = self.read_state()

        def one_task(episode):
            fast, slow = self.read_params()

            def losses(params):
                return tf.stack([self.outer_objective(params, slow, state, self.sub_task(episode, j), training=False)[0]
                                 for j in range(sub_tasks)])

            def objective(params, state, step):
                return self.inner_objective(params, slow, state, episode, step, training=False)

            def body(step, params, curve):
                params = inner_step(objective, params, state, self.update_rule, (), step, first_order=True,
                                    check_finite=False).params
                return step + 1, params, curve.write(step + 1, losses(params))

            curve = tf.TensorArray(self._log_dtype, size=steps + 1).write(0, losses(fast))
            _, _, curve = tf.while_loop(lambda step, *_: step < steps, body, (tf.constant(0), fast, curve))
            return curve.stack()

        return tf.map_fn(one_task, episodes, fn_output_signature=tf.TensorSpec([steps + 1, sub_tasks],
                                                                               self._log_dtype))

    def evaluate_tasks(self, episodes: dict, steps: Optional[int] = None,
                       at_steps: Optional[Sequence[int]] = None) -> dict:
        """The mean query loss over all sub-tasks before the stream and after it (or after each of `at_steps`
        stream steps), per task; `steps` must be None or the stream's length."""
        curve = self.stream_losses(episodes)
        length = curve.shape[1] - 1
        if steps is not None and steps != length:
            raise ValueError(f"continual evaluation runs the whole stream of {length} steps; got steps={steps}.")
        at_steps = (0, length) if at_steps is None else tuple(at_steps)
        return {"loss": tf.gather(tf.reduce_mean(curve, axis=2), list(at_steps), axis=1)}

    def get_config(self) -> dict:
        return {**super().get_config(), "warp_interval": self.warp_interval}
