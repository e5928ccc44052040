"""Meta-learners that adapt several models of the learner at once (`ParticleLearner`), and the first of them:
ensembles of MAML (EMAML; Yoon et al., 2018, the baseline of the Bayesian MAML paper), M learners, the
"particles", each independently initialised and adapted by MAML's inner loop, predicting with their mixture.

The particles' parameters are stacked on a leading axis [M, ...]: the update rule sees the stacked fast parameters
(so a rule may couple the particles, as BMAML's Stein variational gradient descent does), and every forward pass
runs the M learners as one batched call (`particle_parallelism`). `PredictiveModel` is what `adapt` returns: the M
adapted learners, predicting the predictive distribution's parameters.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence, Union

import keras
import tensorflow as tf

from tfmeta import adapted as adapted_lib
from tfmeta import checks, likelihoods, losses
from tfmeta import partition as partition_lib
from tfmeta.algorithms.maml import MAML
from tfmeta.episodic import vectorizable
from tfmeta.inner_loop import at_step
from tfmeta.layers import batch_statistics_layers
from tfmeta.registry import register

PARTICLE_PARALLELISM = ("auto", "vectorized_map", "unrolled")


def _stack(values: Sequence[list]) -> list[tf.Tensor]:
    return [tf.stack(per_particle) for per_particle in zip(*values)]


def particle_call(learner: keras.Model, trainable: list, state: list, x, training: bool, mapping: str,
                  return_losses: bool = False):
    """`learner.stateless_call` for M sets of parameters stacked on a leading axis (`trainable` [M, ...]) on the same
    inputs: returns the outputs [M, examples, ...], the state of each particle [M, ...] and, with `return_losses`,
    each particle's Keras losses [M]. `mapping` is "vectorized_map" (one batched call) or "unrolled"."""
    kwargs = {"training": training} if learner._call_has_training_arg else {}

    def one(params):
        return learner.stateless_call(params, state, x, return_losses=return_losses, **kwargs)

    if mapping == "vectorized_map":
        return tf.vectorized_map(one, list(trainable))
    results = [one([p[i] for p in trainable]) for i in range(trainable[0].shape[0])]
    return tf.nest.map_structure(lambda *xs: tf.stack(xs), *results)


def content_seed(seed: tf.Tensor, tensors) -> tf.Tensor:
    """`seed` (a stateless seed, shape [2]) folded with a hash of the values of `tensors`: the same data give the
    same seed wherever they are seen (evaluation, `adapt`, serving), different data a different one."""
    hashed = tf.constant(0, tf.int64)
    for tensor in tensors:
        bits = tf.reshape(tf.bitcast(tf.cast(tensor, tf.float32), tf.int32), [-1])
        weights = tf.range(1, tf.size(bits, out_type=tf.int64) + 1) * 2654435761 % 2147483629 + 1
        hashed = (hashed * 31 + tf.reduce_sum(tf.cast(bits, tf.int64) * weights)) % 2147483629
    return tf.random.experimental.stateless_fold_in(seed, hashed)


def draw(distributions, num_samples, seed: tf.Tensor) -> list[tf.Tensor]:
    """`num_samples` reparameterised draws of each of `distributions` (per-weight TFP distributions), stacked
    [num_samples, ...]: the stateless `seed` folded with the weight's index, so every weight draws its own noise."""
    return [d.sample(num_samples, seed=tf.random.experimental.stateless_fold_in(seed, i))
            for i, d in enumerate(distributions)]


class ParticleLearner(MAML):
    """The base of meta-learners that adapt M models of the learner at once (the "particles": an ensemble's
    members, a posterior's samples), their parameters stacked on a leading axis [M, ...]: the update rule sees the
    stacked fast parameters, every forward pass runs the M models as one batched call (`particle_parallelism`), the
    inner loop minimises the sum of their support losses (so each takes its own step), the query loss is their
    mean, the metrics score the point prediction (the mean, or the averaged class probabilities) and the
    likelihood's scores the uniform mixture. Subclasses say where the M starting points come from (`read_params`,
    or `adapt_episode` for starting points drawn per task).

    Args:
      learner: the architecture of every particle.
      num_particles: M >= 1.
      likelihood: the particles' likelihood (`tfmeta.likelihoods`); default: the loss's (a categorical for
        cross-entropies, the heteroscedastic Gaussian for "gaussian_nll", else Normal(1.0): state the level).
      particle_parallelism: "vectorized_map" (`tf.vectorized_map`: one batched call of the M particles),
        "unrolled" (a Python loop: any learner) or "auto": vectorized for learners of dense layers and
        activations without state, else unrolled (docs/performance.md measures both).
      **kwargs: see `MAML`.
    """

    def __init__(self, learner: keras.Model, num_particles: int = 5, particle_parallelism: str = "auto",
                 likelihood: Optional[likelihoods.Likelihood] = None, **kwargs):
        self.num_particles = checks.integer(num_particles, "num_particles", minimum=1, owner=type(self).__name__)
        if particle_parallelism not in PARTICLE_PARALLELISM:
            raise ValueError(f"`particle_parallelism` must be one of {PARTICLE_PARALLELISM}; got "
                             f"{particle_parallelism!r}.")
        if likelihood is None:
            likelihood = likelihoods.for_loss(losses.get(kwargs.get("loss", "mse")))
        super().__init__(learner, likelihood=likelihood, **kwargs)
        self.particle_parallelism = particle_parallelism

    def extra_particle_shapes(self) -> list[tuple]:
        """The shapes, without the particle axis, of per-particle meta-parameters beyond the learner's (BMAML's
        log-precisions): adapted with the fast parameters and appended to them. Known before they are created."""
        return []

    def extra_particle_variables(self) -> list[keras.Variable]:
        """The variables of `extra_particle_shapes`, each [M, ...]."""
        return []

    def fast_shapes(self, fast_variables):
        shapes = [tuple(v.shape) for v in fast_variables] + self.extra_particle_shapes()
        return [(self.num_particles, *shape) for shape in shapes]

    @property
    def particle_mapping(self) -> str:
        """`particle_parallelism` with "auto" resolved for the learner."""
        if self.particle_parallelism != "auto":
            return self.particle_parallelism
        return "vectorized_map" if vectorizable(self.learner) else "unrolled"

    def _stateless_call(self, fast, slow, state, x, training, step, return_losses=False):
        fast = fast[:len(fast) - len(self.extra_particle_shapes())]
        trainable = partition_lib.merge(fast, slow, self.fast_mask)
        with contextlib.nullcontext() if step is None else at_step(step):
            results = particle_call(self.learner, trainable, state, x, training, self.particle_mapping,
                                    return_losses)
        # The particles share the learner's state: batch-norm statistics are averaged over them.
        merged = self.merge_task_states(results[1])
        return (results[0], merged, results[2]) if return_losses else (results[0], merged)

    def task_objective(self, fast, slow, state, x, y, training: bool, step=None):
        """The mean over particles of their task objectives; the outputs are the particles' [M, examples, ...]."""
        outputs, state, extra_losses = self._stateless_call(fast, slow, state, x, training, step, return_losses=True)
        particles = tf.shape(outputs)[:1]
        per_example = self.task_loss(tf.broadcast_to(y, tf.concat([particles, tf.shape(y)], 0)), outputs)
        loss = tf.reduce_mean(tf.reshape(per_example, tf.concat([particles, [-1]], 0)), axis=1)
        if extra_losses:
            loss += tf.cast(tf.add_n(extra_losses), loss.dtype)
        return tf.reduce_mean(loss), outputs, state

    def inner_objective(self, fast, slow, state, episode, step, *, training, seed=None, start=None):
        """The sum over particles of their support objectives: the gradient of particle m is that of its own."""
        loss, state = super().inner_objective(fast, slow, state, episode, step, training=training, seed=seed,
                                              start=start)
        return loss * tf.cast(tf.shape(fast[0])[0], loss.dtype), state

    def predictive(self, outputs):
        return self.likelihood.predictive(outputs)

    def point_prediction(self, outputs):
        return self.likelihood.point(outputs)

    # ------------------------------------------------------------------------------------------ adapt

    def adapt(self, support_x, support_y, steps: Optional[int] = None, batch_norm: str = "batch",
              return_samples: bool = False) -> keras.Model:
        """The particles adapted to one task's support set, as a `PredictiveModel` whose `predict` returns the
        predictive distribution's parameters ("mean" and "stddev", or "probabilities" and "classes") and, with
        `return_samples`, every particle's outputs ("samples", [examples, M, ...]). It predicts what `evaluate`
        scores; learners with batch statistics at inference normalise the whole input as one batch, as
        `evaluate` normalises a query set (`batch_norm="batch"`, the only policy of an ensemble)."""
        if batch_norm != "batch":
            raise ValueError(f"{type(self).__name__}.adapt normalises with the query batch's statistics "
                             f"(batch_norm='batch'); got batch_norm={batch_norm!r}.")
        steps = checks.integer(self.eval_inner_steps if steps is None else steps, "steps")
        support_x, support_y = self.check_support(support_x, support_y)
        fast, slow = self.read_params()
        state = self.read_state()
        adaptation = self.adapt_episode(fast, slow, state, {"support_x": support_x, "support_y": support_y}, steps,
                                        training=False)
        return self.predictive_model(adaptation.params, slow, state, return_samples)

    def serve_from(self, fast, slow, state, request, steps):
        """The served outputs: the ensemble's point prediction (the predictive mean, or the logits of the averaged
        class probabilities), as `adapt(...).predict` gives its "mean" or "probabilities"."""
        return self.point_prediction(super().serve_from(fast, slow, state, request, steps))

    def predictive_model(self, fast, slow, state, return_samples: bool) -> keras.Model:
        """A `PredictiveModel` of adapted particle parameters `fast`."""
        n = len(fast) - len(self.extra_particle_shapes())
        return PredictiveModel(self.learner, partition_lib.merge(fast[:n], slow, self.fast_mask), state,
                               self.likelihood, return_samples=return_samples,
                               sample_stddev=self.particle_stddev(fast),
                               mapping=self.particle_mapping, name=f"{self.learner.name}_adapted")

    def particle_stddev(self, fast) -> Optional[tf.Tensor]:
        """The particles' own observation noise [M] (BMAML's), or None for the likelihood's."""
        return None

    def get_config(self) -> dict:
        return {**super().get_config(), "num_particles": self.num_particles,
                "particle_parallelism": self.particle_parallelism}


class SamplingLearner(ParticleLearner):
    """The base of learners whose models are samples, drawn per task, of a distribution over the learner's weights
    (PLATIPUS' prior, ABML's posterior). Meta-training draws `num_samples` from the task's stateless seed;
    evaluation, `adapt` and serving from `seed` folded with a hash of the support set, so that the three give the
    same samples for the same task and different tasks different ones. `sampling(num_samples, seed)` draws
    another number of samples from another seed (a serving signature's inputs: either may be a tensor).

    Args:
      num_samples: the samples per task (>= 1).
      seed: the seed of evaluation's samples.
      **kwargs: see `ParticleLearner` and `MAML` (MAML++'s multi-step and annealing options do not apply: the
        subclasses meta-train with their own objectives).
    """

    takes_support_streams = False
    vectorizes_dense_learners = False  # tf.vectorized_map has no converter for the stateless samplers

    def __init__(self, learner: keras.Model, num_samples: int = 5, seed: int = 0, **kwargs):
        name = type(self).__name__
        refused = [k for k in ("query_step_weights", "multi_step_loss_annealing", "first_order_steps") if kwargs.get(k)]
        if refused:
            raise ValueError(f"{name} meta-trains with its own objective: MAML's {', '.join(refused)} do not apply.")
        super().__init__(learner, num_particles=checks.integer(num_samples, "num_samples", minimum=1, owner=name),
                         **kwargs)
        self.seed = int(seed)
        object.__setattr__(self, "_sampling", None)  # (num_samples, seed) of `sampling`; not tracked by Keras

    @property
    def num_samples(self) -> int:
        return self.num_particles

    @contextlib.contextmanager
    def sampling(self, num_samples: Union[int, tf.Tensor], seed: Union[int, tf.Tensor]) -> Iterator[None]:
        """Within the block, adaptation outside meta-training draws `num_samples` from `seed` (ints or int
        tensors) instead of `num_samples` from the learner's `seed`."""
        previous = self._sampling
        object.__setattr__(self, "_sampling", (num_samples, seed))
        try:
            yield
        finally:
            object.__setattr__(self, "_sampling", previous)

    def draw(self, distributions, seed: tf.Tensor) -> list[tf.Tensor]:
        """Reparameterised draws of each weight's distribution (`draw`), as many as the sampling in force says."""
        return draw(distributions, self.num_samples if self._sampling is None else self._sampling[0], seed)

    def evaluation_seed(self, episode: dict) -> tf.Tensor:
        """The seed of a task's samples outside meta-training: the learner's (or `sampling`'s) seed folded with
        the hash of the support set."""
        base = self.seed if self._sampling is None else self._sampling[1]
        return content_seed(tf.stack([tf.cast(base, tf.int32), 0]), [episode["support_x"], episode["support_y"]])

    def get_config(self) -> dict:
        config = super().get_config()
        config["num_samples"] = config.pop("num_particles")
        return {**config, "seed": self.seed}


@register
class EMAML(ParticleLearner):
    """Ensemble of MAML: `num_particles` independently initialised learners, each adapted by MAML's inner loop.

    The inner loop minimises the sum of the particles' support losses, so that each particle takes its own MAML
    step; the meta-objective is the mean of their query losses (the official BMAML code's EMAML sums them: with
    Adam the two differ only in the scale epsilon is compared with). The query metrics score the ensemble's point
    prediction (the mean prediction, or the averaged class probabilities) and the likelihood's scores its mixture.
    The particles hold M times the learner's parameters: say so beside a comparison with MAML.

    Args:
      learner: the architecture of every particle; its weights are particle 0's initial values, and the others
        come from `keras.models.clone_model` (fresh draws of the initialisers: unseeded initialisers, or every
        particle starts the same and the ensemble is M copies of MAML, which is refused).
      num_particles: M >= 1 (M = 1 is MAML).
      **kwargs: see `ParticleLearner` (`likelihood`, `particle_parallelism`) and `MAML`.
    """

    def __init__(self, learner: keras.Model, num_particles: int = 5, **kwargs):
        super().__init__(learner, num_particles=num_particles, **kwargs)
        self.particles = self._initial_particles(learner)

    def _initial_particles(self, learner: keras.Model) -> list[keras.Variable]:
        particles = [learner.trainable_variables]
        try:
            particles += [keras.models.clone_model(learner).trainable_variables for _ in range(self.num_particles - 1)]
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"{type(self).__name__} initialises its particles as copies of learner '{learner.name}' made by "
                "keras.models.clone_model, which rebuilds a subclassed model from its get_config(): give its "
                f"__init__ **kwargs for Keras' own arguments (and a get_config for its own). It failed with: {error}"
            ) from None
        stacked = _stack([[tf.convert_to_tensor(v) for v in variables] for variables in particles])
        if self.num_particles > 1 and all(bool(tf.reduce_all(s[0] == s[1])) for s in stacked):
            raise ValueError(f"the particles of {type(self).__name__} start identical: learner '{learner.name}' "
                             "draws the same initial weights in every copy (seeded initialisers); give it unseeded "
                             "initialisers, so that the particles are independently initialised.")
        return [self.add_weight(shape=value.shape, dtype=variable.dtype, initializer=lambda shape, dtype, v=value: v,
                                name=f"particles_{variable.name}")
                for variable, value in zip(learner.trainable_variables, stacked)]

    def call(self, inputs, training=False):
        """The ensemble's point prediction at the meta-learned initial particles (the learner's own weights are
        only particle 0's initial values)."""
        fast, slow = self.read_params()
        outputs, _ = self._stateless_call(fast, slow, self.read_state(), inputs, training, None)
        return self.point_prediction(outputs)

    @property
    def meta_variables(self) -> list[keras.Variable]:
        return self.particles + self.extra_particle_variables() + self.update_rule.trainable_variables

    def read_params(self):
        fast, slow = partition_lib.split([tf.convert_to_tensor(v) for v in self.particles], self.fast_mask)
        return fast + [tf.convert_to_tensor(v) for v in self.extra_particle_variables()], slow


@keras.saving.register_keras_serializable(package="tfmeta")
class PredictiveModel(keras.Model):
    """Several adapted copies of a learner (particles, or samples of a posterior; parameters stacked on a leading
    axis) that predict their predictive distribution: its mean and standard deviation (regression) or its class
    probabilities and most probable classes, and with `return_samples` each model's outputs ("samples",
    [examples, models, ...]). A learner with batch statistics at inference normalises the whole input of
    `predict` as one batch, as `TransductiveModel` does.

    Args:
      learner: the architecture (its own weights are not used).
      trainable: the models' trainable parameters, each [models, ...] (the learner's trainable variables' order).
      state: the learner's non-trainable state, shared by the models.
      likelihood: a `tfmeta.likelihoods.Likelihood`.
      sample_stddev: each model's observation noise [models] for a Gaussian likelihood with fixed noise, or None.
    """

    def __init__(self, learner: keras.Model, trainable: Sequence, state: Sequence, likelihood,
                 return_samples: bool = False, sample_stddev=None, mapping: str = "unrolled", **kwargs):
        super().__init__(**kwargs)
        self.learner = learner
        self.likelihood = likelihoods.get(likelihood)
        self.return_samples = bool(return_samples)
        self.mapping = mapping
        constant = lambda value, name: self.add_weight(  # noqa: E731
            shape=tuple(value.shape), dtype=value.dtype, trainable=False, name=name,
            initializer=lambda shape, dtype, v=tf.convert_to_tensor(value): v)
        self.sample_params = [constant(t, f"sample_{i}") for i, t in enumerate(trainable)]
        self.shared_state = [constant(s, f"state_{i}") for i, s in enumerate(state)]
        self.sample_stddev = None if sample_stddev is None else constant(sample_stddev, "sample_stddev")
        self.transductive = bool(batch_statistics_layers(learner))
        self.built = True

    def call(self, inputs, training=None):
        samples, _ = particle_call(self.learner, [tf.convert_to_tensor(p) for p in self.sample_params],
                                   [tf.convert_to_tensor(s) for s in self.shared_state], inputs, False, self.mapping)
        stddev = None
        if self.sample_stddev is not None:
            rank = samples.shape.rank
            stddev = tf.reshape(tf.convert_to_tensor(self.sample_stddev), [-1] + [1] * (rank - 1))
        result = self.likelihood.summary(self.likelihood.predictive(samples, stddev))
        if self.return_samples:
            result["samples"] = tf.experimental.numpy.moveaxis(samples, 0, 1)
        return result

    def predict(self, x, batch_size=None, verbose="auto", steps=None, callbacks=None):
        if self.transductive:
            batch_size = adapted_lib._examples(x)  # the whole input is one batch
        return super().predict(x, batch_size=batch_size, verbose=verbose, steps=steps, callbacks=callbacks)

    def get_config(self) -> dict:
        """The architecture, the likelihood and the shapes of the models' parameters; their values are the
        model's weights, which `model.save` writes and `keras.models.load_model` restores."""
        spec = lambda variables: [[list(v.shape), str(v.dtype)] for v in variables]  # noqa: E731
        return {**super().get_config(), "learner": keras.saving.serialize_keras_object(self.learner),
                "likelihood": keras.saving.serialize_keras_object(self.likelihood),
                "return_samples": self.return_samples, "mapping": self.mapping,
                "trainable": spec(self.sample_params), "state": spec(self.shared_state),
                "sample_stddev": None if self.sample_stddev is None else spec([self.sample_stddev])[0]}

    @classmethod
    def from_config(cls, config: dict):
        config = dict(config)
        zeros = lambda entry: tf.zeros(entry[0], entry[1])  # noqa: E731  (placeholders that load_model overwrites)
        config["learner"] = keras.saving.deserialize_keras_object(config["learner"])
        config["likelihood"] = likelihoods.get(config["likelihood"])
        config["trainable"] = [zeros(e) for e in config["trainable"]]
        config["state"] = [zeros(e) for e in config["state"]]
        config["sample_stddev"] = None if config["sample_stddev"] is None else zeros(config["sample_stddev"])
        return cls(**config)
