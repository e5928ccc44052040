"""WarpGrad (Flennerhag et al., ICLR 2020) and Leap (Flennerhag et al., ICLR 2019).

WarpGrad meta-learns warp layers φ (the learner's slow variables, e.g. `tfmeta.warp` layers) interleaved with
task layers θ (the fast variables). Tasks adapt θ with the update rule while φ preconditions their gradients;
φ is meta-learned from points θ_k of the adaptation trajectories, one inner step at a time, never by
backpropagating through a whole adaptation:

  L(φ) = mean over tasks τ and steps k of L_meta^τ(θ_k^τ + u(∇L_task^τ(θ_k^τ; φ)); φ)

with u the update rule, the task loss on the support set and the meta loss on the query set. "full" is the
paper's Eq. 11 (differentiated through the step, so a learned step size is meta-learned too); "approximate"
its Eq. 12, with a stop-gradient on the step (no second derivatives). The initialisation θ_0 follows an
initialisation objective C weighted by λ, J = L(φ) + λ·C(θ_0): Leap's trajectory length (Warp-Leap), MAML's
query loss after the adaptation (Warp-MAML), Reptile's, or none (a fixed random initialisation).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from tfmeta import checks
from tfmeta import partition as partition_lib
from tfmeta.inner_loop import inner_step
from tfmeta.episodic import specs
from tfmeta.meta_learner import MetaLearner
from tfmeta.registry import register

OBJECTIVES = ("full", "approximate")
INIT_OBJECTIVES = ("leap", "maml", "reptile", "none")
MODES = ("online", "offline")
META_BATCHES = ("query", "next_batch")


def _flatten_steps(per_step: list) -> list[tf.Tensor]:
    """A list (over steps) of nests of tensors -> a flat list of tensors with a leading step axis."""
    return [tf.stack(values) for values in zip(*[tf.nest.flatten(s) for s in per_step])]


def leap_gradient(trajectory: list[list[tf.Tensor]], losses: list[tf.Tensor], grads: list[list[tf.Tensor]],
                  norm: bool = True, loss_delta: bool = True) -> list[tf.Tensor]:
    """Leap's first-order meta-gradient of the trajectory length for one task (Leap's Eq. 8; WarpGrad's Eq. 17).

    The trajectory θ_0..θ_K is a path on the loss surface, through the points (θ_k, f(θ_k)). With the Jacobian of
    θ_k in θ_0 approximated by the identity and θ_{k+1} held fixed, each segment contributes
    −(Δf_k ∇f(θ_k) + Δθ_k) / d_k, where Δθ_k = θ_{k+1} − θ_k, Δf_k = f(θ_{k+1}) − f(θ_k) and d_k is the segment's
    length ‖(Δθ_k, Δf_k)‖ (`norm`; 1 otherwise). `loss_delta=False` drops the loss coordinate (the
    "simplified Leap" of the WarpGrad code: unit steps along the trajectory).

    Args:
      trajectory: the K + 1 parameter lists θ_0..θ_K.
      losses: the K + 1 losses f(θ_0)..f(θ_K).
      grads: the K gradients ∇f(θ_0)..∇f(θ_{K-1}).
    """
    # Vectorised over the K segments: a constant-size graph however long the trajectory.
    points = [tf.stack(values) for values in zip(*trajectory)]  # per variable: [K + 1, ...]
    gradients = [tf.stack(values) for values in zip(*grads)]  # per variable: [K, ...]
    losses = tf.stack(losses)
    delta_theta = [p[1:] - p[:-1] for p in points]
    delta_f = losses[1:] - losses[:-1] if loss_delta else tf.zeros_like(losses[1:])
    if norm:
        squared = tf.add_n([tf.reduce_sum(tf.square(tf.reshape(d, [tf.shape(d)[0], -1])), axis=1)
                            for d in delta_theta]) + tf.square(delta_f)
        length = tf.sqrt(squared) + 1e-12
    else:
        length = tf.ones_like(delta_f)

    def per_segment(values, like):  # [K] -> [K, 1, ...] in `like`'s dtype, to broadcast over a variable
        return tf.reshape(tf.cast(values, like.dtype), [-1] + [1] * (like.shape.rank - 1))

    return [-tf.reduce_sum((per_segment(delta_f, g) * g + d) / per_segment(length, d), axis=0)
            for g, d in zip(gradients, delta_theta)]


@register
class WarpGrad(MetaLearner):
    """Warped gradient descent: meta-learns the slow variables (warp layers) from trajectory points, and the
    initialisation of the fast variables by an initialisation objective (see the module docstring).

    Args:
      objective: "full" (Eq. 11: through one inner step) or "approximate" (Eq. 12: stop-gradient on the step).
      init_objective: the objective C of the fast variables' initialisation: "leap" (Warp-Leap), "maml"
        (Warp-MAML), "reptile" or "none" (a fixed random initialisation, λ = 0).
      init_weight: λ, the weight of C's gradient relative to the warp objective's.
      mode: "online" (the paper's Algorithm 1: one warp update per meta-step on the mean over every trajectory
        point of the meta-batch) or "offline" (Algorithm 2: the points and the update rule's state at each, e.g.
        momentum buffers, form a buffer; φ then takes one update per mini-batch of `warp_batch_size` points
        drawn without replacement, for `warp_epochs` passes).
      warp_batch_size: η, trajectory points per warp update in offline mode (at most the buffer's size,
        tasks x inner steps).
      warp_epochs: passes over the buffer per meta-step in offline mode.
      meta_batch: the task data of a point's meta loss: "query" (the episode's query set) or "next_batch" (for
        stream episodes: the stream's batch after the point's own, as the official code draws a second
        training batch; on multi-shot Omniglot 20 images per point instead of the 100 test images).
      leap_norm, leap_loss_delta: Leap's segment normalisation and loss coordinate (see `leap_gradient`).
      first_order: for init_objective="maml": first-order MAML for the initialisation.
      **kwargs: see `MetaLearner` (`update_rule` is the task learner's optimiser; a `LearnedSgd` with
        `per_element=False, shared=True` gives the ablation's meta-learned scalar learning rate, learned by the
        full objective).

    `meta_step()` counts meta-steps (batches of tasks); in offline mode the Keras optimizer takes several
    updates per meta-step, so its `iterations` (and learning-rate schedules) count updates.
    """

    def __init__(self, learner: keras.Model, objective: str = "full", init_objective: str = "leap",
                 init_weight: float = 1.0, mode: str = "online", warp_batch_size: int = 1, warp_epochs: int = 1,
                 meta_batch: str = "query", leap_norm: bool = True, leap_loss_delta: bool = True,
                 first_order: bool = False, **kwargs):
        super().__init__(learner, **kwargs)
        for argument, value, allowed in (("objective", objective, OBJECTIVES),
                                         ("init_objective", init_objective, INIT_OBJECTIVES), ("mode", mode, MODES),
                                         ("meta_batch", meta_batch, META_BATCHES)):
            if value not in allowed:
                raise ValueError(f"WarpGrad `{argument}` must be one of {allowed}; got {value!r}.")
        if not init_weight >= 0:
            raise ValueError(f"WarpGrad `init_weight` must be >= 0; got {init_weight!r}.")
        for argument, value in (("warp_batch_size", warp_batch_size), ("warp_epochs", warp_epochs)):
            checks.integer(value, argument, minimum=1, owner="WarpGrad")
        if self.inner_steps < 1:
            raise ValueError(f"WarpGrad needs `inner_steps` >= 1 (its trajectories); got {self.inner_steps}.")
        if init_objective == "maml" and not (first_order or self.unroll_inner_loop):
            raise ValueError("the second-order MAML initialisation objective differentiates through the inner loop: "
                             "it needs `unroll_inner_loop=True` (or `first_order=True`).")
        self.objective, self.init_objective, self.init_weight = objective, init_objective, float(init_weight)
        self.mode, self.warp_batch_size, self.warp_epochs = mode, warp_batch_size, warp_epochs
        self.meta_batch = meta_batch
        self.leap_norm, self.leap_loss_delta, self.first_order = leap_norm, leap_loss_delta, bool(first_order)
        self.meta_steps = keras.Variable(0, dtype="int64", trainable=False, name="meta_steps")
        self._fast_variables, self._slow_variables = partition_lib.split(learner.trainable_variables, self.fast_mask)
        # Context parameters (task embeddings) restart from their initial value in every task: no meta-gradient.
        self._fast_context, _ = partition_lib.split(self.context_mask[:len(self.fast_mask)], self.fast_mask)

    @property
    def warp_variables(self) -> list[keras.Variable]:
        """What the warp objective meta-learns: the learner's slow variables and the update rule's."""
        return self._slow_variables + self.update_rule.trainable_variables

    def meta_step(self) -> tf.Tensor:
        return tf.convert_to_tensor(self.meta_steps)

    # ---------------------------------------------------------------------------------------- trajectories

    def _adapt_task(self, episode: dict, state: list, seed: tf.Tensor) -> dict:
        """Adapts to one task; returns its trajectory points, the initialisation gradient, logs and state."""
        steps = self.inner_steps
        differentiate = self.init_objective == "maml"
        with tf.GradientTape(watch_accessed_variables=differentiate) as tape:
            fast, slow = self.read_params()
            adaptation = self.adapt_episode(fast, slow, state, episode, steps, training=True, keep_trajectory=True,
                                            first_order=not differentiate or self.first_order, seed=seed)
            query_loss, logs, state = self.outer_objective(adaptation.params, slow, adaptation.state, episode,
                                                           training=True, seed=seed, start=fast)
        trajectory = [[tf.stop_gradient(p) for p in params] for params in adaptation.trajectory]
        if self.init_objective == "maml":
            init_grads = tape.gradient(query_loss, fast, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        elif self.init_objective == "reptile":
            init_grads = [a - b for a, b in zip(trajectory[0], trajectory[-1])]
        elif self.init_objective == "leap":
            final_loss, _ = self.inner_objective(trajectory[-1], slow, adaptation.state, episode, steps, training=True,
                                                 seed=seed, start=fast)
            losses = [tf.stop_gradient(loss) for loss in adaptation.losses] + [final_loss]
            grads = [[tf.stop_gradient(g) for g in step_grads] for step_grads in adaptation.grads]
            init_grads = leap_gradient(trajectory, losses, grads, self.leap_norm, self.leap_loss_delta)
        else:
            init_grads = [tf.zeros_like(p) for p in fast]
        return {
            "points": [tf.stack(values) for values in zip(*trajectory[:-1])],
            "rule_states": _flatten_steps(adaptation.rule_states),
            "init_grads": init_grads,
            "logs": {"loss": query_loss, **logs},
            "state": state,
        }

    # -------------------------------------------------------------------------------------- warp objective

    def point_gradients(self, episode: dict, theta: list, rule_state, step, state: list) -> tuple[list, tf.Tensor]:
        """The warp objective's gradient for `warp_variables` at one trajectory point: task parameters `theta`
        and update-rule state `rule_state` before inner step `step`; also returns the meta loss."""
        if self.meta_batch == "query":
            def meta_loss_fn(adapted, slow):
                return self.outer_objective(adapted, slow, state, episode, training=True)[0]
        elif self.is_stream(episode):
            def meta_loss_fn(adapted, slow):
                return self.inner_objective(adapted, slow, state, episode, step + 1, training=True)[0]
        else:
            raise ValueError("WarpGrad meta_batch='next_batch' needs stream episodes (`stream_x` [tasks, steps, batch, "
                             f"...]; see tfmeta.episodes); got an episode with keys {sorted(episode)}.")
        grads, meta_loss, _ = self.warp_step(theta, rule_state, step, state, episode, meta_loss_fn)
        return grads, meta_loss

    def warp_step(self, theta: list, rule_state, step, state: list, episode: dict,
                  meta_loss_fn) -> tuple[list, tf.Tensor, list]:
        """One inner step from `theta` on the inner objective of `episode` at step `step`, then
        `meta_loss_fn(adapted, slow)`: returns the meta loss's gradient for `warp_variables` (through the step for
        the full objective), the meta loss and the adapted parameters."""
        with tf.GradientTape() as tape:
            _, slow = self.read_params()

            def objective(params, state, step):
                return self.inner_objective(params, slow, state, episode, step, training=True)

            inner = inner_step(objective, theta, state, self.update_rule, rule_state, step, check_finite=False)
            if self.objective == "approximate":
                adapted = [p + tf.stop_gradient(u) for p, u in zip(theta, inner.updates)]
            else:
                adapted = inner.params
            meta_loss = meta_loss_fn(adapted, slow)
        grads = tape.gradient(meta_loss, self.warp_variables)
        # Not UnconnectedGradients.ZERO, which fails eagerly on Keras variables (their dtype is a string).
        grads = [tf.zeros(v.shape, v.dtype) if g is None else g for g, v in zip(grads, self.warp_variables)]
        return grads, meta_loss, adapted

    def _warp_gradients(self, episodes: dict, buffer: dict, indices, state: list, rule_template) -> list:
        """The mean warp-objective gradient over the buffer's points `indices` (point i: task i // K, step i % K)."""
        steps = self.inner_steps

        def one_point(i):
            task = i // steps
            episode = {k: tf.gather(v, task) for k, v in episodes.items()}
            theta = [tf.gather(tf.gather(p, task), i % steps) for p in buffer["points"]]
            rule_state = tf.nest.pack_sequence_as(
                rule_template, [tf.gather(tf.gather(s, task), i % steps) for s in buffer["rule_states"]])
            grads, _ = self.point_gradients(episode, theta, rule_state, i % steps, state)
            return grads

        if self.task_mapping == "unrolled":
            grads = [one_point(tf.constant(i)) for i in indices]
            return [tf.add_n(g) / len(indices) for g in zip(*grads)]
        if self.task_mapping == "vectorized_map":
            grads = tf.vectorized_map(one_point, tf.convert_to_tensor(indices))
        else:
            grads = tf.map_fn(one_point, tf.convert_to_tensor(indices), fn_output_signature=specs(self.warp_variables))
        return [tf.reduce_mean(g, axis=0) for g in grads]

    # -------------------------------------------------------------------------------------------- training

    def meta_update(self, episodes: dict) -> dict:
        episodes = self.check_episodes(episodes)
        tasks, dynamic_tasks = self.task_count(episodes)
        state = self.read_state()
        batch_seed = self.task_seeds.next()
        rule_template = self.update_rule.init_state([tf.convert_to_tensor(v) for v in self._fast_variables],
                                                    training=False)  # only its structure is used

        fast_specs = specs(self._fast_variables)
        signature = {
            "points": [tf.TensorSpec([self.inner_steps, *s.shape], s.dtype) for s in fast_specs],
            "rule_states": [tf.TensorSpec([self.inner_steps, *t.shape], t.dtype)
                            for t in tf.nest.flatten(rule_template)],
            "init_grads": fast_specs,
            "logs": self._log_spec(self.train_log_names()),
            "state": specs(state),
        }
        buffer = self.map_meta_batch(self._adapt_task, episodes, signature, state, batch_seed)
        init_grads = [tf.zeros_like(g[0]) if context else self.init_weight * tf.reduce_mean(g, axis=0)
                      for g, context in zip(buffer["init_grads"], self._fast_context)]

        if self.warp_variables and self.mode == "online":
            indices = tf.range(dynamic_tasks * self.inner_steps)
            if self.task_mapping == "unrolled":
                indices = list(range(tasks * self.inner_steps))
            warp_grads = self._warp_gradients(episodes, buffer, indices, state, rule_template)
            self.apply_gradients(init_grads + warp_grads, self._fast_variables + self.warp_variables)
        else:
            if self.warp_variables:
                self._offline_updates(episodes, buffer, tasks, state, rule_template, batch_seed)
            self.apply_gradients(init_grads, self._fast_variables)
        self.meta_steps.assign_add(1)
        self.assign_state(self.reduce_state(self.merge_task_states(buffer["state"]), after=self._fast_variables))
        return {k: tf.reduce_mean(v) for k, v in buffer["logs"].items()}

    def _offline_updates(self, episodes, buffer, tasks, state, rule_template, seed) -> None:
        """Algorithm 2: warp updates on mini-batches of `warp_batch_size` buffer points drawn without replacement."""
        if tasks is None:
            raise ValueError("WarpGrad mode='offline' needs a static number of tasks per meta-batch: batch the "
                             "episodes with drop_remainder=True.")
        size = tasks * self.inner_steps
        if self.warp_batch_size > size:
            raise ValueError(f"WarpGrad `warp_batch_size` ({self.warp_batch_size}) is larger than the buffer of "
                             f"{size} trajectory points ({tasks} tasks x {self.inner_steps} inner steps).")
        for epoch in range(self.warp_epochs):
            order = tf.argsort(tf.random.stateless_uniform([size], tf.random.experimental.stateless_fold_in(
                seed, -1 - epoch)))
            for start in range(0, size, self.warp_batch_size):
                batch = order[start:start + self.warp_batch_size]
                if self.task_mapping == "unrolled":
                    batch = [batch[i] for i in range(min(self.warp_batch_size, size - start))]
                grads = self._warp_gradients(episodes, buffer, batch, state, rule_template)
                self.apply_gradients(grads, self.warp_variables)

    # ------------------------------------------------------------------------------------ serialisation

    def get_config(self) -> dict:
        return {**super().get_config(), "objective": self.objective, "init_objective": self.init_objective,
                "init_weight": self.init_weight, "mode": self.mode, "warp_batch_size": self.warp_batch_size,
                "warp_epochs": self.warp_epochs, "meta_batch": self.meta_batch, "leap_norm": self.leap_norm,
                "leap_loss_delta": self.leap_loss_delta, "first_order": self.first_order}


@register
class Leap(WarpGrad):
    """Leap (Flennerhag et al., ICLR 2019): meta-learns the initialisation that minimises the expected length of
    the adaptation trajectories on the loss surface, with its first-order meta-gradient (`leap_gradient`).
    Slow variables, if any, are warps meta-learned as in WarpGrad (Warp-Leap is `WarpGrad` with its defaults).
    """

    def __init__(self, learner: keras.Model, **kwargs):
        kwargs.setdefault("init_objective", "leap")
        if kwargs["init_objective"] != "leap":
            raise ValueError(f"Leap's `init_objective` is 'leap'; got {kwargs['init_objective']!r}.")
        super().__init__(learner, **kwargs)
