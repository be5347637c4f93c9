"""Backward against central finite differences in float64: every parameter, x, h0 and c0.

The tutorial this project started from checked one weight matrix over two steps and
so missed four gradient bugs (DESIGN.md). These checks cover every parameter group,
the inputs and the initial state, over several steps, with a non-zero initial
state, unequal lengths, both directions, stacked layers and dropout.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastlstm
from lstm_testing import ALL_CPU_BACKENDS, central_differences

EPS = 1e-6


def loss_and_grads(lstm, x, state, lengths, dy, dstate, reset_dropout=None):
    """L = sum(y * dy) + sum(h_n * dh_n) + sum(c_n * dc_n), and its analytic gradients."""
    if reset_dropout is not None:
        lstm._dropout_rng.bit_generator.state = reset_dropout
    lstm.zero_grad()
    y, (h_n, c_n) = lstm(x, state, lengths)
    loss = float(np.sum(y * dy) + np.sum(h_n * dstate[0]) + np.sum(c_n * dstate[1]))
    dx, (dh0, dc0) = lstm.backward(dy, dstate)
    grads = {name: np.array(g) for name, g in lstm.grads.items()}
    grads.update(x=dx, h0=dh0, c0=dc0)
    return loss, grads


def numerical_gradients(lstm, x, state, lengths, dy, dstate, reset_dropout=None):
    """Central differences of the same loss w.r.t. every parameter, x, h0 and c0."""

    def loss():
        if reset_dropout is not None:
            lstm._dropout_rng.bit_generator.state = reset_dropout
        y, (h_n, c_n) = lstm(x, state, lengths)
        return float(np.sum(y * dy) + np.sum(h_n * dstate[0]) + np.sum(c_n * dstate[1]))

    arrays = dict(lstm.params)
    arrays.update(x=x, h0=state[0], c0=state[1])
    return {name: central_differences(loss, array, EPS) for name, array in arrays.items()}


def check_gradients(analytic, numeric, atol=1e-7, rtol=1e-6):
    assert analytic.keys() == numeric.keys()
    for name in numeric:
        a, n = analytic[name], numeric[name]
        assert a.shape == n.shape, name
        bad = np.abs(a - n) > atol + rtol * np.abs(n)
        assert not bad.any(), (
            f"{name}: {int(bad.sum())} of {bad.size} entries differ; worst "
            f"{np.max(np.abs(a - n)):.3e} (analytic {a.ravel()[np.argmax(bad)]:.6e}, "
            f"numeric {n.ravel()[np.argmax(bad)]:.6e})"
        )


def problem(lstm, num_steps, batch, seed):
    rng = np.random.default_rng(seed)
    d = lstm.num_layers * lstm.num_directions
    x = rng.standard_normal((num_steps, batch, lstm.input_size))
    state = tuple(0.5 * rng.standard_normal((d, batch, lstm.hidden_size)) for _ in range(2))
    dy = rng.standard_normal((num_steps, batch, lstm.hidden_size * lstm.num_directions))
    dstate = tuple(rng.standard_normal((d, batch, lstm.hidden_size)) for _ in range(2))
    return x, state, dy, dstate


@pytest.mark.parametrize("backend", ALL_CPU_BACKENDS)
def test_two_layer_bidirectional_unequal_lengths(backend):
    lstm = fastlstm.LSTM(3, 4, num_layers=2, bidirectional=True, dtype="float64", backend=backend, seed=1)
    x, state, dy, dstate = problem(lstm, num_steps=5, batch=3, seed=2)
    lengths = np.array([5, 2, 4])
    _, analytic = loss_and_grads(lstm, x, state, lengths, dy, dstate)
    check_gradients(analytic, numerical_gradients(lstm, x, state, lengths, dy, dstate))


@pytest.mark.parametrize("backend", ALL_CPU_BACKENDS)
def test_dropout_between_layers(backend):
    lstm = fastlstm.LSTM(2, 3, num_layers=3, dropout=0.4, dtype="float64", backend=backend, seed=3)
    x, state, dy, dstate = problem(lstm, num_steps=4, batch=2, seed=4)
    rng_state = lstm._dropout_rng.bit_generator.state  # same masks for every evaluation
    _, analytic = loss_and_grads(lstm, x, state, None, dy, dstate, reset_dropout=rng_state)
    numeric = numerical_gradients(lstm, x, state, None, dy, dstate, reset_dropout=rng_state)
    check_gradients(analytic, numeric)


@pytest.mark.parametrize("backend", ALL_CPU_BACKENDS)
def test_no_bias_batch_first(backend):
    lstm = fastlstm.LSTM(2, 3, bias=False, batch_first=True, dtype="float64", backend=backend, seed=5)
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 4, 2))  # (B, T, I)
    state = tuple(0.5 * rng.standard_normal((1, 2, 3)) for _ in range(2))
    dy = rng.standard_normal((2, 4, 3))
    dstate = tuple(rng.standard_normal((1, 2, 3)) for _ in range(2))
    _, analytic = loss_and_grads(lstm, x, state, np.array([3, 4]), dy, dstate)
    check_gradients(analytic, numerical_gradients(lstm, x, state, np.array([3, 4]), dy, dstate))


def tutorial_problem():
    """The tutorial's example: input size 3, hidden size 2, x1 = (1, 2, 3), x2 = (2, 3, 4)."""
    lstm = fastlstm.LSTM(3, 2, dtype="float64", backend="numpy", seed=7)
    x = np.array([[[1.0, 2.0, 3.0]], [[2.0, 3.0, 4.0]]])  # (T=2, B=1, I=3)
    rng = np.random.default_rng(8)
    state = (0.3 * rng.standard_normal((1, 1, 2)), 0.3 * rng.standard_normal((1, 1, 2)))
    dy = rng.standard_normal((2, 1, 2))
    dstate = (rng.standard_normal((1, 1, 2)), rng.standard_normal((1, 1, 2)))
    return lstm, x, state, dy, dstate


def test_tutorial_example_every_parameter_group():
    lstm, x, state, dy, dstate = tutorial_problem()
    _, analytic = loss_and_grads(lstm, x, state, None, dy, dstate)
    numeric = numerical_gradients(lstm, x, state, None, dy, dstate)
    assert set(numeric) == {
        "weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0", "x", "h0", "c0",
    }
    check_gradients(analytic, numeric)


def test_check_catches_the_tutorials_bias_bug():
    """The check must fail for the tutorial's bug 1: i/o bias gradients taken from the f gate."""
    lstm, x, state, dy, dstate = tutorial_problem()
    _, analytic = loss_and_grads(lstm, x, state, None, dy, dstate)
    numeric = numerical_gradients(lstm, x, state, None, dy, dstate)
    hidden = 2
    buggy = dict(analytic)
    bias = analytic["bias_ih_l0"].copy()
    bias[0:hidden] = bias[hidden : 2 * hidden]  # i from f
    bias[3 * hidden :] = bias[hidden : 2 * hidden]  # o from f
    buggy["bias_ih_l0"] = bias
    with pytest.raises(AssertionError, match="bias_ih_l0"):
        check_gradients(buggy, numeric)


@pytest.mark.parametrize(
    "group", ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0", "x", "h0", "c0"]
)
def test_check_has_teeth_for_every_group(group):
    """One entry of any group off by 1e-4 (relative) must fail the check, naming the group."""
    lstm, x, state, dy, dstate = tutorial_problem()
    _, analytic = loss_and_grads(lstm, x, state, None, dy, dstate)
    numeric = numerical_gradients(lstm, x, state, None, dy, dstate)
    wrong = {name: value.copy() for name, value in analytic.items()}
    flat = wrong[group].reshape(-1)
    i = int(np.argmax(np.abs(flat)))
    flat[i] *= 1 + 1e-4
    with pytest.raises(AssertionError, match=group):
        check_gradients(wrong, numeric)
