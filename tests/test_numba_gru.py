"""The Numba GRU kernels (kernels/numba_gru.py): parity with the NumPy reference on every
feature (hypothesis), every GEMM mode and block plan of both reset conventions, threaded
against one thread, determinism; and the cache digests that tie each cell's kernel file to
numba_common.py."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastlstm

if not fastlstm.available_backends()["numba"].available:
    pytest.skip(f"numba backend unavailable: {fastlstm.available_backends()['numba'].reason}", allow_module_level=True)

from fastlstm.backends import numba_backend  # noqa: E402
from fastlstm.kernels import numba_common as common  # noqa: E402
from fastlstm.kernels import numba_gru, numba_lstm  # noqa: E402
from lstm_testing import (  # noqa: E402
    assert_close,
    assert_layers_agree,
    forward_backward,
    record_argument,
    run_workers_in_turn,
)

PARITY = {"float32": 1e-5, "float64": 1e-9}
# Drawn problems (hypothesis) reach corners that fixed ones do not, one hidden unit through
# several layers, say, where the float32 kernels' tanh approximation (3.7e-7 absolute,
# against libm in the reference) adds up past 1e-5 relative: 3e-5 there.
DRAWN_PARITY = {"float32": 3e-5, "float64": 1e-9}


def gru_pair(dtype, seed=0, **config):
    """A numba GRU and a numpy GRU with the same weights and dropout stream."""
    a = fastlstm.GRU(backend="numba", dtype=dtype, seed=seed, **config)
    b = fastlstm.GRU(backend="numpy", dtype=dtype, seed=seed, **config)
    b.load_state_dict(a.state_dict())
    b._dropout_rng.bit_generator.state = a._dropout_rng.bit_generator.state
    return a, b


def inputs(gru, num_steps, batch, seed, with_state=True, lengths=None):
    rng = np.random.default_rng(seed)
    d = gru.num_layers * gru.num_directions
    shape = (batch, num_steps) if gru.batch_first else (num_steps, batch)
    x = rng.standard_normal(shape + (gru.input_size,))
    h0 = 0.5 * rng.standard_normal((d, batch, gru.hidden_size)) if with_state else None
    dy = rng.standard_normal(shape + (gru.hidden_size * gru.num_directions,))
    dh = rng.standard_normal((d, batch, gru.hidden_size))
    return x, h0, lengths, dy, dh


@st.composite
def problems(draw):
    config = dict(
        input_size=draw(st.integers(1, 6)),
        hidden_size=draw(st.sampled_from([1, 3, 8, 17, 32, 40, 64, 96])),
        num_layers=draw(st.integers(1, 3)),
        bidirectional=draw(st.booleans()),
        batch_first=draw(st.booleans()),
        bias=draw(st.booleans()),
        dropout=draw(st.sampled_from([0.0, 0.3])),
        reset_after=draw(st.booleans()),
    )
    if config["num_layers"] == 1:
        config["dropout"] = 0.0
    num_steps = draw(st.integers(1, 7))
    batch = draw(st.sampled_from([1, 2, 5, 16]))
    lengths = draw(st.none() | st.lists(st.integers(1, num_steps), min_size=batch, max_size=batch))
    return config, num_steps, batch, lengths, draw(st.booleans()), draw(st.sampled_from(["float32", "float64"])), \
        draw(st.integers(0, 1000))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_matches_numpy_on_every_feature(problem):
    config, num_steps, batch, lengths, with_state, dtype, seed = problem
    numba_gru_layer, numpy_gru_layer = gru_pair(dtype, **config)
    args = inputs(numba_gru_layer, num_steps, batch, seed, with_state, lengths)
    assert_layers_agree(numba_gru_layer, numpy_gru_layer, args, DRAWN_PARITY[dtype], floor=0.01)  # as the LSTM's
    # eval mode keeps nothing for backward: the kernels' other path
    (y, h_n), (y_ref, h_ref) = (layer.eval()(*args[:3]) for layer in (numba_gru_layer, numpy_gru_layer))
    assert_close(y, y_ref, DRAWN_PARITY[dtype], "eval y", floor=0.01)
    assert_close(h_n, h_ref, DRAWN_PARITY[dtype], "eval h_n", floor=0.01)


# Plans the heuristics pick on two threads: (batch, hidden, dtype) -> mode, blocks.
PLANS = [
    pytest.param(16, 64, "float32", common.GEMM_PACKED, 2, id="packed-2-blocks"),
    pytest.param(1, 128, "float32", common.GEMM_PACKED, 2, id="packed-batch-1-2-blocks"),
    pytest.param(4, 96, "float32", common.GEMM_BLAS, 2, id="blas-unaligned-2-blocks"),
    pytest.param(4, 64, "float64", common.GEMM_BLAS, 2, id="blas-float64-2-blocks"),
    pytest.param(1, 40, "float64", common.GEMM_SMALL, 1, id="small-batch-1-1-block"),
    pytest.param(2, 32, "float32", common.GEMM_PACKED, 1, id="packed-1-block"),
]


def plan_of(gru, batch, dtype):
    return gru._current_backend()._gru_plan(batch, gru.hidden_size, np.dtype(dtype), gru._spec.cell.reset_after)


@pytest.mark.parametrize("reset_after", [True, False])
@pytest.mark.parametrize(("batch", "hidden", "dtype", "mode", "blocks"), PLANS)
def test_every_plan_matches_numpy_threaded_and_in_turn(batch, hidden, dtype, mode, blocks, reset_after, monkeypatch):
    """Each GEMM mode and block count, with lengths, both directions and an initial state;
    the threaded time loop gives bit for bit what the same blocks give run in turn."""
    if fastlstm.threads.available_cores() < 2 and blocks > 1:
        pytest.skip("needs 2 cores")
    fastlstm.set_num_threads(min(2, fastlstm.threads.available_cores()))
    try:
        layer, reference = gru_pair(dtype, input_size=5, hidden_size=hidden, bidirectional=True,
                                    reset_after=reset_after, seed=7)
        plan = plan_of(layer, batch, dtype)
        assert (plan.mode, plan.num_blocks) == (mode, blocks)
        lengths = np.arange(batch) % 6 + 1
        args = inputs(layer, 6, batch, seed=3, lengths=lengths)
        assert_layers_agree(layer, reference, args, PARITY[dtype])
        layer.zero_grad()
        threaded = forward_backward(layer, *args)
        run_workers_in_turn(monkeypatch)
        layer.zero_grad()
        in_turn = forward_backward(layer, *args)
    finally:
        fastlstm.set_num_threads(None)
    for name in threaded:
        assert np.array_equal(threaded[name], in_turn[name]), name


@pytest.mark.parametrize("training", [False, True], ids=["eval", "training"])
@pytest.mark.parametrize("reset_after", [True, False])
@pytest.mark.parametrize(("projection", "batch", "dtype"), [
    ("PROJECT_EACH_STEP", 16, "float32"),
    ("PROJECT_EACH_STEP", 16, "float64"),
    ("PROJECT_AT_FIRST_STEP", 4, "float32"),
    ("PROJECT_AT_FIRST_STEP", 16, "float64"),
    ("PROJECTED_BY_CALLER", 4, "float32"),
])
def test_matches_numpy_with_each_input_projection(projection, batch, dtype, reset_after, training, monkeypatch):
    """Each place the forward's input projection can come from (the caller on one block;
    in the kernel on two, each step's from batch 16 on, in training only where the GEMM is
    packed), with
    lengths, both directions and an initial state: eval outputs, or training's outputs and
    gradients (the gates each step's projection went into are the ones its backward reads)."""
    num_threads = 1 if projection == "PROJECTED_BY_CALLER" else 2
    if num_threads > fastlstm.threads.available_cores():
        pytest.skip("needs 2 cores")
    if batch == 16 and dtype == "float64" and (projection == "PROJECT_EACH_STEP") == training:
        pytest.skip("from batch 16 on inference projects each step; training only with the packed GEMM (float32)")
    monkeypatch.setattr(numba_backend, "_SLICE_MAX_STEP_WORK", 0)  # the units cut's projections (forward's)
    seen = record_argument(monkeypatch, numba_gru, "forward", 2)  # the projection argument
    fastlstm.set_num_threads(num_threads)
    try:
        layer, reference = gru_pair(dtype, input_size=5, hidden_size=64, bidirectional=True, reset_after=reset_after,
                                    seed=2)
        args = inputs(layer, 7, batch, seed=4, lengths=np.arange(batch) % 7 + 1)
        if training:
            assert_layers_agree(layer, reference, args, PARITY[dtype])
        else:
            (y, h_n), (y_ref, h_ref) = (gru.eval()(*args[:3]) for gru in (layer, reference))
            assert_close(y, y_ref, PARITY[dtype], "y")
            assert_close(h_n, h_ref, PARITY[dtype], "h_n")
    finally:
        fastlstm.set_num_threads(None)
    assert seen and set(seen) == {getattr(common, projection)}


@pytest.mark.parametrize("reset_after", [True, False])
def test_deterministic(reset_after):
    results = []
    for _ in range(2):
        gru = fastlstm.GRU(8, 64, num_layers=2, bidirectional=True, backend="numba", seed=0, reset_after=reset_after)
        args = inputs(gru, 20, 16, seed=5, lengths=np.arange(20, 4, -1))
        results.append(forward_backward(gru, *args))
    for name in results[0]:
        assert np.array_equal(results[0][name], results[1][name]), name


def test_output_gradients_past_the_end_reach_nothing():
    """Whatever dy holds past a sequence's end (here inf) reaches no gradient: the kernels
    select, they do not multiply by a mask."""
    for reset_after in (True, False):
        gru = fastlstm.GRU(3, 32, backend="numba", seed=1, reset_after=reset_after, dtype="float64")
        x, h0, _, dy, dh = inputs(gru, 5, 4, seed=2)
        lengths = np.array([5, 3, 1, 2])
        clean = forward_backward(gru, x, h0, lengths, dy, dh)
        dy_bad = dy.copy()
        for b, n in enumerate(lengths):
            dy_bad[n:, b] = np.inf
        gru.zero_grad()
        dirty = forward_backward(gru, x, h0, lengths, dy_bad, dh)
        for name in clean:
            np.testing.assert_array_equal(dirty[name], clean[name], err_msg=name)


@pytest.mark.parametrize("cell_kernels", [numba_lstm, numba_gru], ids=["lstm", "gru"])
def test_cell_kernels_record_the_common_source_they_were_compiled_against(cell_kernels):
    """Numba's cache checks only a cached function's own file: a changed numba_common.py must
    change every cell's file too (its COMMON_SOURCE_DIGEST), or stale kernels would load."""
    assert cell_kernels.COMMON_SOURCE_DIGEST == common.source_digest(), (
        f"numba_common.py changed: set COMMON_SOURCE_DIGEST = {common.source_digest()!r} in "
        f"{pathlib.Path(cell_kernels.__file__).name} (and every other cell's kernel file)"
    )
