"""The CuPy backend without a GPU: its CUDA kernels built for the host, its sequence logic,
and its host-side plumbing, against the NumPy reference.

kernels/*.cu are compiled with the system C++ compiler under a small emulation header
(tests/cuda_emulation/cuda_host.h): the same source file, no second copy of the math.
A fake ``cupy`` module (NumPy arrays of another type, NumPy GEMMs, RawModule functions
that launch the host build) then lets the real CupyBackend run end to end on the CPU.
"""

from __future__ import annotations

import ctypes
import sys
import types

import numpy as np
import pytest
from cuda_emulation import host_kernels
from cuda_emulation.fake_cupy import make_fake_cupy
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from lstm_testing import TOLERANCE, assert_close, random_problem

import fastlstm
from fastlstm import registry
from fastlstm.backends import cublas_api, cupy_backend
from fastlstm.backends.numpy_backend import NumpyBackend

pytestmark = pytest.mark.skipif(host_kernels.compiler() is None, reason="no C++ compiler to build the kernels for the host")


def sequence_problems(num_steps, batch, input_size, hidden) -> dict:
    """Hypothesis strategies for check_against_numpy's arguments: sizes from 1 to the given
    maxima, either dtype and direction, with or without lengths."""
    return dict(num_steps=st.integers(1, num_steps), batch=st.integers(1, batch),
                input_size=st.integers(1, input_size), hidden=st.integers(1, hidden),
                dtype=st.sampled_from(["float32", "float64"]), reverse=st.booleans(), with_lengths=st.booleans(),
                seed=st.integers(0, 2**31))


@pytest.fixture(scope="module")
def emulated(library):
    """CudaSequenceBackend over NumPy, NumPy GEMMs and the host-built kernels: the per-step loop."""
    return cupy_backend.CudaSequenceBackend(np, host_kernels.numpy_gemm, host_kernels.emulated_kernels(library),
                                            loop="per-step")


@pytest.fixture(scope="module")
def emulated_persistent(library):
    """The same with the persistent kernels, every CUDA thread a host thread."""
    kernels = host_kernels.emulated_kernels(library, shared_limit=8192)
    return cupy_backend.CudaSequenceBackend(np, host_kernels.numpy_gemm, kernels, loop="persistent")


@pytest.fixture(scope="module")
def emulated_resident(library):
    """The same with the resident kernels (3 multiprocessors: blocks of several sequences
    from 4 sequences on)."""
    kernels = host_kernels.emulated_kernels(library)
    return cupy_backend.CudaSequenceBackend(np, host_kernels.numpy_gemm, kernels, loop="resident")


def sequence_inputs(rng, num_steps, batch, input_size, hidden, dtype, with_lengths):
    x = rng.standard_normal((num_steps, batch, input_size)).astype(dtype)
    w_ih = (0.3 * rng.standard_normal((4 * hidden, input_size))).astype(dtype)
    w_hh = (0.3 * rng.standard_normal((4 * hidden, hidden))).astype(dtype)
    bias = (0.3 * rng.standard_normal(4 * hidden)).astype(dtype)
    h0 = (0.5 * rng.standard_normal((batch, hidden))).astype(dtype)
    c0 = (0.5 * rng.standard_normal((batch, hidden))).astype(dtype)
    lengths = rng.integers(1, num_steps + 1, size=batch).astype(np.int64) if with_lengths else None
    return x, w_ih, w_hh, bias, h0, c0, lengths


@settings(max_examples=25, deadline=None)
@given(**sequence_problems(num_steps=6, batch=5, input_size=5, hidden=70))
def test_host_built_kernels_match_numpy(emulated, num_steps, batch, input_size, hidden, dtype, reverse, with_lengths, seed):
    check_against_numpy(emulated, num_steps, batch, input_size, hidden, dtype, reverse, with_lengths, seed)


@settings(max_examples=20, deadline=None)
@given(**sequence_problems(num_steps=5, batch=40, input_size=4, hidden=24))
def test_host_built_persistent_kernels_match_numpy(emulated_persistent, num_steps, batch, input_size, hidden, dtype,
                                                   reverse, with_lengths, seed):
    """Blocks owning 1-8 units, the last one partly past the end; few sequences (split-k)
    and many (several per thread); several k-tiles per product."""
    assume(emulated_persistent._plan(batch, hidden, dtype) is not None)  # else the per-step path runs
    check_against_numpy(emulated_persistent, num_steps, batch, input_size, hidden, dtype, reverse, with_lengths, seed)


@settings(max_examples=20, deadline=None)
@given(**sequence_problems(num_steps=5, batch=20, input_size=4, hidden=10))
def test_host_built_resident_kernels_match_numpy(emulated_resident, num_steps, batch, input_size, hidden, dtype,
                                                 reverse, with_lengths, seed):
    """1-7 sequences a block (one or two groups of four), the last block partly filled."""
    assert emulated_resident._plan(batch, hidden, dtype) is not None
    check_against_numpy(emulated_resident, num_steps, batch, input_size, hidden, dtype, reverse, with_lengths, seed)


@pytest.mark.parametrize("batch, hidden, dtype, shared_limit, path", [
    (3, 5, "float32", None, "one sequence a block"),
    (14, 3, "float64", None, "a group of four sequences a block and one left over, the last block partly filled"),
    (15, 6, "float32", None, "more threads for the cells than for the gate rows"),
    (24, 4, "float32", 1000, "sequences a block cut to fit shared memory"),
    (2, 64, "float32", None, "more than 48 KiB of shared memory (opted in)"),
])
def test_each_path_of_the_resident_kernels(library, batch, hidden, dtype, shared_limit, path):
    kernels = host_kernels.emulated_kernels(library)
    kernels.resident_shared_limit = shared_limit
    backend = cupy_backend.CudaSequenceBackend(np, host_kernels.numpy_gemm, kernels, loop="resident")
    plan = backend._plan(batch, hidden, dtype)
    shown = {
        "one sequence a block": plan.rows == 1 and plan.blocks == batch,
        "a group of four sequences a block and one left over, the last block partly filled":
            plan.rows > cupy_backend.RESIDENT_GROUP and batch % plan.rows != 0,
        "more threads for the cells than for the gate rows": plan.rows * hidden > 4 * hidden,
        "sequences a block cut to fit shared memory": plan.rows < -(-batch // kernels.multiprocessors),
        "more than 48 KiB of shared memory (opted in)": plan.shared_forward > cupy_backend.SHARED_LIMIT,
    }
    assert shown[path], plan
    for reverse in (False, True):
        check_against_numpy(backend, 4, batch, 3, hidden, dtype, reverse, True, seed=batch + hidden)


def test_resident_plan_spreads_sequences_and_fits_threads_and_shared_memory():
    limit = 227 * 1024  # an H100's / H200's opt-in shared memory a block
    small = cupy_backend.resident_plan(16, 64, 4, 132, limit)  # DESIGN.md's `small`: a sequence a block
    assert (small.blocks, small.rows, small.threads) == (16, 1, 256)
    assert small.shared_forward == 8 * 4 + 4 * (4 * 64 * 64 + 4 * 64 * 2 + 2 * 4 * 256)  # w, h, c, pre x2
    spread = cupy_backend.resident_plan(1000, 32, 4, 132, limit)
    assert (spread.rows, spread.blocks, spread.threads) == (8, 125, 256)  # ceil(1000 / 132) a block
    by_threads = cupy_backend.resident_plan(4096, 100, 4, 132, limit)  # 32 a block would need 3200 threads
    assert by_threads.rows == 10 and by_threads.threads == 1024 and by_threads.blocks == 410
    assert max(cupy_backend.resident_shared_bytes(by_threads.rows, 100, 4)) <= limit
    assert cupy_backend.resident_plan(1, 112, 4, 132, limit) is not None  # W_hh 196 KiB in float32
    assert cupy_backend.resident_plan(1, 120, 4, 132, limit) is None  # 225 KiB and the state: too much
    assert cupy_backend.resident_plan(1, 80, 8, 132, limit) is not None
    assert cupy_backend.resident_plan(1, 90, 8, 132, limit) is None
    assert cupy_backend.resident_plan(1, 257, 4, 132, 10**9) is None  # 4H threads a block at most
    assert cupy_backend.resident_plan(1, 8, 4, 132, 100) is None  # not even one sequence fits


def test_default_rule_resident_then_per_step_with_graphs_then_persistent(library):
    kernels = host_kernels.emulated_kernels(library, blocks=132, threads=256, shared_limit=cupy_backend.SHARED_LIMIT)
    graphs = types.SimpleNamespace(enabled=True)
    backend = cupy_backend.CudaSequenceBackend(np, host_kernels.numpy_gemm, kernels, graphs=graphs)
    assert isinstance(backend._plan(3, 8, np.float32), cupy_backend.ResidentPlan)  # 3 blocks, 3 multiprocessors
    assert backend._plan(1, 256, np.float32) is None  # W_hh beyond shared memory: per step, replayed
    assert backend._plan(kernels.multiprocessors * 1024 // 8 + 1, 8, np.float32) is None  # more than a wave
    graphs.enabled = False
    assert isinstance(backend._plan(1, 256, np.float32), cupy_backend.PersistentPlan)
    backend.loop = "resident"
    assert isinstance(backend._plan(1000, 8, np.float32), cupy_backend.ResidentPlan)  # forced: whatever the waves
    with pytest.raises(ValueError, match="loop: expected None or one of per-step, persistent, resident, got 'fast'"):
        backend.loop = "fast"
    assert backend.loop == "resident"


def test_resident_launch_asks_for_shared_memory_beyond_the_default_once(library):
    kernels = host_kernels.emulated_kernels(library)
    backend = cupy_backend.CudaSequenceBackend(np, host_kernels.numpy_gemm, kernels, loop="resident")
    plan = backend._plan(1, 64, np.float32)
    assert plan.shared_forward > cupy_backend.SHARED_LIMIT
    args = sequence_inputs(np.random.default_rng(0), 2, 1, 2, 64, "float32", False)
    backend.forward_sequence(*args, False, False)
    function = kernels._function("lstm_forward_resident<float, false>")
    assert function.max_dynamic_shared_size_bytes == plan.shared_forward
    small = backend._plan(1, 8, np.float32)
    backend.forward_sequence(*sequence_inputs(np.random.default_rng(0), 2, 1, 2, 8, "float32", False), False, False)
    assert function.max_dynamic_shared_size_bytes == plan.shared_forward > small.shared_forward  # never lowered
    kernels._shared_allowed.clear()  # as a new process would: without asking, the launch fails
    function.max_dynamic_shared_size_bytes = cupy_backend.SHARED_LIMIT
    kernels._shared_allowed[("lstm_forward_resident<float, false>", 0)] = plan.shared_forward  # a stale record
    with pytest.raises(RuntimeError, match="dynamic shared memory"):
        backend.forward_sequence(*args, False, False)


@pytest.mark.parametrize("batch, hidden, dtype, shared_limit, threads, blocks, path", [
    (2, 3, "float32", 3072, 32, 3, "split-k"),  # 1 register tile per block, 32 threads: 32 k-slices
    (1, 3, "float64", 16384, 128, 3, "split-k capped"),  # 128 threads, 1 tile: 64 slices, 64 threads idle
    (33, 4, "float32", 3072, 32, 3, "one thread per register tile, some threads idle"),
    (30, 3, "float32", 4096, 32, 3, "partial register tiles"),
    (16, 24, "float32", 4600, 32, 3, "several k-tiles"),
    (3, 7, "float32", 3072, 32, 3, "last block partly past the end"),
    (4, 6, "float32", 4096, 32, 1, "one block: the block barrier is the grid barrier"),
])
def test_each_path_of_the_persistent_kernels(library, batch, hidden, dtype, shared_limit, threads, blocks, path):
    kernels = host_kernels.emulated_kernels(library, blocks=blocks, threads=threads, shared_limit=shared_limit)
    backend = cupy_backend.CudaSequenceBackend(np, host_kernels.numpy_gemm, kernels, loop="persistent")
    plan = backend._plan(batch, hidden, dtype)
    tiles = -(-batch // 4) * -(-4 * plan.units // 4)  # forward's register tiles
    shown = {
        "split-k": plan.threads // tiles > 1,
        "one thread per register tile, some threads idle": plan.threads // tiles == 1 and tiles < plan.threads,
        "split-k capped": plan.threads // tiles > cupy_backend.MAX_SLICES,
        "partial register tiles": batch % 4 != 0,
        "several k-tiles": plan.tile_forward < hidden and plan.tile_backward < 4 * hidden,
        "last block partly past the end": plan.blocks * plan.units > hidden,
        "one block: the block barrier is the grid barrier": plan.blocks == 1,
    }
    assert shown[path], plan
    for reverse in (False, True):
        check_against_numpy(backend, 5, batch, 3, hidden, dtype, reverse, True, seed=batch + hidden)


def check_against_numpy(backend, num_steps, batch, input_size, hidden, dtype, reverse, with_lengths, seed):
    """Forward (training and eval) and backward of `backend` against the NumPy reference.

    Errors are relative to the largest magnitude of each result, but at least to 0.01: the
    inputs are O(0.1-1), and a tiny result (one sequence, one unit, c = f c0 + i g nearly
    cancelling) would otherwise turn a last-bit rounding difference into a large ratio.
    """
    rng = np.random.default_rng(seed)
    args = sequence_inputs(rng, num_steps, batch, input_size, hidden, dtype, with_lengths)
    reference = NumpyBackend()
    y_ref, h_ref, c_ref, saved_ref = reference.forward_sequence(*args, reverse, True)
    y, h, c, saved = backend.forward_sequence(*args, reverse, True)
    tol = TOLERANCE[dtype]
    for name, a, b in (("y", y, y_ref), ("h_n", h, h_ref), ("c_n", c, c_ref)):
        assert_close(a, b, tol, name, floor=0.01)
    y_eval, h_eval, c_eval, nothing = backend.forward_sequence(*args, reverse, False)
    assert nothing is None
    assert_close(y_eval, y_ref, tol, "y (eval)", floor=0.01)
    assert_close(h_eval, h_ref, tol, "h_n (eval)", floor=0.01)
    assert_close(c_eval, c_ref, tol, "c_n (eval)", floor=0.01)
    dy = rng.standard_normal(y.shape).astype(dtype)
    dh_n = rng.standard_normal(h.shape).astype(dtype)
    dc_n = rng.standard_normal(c.shape).astype(dtype)
    expected = reference.backward_sequence(saved_ref, dy, dh_n, dc_n)
    actual = backend.backward_sequence(saved, dy, dh_n, dc_n)
    for name, a, b in zip(("dx", "dh0", "dc0", "dw_ih", "dw_hh", "dbias"), actual, expected):
        assert_close(a, b, tol, name, floor=0.01)


def gru_inputs(rng, num_steps, batch, input_size, hidden, dtype, with_lengths):
    x = rng.standard_normal((num_steps, batch, input_size)).astype(dtype)
    w_ih = (0.3 * rng.standard_normal((3 * hidden, input_size))).astype(dtype)
    w_hh = (0.3 * rng.standard_normal((3 * hidden, hidden))).astype(dtype)
    b_ih, b_hh = ((0.3 * rng.standard_normal(3 * hidden)).astype(dtype) for _ in range(2))
    h0 = (0.5 * rng.standard_normal((batch, hidden))).astype(dtype)
    lengths = rng.integers(1, num_steps + 1, size=batch).astype(np.int64) if with_lengths else None
    return x, w_ih, w_hh, b_ih, b_hh, h0, lengths


@settings(max_examples=30, deadline=None)
@given(**sequence_problems(num_steps=6, batch=5, input_size=5, hidden=40), reset_after=st.booleans())
def test_host_built_gru_kernels_match_numpy(emulated, num_steps, batch, input_size, hidden, dtype, reverse,
                                            with_lengths, seed, reset_after):
    """The GRU's per-step kernels (both conventions) against the reference: forward in
    training and eval, backward, every gradient."""
    rng = np.random.default_rng(seed)
    args = gru_inputs(rng, num_steps, batch, input_size, hidden, dtype, with_lengths)
    check_gru_against_numpy(emulated, args, reverse, reset_after, rng)


def check_gru_against_numpy(emulated, args, reverse, reset_after, rng):
    """A GRU forward (training and eval) and backward of `emulated` against the reference."""
    dtype = args[0].dtype.name
    reference, tol = NumpyBackend(), TOLERANCE[dtype]
    y_ref, h_ref, saved_ref = reference.gru_forward_sequence(*args, reverse, True, reset_after)
    y, h, saved = emulated.gru_forward_sequence(*args, reverse, True, reset_after)
    y_eval, h_eval, nothing = emulated.gru_forward_sequence(*args, reverse, False, reset_after)
    assert nothing is None
    for name, a, b in (("y", y, y_ref), ("h_n", h, h_ref), ("y (eval)", y_eval, y_ref), ("h_n (eval)", h_eval, h_ref)):
        assert_close(a, b, tol, name, floor=0.01)
    dy = rng.standard_normal(y.shape).astype(dtype)
    dh_n = rng.standard_normal(h.shape).astype(dtype)
    expected = reference.gru_backward_sequence(saved_ref, dy, dh_n)
    actual = emulated.gru_backward_sequence(saved, dy, dh_n)
    for name, a, b in zip(("dx", "dh0", "dw_ih", "dw_hh", "db_ih", "db_hh"), actual, expected):
        assert_close(a, b, tol, name, floor=0.01)


@settings(max_examples=25, deadline=None)
@given(**sequence_problems(num_steps=5, batch=20, input_size=4, hidden=10))
def test_host_built_gru_resident_kernels_match_numpy(emulated_resident, num_steps, batch, input_size, hidden, dtype,
                                                     reverse, with_lengths, seed):
    """The GRU's resident kernels (reset_after): 1-7 sequences a block, the last block partly
    filled; forward in training and eval, backward, every gradient."""
    assert emulated_resident._gru_plan(batch, hidden, dtype, True) is not None
    rng = np.random.default_rng(seed)
    args = gru_inputs(rng, num_steps, batch, input_size, hidden, dtype, with_lengths)
    check_gru_against_numpy(emulated_resident, args, reverse, True, rng)


def test_gru_loops_follow_the_rule_and_cho_never_runs_resident(library):
    kernels = host_kernels.emulated_kernels(library)
    backend = cupy_backend.CudaSequenceBackend(np, host_kernels.numpy_gemm, kernels)
    assert backend._gru_plan(6, 16, np.float32, True) is not None  # W_hh fits, one wave of blocks
    assert backend._gru_plan(6, 16, np.float32, False) is None  # Cho: the per-step kernels
    assert backend._gru_plan(6, 400, np.float32, True) is None  # 3H > 1024 threads
    assert backend._gru_plan(4000, 16, np.float32, True) is None  # more than a wave: per step (graphs)
    backend.loop = "per-step"
    assert backend._gru_plan(6, 16, np.float32, True) is None
    forward, backward = cupy_backend.resident_shared_bytes(5, 16, 4, gates=3)
    padded = 8
    assert forward == 8 * padded + 4 * (3 * 16 * 16 + 2 * padded * 16 + 2 * padded * 3 * 16)
    assert backward == 8 * padded + 4 * (3 * 16 * 16 + padded * 3 * 16 + 4 * padded * 16)


def test_bias_gradient_is_deterministic_and_chunked(emulated):
    rng = np.random.default_rng(0)
    a2 = rng.standard_normal((1000, 37)).astype(np.float32)  # 4 chunks of 256 rows, one short
    first = emulated._column_sums(a2)
    np.testing.assert_allclose(first, a2.astype(np.float64).sum(axis=0), rtol=1e-5)
    assert np.array_equal(first, emulated._column_sums(a2.copy()))


def test_cupy_backend_end_to_end_on_the_fake_device(fake_cupy):
    """The real CupyBackend (launchers, argument types, cuBLAS calls, data movement) through the layer."""
    status = fastlstm.available_backends()["cupy"]
    assert status.available and "Fake GPU" in status.reason
    assert fastlstm.get_backend() == "cupy"  # auto prefers a usable GPU
    gpu = fastlstm.LSTM(3, 5, num_layers=2, bidirectional=True, dropout=0.3, dtype="float64", backend="cupy", seed=4)
    cpu = fastlstm.LSTM(3, 5, num_layers=2, bidirectional=True, dropout=0.3, dtype="float64", backend="numpy", seed=4)
    cpu.load_state_dict(gpu.state_dict())
    assert all(type(p) is fake_cupy.ndarray for p in gpu.params.values())  # weights live on the device
    assert all(type(v) is np.ndarray for v in gpu.state_dict().values())  # state_dict is NumPy
    x, state, _, dy, dstate = random_problem(cpu, 6, 4, seed=5)
    lengths = np.array([6, 3, 1, 5])
    out_gpu = gpu(x, state, lengths)
    out_cpu = cpu(x, state, lengths)
    assert type(out_gpu[0]) is np.ndarray  # NumPy in, NumPy out
    grads_gpu = gpu.backward(dy, dstate)
    grads_cpu = cpu.backward(dy, dstate)
    for a, b in zip((out_gpu[0], *out_gpu[1], grads_gpu[0], *grads_gpu[1]), (out_cpu[0], *out_cpu[1], grads_cpu[0], *grads_cpu[1])):
        assert_close(a, b, 1e-12)
    for name in cpu.grads:
        assert type(gpu.grads[name]) is fake_cupy.ndarray
        assert_close(np.asarray(gpu.grads[name]), cpu.grads[name], 1e-12, name)
    assert {names for names in fake_cupy.compiled} == {
        ("lstm_forward_step<float, true>", "lstm_forward_step<float, false>",
         "lstm_forward_step<double, true>", "lstm_forward_step<double, false>"),
        ("lstm_backward_step<float>", "lstm_backward_step<double>", "column_sum<float>", "column_sum<double>"),
        ("lstm_forward_persistent<float, true>", "lstm_forward_persistent<float, false>",
         "lstm_forward_persistent<double, true>", "lstm_forward_persistent<double, false>",
         "lstm_backward_persistent<float>", "lstm_backward_persistent<double>"),
        ("lstm_forward_resident<float, true>", "lstm_forward_resident<float, false>",
         "lstm_forward_resident<double, true>", "lstm_forward_resident<double, false>",
         "lstm_backward_resident<float>", "lstm_backward_resident<double>"),
        ("gru_forward_step<float, true>", "gru_forward_step<float, false>",
         "gru_forward_step<double, true>", "gru_forward_step<double, false>",
         "gru_new_step<float, true>", "gru_new_step<float, false>",
         "gru_new_step<double, true>", "gru_new_step<double, false>",
         "gru_reset_step<float>", "gru_reset_step<double>"),
        ("gru_backward_step<float>", "gru_backward_step<double>", "gru_backward_new_step<float>",
         "gru_backward_new_step<double>", "gru_backward_reset_step<float>", "gru_backward_reset_step<double>"),
        ("gru_forward_resident<float, true>", "gru_forward_resident<float, false>",
         "gru_forward_resident<double, true>", "gru_forward_resident<double, false>",
         "gru_backward_resident<float>", "gru_backward_resident<double>"),
    }


def test_device_arrays_in_device_arrays_out(fake_cupy):
    lstm = fastlstm.LSTM(3, 4, backend="cupy", seed=0)
    x = fake_cupy.asarray(np.random.default_rng(0).standard_normal((5, 2, 3)).astype(np.float32))
    y, (h, c) = lstm(x)
    assert type(y) is type(h) is type(c) is fake_cupy.ndarray
    dx, (dh0, dc0) = lstm.backward(fake_cupy.asarray(np.ones((5, 2, 4), np.float32)))
    assert type(dx) is type(dh0) is fake_cupy.ndarray
    # float64 device input is converted to the layer's float32 on the device
    y64, _ = lstm(fake_cupy.asarray(np.zeros((5, 2, 3))))
    assert y64.dtype == np.float32 and type(y64) is fake_cupy.ndarray


def test_torch_callers_get_torch_tensors_on_their_device(fake_cupy):
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    lstm = fastlstm.LSTM(3, 4, backend="cupy", seed=0)
    x = np.random.default_rng(0).standard_normal((5, 2, 3)).astype(np.float32)
    y_np, (h_np, c_np) = lstm(x)
    y, (h, c) = lstm(torch.from_numpy(x))  # a torch CPU caller: torch CPU tensors, computed on the device
    for actual, expected in zip((y, h, c), (y_np, h_np, c_np)):
        assert isinstance(actual, torch.Tensor) and actual.device.type == "cpu"
        np.testing.assert_array_equal(actual.numpy(), expected)

    class CudaTensor(torch.Tensor):  # a CPU tensor that says it is on CUDA, as the backend sees one
        @property
        def is_cuda(self):
            return True

    CudaTensor.__module__ = "torch"
    backend = lstm._current_backend()
    on_device = fake_cupy.asarray(x)
    cuda_caller = backend.to_user(on_device, torch.zeros(1).as_subclass(CudaTensor))
    assert isinstance(cuda_caller, torch.Tensor) and cuda_caller.data_ptr() == on_device.data.ptr  # DLPack, no copy
    cpu_caller = backend.to_user(on_device, torch.zeros(1))
    assert cpu_caller.data_ptr() != on_device.data.ptr and np.array_equal(cpu_caller.numpy(), x)  # to the host


@pytest.mark.parametrize("make", [fastlstm.LSTM, fastlstm.GRU], ids=["lstm", "gru"])
def test_streams_on_the_device_equal_the_whole_sequence(fake_cupy, make):
    layer = make(3, 5, num_layers=2, backend="cupy", seed=0).eval()
    x = np.random.default_rng(0).standard_normal((6, 2, 3)).astype(np.float32)
    y, state_n = layer(x)
    stream = layer.stream(2)
    steps = [stream(x[t]) for t in range(3)] + list(stream(fake_cupy.asarray(x[3:])))
    assert type(steps[0]) is np.ndarray and type(steps[-1]) is fake_cupy.ndarray  # each caller's kind of array
    assert_close(np.stack([np.asarray(s) for s in steps]), y, TOLERANCE["float32"], "y")
    finals = stream.state if isinstance(stream.state, tuple) else (stream.state,)
    assert all(type(part) is fake_cupy.ndarray for part in finals)  # the state stays on the device
    for got, want in zip(finals, state_n if isinstance(state_n, tuple) else (state_n,)):
        assert_close(np.asarray(got), want, TOLERANCE["float32"], "state")


def test_moving_a_layer_between_host_and_device(fake_cupy):
    lstm = fastlstm.LSTM(3, 4, backend="numpy", seed=0)
    before = lstm.state_dict()
    lstm.to("cupy")
    assert all(type(p) is fake_cupy.ndarray for p in lstm.params.values())
    lstm.to("numpy")
    assert all(type(p) is np.ndarray for p in lstm.params.values())
    for k, v in lstm.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_bad_input_is_refused_before_anything_reaches_the_device(fake_cupy):
    lstm = fastlstm.LSTM(3, 4, backend="cupy")
    with pytest.raises(ValueError, match="x: expected input_size=3"):
        lstm(fake_cupy.asarray(np.zeros((5, 2, 6), np.float32)))
    with pytest.raises(TypeError, match="x: expected real numbers"):
        lstm(np.zeros((5, 2, 3), complex))


def test_no_usable_device_means_unavailable(monkeypatch, library):
    fake = make_fake_cupy(library)
    fake.is_available = lambda: False
    monkeypatch.setitem(sys.modules, "cupy", fake)
    saved = dict(registry._probed)
    registry._probed.pop("cupy", None)
    try:
        status = fastlstm.available_backends()["cupy"]
        assert not status.available and "no usable CUDA device" in status.reason
        with pytest.raises(fastlstm.BackendUnavailableError, match="fastlstm\\[cuda12\\]"):
            fastlstm.LSTM(2, 3, backend="cupy")
    finally:
        registry._probed.clear()
        registry._probed.update(saved)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("transa, transb", [("N", "N"), ("N", "T"), ("T", "N"), ("T", "T")])
@pytest.mark.parametrize("beta", [0.0, 1.0])
@pytest.mark.parametrize("api", ["emulated binding", "ctypes"])
def test_cublas_gemm_on_row_major_arrays(library, fake_cublas_library, transa, transb, beta, dtype, api):
    """CublasGemm's row-major -> column-major mapping, on an emulation of CuPy's cuBLAS
    binding, and through cublas_api's ctypes binding on a C library with cuBLAS's signatures."""
    fake = make_fake_cupy(library)
    cublas_library, binding = fake_cublas_library
    # ctypes: looked up through a library linked against the fake libcublas, as through CuPy's binding module
    functions = fake.cuda.cublas if api == "emulated binding" else cublas_api.load(types.SimpleNamespace(
        __file__=str(binding)), prefix="no such library")[0]
    gemm = cupy_backend.CublasGemm(fake.cuda, functions)
    rng = np.random.default_rng(0)
    m, n, k = 5, 7, 3
    a = rng.standard_normal((m, k) if transa == "N" else (k, m)).astype(dtype).view(fake.ndarray)
    wide = rng.standard_normal((9, 11)).astype(dtype).view(fake.ndarray)  # b: rows further apart than its width
    b = wide[: (k if transb == "N" else n), : (n if transb == "N" else k)]
    out = rng.standard_normal((m, n)).astype(dtype).view(fake.ndarray)
    if beta == 0.0:
        out[0, 0] = np.nan  # beta 0: the old contents must not leak in
    expected = (a.T if transa == "T" else a) @ (b.T if transb == "T" else b) + (beta * out if beta else 0)
    gemm(transa, transb, a, b, out, beta)
    tolerance = 1e-5 if dtype == np.float32 else 1e-12  # float32: the C loop sums in another order
    np.testing.assert_allclose(out, expected, rtol=tolerance, atol=tolerance)
    if api == "emulated binding":
        ops = {"N": 0, "T": 1}
        assert fake.cuda.cublas.calls == [(np.dtype(dtype).name, ops[transb], ops[transa], n, m, k)]
    else:
        library = ctypes.CDLL(str(cublas_library))
        library.fake_cublas_stream.restype = ctypes.c_void_p
        assert library.fake_cublas_stream() is None  # the current stream: the legacy one, 0
        assert library.fake_cublas_pointer_mode() == cublas_api.CtypesCublas.CUBLAS_POINTER_MODE_HOST


@pytest.mark.parametrize("api", ["emulated binding", "ctypes"])
def test_cublas_gemm_gives_its_workspace_only_inside_the_block(library, fake_cublas_library, api):
    """Inside `workspace(array)` each GEMM hands cuBLAS that array; outside, cuBLAS's default
    (setStream resets it, so nothing set for a loop outlives it)."""
    fake = make_fake_cupy(library)
    cublas_library, binding = fake_cublas_library
    functions = fake.cuda.cublas if api == "emulated binding" else cublas_api.load(types.SimpleNamespace(
        __file__=str(binding)), prefix="no such library")[0]
    library = ctypes.CDLL(str(cublas_library))
    library.fake_cublas_workspace.restype = ctypes.c_void_p
    library.fake_cublas_workspace_bytes.restype = ctypes.c_size_t

    def workspace_of_last_call():
        if api == "emulated binding":
            return fake.cuda.cublas.workspaces[-1]
        address = library.fake_cublas_workspace()
        return None if address is None else (address, library.fake_cublas_workspace_bytes())

    gemm = cupy_backend.CublasGemm(fake.cuda, functions)
    a, b, out = (np.ones(shape).view(fake.ndarray) for shape in ((2, 3), (3, 4), (2, 4)))
    workspace = fake.empty(1024, dtype="u1")
    gemm("N", "N", a, b, out, 0.0)
    assert workspace_of_last_call() is None
    with gemm.workspace(workspace):
        gemm("N", "N", a, b, out, 0.0)
        assert workspace_of_last_call() == (workspace.data.ptr, 1024)
    gemm("N", "N", a, b, out, 0.0)
    assert workspace_of_last_call() is None
    np.testing.assert_array_equal(out, np.full((2, 4), 3.0))


def test_cublas_gemm_refuses_strided_rows(library):
    fake = make_fake_cupy(library)
    a = np.zeros((4, 6), np.float32).view(fake.ndarray)[:, ::2]
    with pytest.raises(ValueError, match="rows must be contiguous"):
        cupy_backend.CublasGemm(fake.cuda)("N", "N", a, np.zeros((3, 2), np.float32).view(fake.ndarray),
                                           np.zeros((4, 2), np.float32).view(fake.ndarray), 0.0)


def test_persistent_blocks_follow_the_current_device(library):
    """One block per multiprocessor of the device a kernel runs on: a count taken from a
    larger device would leave blocks waiting at the grid barrier for ones never resident."""
    fake = make_fake_cupy(library)
    current, counts, looked_up = [0], {0: 132, 1: 80}, []

    def properties(device):
        looked_up.append(device)
        return {"name": b"Fake GPU", "multiProcessorCount": counts[device], "major": 9}

    fake.cuda.Device = lambda: types.SimpleNamespace(id=current[0])
    fake.cuda.runtime.getDeviceProperties = properties
    kernels = cupy_backend.CupyKernels(fake)
    assert kernels.persistent_blocks == 132
    current[0] = 1
    assert kernels.persistent_blocks == 80 and kernels.persistent_blocks == 80
    assert looked_up == [0, 1]  # once per device
    kernels.persistent_blocks = 4  # by hand (the probe's sweep): on every device
    assert kernels.persistent_blocks == 4
    current[0] = 0
    assert kernels.persistent_blocks == 4
    kernels.persistent_blocks = None
    assert kernels.persistent_blocks == 132


def test_default_time_loop_depends_on_the_state_size(library):
    """Persistent kernels for small batch x hidden, the per-step loop past the threshold."""
    kernels = host_kernels.emulated_kernels(library, blocks=132, threads=256, shared_limit=cupy_backend.SHARED_LIMIT)
    backend = cupy_backend.CudaSequenceBackend(np, host_kernels.numpy_gemm, kernels)
    limit = cupy_backend.PERSISTENT_MAX_STATE
    assert backend._plan(1, 256, np.float32) is not None
    assert backend._plan(limit // 256, 256, np.float32) is not None
    assert backend._plan(limit // 256 + 1, 256, np.float32) is None
    backend.loop = "persistent"
    assert backend._plan(limit // 256 + 1, 256, np.float32) is not None
    backend.loop = "per-step"
    assert backend._plan(1, 256, np.float32) is None


def test_calls_without_lengths_share_one_kept_lengths_array_per_shape_and_stream(fake_cupy):
    """No fill kernel per call: the all-full lengths are kept per (device, stream, shape),
    read only, the least recently used dropped beyond FULL_LENGTHS_KEPT."""
    backend = fastlstm.registry.backend_object("cupy")
    first = backend._full_lengths(3, 7)
    assert type(first) is fake_cupy.ndarray and first.tolist() == [7, 7, 7]
    assert backend._full_lengths(3, 7) is first
    with fake_cupy.cuda.Stream() as stream:
        other = backend._full_lengths(3, 7)
        assert other is not first and backend._full_lengths(3, 7) is other  # per stream
    assert stream.ptr != fake_cupy.cuda.get_current_stream().ptr
    lstm = fastlstm.LSTM(2, 3, backend="cupy", seed=0)
    x = np.random.default_rng(0).standard_normal((7, 3, 2)).astype(np.float32)
    y1, _ = lstm(x)
    y2, _ = lstm(x)
    np.testing.assert_array_equal(y1, y2)
    assert first.tolist() == [7, 7, 7]  # nothing wrote to it
    for steps in range(100, 100 + cupy_backend.FULL_LENGTHS_KEPT):
        backend._full_lengths(3, steps)
    assert len(backend._full) == cupy_backend.FULL_LENGTHS_KEPT
    assert backend._full_lengths(3, 7) is not first  # dropped, made anew
