"""A meta-trained update rule as a Keras optimizer, and the save format of a trained rule."""

from __future__ import annotations

import json
from typing import Union

import keras
import numpy as np
import tensorflow as tf

from tfmeta.update_rules.base import UpdateRule
from tfmeta.update_rules.lstm import CoordinatewiseLSTM


def rule_to_dict(rule: UpdateRule) -> dict:
    """A trained rule as plain JSON data: its Keras config, the parameter shapes it was built for (which fix its
    per-group networks) and its weights as nested lists, in `rule.weights` order."""
    if not rule.built:
        raise ValueError(f"rule '{rule.name}' is not built (it has no weights to save): meta-train it first.")
    return {"config": keras.saving.serialize_keras_object(rule), "param_shapes": [list(s) for s in rule.param_shapes],
            "weights": [np.asarray(w).tolist() for w in rule.weights]}


def rule_from_dict(data: dict) -> UpdateRule:
    """The rule `rule_to_dict` wrote, with its weights."""
    rule = keras.saving.deserialize_keras_object(data["config"])
    rule.check_params([tuple(s) for s in data["param_shapes"]])
    if len(rule.weights) != len(data["weights"]):
        raise ValueError(f"the saved rule holds {len(data['weights'])} weights; its config builds {len(rule.weights)}.")
    for variable, value in zip(rule.weights, data["weights"]):
        variable.assign(np.asarray(value, dtype=variable.dtype))
    return rule


def save_rule(rule: UpdateRule, path: str) -> None:
    """Writes a trained rule to `path` as JSON (`rule_to_dict`): the save format of a learned optimizer."""
    with open(path, "w") as f:
        json.dump(rule_to_dict(rule), f)


def load_rule(path: str) -> UpdateRule:
    """The rule `save_rule` wrote to `path`."""
    with open(path) as f:
        return rule_from_dict(json.load(f))


@keras.saving.register_keras_serializable(package="tfmeta")
class LearnedOptimizer(keras.optimizers.Optimizer):
    """A meta-trained `tfmeta.CoordinatewiseLSTM` as a Keras optimizer, for `model.compile(optimizer=...)`.

    It needs only gradients, which is what a Keras optimizer receives: each variable's update is the rule's output
    for its gradient, times `learning_rate`, which is a multiplier on the learned update (1.0 applies the rule as
    it was meta-trained; a schedule scales it over training). The rule's recurrent state is optimizer state: per
    coordinate, h and c of every LSTM layer, so 80 floats per parameter with two layers of 20 units, saved with
    the optimizer by `model.save` and TensorFlow checkpoints. Sparse gradients (`tf.IndexedSlices`, from
    embeddings) are densified (by the rule): the LSTM updates every coordinate, each with its own state. The rule's
    weights are fixed (it is not trained further here) and part of `get_config`, so a saved model reloads its
    optimizer.

    Args:
      rule: the trained rule, or the path of a file `save_rule` wrote.
      learning_rate: the multiplier on the rule's updates.
      **kwargs: Keras optimizer arguments (`clipnorm`, `global_clipnorm`, `weight_decay`, `name`, ...).
    """

    def __init__(self, rule: Union[CoordinatewiseLSTM, str, dict], learning_rate=1.0, name: str = "learned_optimizer",
                 **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        if isinstance(rule, str):
            rule = load_rule(rule)
        elif isinstance(rule, dict):
            rule = rule_from_dict(rule)
        if not isinstance(rule, CoordinatewiseLSTM) or not rule.built:
            raise TypeError("LearnedOptimizer `rule` must be a built (meta-trained) tfmeta.CoordinatewiseLSTM or the "
                            f"path of a saved one; got {rule!r}.")
        self.rule = rule

    def build(self, variables: list) -> None:
        if self.built:
            return
        self.rule.check_params([tuple(v.shape) for v in variables])  # a network for every parameter group
        super().build(variables)
        self._lstm_states = []
        for variable in variables:
            size = int(np.prod(variable.shape))
            self._lstm_states.append([self.add_variable((size, units), name=f"{variable.name}_lstm_{i}_{part}")
                                      for i, units in enumerate(self.rule.hidden_units) for part in ("h", "c")])

    def update_step(self, gradient: tf.Tensor, variable: keras.Variable, learning_rate) -> None:
        slots = self._lstm_states[self._get_variable_index(variable)]
        state = tuple((slots[2 * i], slots[2 * i + 1]) for i in range(len(self.rule.hidden_units)))
        state = tf.nest.map_structure(tf.convert_to_tensor, state)
        value = tf.convert_to_tensor(variable)
        (update,), (new_state,) = self.rule.update([gradient], (state,), [value], self.iterations)
        for slot, new in zip(slots, tf.nest.flatten(new_state)):
            self.assign(slot, new)
        self.assign_add(variable, tf.cast(learning_rate, update.dtype) * update)

    def get_config(self) -> dict:
        return {**super().get_config(), "rule": rule_to_dict(self.rule)}
