"""The per-step time loop replayed as a CUDA graph, and the capturable cuBLAS binding, on
the fake device (tests/cuda_emulation/fake_cupy.py): a captured launch is recorded, not
run, with the addresses and scalars of the moment, as CUDA does; a graph runs it later.
"""

from __future__ import annotations

import types
from dataclasses import replace

import numpy as np
import pytest
from cuda_emulation import host_kernels
from cuda_emulation.fake_cupy import make_fake_cupy
from lstm_testing import assert_close, assert_layers_agree, random_problem

import fastlstm
from fastlstm.backends import cublas_api, cupy_backend
from fastlstm.backends.cuda_graphs import GraphCache
from fastlstm.backends.numpy_backend import NumpyBackend

pytestmark = pytest.mark.skipif(host_kernels.compiler() is None, reason="no C++ compiler to build host kernels")


@pytest.fixture
def fake(library):
    return make_fake_cupy(library)


def per_step_backend(fake, graphs=True, workspace_bytes=0):
    kernels = cupy_backend.CupyKernels(fake)
    cache = GraphCache(fake.cuda, workspace_bytes=workspace_bytes) if graphs else None
    return cupy_backend.CudaSequenceBackend(fake, cupy_backend.CublasGemm(fake.cuda), kernels, loop="per-step",
                                            graphs=cache)


def queue_increment(fake, counter):
    """Queue `counter += 1` on the current stream (run now, or recorded while capturing)."""
    streams = fake.cuda.streams
    streams.submit(streams.current().ptr, lambda: counter.__setitem__(0, counter[0] + 1))


# -- the cache ----------------------------------------------------------------------------
SHAPES = (("a", (2, 3), "<f8"),)


def test_a_loop_runs_then_is_captured_then_replayed(fake):
    graphs, counter = GraphCache(fake.cuda), [0]
    for expected in (1, 2, 3, 4):
        graphs.run(graphs.buffers(fake, SHAPES), ("loop",), lambda: queue_increment(fake, counter))
        assert counter[0] == expected  # every call did the work once, however it was issued
    assert graphs.counts == {"eager": 1, "captured": 1, "replayed": 2}


def test_buffers_are_kept_per_shapes_and_stream_and_dropped_with_their_graphs(fake):
    graphs, counter = GraphCache(fake.cuda, capacity=2), [0]
    first = graphs.buffers(fake, SHAPES)
    assert graphs.buffers(fake, SHAPES) is first and first.arrays["a"].shape == (2, 3)
    with fake.cuda.Stream():
        assert graphs.buffers(fake, SHAPES) is not first  # another stream could run at the same time
    for _ in range(2):
        graphs.run(first, ("loop",), lambda: queue_increment(fake, counter))
    assert ("loop",) in first.graphs
    for n in (4, 5):  # two other shapes: the least recently used set goes, its graph with it
        graphs.buffers(fake, (("a", (n,), "<f8"),))
    again = graphs.buffers(fake, SHAPES)
    assert again is not first and not again.graphs
    graphs.run(again, ("loop",), lambda: queue_increment(fake, counter))
    assert graphs.counts == {"eager": 2, "captured": 1} and counter[0] == 3


def test_a_cublas_workspace_is_shared_by_the_buffers_of_one_stream_and_goes_with_the_last(fake):
    graphs = GraphCache(fake.cuda, capacity=2, workspace_bytes=4096)
    first = graphs.buffers(fake, SHAPES)
    assert first.workspace.nbytes == 4096 and first.workspace.dtype == np.uint8
    assert graphs.buffers(fake, (("a", (4,), "<f8"),)).workspace is first.workspace  # same stream
    with fake.cuda.Stream():
        assert graphs.buffers(fake, SHAPES).workspace is not first.workspace  # another stream: its own
    # that stream's set pushed out the first (capacity 2); one set of the first stream is left
    again = graphs.buffers(fake, SHAPES)
    assert again is not first and again.workspace is first.workspace
    with fake.cuda.Stream():
        for n in (5, 6):  # two sets on a third stream push out the rest: the first stream's last set
            graphs.buffers(fake, (("a", (n,), "<f8"),))  # goes, and its workspace with it
    assert graphs.buffers(fake, SHAPES).workspace is not first.workspace
    assert GraphCache(fake.cuda).buffers(fake, SHAPES).workspace is None  # 0 bytes: cuBLAS's default


def test_a_failed_capture_switches_graphs_off_and_runs_the_loop(fake):
    graphs, counter = GraphCache(fake.cuda), [0]

    def loop_that_allocates():
        fake.empty(3)  # refused while capturing, as cudaMalloc would be
        queue_increment(fake, counter)

    for _ in range(3):
        graphs.run(graphs.buffers(fake, SHAPES), ("loop",), loop_that_allocates)
    assert counter[0] == 3
    assert not graphs.enabled and "allocated while a stream is being captured" in graphs.disabled_reason
    assert graphs.counts == {"eager": 3}


def test_an_error_of_the_loop_itself_still_comes_back(fake):
    graphs = GraphCache(fake.cuda)

    def broken():
        raise ValueError("a bug in the loop")

    for _ in range(3):  # eager, failed capture (then eager), eager
        with pytest.raises(ValueError, match="a bug in the loop"):
            graphs.run(graphs.buffers(fake, SHAPES), ("loop",), broken)


# -- the backend's loops ------------------------------------------------------------------
def forward_problem(seed, steps=5, batch=3, input_size=2, hidden=4, dtype=np.float64):
    rng = np.random.default_rng(seed)
    host = {
        "x": rng.standard_normal((steps, batch, input_size)),
        "w_ih": 0.5 * rng.standard_normal((4 * hidden, input_size)),
        "w_hh": 0.5 * rng.standard_normal((4 * hidden, hidden)),
        "bias": 0.5 * rng.standard_normal(4 * hidden),
        "h0": rng.standard_normal((batch, hidden)),
        "c0": rng.standard_normal((batch, hidden)),
        "lengths": np.array([steps, 2, 4][:batch], dtype=np.int64),
    }
    return {name: value.astype(dtype) if value.dtype.kind == "f" else value for name, value in host.items()}


def run_forward_steps(backend, host, device, reverse, training):
    """The per-step forward on the device buffers `device`, refilled with `host`'s values in place."""
    steps, batch, _ = host["x"].shape
    for name in ("w_hh", "bias", "h0", "c0", "lengths"):
        device[name][...] = host[name]
    device["gates"][...] = (host["x"].reshape(steps * batch, -1) @ host["w_ih"].T).reshape(steps, batch, -1)
    states = (device["h_states"], device["c_states"]) if training else (None, None)
    h_n, c_n = backend._forward_steps(device["gates"], device["w_hh"], device["bias"], device["h0"], device["c0"],
                                      device["lengths"], reverse, training, device["y"], *states)
    return np.array(device["y"]), np.array(h_n), np.array(c_n)


def expected_forward(host, reverse):
    y, h_n, c_n, _ = NumpyBackend().forward_sequence(host["x"], host["w_ih"], host["w_hh"], host["bias"], host["h0"],
                                                     host["c0"], host["lengths"], reverse, False)
    return y, h_n, c_n


def device_buffers(fake, host):
    steps, batch, _ = host["x"].shape
    hidden = host["w_hh"].shape[1]
    dtype = host["x"].dtype
    device = {name: fake.empty(host[name].shape, host[name].dtype) for name in ("w_hh", "bias", "h0", "c0", "lengths")}
    device["gates"] = fake.empty((steps, batch, 4 * hidden), dtype)
    for name in ("y", "h_states", "c_states"):
        device[name] = fake.empty((steps, batch, hidden), dtype)
    return device


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_forward_loop_replayed_from_a_graph_matches_numpy(fake, reverse, training):
    backend = per_step_backend(fake)
    host = forward_problem(0)
    device = device_buffers(fake, host)
    for seed in range(4):  # same buffers, new values each time: eager, capture, replay, replay
        host = forward_problem(seed)
        for actual, expected, what in zip(run_forward_steps(backend, host, device, reverse, training),
                                          expected_forward(host, reverse), ("y", "h_n", "c_n")):
            assert_close(actual, expected, 1e-12, f"call {seed}: {what}")
    assert backend.graphs.counts == {"eager": 1, "captured": 1, "replayed": 2}


@pytest.mark.parametrize("training", [False, True])
def test_a_forward_loop_on_new_buffers_is_replayed_on_their_values(fake, training):
    """The graph runs on buffers of its own: each call's arrays (new addresses, new values)
    are copied in and out, so a replay computes from this call's values into this call's arrays."""
    backend = per_step_backend(fake)
    for seed in range(4):
        host = forward_problem(seed)
        device = device_buffers(fake, host)
        for actual, expected, what in zip(run_forward_steps(backend, host, device, True, training),
                                          expected_forward(host, True), ("y", "h_n", "c_n")):
            assert_close(actual, expected, 1e-12, f"call {seed}: {what}")
    assert backend.graphs.counts == {"eager": 1, "captured": 1, "replayed": 2}


BACKWARD_BUFFERS = ("gates", "c_states", "c0", "w_hh", "lengths", "dy", "d_gates")


def backward_problem(fake, backend, seed, reverse):
    """A training forward on the device, and the backward's inputs: (saved, dy, dh_n, dc_n)."""
    host = forward_problem(seed)
    names = ("x", "w_ih", "w_hh", "bias", "h0", "c0", "lengths")
    _, _, _, saved = backend.forward_sequence(*(fake.asarray(host[name]) for name in names), reverse, True)
    rng = np.random.default_rng(100 + seed)
    dy = fake.asarray(rng.standard_normal(saved.h_states.shape))
    dh_n, dc_n = (fake.asarray(rng.standard_normal(saved.h0.shape)) for _ in range(2))
    return saved, dy, dh_n, dc_n


def run_backward_steps(backend, saved, dy, dh_n, dc_n, d_gates):
    d_gates[...] = np.nan  # every element must be written
    dh0, dc0 = backend._backward_steps(saved, dy, dh_n, dc_n, d_gates)
    return np.asarray(dh0).copy(), np.asarray(dc0).copy(), np.asarray(d_gates).copy()


@pytest.mark.parametrize("training", [False, True])
def test_the_loops_gemms_get_the_cache_workspace_and_no_other_gemm_does(fake, training):
    """Every GEMM a loop queues (run, captured) gets its buffers' workspace; the input
    projection outside the loop gets cuBLAS's default."""
    backend = per_step_backend(fake, workspace_bytes=2048)
    host = forward_problem(0)
    steps = host["x"].shape[0]
    names = ("x", "w_ih", "w_hh", "bias", "h0", "c0", "lengths")
    for call in range(3):  # eager, captured, replayed
        backend.forward_sequence(*(fake.asarray(host[name]) for name in names), False, training)
    (staged,) = backend.graphs._staged.values()
    loop = (staged.workspace.data.ptr, 2048)
    projection = [None]
    # the replay queues no GEMM from the host: its GEMMs are the captured ones
    assert fake.cuda.cublas.workspaces == (projection + [loop] * steps) * 2 + projection
    assert backend.graphs.counts == {"eager": 1, "captured": 1, "replayed": 1}


def test_a_call_holds_the_cache_lock_from_its_inputs_in_to_its_outputs_out(fake):
    """Copies and launches of two host threads on one stream must not interleave on the
    same buffers: each call's copy-in, loop (eager, captured or replayed) and copy-out are
    queued under one lock."""
    backend = per_step_backend(fake)
    host = forward_problem(0)
    device = device_buffers(fake, host)
    held, run = [], backend.graphs.run

    def spy(staged, flags, issue):
        held.append(backend.graphs.lock.locked())
        run(staged, flags, issue)

    backend.graphs.run = spy
    for _ in range(3):
        run_forward_steps(backend, host, device, False, True)
    assert held == [True, True, True] and not backend.graphs.lock.locked()
    assert backend.graphs.counts == {"eager": 1, "captured": 1, "replayed": 1}


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("moved", [None, *BACKWARD_BUFFERS])
def test_backward_loop_replayed_from_a_graph_matches_the_launched_loop(fake, reverse, moved):
    """Replays give what launching the loop gives, on the same arrays refilled or on a
    moved one (new address, new values)."""
    graphed, launched = per_step_backend(fake), per_step_backend(fake, graphs=False)
    saved, dy, dh_n, dc_n = backward_problem(fake, launched, 0, reverse)
    d_gates = fake.empty_like(saved.gates)
    for seed in range(4):
        new_saved, new_dy, dh_n, dc_n = backward_problem(fake, launched, seed, reverse)
        # the same buffers, refilled in place (new values, same addresses)
        for name in ("gates", "c_states", "c0", "w_hh", "lengths"):
            getattr(saved, name)[...] = getattr(new_saved, name)
        dy[...] = new_dy
        if moved is not None and seed == 3:
            if moved == "dy":
                dy = new_dy
            elif moved == "d_gates":
                d_gates = fake.empty_like(d_gates)
            else:
                saved = replace(saved, **{moved: getattr(new_saved, moved)})
        expected = run_backward_steps(launched, saved, dy, dh_n, dc_n, fake.empty_like(d_gates))
        actual = run_backward_steps(graphed, saved, dy, dh_n, dc_n, d_gates)
        for a, e, what in zip(actual, expected, ("dh0", "dc0", "d_gates")):
            assert_close(a, e, 1e-12, f"call {seed}, {moved} moved: {what}")
    assert graphed.graphs.counts == {"eager": 1, "captured": 1, "replayed": 2}


def test_training_through_the_layer_replays_graphs_and_matches_numpy(fake_cupy):
    """The real CupyBackend through the layer, every feature, several training steps on
    new data: from the third step on, every loop is replayed from its graph."""
    kwargs = dict(num_layers=2, bidirectional=True, dropout=0.3, dtype="float64", seed=4)
    gpu = fastlstm.LSTM(3, 5, backend="cupy", **kwargs)
    cpu = fastlstm.LSTM(3, 5, backend="numpy", **kwargs)
    cpu.load_state_dict(gpu.state_dict())
    backend = gpu._current_backend()
    backend.loop = "per-step"
    assert backend.graphs.enabled
    for step in range(4):
        problem = random_problem(cpu, 6, 4, seed=step, lengths=np.array([6, 3, 1, 5]))
        assert_layers_agree(gpu, cpu, problem, 1e-12, f"step {step}: ")
    # Both layers' loops have the same shapes (the input size is not the loop's): one graph
    # each for forward and backward in each direction, 8 loops a training step.
    assert backend.graphs.counts == {"eager": 4, "captured": 4, "replayed": 24}
    assert "CUDA graphs for the per-step loop on" in fastlstm.available_backends()["cupy"].reason
    # one workspace (the fake reports compute capability 9: 32 MiB) for every loop's GEMMs
    workspaces = set(fake_cupy.cuda.cublas.workspaces)
    assert len(workspaces) == 2 and None in workspaces, workspaces
    assert {size for _, size in workspaces - {None}} == {32 * 1024 * 1024}


@pytest.mark.parametrize("reset_after", [True, False])
def test_gru_training_through_the_layer_replays_graphs_and_matches_numpy(fake_cupy, reset_after):
    """The GRU's per-step loops (both conventions) through the real CupyBackend: several
    training steps and an eval call on new data, replayed from their graphs from the third
    step on, against the NumPy layer."""
    kwargs = dict(num_layers=2, bidirectional=True, dropout=0.3, dtype="float64", seed=4, reset_after=reset_after)
    gpu = fastlstm.GRU(3, 5, backend="cupy", **kwargs)
    cpu = fastlstm.GRU(3, 5, backend="numpy", **kwargs)
    cpu.load_state_dict(gpu.state_dict())
    backend = gpu._current_backend()
    backend.loop = "per-step"  # not the resident kernels these shapes would get
    assert backend.graphs.enabled
    rng = np.random.default_rng(0)
    lengths = np.array([6, 3, 1, 5])
    for step in range(4):
        x, h0 = rng.standard_normal((6, 4, 3)), rng.standard_normal((4, 4, 5))
        dy, dh = rng.standard_normal((6, 4, 10)), rng.standard_normal((4, 4, 5))
        assert_layers_agree(gpu, cpu, (x, h0, lengths, dy, dh), 1e-12, f"step {step}: ")
    assert backend.graphs.counts == {"eager": 4, "captured": 4, "replayed": 24}
    for layer in (gpu, cpu):
        layer.eval()
    (y, h_n), (y_ref, h_ref) = (layer(x, h0, lengths) for layer in (gpu, cpu))
    assert_close(np.asarray(y), y_ref, 1e-12, "eval y")
    assert_close(np.asarray(h_n), h_ref, 1e-12, "eval h_n")


def test_the_cublas_workspace_is_the_recommended_size():
    assert cupy_backend.cublas_workspace_bytes(8) == 4 * 1024 * 1024
    assert cupy_backend.cublas_workspace_bytes(9) == cupy_backend.cublas_workspace_bytes(10) == 32 * 1024 * 1024


# -- cuBLAS through ctypes ----------------------------------------------------------------
def test_ctypes_cublas_errors_name_the_function_and_status(fake_cublas_library):
    api = cublas_api.CtypesCublas(str(fake_cublas_library[0]))
    with pytest.raises(cublas_api.CublasError, match="cublasSetStream_v2 returned 1 .CUBLAS_STATUS_NOT_INITIALIZED"):
        api.setStream(0, 0)  # a null handle
    one = np.ones(1)
    with pytest.raises(cublas_api.CublasError, match="cublasDgemm_v2 returned 7 .CUBLAS_STATUS_INVALID_VALUE"):
        api.dgemm(7, 0, 0, 4, 1, 1, one.ctypes.data, one.ctypes.data, 1, one.ctypes.data, 1, one.ctypes.data,
                  one.ctypes.data, 1)  # ldc 1 < m 4


def test_the_library_is_found_through_the_binding_or_by_name(fake_cublas_library, library, tmp_path):
    cublas_library, binding = fake_cublas_library
    def module(path):  # what CuPy's binding module offers: the file of its shared object
        return types.SimpleNamespace(__file__=str(path))

    through_binding, _ = cublas_api.load(module(binding), prefix="no such library")
    assert through_binding is not None and through_binding.path == str(binding)
    # a binding that does not link cuBLAS (the host kernels): the mapped library by name instead
    by_name, _ = cublas_api.load(module(library), prefix="libfakecublas_host")
    assert by_name is not None and by_name.path == str(cublas_library)
    nothing, why_not = cublas_api.load(module(library), prefix="no such library")
    assert nothing is None and str(library) in why_not and "cublasSetStream_v2" in why_not
    nothing, why_not = cublas_api.load(None, prefix="libcublas_surely_absent.so")
    assert nothing is None and "no libcublas_surely_absent.so* mapped" in why_not

    assert cublas_api.loaded_library_path("libfakecublas_host") == str(cublas_library)
    assert cublas_api.loaded_library_path("libcublasLt_not_loaded_here") is None
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 00000000 08:01 42  /usr/lib/libcublasLt.so.13\n"
                    "7f01-7f02 r-xp 00000000 08:01 43  /opt/cuda/lib/libcublas.so.13.0.1\n"
                    "7f02-7f03 rw-p 00000000 00:00 0 \n")
    assert cublas_api.loaded_library_path("libcublas.so", maps=str(maps)) == "/opt/cuda/lib/libcublas.so.13.0.1"


@pytest.mark.parametrize("value", ["0", "off"])
def test_graphs_can_be_switched_off_from_the_environment(fake_cupy, monkeypatch, value):
    monkeypatch.setenv(cupy_backend.GRAPHS_ENV_VAR, value)
    gpu = fastlstm.LSTM(3, 5, backend="cupy", dtype="float64", seed=1)
    cpu = fastlstm.LSTM(3, 5, backend="numpy", dtype="float64", seed=1)
    cpu.load_state_dict(gpu.state_dict())
    backend = gpu._current_backend()
    backend.loop = "per-step"
    reason = fastlstm.available_backends()["cupy"].reason
    assert f"CUDA graphs for the per-step loop off: FASTLSTM_CUDA_GRAPHS={value}" in reason
    for step in range(3):
        x = np.random.default_rng(step).standard_normal((4, 2, 3))
        assert_close(gpu(x)[0], cpu(x)[0], 1e-12, f"call {step}")
    assert backend.graphs.counts == {}  # the loops ran on the caller's arrays, not through the cache
