"""Training an optimizer policy (`tfmeta.update_rules.policy.PolicyOptimizer`) by policy gradient."""

from __future__ import annotations

import keras
import tensorflow as tf

from tfmeta import checks
from tfmeta.optimizers.problems import OptimizationProblems
from tfmeta.registry import register
from tfmeta.update_rules.policy import PolicyOptimizer


@register
class PolicyTraining(keras.Model):
    """Trains `rule`'s policy by REINFORCE with a leave-one-out baseline (a policy-gradient method, stated in place
    of Li & Malik's guided policy search): each `train_step` rolls out `batch_problems` problems of `problems`,
    each `samples_per_problem` times (the same constants and initial parameters, different noise), for `horizon`
    steps sampled from the policy; the reward of a step is minus the loss after it, so that a rollout's return is
    minus the sum of its losses after each step (the learned optimizers' meta-loss); the surrogate
    −Σ_t log π(a_t | o_t)·(G_t − b_t), with G_t the return from step t and b_t the mean of the other rollouts' G_t
    (of the same problem when `samples_per_problem` > 1, of the other problems otherwise: either keeps the
    estimator unbiased), averaged over rollouts, is minimised with the compiled optimizer. When the optimizee holds
    independent problems (`problems.problem_losses`, e.g. `Quadratics`' 128), each problem's steps are credited
    with its own losses only (the others' do not depend on them): the same expected gradient, less variance.
    Problems and their minibatches (the seed `problems.problem_losses` gets at each step) come from `seed` folded
    with the problem's index, the policy's noise with the rollout's: a problem's samples see the same minibatches
    (common random numbers, so that their returns differ by the policy's noise alone and the baseline cancels the
    data's), and training is a function of `seed`."""

    def __init__(self, rule: PolicyOptimizer, problems: OptimizationProblems, horizon: int = 20,
                 batch_problems: int = 16, samples_per_problem: int = 1, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(rule, PolicyOptimizer):
            raise TypeError(f"`rule` must be a tfmeta PolicyOptimizer; got {type(rule).__name__}.")
        self.rule, self.problems = rule, problems
        self.horizon = checks.integer(horizon, "horizon", minimum=1, owner="PolicyTraining")
        self.samples_per_problem = checks.integer(samples_per_problem, "samples_per_problem", minimum=1,
                                                  owner="PolicyTraining")
        self.batch_problems = checks.integer(batch_problems, "batch_problems",
                                             minimum=2 if self.samples_per_problem == 1 else 1, owner="PolicyTraining")
        self.seed = int(seed)
        constants, params = self.start(tf.constant(0, tf.int64))
        self.rule.check_params([tuple(p.shape) for p in params])
        self.num_independent = int(problems.problem_losses(params, constants, tf.constant([0, 0], tf.int64)).shape[0])
        if self.num_independent > 1 and any(p.shape[:1] != (self.num_independent,) for p in params):
            raise ValueError(f"PolicyTraining: `problems` holds {self.num_independent} independent problems, so every "
                             f"parameter's leading axis must be {self.num_independent}; got shapes "
                             f"{[tuple(p.shape) for p in params]}.")
        self.rollouts_done = self.add_weight(shape=(), dtype="int64", trainable=False, name="rollouts_done",
                                             initializer="zeros")
        self.built = True

    def start(self, index: tf.Tensor) -> tuple[dict, list]:
        seed = tf.random.experimental.stateless_fold_in(tf.constant([self.seed, 0], tf.int64), index)
        constants = self.problems.constants(seed)
        return constants, self.problems.initial_params(constants, tf.random.experimental.stateless_fold_in(seed, 1))

    def rollout(self, index: tf.Tensor) -> tuple[list, list, tf.Tensor]:
        """Rollout `index` (of problem `index // samples_per_problem`): per step the observations and sampled steps
        of every parameter ([horizon, coordinates, ...] each) and the losses of each independent problem before
        each step and after the last [horizon + 1, P]."""
        problem = index // self.samples_per_problem
        constants, params = self.start(problem)
        seed = tf.random.experimental.stateless_fold_in(tf.constant([self.seed, 1], tf.int64), index)
        data_seed = tf.random.experimental.stateless_fold_in(tf.constant([self.seed, 2], tf.int64), problem)
        state = self.rule.init_state(params)
        observations, actions, losses = [], [], []
        for t in range(self.horizon):
            step_seed = tf.random.experimental.stateless_fold_in(seed, t)
            with tf.GradientTape() as tape:
                tape.watch(params)
                losses_now = self.problems.problem_losses(
                    params, constants, tf.random.experimental.stateless_fold_in(data_seed, t))
                loss = tf.reduce_mean(losses_now)
            observed, state = self.rule.observe(tape.gradient(loss, params), state, loss)
            steps = [d.sample(seed=tf.random.experimental.stateless_fold_in(step_seed, 1 + i))
                     for i, d in enumerate(self.rule.policy(observed))]
            params = [p + tf.reshape(a, tf.shape(p)) for p, a in zip(params, steps)]
            observations.append(observed)
            actions.append(steps)
            losses.append(losses_now)
        final_seed = tf.random.experimental.stateless_fold_in(data_seed, self.horizon)
        losses.append(self.problems.problem_losses(params, constants, final_seed))
        stack = lambda per_step: [tf.stack(x) for x in zip(*per_step)]  # noqa: E731
        return stack(observations), stack(actions), tf.stack(losses)

    def rollouts(self, first: tf.Tensor) -> tuple[list, list, tf.Tensor]:
        """`batch_problems` × `samples_per_problem` rollouts from index `first` (a multiple of
        `samples_per_problem`) on, stacked on a leading axis (`tf.map_fn`), each problem's samples adjacent."""
        indices = first + tf.range(self.batch_problems * self.samples_per_problem, dtype=tf.int64)
        _, params = self.start(tf.constant(0, tf.int64))
        state = self.rule.init_state(params)
        observed, _ = self.rule.observe([tf.zeros_like(p) for p in params], state, tf.zeros([], params[0].dtype))
        spec = lambda t: tf.TensorSpec([self.horizon, *t.shape], t.dtype)  # noqa: E731
        signature = ([spec(o) for o in observed], [spec(o[:, 0]) for o in observed],
                     tf.TensorSpec([self.horizon + 1, self.num_independent], params[0].dtype))
        return tf.map_fn(self.rollout, indices, fn_output_signature=signature)

    def surrogate(self, observations: list, actions: list, losses: tf.Tensor) -> tf.Tensor:
        """The REINFORCE surrogate of stacked rollouts (see the class docstring): its gradient is the estimate."""
        rewards = -losses[:, 1:] / self.num_independent  # [rollouts, horizon, P]: their sum is minus the loss
        returns = tf.math.cumsum(rewards, axis=1, reverse=True)
        # Leave one out among the samples of the same problem, or among all rollouts with one sample each.
        group = self.samples_per_problem if self.samples_per_problem > 1 else self.batch_problems
        grouped = tf.reshape(returns, [-1, group, *returns.shape[1:]])
        others = (tf.reduce_sum(grouped, axis=1, keepdims=True) - grouped) / (group - 1)
        baseline = tf.reshape(others, tf.shape(returns))
        advantages = tf.stop_gradient(returns - baseline)
        log_prob = 0.0
        for o, a in zip(observations, actions):
            flat = tf.reshape(o, [-1, o.shape[-1]])
            (distribution,) = self.rule.policy([flat])
            per_coordinate = tf.reshape(distribution.log_prob(tf.reshape(a, [-1])), tf.shape(a))
            shape = tf.concat([tf.shape(a)[:2], [self.num_independent, -1]], 0)  # each problem's coordinates
            log_prob += tf.reduce_sum(tf.reshape(per_coordinate, shape), axis=-1)
        return -tf.reduce_mean(tf.reduce_sum(log_prob * advantages, axis=[1, 2]))

    def train_step(self, data):
        del data
        observations, actions, losses = self.rollouts(tf.convert_to_tensor(self.rollouts_done))
        variables = self.rule.trainable_variables
        with tf.GradientTape() as tape:
            surrogate = self.surrogate(observations, actions, losses)
        self.optimizer.apply(tape.gradient(surrogate, variables), variables)
        self.rollouts_done.assign_add(self.batch_problems * self.samples_per_problem)
        return {"loss": tf.reduce_mean(losses[:, 1:]), "final_loss": tf.reduce_mean(losses[:, -1])}

    @staticmethod
    def dataset() -> tf.data.Dataset:
        """What `fit` iterates (with `steps_per_epoch`): one dummy element per training step."""
        return tf.data.Dataset.from_tensors(0).repeat()
