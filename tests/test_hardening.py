"""Careless and hostile use (issue 17): padding that holds NaN, caller arrays changed between a
forward and its backward, a failed backend switch, odd Numba environments."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tracemalloc
import warnings
import zipfile

import numpy as np
import pytest

import fastlstm
from fastlstm import checkpoint, registry
from lstm_testing import CPU_BACKENDS, assert_close, forward_backward

CELLS = ["lstm", "gru"]


def make_layer(cell, backend, **kwargs):
    cls = fastlstm.LSTM if cell == "lstm" else fastlstm.GRU
    return cls(3, 5, num_layers=2, bidirectional=True, backend=backend, seed=1, **kwargs)


def problem(layer, seed=0):
    rng = np.random.default_rng(seed)
    d = layer.num_layers * layer.num_directions
    x = rng.standard_normal((6, 4, 3))
    state = tuple(rng.standard_normal((d, 4, 5)) for _ in layer._spec.cell.state_parts)
    dy = rng.standard_normal((6, 4, 10))
    dstate = tuple(rng.standard_normal((d, 4, 5)) for _ in layer._spec.cell.state_parts)
    if len(state) == 1:
        state, dstate = state[0], dstate[0]
    return x, state, np.array([6, 3, 1, 5]), dy, dstate


def poisoned(x, lengths, value):
    """x with `value` in every step past each sequence's length."""
    x = x.copy()
    for b, n in enumerate(lengths):
        x[n:, b] = value
    return x


def check_padding_reaches_nothing(layer):
    x, state, lengths, dy, dstate = problem(layer)
    clean = forward_backward(layer, x, state, lengths, dy, dstate)
    for value in (np.nan, np.inf, -np.inf):
        layer.zero_grad()
        dirty = forward_backward(layer, poisoned(x, lengths, value), state, lengths, poisoned(dy, lengths, value),
                                 dstate)
        for name in clean:
            np.testing.assert_array_equal(dirty[name], clean[name], err_msg=f"{value} in the padding: {name}")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_and_inf_in_the_padding_reach_no_result(backend, cell, dtype):
    """Callers fill padding from np.empty: whatever it holds, outputs and every gradient are
    those of zero padding, bit for bit (the padding's own dx is zero)."""
    check_padding_reaches_nothing(make_layer(cell, backend, dtype=dtype))


@pytest.mark.parametrize("cell", CELLS)
def test_nan_padding_on_the_cupy_backend_host_emulated(fake_cupy, cell):
    check_padding_reaches_nothing(make_layer(cell, "cupy", dtype="float64"))


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_changing_inputs_and_weights_before_backward_changes_no_gradient(backend, cell):
    """A training forward keeps what its backward reads: the caller may reuse x and the state
    for the next batch, or an optimizer may step, before the backward."""
    for with_lengths in (False, True):
        layer = make_layer(cell, backend, dtype="float32")
        x, state, lengths, dy, dstate = problem(layer)
        lengths = lengths if with_lengths else None
        x, state = x.astype(np.float32), (np.asarray(state, np.float32) if cell == "gru"
                                          else tuple(s.astype(np.float32) for s in state))
        expected = forward_backward(layer, x, state, lengths, dy, dstate)
        layer.zero_grad()
        y, _ = layer(x, state, lengths)
        x += 1.0  # in place: the same arrays the forward was given
        for part in (state,) if cell == "gru" else state:
            part *= 3.0
        for p in layer.params.values():
            p += 0.5
        dx, _ = layer.backward(dy, dstate)
        np.testing.assert_array_equal(dx, expected["dx"])
        for name, g in layer.grads.items():
            np.testing.assert_array_equal(g, expected[name], err_msg=name)


def test_a_failed_switch_to_an_unusable_backend_changes_nothing():
    if fastlstm.available_backends()["cupy"].available:
        pytest.skip("a GPU is usable here")
    layer = fastlstm.LSTM(3, 4, backend="numpy", seed=0)
    before = {k: v.copy() for k, v in layer.state_dict().items()}
    with pytest.raises(registry.BackendUnavailableError, match="cupy"):
        layer.to("cupy")
    assert layer.backend == "numpy" and "numpy" in repr(layer)
    y, _ = layer(np.ones((2, 1, 3), np.float32))
    assert y.shape == (2, 1, 4)
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def run_python(code: str, **env) -> dict:
    """`code` in a fresh interpreter with `env` added; its last stdout line as JSON."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                            env={**os.environ, **env})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


NUMBA_ENV_CHECK = """
import json, warnings, numpy as np, fastlstm
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    fastlstm.LSTM(2, 3)(np.ones((2, 1, 2), np.float32))
status = fastlstm.available_backends()["numba"]
out = {"available": status.available, "reason": status.reason, "auto": fastlstm.get_backend(),
       "warnings": [str(w.message) for w in caught]}
if status.available:
    fastlstm.set_num_threads(fastlstm.threads.available_cores())
    for cell in (fastlstm.LSTM, fastlstm.GRU):  # parallel-sized on two cores
        layer = cell(16, 256, backend="numba", seed=0)
        y, _ = layer(np.ones((3, 64, 16), np.float32))
        layer.backward(np.ones_like(y))
    out["ran"] = True
print(json.dumps(out))
"""


def numba_usable():
    return fastlstm.available_backends()["numba"].available


@pytest.mark.skipif(not numba_usable(), reason="numba backend unavailable")
def test_a_numba_pool_smaller_than_the_cores_runs_on_the_pool():
    """NUMBA_NUM_THREADS=1 (or an affinity narrowed when Numba started): parallel-sized calls
    run on the threads Numba has, and the backend says so."""
    if fastlstm.threads.available_cores() < 2:
        pytest.skip("needs 2 cores")
    result = run_python(NUMBA_ENV_CHECK, NUMBA_NUM_THREADS="1")
    assert result["available"] and result["ran"], result
    assert "1 threads (NUMBA_NUM_THREADS=1)" in result["reason"], result


@pytest.mark.skipif(not numba_usable(), reason="numba backend unavailable")
def test_numba_with_its_jit_disabled_is_reported_unavailable():
    result = run_python(NUMBA_ENV_CHECK, NUMBA_DISABLE_JIT="1")
    assert not result["available"] and "NUMBA_DISABLE_JIT" in result["reason"], result
    assert result["auto"] == "numpy"
    assert any("numba backend is installed but cannot be used" in w and "NUMBA_DISABLE_JIT" in w
               for w in result["warnings"]), result


FORK_CHECK = """
import json, multiprocessing, numpy as np, fastlstm

def run(seed):
    x = np.random.default_rng(seed).standard_normal((3, 64, 16)).astype(np.float32)
    out = []
    for cell in (fastlstm.LSTM, fastlstm.GRU):
        layer = cell(16, 256, backend="numba", seed=0)
        y, _ = layer(x)
        dx, _ = layer.backward(np.ones_like(y))
        out.append([float(np.abs(y).sum()), float(np.abs(dx).sum())])
    return out

if __name__ == "__main__":
    here = run(0)  # parallel kernels run here first
    with multiprocessing.get_context("fork").Pool(2) as pool:
        children = pool.map(run, [0, 0])
    print(json.dumps({"here": here, "children": children}))
"""


@pytest.mark.skipif(not numba_usable(), reason="numba backend unavailable")
@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_children_forked_after_a_parallel_call_run(tmp_path):
    """Linux's default multiprocessing start method forks: the children must work (with
    GNU OpenMP, on one thread each) and agree with the parent."""
    if fastlstm.threads.available_cores() < 2:
        pytest.skip("needs 2 cores")
    script = tmp_path / "fork_check.py"
    script.write_text(FORK_CHECK)
    # without the fix the pool hangs: the timeout turns that into a failure
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    for child in found["children"]:
        np.testing.assert_allclose(child, found["here"], rtol=1e-5)


# -- files from untrusted sources -----------------------------------------------------------
def write_zip(path, members: dict, compression=zipfile.ZIP_STORED):
    """A .npz-like zip of raw member bytes (name -> bytes)."""
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def npy_bytes(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def layer_file_members(config: dict, arrays: dict) -> dict:
    header = json.dumps({"format": "fastlstm-lstm", "version": 1, "config": config}).encode()
    members = {"__fastlstm_header__.npy": npy_bytes(np.frombuffer(header, np.uint8))}
    members.update({f"{name}.npy": npy_bytes(a) for name, a in arrays.items()})
    return members


def refused_cheaply(path, match):
    """Loading `path` raises CheckpointError matching `match`, allocating little on the way."""
    tracemalloc.start()
    try:
        with pytest.raises(fastlstm.CheckpointError, match=match):
            fastlstm.LSTM.load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20, f"{peak / 2**20:.0f} MiB allocated before refusing"


def test_hostile_layer_files_are_refused_before_anything_large_is_allocated(tmp_path):
    small = fastlstm.LSTM(3, 4, seed=0)
    config, arrays = small.config(), small.state_dict()
    cases = {
        # a zip bomb: one compressed member that expands to 256 MiB of zeros
        "bomb.npz": ({**layer_file_members(config, {}), "weight_ih_l0.npy": npy_bytes(np.zeros(1)) + bytes(2**28)},
                     zipfile.ZIP_DEFLATED, "compressed"),
        # a small file whose configuration declares a huge layer
        "huge_config.npz": (layer_file_members({**config, "hidden_size": 8000}, arrays), zipfile.ZIP_STORED,
                            "do not match the configuration"),
        "many_layers.npz": (layer_file_members({**config, "num_layers": 200000}, arrays), zipfile.ZIP_STORED,
                            "parameter arrays"),
        # a member whose .npy header declares far more data than it holds
        "huge_shape.npz": ({**layer_file_members(config, {}),
                            "weight_ih_l0.npy": npy_bytes(np.zeros(3, np.float32)).replace(b"(3,)", b"(1000000000000,)")},
                           zipfile.ZIP_STORED, "do not match|declares shape"),
        # refused before json's parser recurses 100000 levels (near Python's recursion limit
        # even the garbage collector's callbacks fail)
        "deep_header.npz": ({"__fastlstm_header__.npy": npy_bytes(np.frombuffer(b"[" * 100000, np.uint8))},
                            zipfile.ZIP_STORED, "not a readable .* nests 100000 levels deep"),
        "object_array.npz": ({**layer_file_members(config, arrays),
                              "weight_ih_l0.npy": npy_bytes(np.zeros((16, 3), np.float32)).replace(b"'<f4'", b"'|O' ")},
                             zipfile.ZIP_STORED, "dtype|not a readable"),
        "unknown_option.npz": (layer_file_members({**config, "evil": 1}, arrays), zipfile.ZIP_STORED,
                               "configuration in the file is not valid"),
        "backend_in_file.npz": (layer_file_members({**config, "backend": "cupy"}, arrays), zipfile.ZIP_STORED,
                                r"unknown options \['backend'\]"),
    }
    for name, (members, compression, match) in cases.items():
        write_zip(tmp_path / name, members, compression)
        refused_cheaply(tmp_path / name, match)
    # a stored member whose data were changed on disk: the CRC check refuses it
    good = tmp_path / "good.npz"
    small.save(good)
    data = bytearray(good.read_bytes())
    at = data.find(b"weight_hh_l0.npy") + 200  # inside that member's data (local header, then .npy header)
    data[at] ^= 0xFF
    (tmp_path / "flipped.npz").write_bytes(bytes(data))
    refused_cheaply(tmp_path / "flipped.npz", "not a readable")


@pytest.mark.parametrize(("text", "depth"), [
    (b"", 0),
    (b'{"format": "layer", "config": {"hidden_size": 4, "sizes": [1, [2]]}}', 4),
    (b'{"name": "[[[{{"}', 1),  # brackets in a string do not nest
    (b'["]]]]]", [[1]]]', 3),  # nor do they close
    (b'["a\\\\", [[1]]]', 3),  # an escaped backslash, then the string's end
    (b'["a\\"[[", 1]', 1),  # an escaped quote: the string goes on
    (b"[" * 1000, 1000),
])
def test_a_header_nesting_is_measured_without_parsing(text, depth):
    assert checkpoint._nesting_depth(text) == depth


def test_saving_writes_through_symlinks_keeps_permissions_and_takes_long_names(tmp_path):
    layer = fastlstm.LSTM(3, 4, seed=0)
    kept = tmp_path / "kept.npz"
    kept.write_bytes(b"old")
    kept.chmod(0o644)
    layer.save(kept)
    assert kept.stat().st_mode & 0o777 == 0o644
    target = tmp_path / "real.npz"
    link = tmp_path / "link.npz"
    link.symlink_to(target)
    layer.save(link)
    assert link.is_symlink() and target.is_file()
    np.testing.assert_array_equal(fastlstm.LSTM.load(link).state_dict()["weight_ih_l0"], layer.params["weight_ih_l0"])
    long_name = tmp_path / ("m" * 250 + ".npz")  # 254 characters: a temporary name beside it must not be longer
    layer.save(long_name)
    assert fastlstm.LSTM.load(long_name).config() == layer.config()
    with pytest.raises(FileNotFoundError, match="missing"):
        layer.save(tmp_path / "missing" / "model.npz")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary files left


@pytest.mark.parametrize("cell", CELLS)
def test_integer_and_boolean_inputs_are_refused_and_change_nothing(cell):
    layer = make_layer(cell, "numpy")
    x, state, lengths, dy, dstate = problem(layer)
    y, _ = layer(x, state, lengths)
    before = {k: v.copy() for k, v in layer.state_dict().items()}
    bad_state = state.astype(np.int32) if cell == "gru" else (state[0].astype(np.int32), state[1])
    for args, name in (((x.astype(np.int64), state, lengths), "x"), ((x > 0, state, lengths), "x"),
                       ((x, bad_state, lengths), "state")):
        with pytest.raises(TypeError, match=f"{name}.*expected floating-point numbers, got dtype"):
            layer(*args)
    with pytest.raises(TypeError, match="dy.*expected floating-point numbers"):
        layer.backward(dy.astype(np.int16), dstate)
    dx, _ = layer.backward(dy.astype(np.float16), dstate)  # another float precision: converted
    assert dx.dtype == np.float32
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_a_layer_too_large_for_this_machine_is_refused_before_allocating():
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    hidden = 40000 if physical < 40 * 2**30 else 200000  # its parameters and gradients: 48 GiB, 1.2 TiB
    tracemalloc.start()
    try:
        with pytest.raises(MemoryError, match=rf"hidden_size={hidden}.*GiB.*smaller hidden_size"):
            fastlstm.LSTM(512, hidden, backend="numpy")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20


# -- soak and fuzz -------------------------------------------------------------------------
@pytest.mark.skipif(not numba_usable(), reason="numba backend unavailable")
def test_soak_changing_shapes_bounded_caches_same_results():
    """Thousands of calls with batch sizes that keep changing: the plan cache stays bounded,
    traced memory does not grow, and a fixed call gives the first call's results bit for bit."""
    from fastlstm.backends import numba_backend

    rng = np.random.default_rng(0)
    layers = [make_layer(cell, "numba", dtype="float32") for cell in CELLS]
    fixed = [problem(layer, seed=9) for layer in layers]
    first = [forward_backward(layer, *args) for layer, args in zip(layers, fixed)]
    tracemalloc.start()
    try:
        for call in range(1500):
            layer = layers[call % 2]
            batch = 1 + call % (numba_backend._PLANS_KEPT + 30)
            x = rng.standard_normal((3, batch, 3)).astype(np.float32)
            y, _ = layer(x)
            layer.backward(np.ones_like(y))
            if call == 500:
                baseline = tracemalloc.get_traced_memory()[0]
        grown = tracemalloc.get_traced_memory()[0] - baseline
    finally:
        tracemalloc.stop()
    assert len(layers[0]._current_backend()._plans) <= numba_backend._PLANS_KEPT
    assert grown < 2 * 2**20, f"{grown / 2**20:.1f} MiB more after 1000 more calls"
    for layer, args, expected in zip(layers, fixed, first):
        layer.zero_grad()
        again = forward_backward(layer, *args)
        for name in expected:
            np.testing.assert_array_equal(again[name], expected[name], err_msg=name)


@pytest.mark.skipif(not numba_usable(), reason="numba backend unavailable")
def test_read_only_inputs_compile_nothing_new():
    """np.frombuffer or a read-only memory map as x, state or dy: the same kernels as for
    writable arrays (the kernels are typed by writability: another would compile for seconds)."""
    from fastlstm.kernels import numba_gru, numba_lstm

    kernels = [numba_lstm.forward, numba_lstm.backward_loop, numba_gru.forward, numba_gru.backward_loop]

    def calls(read_only):
        for cell in CELLS:
            cls = fastlstm.LSTM if cell == "lstm" else fastlstm.GRU
            layer = cls(3, 5, backend="numba", dtype="float64", seed=0)  # one direction: dy goes in as it is
            rng = np.random.default_rng(0)
            x, dy = rng.standard_normal((4, 2, 3)), rng.standard_normal((4, 2, 5))
            state = tuple(rng.standard_normal((1, 2, 5)) for _ in layer._spec.cell.state_parts)
            for a in (x, dy, *state) if read_only else ():
                a.flags.writeable = False
            state = state if cell == "lstm" else state[0]
            layer.eval()(x, state)  # eval, no lengths: nothing is copied on the way
            layer.train()(x, state)
            layer.backward(dy)

    calls(read_only=False)
    before = [len(k.signatures) for k in kernels]
    calls(read_only=True)
    assert [len(k.signatures) for k in kernels] == before


from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def api_calls(draw):
    """A layer configuration and one call: right or wrong shapes, dtypes, strides, lengths, states."""
    config = dict(input_size=draw(st.integers(1, 4)), hidden_size=draw(st.integers(1, 5)),
                  num_layers=draw(st.integers(1, 2)), bidirectional=draw(st.booleans()),
                  batch_first=draw(st.booleans()), bias=draw(st.booleans()))
    steps, batch = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    x_shape = [batch, steps, config["input_size"]] if config["batch_first"] else [steps, batch, config["input_size"]]
    wrong_axis = draw(st.sampled_from([None, None, None, 0, 1, 2]))
    if wrong_axis is not None:
        x_shape[wrong_axis] += 1
    x_dtype = draw(st.sampled_from(["float32", "float64", "float16", "int64", "complex64", "bool"]))
    strided = draw(st.booleans())
    lengths = draw(st.sampled_from(["none", "valid", "zero", "too_long", "wrong_count"]))
    state = draw(st.sampled_from(["none", "valid", "wrong_shape"]))
    return (draw(st.sampled_from(CELLS)), draw(st.sampled_from(CPU_BACKENDS)), draw(st.sampled_from(
        ["float32", "float64"])), config, steps, batch, tuple(x_shape), x_dtype, strided, lengths, state,
        draw(st.integers(0, 2**31)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(api_calls())
def test_fuzz_every_call_agrees_with_numpy_or_fails_cleanly(call):
    """Every call either gives what the NumPy reference gives, or raises TypeError /
    ValueError and leaves the parameters and gradients as they were."""
    cell, backend, dtype, config, steps, batch, x_shape, x_dtype, strided, lengths, state, seed = call
    rng = np.random.default_rng(seed)
    cls = fastlstm.LSTM if cell == "lstm" else fastlstm.GRU
    layer = cls(backend=backend, dtype=dtype, seed=1, **config)
    reference = cls(backend="numpy", dtype=dtype, seed=1, **config)
    x = rng.standard_normal(x_shape + ((2,) if strided else ())).astype(x_dtype)
    x = x[..., 0] if strided else x  # a non-contiguous view
    d = config["num_layers"] * (2 if config["bidirectional"] else 1)
    state_shape = (d, batch + (state == "wrong_shape"), config["hidden_size"])
    parts = None if state == "none" else tuple(rng.standard_normal(state_shape) for _ in layer._spec.cell.state_parts)
    state_value = parts if parts is None or cell == "lstm" else parts[0]
    length_values = {"none": None, "valid": rng.integers(1, steps + 1, batch), "zero": np.zeros(batch, int),
                     "too_long": np.full(batch, steps + 1), "wrong_count": np.ones(batch + 1, int)}[lengths]
    y_shape = x_shape[:2] + (config["hidden_size"] * (2 if config["bidirectional"] else 1),)
    dy = rng.standard_normal(y_shape)
    before = {k: v.copy() for k, v in layer.state_dict().items()}
    try:
        actual = forward_backward(layer, x, state_value, length_values, dy, None)
    except (TypeError, ValueError) as exc:
        event(f"refused: {type(exc).__name__}")
        for k, v in layer.state_dict().items():
            np.testing.assert_array_equal(v, before[k], err_msg=k)
        assert all(not np.any(layer._storage.to_host(g)) for g in layer.grads.values())
        return
    event("ran")
    expected = forward_backward(reference, x, state_value, length_values, dy, None)
    tol = 1e-4 if dtype == "float32" else 1e-9
    for name in expected:
        assert_close(actual[name], expected[name], tol, name, floor=0.01)


def test_a_call_too_large_for_this_machine_is_refused_before_allocating():
    """A (T, B, I) input whose gates and kept states cannot fit: refused naming the sizes. The
    input itself is a broadcast view (no memory), so only the layer could allocate."""
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    layer = fastlstm.LSTM(1, 1024, backend="numpy", seed=0)
    batch = int(physical // (1000 * 1024 * 7 * 4)) + 1  # T=1000: 7 numbers a unit in training
    x = np.broadcast_to(np.float32(0.5), (1000, batch, 1))
    before = {k: v.copy() for k, v in layer.state_dict().items()}
    tracemalloc.start()
    try:
        with pytest.raises(MemoryError, match=rf"1000 steps x {batch} sequences needs about .* GiB.*split"):
            layer(x)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**26, f"{peak / 2**20:.0f} MiB"
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


ODD_VALUES = st.sampled_from([0, 1, 3, -1, 2.5, True, None, "2", "float32", "float16", [2], np.int64(2), np.float32(0.5)])


@settings(max_examples=150, deadline=None)
@given(cell=st.sampled_from(CELLS), args=st.fixed_dictionaries(
    {}, optional={name: ODD_VALUES for name in ("input_size", "hidden_size", "num_layers", "bias", "batch_first",
                                                "dropout", "bidirectional", "dtype", "seed")}))
def test_fuzz_constructor_arguments_build_a_layer_or_fail_cleanly(cell, args):
    cls = fastlstm.LSTM if cell == "lstm" else fastlstm.GRU
    args = {"input_size": 2, "hidden_size": 3, **args}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # dropout with one layer warns
            layer = cls(backend="numpy", **args)
    except (TypeError, ValueError) as exc:
        event(f"refused: {type(exc).__name__}")
        return
    event("built")
    y, _ = layer(np.ones((2, 1, layer.input_size), layer.dtype))
    assert y.shape == (2, 1, layer.hidden_size * layer.num_directions)


@settings(max_examples=150, deadline=None)
@given(cell=st.sampled_from(CELLS), change=st.sampled_from(
    ["none", "drop", "extra", "shape", "int", "complex", "float16", "list", "string", "nan"]), which=st.integers(0, 7))
def test_fuzz_state_dicts_load_or_fail_cleanly(cell, change, which):
    layer, source = make_layer(cell, "numpy", dtype="float32"), make_layer(cell, "numpy", dtype="float64")
    state = dict(source.state_dict())
    name = sorted(state)[which % len(state)]
    if change == "drop":
        del state[name]
    elif change == "extra":
        state["weight_ih_l9"] = state[name]
    elif change == "shape":
        state[name] = state[name][..., :-1]
    elif change in ("int", "complex", "float16"):
        state[name] = state[name].astype({"int": np.int32, "complex": np.complex64, "float16": np.float16}[change])
    elif change == "list":
        state[name] = state[name].tolist()
    elif change == "string":
        state[name] = "weights"
    elif change == "nan":
        state[name] = np.full_like(state[name], np.nan)
    before = {k: v.copy() for k, v in layer.state_dict().items()}
    try:
        layer.load_state_dict(state)
    except (TypeError, ValueError) as exc:
        event(f"refused {change}: {type(exc).__name__}")
        for k, v in layer.state_dict().items():
            np.testing.assert_array_equal(v, before[k], err_msg=k)
        return
    event(f"loaded {change}")
    for k, v in layer.state_dict().items():
        np.testing.assert_allclose(v, np.asarray(state[k], dtype=np.float64), rtol=1e-3, err_msg=k)


def test_a_new_file_gets_the_permissions_open_would_give_it(tmp_path):
    old = os.umask(0o027)
    try:
        fastlstm.LSTM(3, 4, seed=0).save(tmp_path / "new.npz")
    finally:
        os.umask(old)
    assert (tmp_path / "new.npz").stat().st_mode & 0o777 == 0o640
