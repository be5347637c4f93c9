"""Inference with the batch cut across threads (numba_lstm / numba_gru.forward_sequences):
which calls take it, parity with the NumPy reference for both cells and every feature that
applies (lengths, initial state, both directions, both projections of the slices, uneven
slices), the same bits as the units cut (float32), workers run one after another; and the
one-row GEMM tile over several panels that batch 1 runs on."""

from __future__ import annotations

import numba
import numpy as np
import pytest

import fastlstm

if not fastlstm.available_backends()["numba"].available:
    pytest.skip(f"numba backend unavailable: {fastlstm.available_backends()['numba'].reason}", allow_module_level=True)

from fastlstm.backends import numba_backend  # noqa: E402
from fastlstm.kernels import numba_common as common  # noqa: E402
from fastlstm.kernels import numba_gru, numba_lstm  # noqa: E402
from lstm_testing import assert_close, record_argument, run_workers_in_turn  # noqa: E402

PARITY = {"float32": 1e-5, "float64": 1e-9}
KERNELS = {"LSTM": numba_lstm, "GRU": numba_gru}
# forward_sequences' `projection` and `slices` arguments
PROJECTION_ARGUMENT = {"LSTM": 10, "GRU": 2}
SLICES_ARGUMENT = {"LSTM": 11, "GRU": 12}


@pytest.fixture
def two_threads():
    if fastlstm.threads.available_cores() < 2:
        pytest.skip("needs 2 cores")
    fastlstm.set_num_threads(2)
    yield
    fastlstm.set_num_threads(None)


def layer(cell, dtype, backend, **config):
    return getattr(fastlstm, cell)(backend=backend, dtype=dtype, seed=5, **config).eval()


def run(model, x, state, lengths):
    """y and the final state parts as a tuple."""
    y, final = model(x, state, lengths)
    return (y, *(final if isinstance(final, tuple) else (final,)))


def problem(cell, batch, seed=0, num_steps=9, input_size=12, hidden=32, directions=2):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_steps, batch, input_size))
    parts = 2 if cell == "LSTM" else 1
    state = tuple(0.5 * rng.standard_normal((directions, batch, hidden)) for _ in range(parts))
    return x, state if parts == 2 else state[0], rng.integers(1, num_steps + 1, size=batch)


@pytest.mark.parametrize("reset_after", [True, False], ids=["reset-after", "cho"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("batch, projection", [(20, "PROJECT_AT_FIRST_STEP"), (40, "PROJECT_EACH_STEP")])
@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_cut_batch_matches_numpy(cell, batch, projection, dtype, reset_after, two_threads, monkeypatch):
    """Uneven slices (20: 8 + 12 sequences, 40: 16 + 24), lengths, an initial state, both
    directions; 12 or 24 rows a slice project all steps first, 16 and more each step."""
    if cell == "LSTM" and not reset_after:
        pytest.skip("reset_after is the GRU's")
    config = dict(input_size=12, hidden_size=32, bidirectional=True, **({} if cell == "LSTM" else
                                                                       {"reset_after": reset_after}))
    slices = record_argument(monkeypatch, KERNELS[cell], "forward_sequences", SLICES_ARGUMENT[cell])
    projections = record_argument(monkeypatch, KERNELS[cell], "forward_sequences", PROJECTION_ARGUMENT[cell])
    numpy_layer = layer(cell, dtype, "numpy", **config)
    x, state, lengths = problem(cell, batch)
    expected = run(numpy_layer, x, state, lengths)
    numba_layer = layer(cell, dtype, "numba", **config)
    actual = run(numba_layer, x, state, lengths)
    for name, a, e in zip(("y", "h_n", "c_n"), actual, expected):
        assert_close(a, e, PARITY[dtype], name)
    assert len(slices) == 2  # one call a direction
    assert [s.tolist() for s in slices] == ([[0, 8, 20]] * 2 if batch == 20 else [[0, 16, 40]] * 2)
    assert set(projections) == {getattr(common, projection)}


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_cut_batch_has_the_units_cuts_bits(cell, two_threads, monkeypatch):
    """float32, packed: every product and cell update is the same arithmetic whichever thread
    runs which sequences."""
    x, state, lengths = problem(cell, 24, seed=1, hidden=64, directions=1)
    model = layer(cell, "float32", "numba", input_size=12, hidden_size=64)
    slices = record_argument(monkeypatch, KERNELS[cell], "forward_sequences", SLICES_ARGUMENT[cell])
    cut_batch = run(model, x, state, lengths)
    monkeypatch.setattr(numba_backend, "_SLICE_MAX_STEP_WORK", 0)
    units = record_argument(monkeypatch, KERNELS[cell], "forward", 0)
    cut_units = run(model, x, state, lengths)
    assert len(slices) == 1 and len(units) == 1
    for a, b in zip(cut_batch, cut_units):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_cut_batch_with_workers_one_after_another(cell, two_threads, monkeypatch):
    """The slices wait for nothing: workers run in turn on one thread finish, and agree."""
    x, state, lengths = problem(cell, 16, seed=2, directions=1)
    config = dict(input_size=12, hidden_size=32)
    expected = run(layer(cell, "float64", "numpy", **config), x, state, lengths)
    model = layer(cell, "float64", "numba", **config)
    run_workers_in_turn(monkeypatch)
    slices = record_argument(monkeypatch, KERNELS[cell], "forward_sequences", SLICES_ARGUMENT[cell])
    for a, e in zip(run(model, x, state, lengths), expected):
        assert_close(a, e, PARITY["float64"])
    assert len(slices) == 1


@pytest.mark.parametrize("batch, hidden, threads, training, cut", [
    (16, 32, 2, False, True),
    (15, 32, 2, False, False),  # a slice would have fewer than 8 sequences
    (16, 32, 1, False, False),  # one thread
    (16, 32, 2, True, False),  # training keeps the units cut
    (64, 256, 2, False, False),  # 25 M multiply-adds a step
])
def test_which_calls_cut_the_batch(batch, hidden, threads, training, cut, monkeypatch):
    if threads > fastlstm.threads.available_cores():
        pytest.skip("needs 2 cores")
    seen = record_argument(monkeypatch, numba_lstm, "forward_sequences", 0)
    model = fastlstm.LSTM(128, hidden, backend="numba", seed=0)
    model.train(training)
    fastlstm.set_num_threads(threads)
    try:
        model(np.zeros((3, batch, 128), np.float32))
    finally:
        fastlstm.set_num_threads(None)
    assert bool(seen) == cut


@numba.njit
def packed_product(a, panels, c, descending):
    common._gemm_packed_in_order(a, panels, c, False, descending)


@pytest.mark.parametrize("descending", [False, True])
@pytest.mark.parametrize("count", [1, 3, 4, 5, 8, 9])
def test_one_row_over_several_panels_is_each_rows_product(count, descending):
    """Batch 1 multiplies _ROW_PANELS panels a tile (the rest one at a time): the same bits
    as that row in a product of several rows (the 4-row tile, one panel at a time), in either
    panel order, and NumPy's product to float32 rounding."""
    rng = np.random.default_rng(count)
    inner = 37
    w = rng.standard_normal((inner, count * common.PANEL)).astype(np.float32)
    panels = np.ascontiguousarray(w.reshape(inner, count, common.PANEL).transpose(1, 0, 2))
    a = rng.standard_normal((4, inner)).astype(np.float32)
    rows = np.empty((4, count * common.PANEL), np.float32)
    packed_product(a, panels, rows, descending)
    one = np.empty((1, count * common.PANEL), np.float32)
    packed_product(a[2:3], panels, one, descending)
    assert np.array_equal(one[0], rows[2])
    np.testing.assert_allclose(one[0], a[2] @ w, rtol=1e-5, atol=1e-5)
