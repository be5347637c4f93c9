"""GPU parity: the cupy backend against the NumPy reference and against torch.nn.LSTM on CUDA.

Marked ``gpu``; every test skips with the reason when no usable CUDA device is seen by
CuPy (CI has none). Run on a GPU by bench/gpu_check.sh.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import fastlstm
from lstm_testing import (
    assert_close, assert_layers_agree, forward_backward, random_problem, torch_forward_backward,
)

STATUS = fastlstm.available_backends()["cupy"]
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not STATUS.available, reason=f"no usable GPU: {STATUS.reason}")]

# The GPU reorders sums (cuBLAS, fused kernels): float32 against the float64-exact
# reference is compared at 1e-5 relative to the largest magnitude, float64 at 1e-10.
TOL = {"float32": 1e-5, "float64": 1e-10}
# cupy against cuDNN: two float32 implementations, each within 1e-5 of the exact result,
# may differ by twice that (seen on an H200: 1.16e-5 for y once the persistent kernels
# split their sums over 512 threads). float64 stays at 1e-10.
TOL_VS_CUDNN = {"float32": 2e-5, "float64": 1e-10}


CASES = list(itertools.product((1, 2), (False, True), (False, True), (False, True)))


@pytest.fixture(params=["persistent", "per-step", "resident"])
def time_loop(request):
    """Run the test with each time loop, forced wherever it applies, whatever the size (the
    resident kernels: where W_hh fits a block's shared memory)."""
    backend = fastlstm.registry.backend_object("cupy")
    backend.loop = request.param
    yield request.param
    backend.loop = None


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("layers, bidirectional, batch_first, with_lengths", CASES)
def test_cupy_matches_numpy_reference(layers, bidirectional, batch_first, with_lengths, dtype, time_loop):
    kwargs = dict(num_layers=layers, bidirectional=bidirectional, batch_first=batch_first, dropout=0.25 if layers > 1 else 0.0,
                  dtype=dtype, seed=7)
    gpu = fastlstm.LSTM(6, 40, backend="cupy", **kwargs)
    cpu = fastlstm.LSTM(6, 40, backend="numpy", **kwargs)
    cpu.load_state_dict(gpu.state_dict())
    lengths = np.array([9, 3, 7, 1, 9]) if with_lengths else None
    assert_layers_agree(gpu, cpu, random_problem(cpu, 9, 5, seed=3, lengths=lengths), TOL[dtype])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("bidirectional, with_lengths, batch_first", [(False, False, False), (True, True, True)])
def test_cupy_matches_torch_cuda(bidirectional, with_lengths, batch_first, dtype, time_loop):
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    torch.backends.cudnn.allow_tf32 = False  # compare IEEE float32 with IEEE float32
    torch.backends.cuda.matmul.allow_tf32 = False
    tt = getattr(torch, dtype)
    module = torch.nn.LSTM(8, 32, num_layers=2, bidirectional=bidirectional, batch_first=batch_first).to("cuda", tt)
    lstm = fastlstm.LSTM(8, 32, num_layers=2, bidirectional=bidirectional, batch_first=batch_first, backend="cupy",
                         dtype=dtype)
    lstm.load_state_dict(module.state_dict())  # CUDA tensors, through DLPack
    lengths = np.array([12, 5, 9, 12]) if with_lengths else None
    x, state, lengths, dy, dstate = random_problem(lstm, 12, 4, seed=1, lengths=lengths)
    expected = torch_forward_backward(module, x, state, lengths, dy, dstate, batch_first, dtype, device="cuda")
    actual = forward_backward(lstm, x, state, lengths, dy, dstate)
    for name in expected:
        assert_close(actual[name], expected[name], TOL_VS_CUDNN[dtype], name)


def test_device_arrays_stay_on_the_device():
    import cupy

    lstm = fastlstm.LSTM(4, 16, backend="cupy")
    x = cupy.random.standard_normal((7, 3, 4), dtype=cupy.float32)
    y, (h, c) = lstm(x)
    assert isinstance(y, cupy.ndarray) and isinstance(h, cupy.ndarray)
    dx, _ = lstm.backward(cupy.ones_like(y))
    assert isinstance(dx, cupy.ndarray)
    assert all(isinstance(v, np.ndarray) for v in lstm.state_dict().values())
    y_host, _ = lstm(cupy.asnumpy(x))
    assert isinstance(y_host, np.ndarray)
    np.testing.assert_allclose(y_host, cupy.asnumpy(y), rtol=1e-6)


def test_torch_cuda_tensors_without_host_copy():
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    import cupy

    lstm = fastlstm.LSTM(4, 16, backend="cupy")
    xt = torch.randn(7, 3, 4, device="cuda")
    backend = lstm._current_backend()
    shared = backend.from_user(xt, "x")
    assert shared.data.ptr == xt.data_ptr()  # the same device memory
    y, (h_n, _) = lstm(xt)
    # torch in, torch out: on the device, through DLPack
    assert isinstance(y, torch.Tensor) and y.is_cuda and isinstance(h_n, torch.Tensor) and h_n.is_cuda
    expected, _ = lstm(cupy.asarray(xt.cpu().numpy()))
    assert_close(y.cpu().numpy(), cupy.asnumpy(expected), 1e-6, "y")


def test_bias_gradient_is_deterministic_on_gpu(time_loop):
    results = []
    for _ in range(2):
        lstm = fastlstm.LSTM(16, 64, backend="cupy", seed=0)
        x, _, _, dy, _ = random_problem(lstm, 20, 32, seed=0)
        lstm(x)
        lstm.backward(dy)
        results.append({k: lstm._storage.to_host(v) for k, v in lstm.grads.items()})
    for k in results[0]:
        if k.startswith("bias"):
            assert np.array_equal(results[0][k], results[1][k]), k


@pytest.mark.parametrize("api", ["ctypes", "cupy binding"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("transa, transb", [("N", "N"), ("N", "T"), ("T", "N"), ("T", "T")])
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_direct_cublas_gemm_matches_cupy_matmul(transa, transb, beta, dtype, api):
    import cupy

    from fastlstm.backends import cublas_api
    from fastlstm.backends.cupy_backend import CublasGemm

    cupy.cuda.get_cublas_handle()  # CuPy loads libcublas
    functions, why_not = cublas_api.load(cupy.cuda.cublas) if api == "ctypes" else (cupy.cuda.cublas, "")
    assert functions is not None, why_not

    rng = np.random.default_rng(0)
    m, n, k = 37, 70, 19
    a = cupy.asarray(rng.standard_normal((m, k) if transa == "N" else (k, m)).astype(dtype))
    wide = cupy.asarray(rng.standard_normal((90, 90)).astype(dtype))
    b = wide[: (k if transb == "N" else n), : (n if transb == "N" else k)]  # rows further apart than its width
    out = cupy.asarray(rng.standard_normal((m, n)).astype(dtype))
    if beta == 0.0:
        out[0, 0] = cupy.nan  # beta 0: the old contents must not leak in
    expected = cupy.matmul(a.T if transa == "T" else a, b.T if transb == "T" else b) + (beta * out if beta else 0)
    CublasGemm(cupy.cuda, functions)(transa, transb, a, b, out, beta)
    assert_close(cupy.asnumpy(out), cupy.asnumpy(expected), TOL[dtype], "out")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_per_step_loops_replayed_from_cuda_graphs_match_numpy(dtype):
    """Training steps on new data with the per-step loop: the first runs it from Python, the
    second captures it into CUDA graphs (cuBLAS included), the later ones replay them."""
    kwargs = dict(num_layers=2, bidirectional=True, dtype=dtype, seed=3)
    gpu = fastlstm.LSTM(24, 64, backend="cupy", **kwargs)
    cpu = fastlstm.LSTM(24, 64, backend="numpy", **kwargs)
    cpu.load_state_dict(gpu.state_dict())
    backend = fastlstm.registry.backend_object("cupy")
    backend.loop = "per-step"
    try:
        assert backend.graphs.enabled, backend.graphs.disabled_reason
        before = backend.graphs.counts.copy()
        for step in range(4):
            problem = random_problem(cpu, 15, 8, seed=step, lengths=np.arange(8) % 15 + 8)
            assert_layers_agree(gpu, cpu, problem, TOL[dtype], f"step {step}: ")
        assert backend.graphs.enabled, backend.graphs.disabled_reason
        counts = backend.graphs.counts - before
        assert counts["captured"] >= 4 and counts["replayed"] >= 8, counts
    finally:
        backend.loop = None


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_time_loops_chosen_by_timing_match_numpy(dtype):
    """FASTLSTM_CUDA_TUNE's tuner on the card: every candidate (the per-step loop, the
    resident kernels, the persistent kernels on each block count) runs and is timed, and
    the chosen loops give NumPy's results."""
    import cupy

    from fastlstm.backends.cuda_tuning import LoopTuner, device_timer

    kwargs = dict(num_layers=2, bidirectional=True, dtype=dtype, seed=11)
    gpu = fastlstm.LSTM(16, 64, backend="cupy", **kwargs)
    cpu = fastlstm.LSTM(16, 64, backend="numpy", **kwargs)
    cpu.load_state_dict(gpu.state_dict())
    backend = fastlstm.registry.backend_object("cupy")
    backend.tuner = tuner = LoopTuner(device_timer(cupy.cuda))
    try:
        for step in range(2):
            problem = random_problem(cpu, 12, 8, seed=step, lengths=np.arange(8) % 12 + 5)
            assert_layers_agree(gpu, cpu, problem, TOL[dtype], f"step {step}: ")
    finally:
        backend.tuner = None
    assert {key[0] for key in tuner.choices} == {"forward", "backward"}
    for key, (label, results) in tuner.choices.items():
        assert len(results) > 3, (key, results)  # the per-step loop, the resident kernels, several block counts
        assert any(label.startswith("resident") for label in results), (key, results)
        assert all(isinstance(t, float) for t in results.values()), (key, results)  # every candidate ran


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cupy_matches_numpy_reference_at_a_realistic_size(dtype, time_loop):
    """Large enough that cuBLAS picks its multi-block (split) kernels, which use its
    workspace. Three calls on new data: the per-step loop runs from Python, is captured
    into CUDA graphs, then replayed (with the workspace the graph cache gives cuBLAS)."""
    if time_loop == "resident":
        pytest.skip("H=256: W_hh does not fit a block's shared memory (the resident kernels' own size test follows)")
    gpu = fastlstm.LSTM(128, 256, backend="cupy", dtype=dtype, seed=2)
    cpu = fastlstm.LSTM(128, 256, backend="numpy", dtype=dtype)
    cpu.load_state_dict(gpu.state_dict())
    for call in range(3):
        assert_layers_agree(gpu, cpu, random_problem(cpu, 20, 64, seed=4 + call), TOL[dtype], f"call {call}: ")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_resident_kernels_match_numpy_at_a_realistic_size(dtype):
    """The resident kernels with their shared memory opted in beyond 48 KiB (W_hh of H=64:
    64 KiB in float32, 128 KiB in float64), 1000 sequences: more than four a block (two
    groups; 8 on 132 multiprocessors)."""
    gpu = fastlstm.LSTM(128, 64, backend="cupy", dtype=dtype, seed=6)
    cpu = fastlstm.LSTM(128, 64, backend="numpy", dtype=dtype)
    cpu.load_state_dict(gpu.state_dict())
    backend = fastlstm.registry.backend_object("cupy")
    backend.loop = "resident"
    try:
        plan = backend._plan(1000, 64, dtype)
        assert plan is not None and plan.rows > 4 and plan.shared_forward > 48 * 1024, plan
        lengths = np.arange(1000) % 30 + 1
        assert_layers_agree(gpu, cpu, random_problem(cpu, 30, 1000, seed=8, lengths=lengths), TOL[dtype])
    finally:
        backend.loop = None


@pytest.mark.parametrize("loop", ["per-step", None])
@pytest.mark.parametrize("reset_after", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cupy_gru_matches_numpy_reference(reset_after, dtype, loop):
    """The GRU on the cupy backend, both conventions: the per-step kernels and GEMMs
    (kernels/gru_forward.cu, gru_backward.cu) replayed from CUDA graphs, and by the default
    rule (reset_after at these sizes) the resident kernels (gru_resident.cu)."""
    kwargs = dict(num_layers=2, bidirectional=True, dropout=0.25, dtype=dtype, seed=7, reset_after=reset_after)
    gpu = fastlstm.GRU(6, 40, backend="cupy", **kwargs)
    cpu = fastlstm.GRU(6, 40, backend="numpy", **kwargs)
    backend = gpu._current_backend()
    if loop is None and reset_after:
        assert backend._gru_plan(5, 40, np.dtype(dtype), True) is not None
    cpu.load_state_dict(gpu.state_dict())
    rng = np.random.default_rng(3)
    x, h0 = rng.standard_normal((9, 5, 6)), 0.5 * rng.standard_normal((4, 5, 40))
    dy, dh = rng.standard_normal((9, 5, 80)), rng.standard_normal((4, 5, 40))
    lengths = np.array([9, 3, 7, 1, 9])
    results = []
    previous, backend.loop = backend.loop, loop
    try:
        for layer in (cpu, gpu):
            y, h_n = layer(x, h0, lengths)
            dx, dh0 = layer.backward(dy, dh)
            results.append([y, h_n, dx, dh0] + [layer._storage.to_host(g) for g in layer.grads.values()])
    finally:
        backend.loop = previous
    for expected, actual in zip(*results):  # NumPy in, NumPy out: every result is on the host
        assert_close(actual, expected, TOL[dtype])


@pytest.mark.parametrize("make", [fastlstm.LSTM, fastlstm.GRU], ids=["lstm", "gru"])
def test_streams_on_the_gpu_equal_the_whole_sequence(make):
    layer = make(64, 128, num_layers=2, backend="cupy", seed=0).eval()
    x = np.random.default_rng(0).standard_normal((9, 2, 64)).astype(np.float32)
    y, _ = layer(x)
    stream = layer.stream(2)
    steps = np.stack([stream(x[t]) for t in range(5)] + list(stream(x[5:])))
    assert_close(steps, y, TOL["float32"], "y")
