"""Every bad input gets a clear error naming the argument, and changes nothing."""

from __future__ import annotations

import numpy as np
import pytest

import fastlstm
from lstm_testing import ALL_CPU_BACKENDS, assert_unchanged, snapshot


@pytest.fixture(params=ALL_CPU_BACKENDS)
def trained(request):
    """A 2-layer bidirectional layer after one training forward + backward, and a pending forward."""
    lstm = fastlstm.LSTM(3, 4, num_layers=2, bidirectional=True, dropout=0.2, backend=request.param, seed=0)
    x = np.random.default_rng(0).standard_normal((5, 2, 3))
    y, _ = lstm(x)
    lstm.backward(np.ones_like(y))
    lstm(x)  # leaves a forward for backward, so we can see it survive failing calls
    return lstm


FORWARD_CASES = [
    # (kwargs, exception, message fragments)
    (dict(x=np.zeros((5, 2, 3, 1))), ValueError, ["x:", "3-D", "4-D", "(5, 2, 3, 1)"]),
    (dict(x=np.zeros(5)), ValueError, ["x:", "1-D"]),
    (dict(x=np.zeros((5, 2, 7))), ValueError, ["x:", "input_size=3", "(5, 2, 7)"]),
    (dict(x=np.zeros((0, 2, 3))), ValueError, ["x:", "at least one time step"]),
    (dict(x=np.zeros((5, 2, 3), dtype=complex)), TypeError, ["x:", "real", "complex128"]),
    (dict(x=np.array([[["a", "b", "c"]]])), TypeError, ["x:", "real", "str"]),
    (dict(x=np.empty((5, 2, 3), dtype=object)), TypeError, ["x:", "real", "object"]),
    (dict(x="not an array"), TypeError, ["x:"]),
    (dict(state=np.zeros((4, 2, 4))), TypeError, ["state:", "pair"]),
    (dict(state=(np.zeros((4, 2, 4)),)), TypeError, ["state:", "pair"]),
    (dict(state=(np.zeros((2, 2, 4)), np.zeros((4, 2, 4)))), ValueError, ["state[h]", "(4, 2, 4)", "(2, 2, 4)"]),
    (dict(state=(np.zeros((4, 2, 4)), np.zeros((4, 3, 4)))), ValueError, ["state[c]", "(4, 2, 4)", "(4, 3, 4)"]),
    (dict(state=(np.zeros((4, 2, 4), complex), np.zeros((4, 2, 4)))), TypeError, ["state[h]", "complex"]),
    (dict(lengths=np.array([5, 0])), ValueError, ["lengths:", "1..5", "from 0 to 5"]),
    (dict(lengths=np.array([6, 2])), ValueError, ["lengths:", "1..5", "6"]),
    (dict(lengths=np.array([5, 2, 1])), ValueError, ["lengths:", "(2,)", "(3,)"]),
    (dict(lengths=np.array([5.0, 2.0])), TypeError, ["lengths:", "integers", "float64"]),
    (dict(lengths=[[5, 2]]), ValueError, ["lengths:", "(2,)"]),
]


@pytest.mark.parametrize("kwargs, error, fragments", FORWARD_CASES)
def test_forward_rejects(trained, kwargs, error, fragments):
    args = dict(x=np.zeros((5, 2, 3)), state=None, lengths=None)
    args.update(kwargs)
    before = snapshot(trained)
    with pytest.raises(error) as info:
        trained(args["x"], args["state"], args["lengths"])
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in {info.value}"
    assert_unchanged(trained, before)


def test_forward_rejects_lengths_for_unbatched_input(trained):
    before = snapshot(trained)
    with pytest.raises(ValueError, match="lengths: not supported with unbatched"):
        trained(np.zeros((5, 3)), lengths=np.array([3]))
    assert_unchanged(trained, before)


BACKWARD_CASES = [
    (dict(dy=np.zeros((5, 2, 4))), ValueError, ["dy:", "(5, 2, 8)", "(5, 2, 4)"]),
    (dict(dy=np.zeros((5, 2, 8), complex)), TypeError, ["dy:", "complex"]),
    (dict(dstate=(np.zeros((4, 2, 4)), np.zeros((4, 2, 5)))), ValueError, ["dstate[c]", "(4, 2, 4)", "(4, 2, 5)"]),
    (dict(dstate=np.zeros((4, 2, 4))), TypeError, ["dstate:", "pair"]),
]


@pytest.mark.parametrize("kwargs, error, fragments", BACKWARD_CASES)
def test_backward_rejects(trained, kwargs, error, fragments):
    args = dict(dy=np.zeros((5, 2, 8)), dstate=None)
    args.update(kwargs)
    before = snapshot(trained)
    with pytest.raises(error) as info:
        trained.backward(args["dy"], args["dstate"])
    for fragment in fragments:
        assert fragment in str(info.value)
    assert_unchanged(trained, before)
    trained.backward(np.zeros((5, 2, 8)))  # the forward is still there to differentiate


def test_backward_without_training_forward():
    lstm = fastlstm.LSTM(3, 4)
    with pytest.raises(RuntimeError, match="no training forward"):
        lstm.backward(np.zeros((5, 2, 4)))
    lstm.eval()
    lstm(np.zeros((5, 2, 3)))
    with pytest.raises(RuntimeError, match="eval forwards keep nothing"):
        lstm.backward(np.zeros((5, 2, 4)))


def test_second_backward_of_one_forward_is_refused():
    lstm = fastlstm.LSTM(3, 4)
    y, _ = lstm(np.ones((5, 2, 3)))
    lstm.backward(np.ones_like(y))
    grads = {k: v.copy() for k, v in lstm.grads.items()}
    with pytest.raises(RuntimeError, match="once"):
        lstm.backward(np.ones_like(y))
    for k in grads:
        np.testing.assert_array_equal(lstm.grads[k], grads[k])


CONSTRUCTOR_CASES = [
    (dict(input_size=0), ValueError, "input_size: expected a positive integer, got 0"),
    (dict(input_size=2.5), TypeError, "input_size: expected a positive integer, got float"),
    (dict(hidden_size=-1), ValueError, "hidden_size"),
    (dict(num_layers=True), TypeError, "num_layers"),
    (dict(dropout=1.5), ValueError, "dropout: expected a probability in [0, 1], got 1.5"),
    (dict(dropout="0.1"), TypeError, "dropout"),
    (dict(bidirectional="yes"), TypeError, "bidirectional: expected True or False"),
    (dict(dtype="float16"), ValueError, "dtype: expected 'float32' or 'float64', got 'float16'"),
    (dict(dtype="bogus"), TypeError, "dtype"),
    (dict(backend="tensorflow"), ValueError, "backend: unknown backend 'tensorflow'; expected one of numpy, numba, cupy, auto"),
]


@pytest.mark.parametrize("kwargs, error, message", CONSTRUCTOR_CASES)
def test_constructor_rejects(kwargs, error, message):
    args = dict(input_size=3, hidden_size=4)
    args.update(kwargs)
    with pytest.raises(error) as info:
        fastlstm.LSTM(**args)
    assert message in str(info.value)


def test_load_state_dict_reports_missing_extra_and_wrong_shapes(trained):
    good = trained.state_dict()
    before = snapshot(trained)
    missing = dict(good)
    del missing["bias_hh_l1_reverse"]
    with pytest.raises(ValueError, match=r"missing \['bias_hh_l1_reverse'\]; unexpected none"):
        trained.load_state_dict(missing)
    extra = dict(good, weight_ih_l2=np.zeros((16, 8)))
    with pytest.raises(ValueError, match=r"missing none; unexpected \['weight_ih_l2'\]"):
        trained.load_state_dict(extra)
    wrong = {k: v + 1 for k, v in good.items()}  # all valid but one: nothing may be applied
    wrong["weight_hh_l1"] = np.zeros((16, 5))
    with pytest.raises(ValueError, match=r"state_dict\['weight_hh_l1'\]: expected shape \(16, 4\), got \(16, 5\)"):
        trained.load_state_dict(wrong)
    complex_value = dict(good, weight_hh_l0=good["weight_hh_l0"].astype(complex))
    with pytest.raises(TypeError, match=r"state_dict\['weight_hh_l0'\]: expected real numbers"):
        trained.load_state_dict(complex_value)
    with pytest.raises(TypeError, match="state_dict: expected a mapping"):
        trained.load_state_dict([1, 2, 3])
    assert_unchanged(trained, before)


def test_load_state_dict_non_strict_keeps_what_is_missing(trained):
    good = trained.state_dict()
    partial = {"weight_hh_l0": np.full((16, 4), 0.5)}
    missing, unexpected = trained.load_state_dict(dict(partial, extra=np.zeros(1)), strict=False)
    assert "weight_ih_l0" in missing and unexpected == ["extra"]
    assert np.all(trained.state_dict()["weight_hh_l0"] == 0.5)
    np.testing.assert_array_equal(trained.state_dict()["weight_ih_l0"], good["weight_ih_l0"])


def test_load_state_dict_converts_dtype():
    lstm = fastlstm.LSTM(2, 3, dtype="float64")
    lstm.load_state_dict({k: v.astype(np.float32) for k, v in lstm.state_dict().items()})
    assert all(v.dtype == np.float64 for v in lstm.state_dict().values())


def test_set_num_threads_rejects():
    with pytest.raises(ValueError, match="n: expected a thread count in 1.."):
        fastlstm.set_num_threads(10_000)
    with pytest.raises(TypeError, match="n: expected a positive integer"):
        fastlstm.set_num_threads(1.5)
