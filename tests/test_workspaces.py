"""Memory kept between calls (fastlstm.backends.workspaces) and its use by the numba backend:
a buffer is reused only once nobody can read it any more."""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest

import fastlstm
from fastlstm.backends import workspaces as workspaces_module
from fastlstm.backends.workspaces import Workspaces
from lstm_testing import assert_close


@pytest.fixture
def keep_every_size(monkeypatch):
    """Small sizes kept too, so that these tests can use small arrays."""
    monkeypatch.setattr(workspaces_module, "SMALL_BYTES", 0)


def test_small_requests_are_new_arrays_never_kept():
    workspaces = Workspaces(1 << 30)
    small = workspaces.take((workspaces_module.SMALL_BYTES // 4 - 1,), np.float32)
    workspaces.give(small)
    assert workspaces.kept_bytes == 0
    large = workspaces.take((workspaces_module.SMALL_BYTES // 4,), np.float32)
    workspaces.give(large)
    assert workspaces.kept_bytes == workspaces_module.SMALL_BYTES


def test_take_gives_an_array_of_the_shape_and_dtype(keep_every_size):
    workspaces = Workspaces(1 << 20)
    for shape, dtype in (((3, 4), np.float32), ((2, 3, 5), np.float64), ((0, 7), np.float32), ((), np.int64)):
        array = workspaces.take(shape, dtype)
        assert array.shape == shape and array.dtype == dtype and array.flags.c_contiguous
        array[...] = 1  # writable
        workspaces.give(array)


def test_a_given_buffer_is_taken_again_when_it_fits(keep_every_size):
    workspaces = Workspaces(1 << 20)
    first = workspaces.take((100, 10), np.float32)
    workspaces.give(first)
    assert workspaces.kept_bytes == 4000
    same = workspaces.take((10, 100), np.float32)
    assert np.shares_memory(first, same) and workspaces.kept_bytes == 0
    workspaces.give(same)
    smaller = workspaces.take((60, 10), np.float64)  # 4800 bytes: does not fit in 4000
    assert not np.shares_memory(first, smaller)
    half = workspaces.take((50, 10), np.float32)  # 2000 bytes: fits (at least half of the buffer)
    assert np.shares_memory(first, half)
    workspaces.give(half)
    tiny = workspaces.take((10, 10), np.float32)  # 400 bytes: would waste the buffer
    assert not np.shares_memory(first, tiny)


def test_two_takes_never_share_memory(keep_every_size):
    workspaces = Workspaces(1 << 20)
    arrays = [workspaces.take((64,), np.float32) for _ in range(3)]
    workspaces.give(*arrays)
    workspaces.give(arrays[0])  # given twice: kept once
    again = [workspaces.take((64,), np.float32) for _ in range(4)]
    for i, a in enumerate(again):
        for b in again[i + 1 :]:
            assert not np.shares_memory(a, b)


def test_kept_memory_is_bounded_least_recently_given_dropped_first(keep_every_size):
    workspaces = Workspaces(10_000)
    old, new, newest = (workspaces.take((1000,), np.float32) for _ in range(3))
    workspaces.give(old)
    workspaces.give(new)  # 8000 bytes kept
    workspaces.give(newest)  # 12000: the oldest goes
    assert workspaces.kept_bytes == 8000
    taken = [workspaces.take((1000,), np.float32) for _ in range(2)]
    assert not any(np.shares_memory(old, t) for t in taken) and any(np.shares_memory(new, t) for t in taken)
    workspaces.give(workspaces.take((5000,), np.float32))  # 20000 bytes: larger than the whole budget
    assert workspaces.kept_bytes == 0
    workspaces.give(*taken)
    workspaces.clear()
    assert workspaces.kept_bytes == 0


def test_give_when_freed_waits_for_the_owner(keep_every_size):
    class Owner:
        pass

    workspaces = Workspaces(1 << 20)
    owner = Owner()
    array = workspaces.take((256,), np.float32)
    workspaces.give_when_freed(owner, array)
    assert workspaces.kept_bytes == 0
    del owner
    gc.collect()
    assert workspaces.kept_bytes == 1024


def test_threads_taking_and_giving_never_share_a_buffer(keep_every_size):
    workspaces = Workspaces(1 << 20)
    failures = []

    def work(tag):
        for _ in range(300):
            array = workspaces.take((32,), np.float32)
            array[:] = tag
            if not np.all(array == tag):  # another thread wrote into it
                failures.append(tag)
            workspaces.give(array)

    workers = [threading.Thread(target=work, args=(tag,)) for tag in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert not failures


# -- the numba backend's use ----------------------------------------------------------------
numba_available = fastlstm.available_backends()["numba"].available
needs_numba = pytest.mark.skipif(not numba_available, reason="numba backend unavailable")


def _problem(cell, hidden, seed, steps=6, batch=4):
    rng = np.random.default_rng(seed)
    inputs = 16
    gates = 4 if cell == "lstm" else 3
    weights = [rng.standard_normal(s).astype(np.float32) * 0.3 for s in
               ((gates * hidden, inputs), (gates * hidden, hidden), (gates * hidden,), (gates * hidden,))]
    x = rng.standard_normal((steps, batch, inputs)).astype(np.float32)
    h0 = rng.standard_normal((batch, hidden)).astype(np.float32)
    dy = rng.standard_normal((steps, batch, hidden)).astype(np.float32)
    dh = rng.standard_normal((batch, hidden)).astype(np.float32)
    return x, weights, h0, dy, dh


def _forward(backend, cell, problem):
    x, (w_ih, w_hh, b_ih, b_hh), h0, _, _ = problem
    if cell == "lstm":
        y, h_n, c_n, saved = backend.forward_sequence(x, w_ih, w_hh, b_ih + b_hh, h0, h0 * 0.5, None, False, True)
        return (y, h_n, c_n), saved
    y, h_n, saved = backend.gru_forward_sequence(x, w_ih, w_hh, b_ih, b_hh, h0, None, False, True, True)
    return (y, h_n), saved


def _backward(backend, cell, saved, problem):
    _, _, _, dy, dh = problem
    if cell == "lstm":
        return backend.backward_sequence(saved, dy, dh, dh * 0.5)
    return backend.gru_backward_sequence(saved, dy, dh)


def _copies(arrays):
    return [np.array(a, copy=True) for a in arrays]


@needs_numba
@pytest.mark.parametrize("hidden", [64, 8])  # the parallel plan (two blocks), and one block
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_saved_forwards_alive_together_and_backward_twice(cell, hidden):
    """Training forwards of one shape, all kept, then differentiated in reverse order, the
    last one twice: each backward matches the NumPy reference's. A saved forward's buffers
    handed to the next forward (or to its own backward's scratch) would change them."""
    from fastlstm.backends import numba_backend, numpy_backend

    backend, reference = numba_backend.create_backend(), numpy_backend.create_backend()
    problems = [_problem(cell, hidden, seed, steps=200, batch=8) for seed in range(3)]  # gates > 64 KiB: kept
    forwards = [_forward(backend, cell, p) for p in problems]
    for (outputs, _), problem in zip(forwards, problems):
        expected, _ = _forward(reference, cell, problem)
        for got, want in zip(outputs, expected):
            assert_close(got, want, 1e-5, "forward")
    for (_, saved), problem in reversed(list(zip(forwards, problems))):
        expected = _backward(reference, cell, _forward(reference, cell, problem)[1], problem)
        first = _copies(_backward(backend, cell, saved, problem))
        for got, want in zip(first, expected):
            assert_close(got, want, 1e-5, "backward")
    last_saved, last_problem = forwards[0][1], problems[0]
    again = _backward(backend, cell, last_saved, last_problem)
    for got, want in zip(again, first):
        np.testing.assert_array_equal(got, want)


@needs_numba
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_training_steps_reuse_the_memory_of_the_previous_step(cell):
    from fastlstm.backends import numba_backend

    backend = numba_backend.create_backend()
    problem = _problem(cell, 64, 0, steps=40, batch=8)  # gates 320 KiB or more: kept
    outputs, saved = _forward(backend, cell, problem)
    _backward(backend, cell, saved, problem)
    kept_while_alive = backend._workspaces.kept_bytes  # scratch only: the saved forward holds the rest
    buffers = [value for value in vars(saved).values() if isinstance(value, np.ndarray) and value.base is not None
               and value.base.dtype == np.uint8]
    assert buffers  # the saved gates and states come from the workspaces
    del saved
    gc.collect()
    assert backend._workspaces.kept_bytes == kept_while_alive + sum(b.base.nbytes for b in buffers)
    _, saved = _forward(backend, cell, problem)
    reused = [value for value in vars(saved).values() if isinstance(value, np.ndarray)
              and any(np.shares_memory(value, b) for b in buffers)]
    assert reused


@needs_numba
def test_empty_cache_frees_the_kept_memory_and_calls_still_agree():
    layer = fastlstm.LSTM(16, 64, backend="numba", seed=0)
    reference = fastlstm.LSTM(16, 64, backend="numpy", seed=0)
    x = np.random.default_rng(1).standard_normal((5, 4, 16)).astype(np.float32)
    layer(x)
    layer.backward(np.ones((5, 4, 64), np.float32))
    layer.eval()(x)
    backend = layer._current_backend()
    assert backend._workspaces.kept_bytes > 0 and backend._kept
    fastlstm.empty_cache()
    assert backend._workspaces.kept_bytes == 0 and not backend._kept
    np.testing.assert_allclose(layer(x)[0], reference.eval()(x)[0], rtol=1e-5, atol=1e-6)
