"""Learned optimizers (Andrychowicz et al., 2016): the coordinatewise LSTM rule, checked against hand computations
and, as MAML's inner-loop rule, against finite differences (float64)."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import random_episodes

import tfmeta
from tfmeta.update_rules.lstm import log_and_sign


def test_log_and_sign_preprocessing_equals_its_piecewise_definition():
    k = 5.0
    grads = np.array([3.0, -0.2, 1e-3, -1e-4, 0.0, 2e-3])[:, None]
    features = log_and_sign(tf.constant(grads), k).numpy()
    large = np.abs(grads[:, 0]) >= np.exp(-k)
    expected = np.where(large[:, None], np.stack([np.log(np.abs(grads[:, 0]) + 1.1920929e-07) / k,
                                                  np.sign(grads[:, 0])], 1),
                        np.stack([-np.ones(6), np.exp(k) * grads[:, 0]], 1))
    np.testing.assert_allclose(features, expected, rtol=1e-6, atol=1e-12)


def lstm_update_by_hand(rule, grad, h, c):
    """One coordinate's update through Keras' LSTM equations written out (gates i, f, c, o; sigmoid and tanh)."""
    cells, head = rule.networks["shared"]
    x = np.array([[grad]])
    states = []
    for cell, (hh, cc) in zip(cells, zip(h, c)):
        kernel, recurrent, bias = (v.numpy() for v in cell.weights)
        z = x @ kernel + hh @ recurrent + bias
        i, f, g, o = np.split(z, 4, axis=-1)
        sigmoid = lambda t: 1 / (1 + np.exp(-t))  # noqa: E731
        cc = sigmoid(f) * cc + sigmoid(i) * np.tanh(g)
        x = hh = sigmoid(o) * np.tanh(cc)
        states.append((hh, cc))
    kernel, bias = (v.numpy() for v in head.weights)
    return (x @ kernel + bias)[0, 0] * rule.output_scale, states


def test_coordinatewise_lstm_shares_weights_keeps_a_state_per_coordinate_and_matches_the_equations():
    rule = tfmeta.CoordinatewiseLSTM(hidden_units=(4, 3), output_scale=0.5, dtype="float64")
    rule.check_params([(2, 2)])
    params = [tf.zeros((2, 2), tf.float64)]
    grads = np.array([[0.3, -1.0], [2.0, 0.0]])
    state = rule.init_state(params)
    first, state = rule.update([tf.constant(grads)], state, params, 0)
    second, _ = rule.update([tf.constant(grads)], state, params, 1)
    for index in np.ndindex(2, 2):
        zeros = [np.zeros((1, u)) for u in (4, 3)]
        expected, states = lstm_update_by_hand(rule, grads[index], zeros, zeros)
        assert float(first[0][index]) == pytest.approx(expected, rel=1e-10)
        again, _ = lstm_update_by_hand(rule, grads[index], [s[0] for s in states], [s[1] for s in states])
        assert float(second[0][index]) == pytest.approx(again, rel=1e-10)  # the state carried per coordinate
    assert not np.allclose(first[0], second[0])


def test_coordinatewise_lstm_as_mamls_rule_matches_finite_differences():
    """The same rule is an inner loop of any meta-learner: MAML's second-order meta-gradient through two LSTM
    steps, for the learner's initialisation and the LSTM's weights (on raw gradients: the log-sign preprocessing is
    piecewise, and finite differences across its kinks at |g| = e^-k disagree with the derivative)."""
    from test_gradients import check_finite_differences, small_mlp

    rule = tfmeta.CoordinatewiseLSTM(hidden_units=(5,), output_scale=0.1, dtype="float64")
    meta = tfmeta.MAML(small_mlp(), update_rule=rule, inner_steps=2)
    episodes = random_episodes()
    grads, _, _ = tf.function(meta.compute_meta_gradients)(episodes)
    check_finite_differences(meta, episodes, grads)
    assert len(rule.trainable_variables) == 5 and all(np.abs(g).max() > 0 for g in grads[-5:])


def test_coordinatewise_lstm_groups_arguments_and_config():
    rule = tfmeta.CoordinatewiseLSTM(groups="by_rank")
    rule.check_params([(3, 3, 1, 4), (4,), (4, 2), (2,)])
    assert sorted(rule.networks) == ["rank_1", "rank_2", "rank_4"] and len(rule.trainable_variables) == 3 * 8
    with pytest.raises(ValueError, match=r"`preprocessing` must be one of"):
        tfmeta.CoordinatewiseLSTM(preprocessing="adam")
    with pytest.raises(ValueError, match=r"CoordinatewiseLSTM `k` must be positive"):
        tfmeta.CoordinatewiseLSTM(k=0.0)
    with pytest.raises(ValueError, match=r"`hidden_units` must be an integer >= 1"):
        tfmeta.CoordinatewiseLSTM(hidden_units=(20, 0))
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(rule))
    assert clone.get_config() == rule.get_config()
