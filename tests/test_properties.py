"""Property-based tests (hypothesis) over shapes, lengths and dtypes, for every CPU backend."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastlstm
from lstm_testing import CPU_BACKENDS, assert_close

TOL = {"float32": 2e-5, "float64": 1e-10}
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def layers_and_batches(draw):
    config = dict(
        input_size=draw(st.integers(1, 5)),
        hidden_size=draw(st.integers(1, 12)),
        num_layers=draw(st.integers(1, 3)),
        bidirectional=draw(st.booleans()),
        backend=draw(st.sampled_from(CPU_BACKENDS)),
        dtype=draw(st.sampled_from(["float32", "float64"])),
    )
    num_steps = draw(st.integers(1, 6))
    batch = draw(st.integers(1, 4))
    lengths = draw(st.lists(st.integers(1, num_steps), min_size=batch, max_size=batch))
    return config, num_steps, batch, lengths, draw(st.integers(0, 2**31))


@SETTINGS
@given(layers_and_batches())
def test_padding_is_invisible(problem):
    """A padded batch with lengths gives each sequence what it gets alone, gradients included."""
    config, num_steps, batch, lengths, seed = problem
    lstm = fastlstm.LSTM(seed=seed % 1000, **config)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_steps, batch, config["input_size"]))
    d = config["num_layers"] * (2 if config["bidirectional"] else 1)
    state = tuple(rng.standard_normal((d, batch, config["hidden_size"])) for _ in range(2))
    y, (h, c) = lstm(x, state, lengths)
    dy = rng.standard_normal(y.shape)
    dx, (dh0, dc0) = lstm.backward(dy, (h, c))
    tol = TOL[config["dtype"]]
    for b, n in enumerate(lengths):
        alone = fastlstm.LSTM(**config)
        alone.load_state_dict(lstm.state_dict())
        one_state = tuple(s[:, b : b + 1] for s in state)
        yb, (hb, cb) = alone(x[:n, b : b + 1], one_state)
        dxb, (dh0b, dc0b) = alone.backward(dy[:n, b : b + 1], (hb, cb))
        assert_close(y[:n, b], yb[:, 0], tol, "y")
        assert not np.any(y[n:, b]), "outputs past the length must be zero"
        assert_close(h[:, b], hb[:, 0], tol, "h_n")
        assert_close(c[:, b], cb[:, 0], tol, "c_n")
        assert_close(dx[:n, b], dxb[:, 0], tol, "dx")
        assert not np.any(dx[n:, b]), "padding gets no gradient"
        assert_close(dh0[:, b], dh0b[:, 0], tol, "dh0")
        assert_close(dc0[:, b], dc0b[:, 0], tol, "dc0")


@SETTINGS
@given(layers_and_batches())
def test_batch_order_does_not_matter(problem):
    config, num_steps, batch, lengths, seed = problem
    lstm = fastlstm.LSTM(seed=1, **config)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_steps, batch, config["input_size"]))
    order = rng.permutation(batch)
    y, (h, c) = lstm(x, lengths=lengths)
    y_perm, (h_perm, c_perm) = lstm(x[:, order], lengths=np.asarray(lengths)[order])
    tol = TOL[config["dtype"]]
    assert_close(y_perm, y[:, order], tol, "y")
    assert_close(h_perm, h[:, order], tol, "h_n")


@SETTINGS
@given(
    st.sampled_from(CPU_BACKENDS),
    st.sampled_from([np.int8, np.int32, np.int64, np.uint16, np.float16, np.float32, np.float64, np.bool_]),
    st.sampled_from(["float32", "float64"]),
)
def test_any_floating_input_dtype_gives_the_layer_dtype_and_others_are_refused(backend, in_dtype, layer_dtype):
    lstm = fastlstm.LSTM(2, 3, backend=backend, dtype=layer_dtype, seed=0)
    x = (np.arange(12).reshape(3, 2, 2) % 2).astype(in_dtype)
    if np.dtype(in_dtype).kind != "f":
        with pytest.raises(TypeError, match="x: expected floating-point numbers"):
            lstm(x)
        return
    y, (h, c) = lstm(x)
    assert y.dtype == h.dtype == c.dtype == np.dtype(layer_dtype)
    dx, (dh0, _) = lstm.backward(np.ones_like(y))
    assert dx.dtype == dh0.dtype == np.dtype(layer_dtype)
    assert all(g.dtype == np.dtype(layer_dtype) for g in lstm.grads.values())
