"""Streams (layer.stream()): one step or chunk per call equals one whole-sequence call, on
every CPU backend and cell; their state, snapshot and refresh; bad input and misuse."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastlstm
from lstm_testing import ALL_CPU_BACKENDS, CPU_BACKENDS, assert_close

TOL = {"float32": 1e-5, "float64": 1e-12}
CELLS = {
    "lstm": lambda *a, **k: fastlstm.LSTM(*a, **k),
    "gru": lambda *a, **k: fastlstm.GRU(*a, **k),
    "gru-cho": lambda *a, **k: fastlstm.GRU(*a, reset_after=False, **k),
}


def as_parts(state):
    return state if isinstance(state, tuple) else (state,)


def run_in_chunks(stream, x, cuts, batch_first=False):
    """Feed x to the stream cut at `cuts` (a cut of length 1 goes as one (B, I) step)."""
    outputs = []
    axis = 1 if batch_first else 0
    for start, stop in zip([0] + cuts, cuts + [x.shape[axis]]):
        if stop - start == 1:
            step = x[:, start] if batch_first else x[start]
            outputs.append(np.expand_dims(stream(step), axis))
        elif stop > start:
            outputs.append(stream(x[:, start:stop] if batch_first else x[start:stop]))
    return np.concatenate(outputs, axis=axis)


def initial_state(layer, batch, rng):
    parts = [0.5 * rng.standard_normal((layer.num_layers, batch, layer.hidden_size)).astype(layer.dtype)
             for _ in layer._spec.cell.state_parts]
    return tuple(parts) if len(parts) > 1 else parts[0]


@st.composite
def stream_problems(draw):
    config = dict(
        cell=draw(st.sampled_from(sorted(CELLS))),
        input_size=draw(st.integers(1, 6)),
        hidden_size=draw(st.integers(1, 12)),
        num_layers=draw(st.integers(1, 3)),
        batch_first=draw(st.booleans()),
        backend=draw(st.sampled_from(CPU_BACKENDS)),
        dtype=draw(st.sampled_from(["float32", "float64"])),
    )
    num_steps = draw(st.integers(1, 8))
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, num_steps - 1)), max_size=4)))) if num_steps > 1 else []
    return config, num_steps, draw(st.integers(1, 4)), cuts, draw(st.booleans()), draw(st.integers(0, 2**31))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream_problems())
def test_a_stream_equals_one_whole_sequence_call(problem):
    config, num_steps, batch, cuts, with_state, seed = problem
    cell = config.pop("cell")
    layer = CELLS[cell](**config, seed=seed % 1000).eval()
    rng = np.random.default_rng(seed)
    shape = (batch, num_steps, layer.input_size) if layer.batch_first else (num_steps, batch, layer.input_size)
    x = rng.standard_normal(shape).astype(layer.dtype)
    state = initial_state(layer, batch, rng) if with_state else None
    y, state_n = layer(x, state)
    stream = layer.stream(batch, state)
    y_stream = run_in_chunks(stream, x, cuts, layer.batch_first)
    tol = TOL[layer.dtype.name]
    assert_close(y_stream, y, tol, "y")
    for got, want in zip(as_parts(stream.state), as_parts(state_n)):
        assert_close(got, want, tol, "state")


# Sizes that take the numba kernels' other paths: packed float32 GEMMs (H a multiple of 32),
# several blocks on threads (a step of 4H(I+H) >= 320K multiply-adds), hand-written batch-1 GEMMs.
@pytest.mark.parametrize("sizes", [(64, 128, 1), (512, 128, 1), (512, 128, 3), (33, 40, 1), (40, 64, 2)],
                         ids=lambda s: "I{}-H{}-B{}".format(*s))
@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("backend", ALL_CPU_BACKENDS)
def test_a_stream_equals_the_whole_sequence_at_kernel_sizes(backend, cell, sizes):
    input_size, hidden, batch = sizes
    for dtype in ("float32", "float64"):
        layer = CELLS[cell](input_size, hidden, num_layers=2, backend=backend, dtype=dtype, seed=3).eval()
        x = np.random.default_rng(1).standard_normal((7, batch, input_size)).astype(dtype)
        y, state_n = layer(x)
        stream = layer.stream(batch)
        y_stream = run_in_chunks(stream, x, [1, 2, 5])
        assert_close(y_stream, y, TOL[dtype], f"{dtype} y")
        for got, want in zip(as_parts(stream.state), as_parts(state_n)):
            assert_close(got, want, TOL[dtype], f"{dtype} state")


@pytest.mark.parametrize("backend", ALL_CPU_BACKENDS)
def test_streams_are_deterministic_and_share_prepared_weights(backend):
    lstm = fastlstm.LSTM(16, 32, backend=backend, seed=0).eval()
    x = np.random.default_rng(0).standard_normal((5, 2, 16)).astype(np.float32)
    first, second = lstm.stream(2), lstm.stream(2)
    assert first._runs is second._runs  # one prepared copy of the weights for both
    np.testing.assert_array_equal(run_in_chunks(first, x, [1, 3]), run_in_chunks(second, x, [2]))
    assert lstm.stream(3)._runs is not first._runs  # another batch size: prepared for it


@pytest.mark.parametrize("backend", ALL_CPU_BACKENDS)
def test_a_stream_keeps_its_snapshot_until_refreshed(backend):
    lstm = fastlstm.LSTM(4, 6, backend=backend, seed=0).eval()
    x = np.random.default_rng(0).standard_normal((3, 1, 4)).astype(np.float32)
    stream = lstm.stream()
    y_before, _ = lstm(x)
    weight = lstm.params["weight_hh_l0"]
    weight *= 0.5  # an in-place change, as an optimizer makes
    y_after, state_after = lstm(x)
    np.testing.assert_allclose(stream(x), y_before, rtol=1e-6)  # the snapshot
    assert lstm.stream()._runs is not stream._runs  # a new stream sees the change
    stream.reset().refresh()
    np.testing.assert_allclose(stream(x), y_after, rtol=1e-6)
    # refresh keeps the state: continuing equals the whole sequence of both chunks
    both, _ = lstm(np.concatenate([x, x]))
    np.testing.assert_allclose(stream(x), both[3:], rtol=1e-5, atol=1e-7)


def test_state_and_reset():
    gru = fastlstm.GRU(3, 5, num_layers=2, backend="numpy", seed=0).eval()
    rng = np.random.default_rng(0)
    h0 = rng.standard_normal((2, 4, 5)).astype(np.float32)
    x = rng.standard_normal((6, 4, 3)).astype(np.float32)
    stream = gru.stream(4, h0)
    np.testing.assert_array_equal(stream.state, h0)
    given = h0.copy()
    h0[...] = 9  # the caller's array: the stream copied it
    np.testing.assert_array_equal(stream.state, given)
    h0 = given
    stream.state[...] = 7  # a copy: the stream's state is its own
    np.testing.assert_array_equal(stream.state, h0)
    y, h_n = gru(x, h0)
    np.testing.assert_allclose(stream(x), y, rtol=1e-6)
    np.testing.assert_allclose(stream.state, h_n, rtol=1e-6)
    stream.reset()
    np.testing.assert_array_equal(stream.state, np.zeros_like(h0))
    np.testing.assert_allclose(stream(x), gru(x)[0], rtol=1e-6)
    lstm_stream = fastlstm.LSTM(3, 5, backend="numpy").eval().stream(2, (None, np.ones((1, 2, 5), np.float32)))
    h, c = lstm_stream.state
    assert h.shape == c.shape == (1, 2, 5) and not h.any() and c.all()


@pytest.mark.parametrize("backend", ALL_CPU_BACKENDS)
def test_misuse_gets_a_clear_error_and_changes_nothing(backend):
    lstm = fastlstm.LSTM(3, 4, backend=backend)
    with pytest.raises(RuntimeError, match="stream: .*training mode.*eval"):
        lstm.stream()
    lstm.eval()
    with pytest.raises(ValueError, match="stream: this layer is bidirectional"):
        fastlstm.LSTM(3, 4, bidirectional=True, backend=backend).eval().stream()
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises((TypeError, ValueError), match="batch_size"):
            lstm.stream(bad)
    with pytest.raises(ValueError, match=r"state\[h\]: expected shape \(1, 2, 4\)"):
        lstm.stream(2, (np.zeros((1, 3, 4), np.float32), None))
    stream = lstm.stream(2)
    stream(np.ones((2, 3), np.float32))
    before = [part.copy() for part in stream.state]
    bad_inputs = [
        (np.ones((3, 3), np.float32), ValueError, r"x: expected one step \(B, input_size\) = \(2, 3\)"),
        (np.ones((2, 5), np.float32), ValueError, "x: expected one step"),
        (np.ones((4, 1, 3), np.float32), ValueError, r"got shape \(4, 1, 3\)"),
        (np.ones((0, 2, 3), np.float32), ValueError, "x: expected"),
        (np.ones(3, np.float32), ValueError, "x: expected"),
        (np.ones((2, 3), np.int64), TypeError, "x: "),
    ]
    for value, error, message in bad_inputs:
        with pytest.raises(error, match=message):
            stream(value)
        with pytest.raises((TypeError, ValueError), match="state"):
            stream.reset((np.zeros((1, 2, 5)), None))
        for got, want in zip(stream.state, before):
            np.testing.assert_array_equal(got, want)


def test_a_stream_serves_one_thread_at_a_time():
    stream = fastlstm.LSTM(3, 4, backend="numpy").eval().stream()
    stream._busy.acquire()  # as while another thread's call runs
    try:
        for action in (lambda: stream(np.ones((1, 3), np.float32)), stream.reset, stream.refresh):
            with pytest.raises(RuntimeError, match="one thread at a time"):
                action()
    finally:
        stream._busy.release()
    stream(np.ones((1, 3), np.float32))


@pytest.mark.skipif("numba" not in CPU_BACKENDS, reason="numba backend unavailable")
def test_numba_streams_follow_the_thread_count_and_equal_the_kernels_result():
    lstm = fastlstm.LSTM(512, 128, backend="numba", seed=0).eval()  # a step large enough for threads
    x = np.random.default_rng(0).standard_normal((4, 1, 512)).astype(np.float32)
    y, _ = lstm(x)
    stream = lstm.stream()
    try:
        fastlstm.set_num_threads(1)
        np.testing.assert_array_equal(run_in_chunks(stream, x, [1, 2, 3]), y)
        assert set(stream._runs[0]._packed) == {1}
        fastlstm.set_num_threads(2)
        stream.reset()
        np.testing.assert_array_equal(run_in_chunks(stream, x, [1, 2, 3]), y)
        assert 2 in stream._runs[0]._packed or fastlstm.get_num_threads() < 2
    finally:
        fastlstm.set_num_threads(None)


def test_torch_tensors_in_torch_tensors_out():
    torch = pytest.importorskip("torch", reason="torch not installed")
    lstm = fastlstm.LSTM(3, 4, batch_first=True, backend="numpy", seed=0).eval()
    x = torch.randn(2, 5, 3)
    stream = lstm.stream(2)
    y = stream(x)
    assert isinstance(y, torch.Tensor) and y.shape == (2, 5, 4)
    np.testing.assert_allclose(y.numpy(), lstm(x.numpy())[0], rtol=1e-6)
    assert isinstance(stream(x[:, 0]), torch.Tensor)
    with pytest.raises(TypeError, match="x: this torch tensor requires grad"):
        stream(torch.randn(2, 3, requires_grad=True))


def test_a_layer_with_streams_copies_and_pickles():
    lstm = fastlstm.LSTM(3, 4, backend="numpy", seed=0).eval()
    lstm.stream()
    for clone in (copy.deepcopy(lstm), pickle.loads(pickle.dumps(lstm))):
        stream = clone.stream()
        x = np.ones((2, 1, 3), np.float32)
        np.testing.assert_array_equal(stream(x), lstm(x)[0])


@pytest.mark.skipif("numba" not in CPU_BACKENDS, reason="numba backend unavailable")
def test_refresh_follows_the_layer_to_another_backend_and_keeps_the_state():
    gru = fastlstm.GRU(5, 32, backend="numpy", seed=0).eval()
    x = np.random.default_rng(0).standard_normal((6, 2, 5)).astype(np.float32)
    y, h_n = gru(x)
    stream = gru.stream(2)
    first = stream(x[:3])
    gru.to("numba")
    assert stream._backend.name == "numpy"  # until refreshed
    stream.refresh()
    assert stream._backend.name == "numba"
    assert_close(np.concatenate([first, stream(x[3:])]), y, 1e-5, "y")
    assert_close(stream.state, h_n, 1e-5, "h")
