"""fastlstm.torch.LSTM and GRU against torch.nn.LSTM and GRU: parity on every feature,
autograd, compile, training, the drop-in surface and its errors (CPU; the CUDA path runs in
test_gpu_torch.py)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import fastlstm
from lstm_testing import (
    ALL_CPU_BACKENDS, FEATURE_CONFIGS, TOLERANCE, assert_close, assert_compiled_matches_eager, config_id,
)

torch = pytest.importorskip("torch", reason="PyTorch is not installed: pip install torch==2.13.0")
ft = pytest.importorskip("fastlstm.torch")
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence  # noqa: E402

from fastlstm import _torch_ops  # noqa: E402

CELLS = {"lstm": (torch.nn.LSTM, ft.LSTM), "gru": (torch.nn.GRU, ft.GRU)}


def parts_of(state) -> tuple:
    """A state as the tuple of its parts: (h, c) for an LSTM, (h,) for a GRU."""
    return tuple(state) if isinstance(state, (tuple, list)) else (state,)


def state_for(module, parts):
    """Parts as the state `module` takes: a pair for an LSTM, one tensor for a GRU."""
    if parts is None:
        return None
    return tuple(parts) if isinstance(module, (torch.nn.LSTM, ft.LSTM)) else parts[0]


def run_module(module, x, state, lengths, dy, dstate, batch_first):
    """Outputs and every gradient of loss = <y, dy> + sum over state parts <s_n, ds>, as
    NumPy arrays (state and dstate given as tuples of parts)."""
    x = x.clone().requires_grad_(True)
    state = None if state is None else tuple(s.clone().requires_grad_(True) for s in state)
    module.zero_grad()
    if lengths is None:
        y, finals = module(x, state_for(module, state))
    else:
        packed = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
        out, finals = module(packed, state_for(module, state))
        total = x.shape[1 if batch_first else 0]
        y, _ = pad_packed_sequence(out, batch_first=batch_first, total_length=total)
    finals = parts_of(finals)
    loss = (y * dy).sum() + sum((f * d).sum() for f, d in zip(finals, dstate))
    loss.backward()
    results = {"y": y, "dx": x.grad, **{f"state_n[{i}]": f for i, f in enumerate(finals)}}
    if state is not None:
        results.update({f"dstate0[{i}]": s.grad for i, s in enumerate(state)})
    results.update({name: p.grad for name, p in module.named_parameters()})
    return {k: v.detach().numpy() for k, v in results.items()}


def problem(module, num_steps, batch, dtype, seed=0, with_state=True):
    """x, state, dy, dstate; state and dstate as tuples of the cell's parts."""
    g = torch.Generator().manual_seed(seed)
    d = module.num_layers * (2 if module.bidirectional else 1)
    parts = 2 if isinstance(module, (torch.nn.LSTM, ft.LSTM)) else 1
    shape = (batch, num_steps, module.input_size) if module.batch_first else (num_steps, batch, module.input_size)
    x = torch.randn(shape, generator=g, dtype=dtype)
    state = tuple(0.5 * torch.randn((d, batch, module.hidden_size), generator=g, dtype=dtype)
                  for _ in range(parts)) if with_state else None
    out = shape[:2] + (module.hidden_size * (2 if module.bidirectional else 1),)
    dy = torch.randn(out, generator=g, dtype=dtype)
    dstate = tuple(torch.randn((d, batch, module.hidden_size), generator=g, dtype=dtype) for _ in range(parts))
    return x, state, dy, dstate


def assert_match(actual, expected, dtype):
    assert actual.keys() == expected.keys()
    for name in expected:
        assert_close(actual[name], expected[name], TOLERANCE[dtype], name)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("cfg", FEATURE_CONFIGS, ids=config_id)
@pytest.mark.parametrize("backend", ALL_CPU_BACKENDS)
@pytest.mark.parametrize("cell", list(CELLS))
def test_matches_torch(cell, backend, cfg, dtype):
    tt = getattr(torch, dtype)
    torch.manual_seed(0)
    torch_class, ours = CELLS[cell]
    reference = torch_class(4, 6, num_layers=cfg["num_layers"], bidirectional=cfg["bidirectional"],
                            batch_first=cfg["batch_first"], dtype=tt)
    module = ours.from_torch(reference, backend=backend)
    x, state, dy, dstate = problem(module, 5, 3, tt, seed=1, with_state=cfg["with_state"])
    lengths = torch.tensor([5, 2, 4]) if cfg["lengths"] else None
    expected = run_module(reference, x, state, lengths, dy, dstate, cfg["batch_first"])
    actual = run_module(module, x, state, lengths, dy, dstate, cfg["batch_first"])
    assert_match(actual, expected, dtype)


@pytest.mark.parametrize("cell", list(CELLS))
def test_packed_output_keeps_the_packed_structure(cell):
    torch_class, ours = CELLS[cell]
    reference = torch_class(3, 5, num_layers=2)
    module = ours.from_torch(reference, backend="numpy")
    x = torch.randn(6, 4, 3)
    for enforce_sorted, lengths in ((False, [2, 6, 6, 3]), (True, [6, 6, 3, 2])):
        packed = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=enforce_sorted)
        out, finals = module(packed)
        expected, finals_ref = reference(packed)
        assert isinstance(out, torch.nn.utils.rnn.PackedSequence)
        assert torch.equal(out.batch_sizes, expected.batch_sizes)
        for a, b in ((out.sorted_indices, expected.sorted_indices), (out.unsorted_indices, expected.unsorted_indices)):
            assert (a is None and b is None) or torch.equal(a, b)
        assert_close(out.data.detach(), expected.data.detach(), 1e-5, "data")
        for got, want in zip(parts_of(finals), parts_of(finals_ref)):
            assert_close(got.detach(), want.detach(), 1e-5, "state_n")


def test_larger_float32_problem_on_numba():
    """Long enough for the compiled kernels' parallel paths (T=30, B=16, H=96)."""
    if not fastlstm.available_backends()["numba"].available:
        pytest.skip("numba backend unavailable")
    torch.manual_seed(1)
    reference = torch.nn.LSTM(20, 96, num_layers=2, bidirectional=True)
    module = ft.LSTM.from_torch(reference, backend="numba")
    x, state, dy, dstate = problem(module, 30, 16, torch.float32, seed=3)
    lengths = torch.from_numpy(np.random.default_rng(2).integers(1, 31, size=16))
    expected = run_module(reference, x, state, lengths, dy, dstate, False)
    actual = run_module(module, x, state, lengths, dy, dstate, False)
    assert_match(actual, expected, "float32")


@pytest.mark.parametrize("cell", list(CELLS))
def test_host_emulated_cupy_path(fake_cupy, cell):
    """The op on the cupy backend (the fake device, host-built kernels; the GRU through the
    reference primitives on its arrays): same as torch."""
    torch.manual_seed(0)
    torch_class, ours = CELLS[cell]
    reference = torch_class(3, 8, num_layers=2, bidirectional=True)
    module = ours.from_torch(reference, backend="cupy")
    x, state, dy, dstate = problem(module, 5, 4, torch.float32, seed=2)
    for lengths in (None, torch.tensor([5, 1, 3, 5])):
        expected = run_module(reference, x, state, lengths, dy, dstate, False)
        actual = run_module(module, x, state, lengths, dy, dstate, False)
        assert_match(actual, expected, "float32")


# -- autograd ---------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ALL_CPU_BACKENDS)
@pytest.mark.parametrize("make", [ft.LSTM, ft.GRU, lambda *a, **k: ft.GRU(*a, reset_after=False, **k)],
                         ids=["lstm", "gru", "gru-reset-before"])
def test_gradcheck_float64(make, backend):
    torch.manual_seed(0)
    module = make(2, 3, num_layers=2, bidirectional=True, dtype=torch.float64, backend=backend)
    names = [n for n, _ in module.named_parameters()]
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    parts = tuple(torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
                  for _ in range(2 if isinstance(module, ft.LSTM) else 1))

    def f(x, *tensors):
        state, weights = tensors[: len(parts)], tensors[len(parts):]
        y, finals = torch.func.functional_call(module, dict(zip(names, weights)), (x, state_for(module, state)))
        return (y, *parts_of(finals))

    assert torch.autograd.gradcheck(f, (x, *parts, *module.parameters()))


def test_gradcheck_packed_with_dropout_masks_fixed():
    torch.manual_seed(0)
    module = ft.LSTM(2, 3, num_layers=2, dropout=0.3, dtype=torch.float64, backend="numpy")
    x = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([4, 1, 3])

    def f(x):
        torch.manual_seed(7)  # the same masks for every evaluation
        out, (h, c) = module(pack_padded_sequence(x, lengths, enforce_sorted=False))
        return out.data, h, c

    assert torch.autograd.gradcheck(f, (x,))


def test_module_called_twice_in_one_graph():
    torch.manual_seed(0)
    reference = torch.nn.LSTM(4, 4, num_layers=2)
    module = ft.LSTM.from_torch(reference, backend="numpy")
    x = torch.randn(5, 3, 4)

    def twice(m):
        m.zero_grad()
        xin = x.clone().requires_grad_(True)
        y1, state = m(xin)
        y2, _ = m(torch.tanh(y1), state)  # the second call depends on the first
        (y1.square().sum() + y2.sum()).backward()
        return [xin.grad] + [p.grad for p in m.parameters()]

    for got, want in zip(twice(module), twice(reference)):
        assert_close(got, want, 1e-5)


def test_records_live_with_the_graph():
    module = ft.LSTM(3, 4, backend="numpy")
    x = torch.randn(5, 2, 3, requires_grad=True)
    before = _torch_ops.live_records()
    y, state = module(x)
    assert _torch_ops.live_records() == before + 1
    y.sum().backward(retain_graph=True)
    first = x.grad.clone()
    y.sum().backward()  # retain_graph: the record is still there
    torch.testing.assert_close(x.grad, 2 * first)
    del y, state
    assert _torch_ops.live_records() == before  # graph gone, record gone
    outputs = module(x)
    del outputs  # never differentiated
    assert _torch_ops.live_records() == before
    with torch.no_grad():
        module(x)
    module.requires_grad_(False)
    module(x.detach())
    assert _torch_ops.live_records() == before


def test_no_record_is_kept_without_grad():
    module = ft.LSTM(3, 4, backend="numpy")
    y, _ = module(torch.randn(5, 2, 3))  # parameters require grad: kept
    assert y.requires_grad
    with torch.no_grad():
        y, _ = module(torch.randn(5, 2, 3))
    assert not y.requires_grad


def test_in_place_change_after_forward_is_caught():
    module = ft.LSTM(3, 4, backend="numpy")
    x = torch.randn(5, 2, 3, requires_grad=True)
    inputs = x * 1
    y, _ = module(inputs)
    inputs.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_double_backward_is_refused_clearly():
    module = ft.LSTM(3, 4, backend="numpy")
    x = torch.randn(5, 2, 3, requires_grad=True)
    y, _ = module(x)
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()


def test_compile_fullgraph_equals_eager():
    torch.manual_seed(0)
    lstm = ft.LSTM(4, 6, num_layers=2, bidirectional=True, batch_first=True, backend="numpy")
    head = torch.nn.Linear(12, 3)

    def step(x, h0, c0):
        y, (h, c) = lstm(x, (h0, c0))
        return head(y).sum() + h.sum() + c.square().sum()

    x = torch.randn(3, 5, 4)
    h0, c0 = torch.randn(4, 3, 6), torch.randn(4, 3, 6)
    assert_compiled_matches_eager(step, (x, h0, c0), list(lstm.parameters()) + list(head.parameters()))


@pytest.mark.parametrize("reset_after", [True, False])
def test_compile_fullgraph_gru_equals_eager(reset_after):
    torch.manual_seed(0)
    gru = ft.GRU(4, 6, num_layers=2, bidirectional=True, dropout=0.3, backend="numpy", reset_after=reset_after)

    def step(x, h0):
        y, h = gru(x, h0)
        return y.square().sum() + h.sum()

    x, h0 = torch.randn(5, 3, 4), torch.randn(4, 3, 6)
    # the same dropout masks in both runs
    assert_compiled_matches_eager(step, (x, h0), list(gru.parameters()), before=lambda: torch.manual_seed(1))


def test_compile_traces_one_graph_with_the_op():
    from torch._dynamo.testing import CompileCounter

    module = ft.LSTM(4, 6, backend="numpy")
    counter = CompileCounter()
    compiled = torch.compile(module, backend=counter, fullgraph=True)
    compiled(torch.randn(5, 2, 4))
    compiled(torch.randn(5, 2, 4))
    assert counter.frame_count == 1


# -- training ---------------------------------------------------------------------------
@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("backend", ALL_CPU_BACKENDS)
def test_training_loss_curve_matches_torch(backend, cell):
    """20 Adam steps of LSTM / GRU + Linear + cross-entropy: the same losses as torch's."""
    torch_class, ours = CELLS[cell]
    vocab, steps = 5, 20

    def train(make_lstm):
        torch.manual_seed(0)
        reference = torch_class(5, 16, num_layers=2, batch_first=True, dtype=torch.float64)
        head = torch.nn.Linear(16, vocab, dtype=torch.float64)
        lstm = make_lstm(reference)
        params = list(lstm.parameters()) + list(head.parameters())
        optimizer = torch.optim.Adam(params, lr=0.05)
        g = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(steps):
            x = torch.randn(4, 9, 5, generator=g, dtype=torch.float64)
            target = x.cumsum(1).argmax(-1)  # a running sum: needs the recurrence
            y, _ = lstm(x)
            loss = torch.nn.functional.cross_entropy(head(y).reshape(-1, vocab), target.reshape(-1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return np.array(losses)

    losses = train(lambda ref: ours.from_torch(ref, backend=backend))
    theirs = train(lambda ref: ref)
    assert losses[-1] < losses[0] - 0.1  # it learns
    np.testing.assert_allclose(losses, theirs, rtol=1e-9)


@pytest.mark.parametrize("cell", list(CELLS))
def test_dropout_masks_come_from_torch_rng_and_match_torch(cell):
    torch_class, ours = CELLS[cell]
    reference = torch_class(4, 6, num_layers=3, bidirectional=True, dropout=0.4)
    module = ours.from_torch(reference, backend="numpy")
    x = torch.randn(5, 3, 4)
    torch.manual_seed(5)
    expected, _ = reference(x)
    torch.manual_seed(5)
    first, _ = module(x)
    torch.manual_seed(5)
    again, _ = module(x)
    other, _ = module(x)
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert not torch.equal(other, first)
    module.eval()
    reference.eval()
    torch.testing.assert_close(module(x)[0], reference(x)[0])


def test_autocast_runs_in_float32():
    module = ft.LSTM(4, 6, backend="numpy")
    reference = torch.nn.LSTM(4, 6)
    reference.load_state_dict(module.state_dict())
    x = torch.randn(5, 2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lowered = torch.nn.Linear(4, 4)(x)
        assert lowered.dtype == torch.bfloat16
        y, (h, c) = module(lowered)
    assert y.dtype == h.dtype == c.dtype == torch.float32
    y.sum().backward()
    assert module.weight_ih_l0.grad.dtype == torch.float32
    torch.testing.assert_close(y, reference(lowered.float())[0])


# -- the drop-in surface ----------------------------------------------------------------
@pytest.mark.parametrize("cell", list(CELLS))
def test_parameters_state_dict_and_init_match_torch(cell):
    torch_class, ours = CELLS[cell]
    extra = {"proj_size": 0} if cell == "lstm" else {}
    torch.manual_seed(3)
    reference = torch_class(5, 7, num_layers=2, bidirectional=True, batch_first=True, **extra)
    torch.manual_seed(3)
    module = ours(5, 7, num_layers=2, bidirectional=True, batch_first=True, **extra)
    assert [n for n, _ in module.named_parameters()] == [n for n, _ in reference.named_parameters()]
    for (name, ours), theirs in zip(module.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0, msg=name)  # same init, same draws
    assert all(isinstance(p, torch.nn.Parameter) for p in module.parameters())
    reference.load_state_dict(module.state_dict(), strict=True)
    module.load_state_dict(reference.state_dict(), strict=True)
    assert [[p.shape for p in ws] for ws in module.all_weights] == [[p.shape for p in ws] for ws in reference.all_weights]
    assert module.all_weights[1][0] is module.weight_ih_l0_reverse
    module.flatten_parameters()
    assert repr(module) == repr(reference)


def test_from_torch_copies_configuration_and_mode():
    reference = torch.nn.LSTM(3, 4, num_layers=2, bias=False, dropout=0.2, dtype=torch.float64).eval()
    module = ft.LSTM.from_torch(reference, backend="numpy")
    assert (module.num_layers, module.bias, module.dropout, module.training) == (2, False, 0.2, False)
    assert module.weight_hh_l1.dtype == torch.float64
    assert module.weight_hh_l1.data_ptr() != reference.weight_hh_l1.data_ptr()  # a copy
    with pytest.raises(TypeError, match="torch.nn.LSTM"):
        ft.LSTM.from_torch(torch.nn.GRU(3, 4))
    with pytest.raises(ValueError, match="proj_size"):
        ft.LSTM.from_torch(torch.nn.LSTM(3, 4, proj_size=2))
    gru = ft.GRU.from_torch(torch.nn.GRU(3, 4, bidirectional=True, batch_first=True).eval(), backend="numpy")
    assert (gru.bidirectional, gru.batch_first, gru.training, gru.reset_after) == (True, True, False, True)
    with pytest.raises(TypeError, match="torch.nn.GRU"):
        ft.GRU.from_torch(torch.nn.LSTM(3, 4))


@pytest.mark.parametrize("cell", list(CELLS))
def test_unbatched_input_and_empty_batch_as_torch(cell):
    torch_class, ours = CELLS[cell]
    reference = torch_class(3, 4, num_layers=2, bidirectional=True)
    module = ours.from_torch(reference, backend="numpy")
    x = torch.randn(6, 3)
    state = state_for(module, (torch.randn(4, 4), torch.randn(4, 4)))
    for args in ((x,), (x, state)):
        (y, finals), (ye, finals_ref) = module(*args), reference(*args)
        assert y.shape == ye.shape
        torch.testing.assert_close(y, ye)
        for got, want in zip(parts_of(finals), parts_of(finals_ref)):
            assert got.shape == want.shape
            torch.testing.assert_close(got, want)
    empty = torch.zeros(5, 0, 3, requires_grad=True)
    (y, finals), (ye, finals_ref) = module(empty), reference(empty)
    assert y.shape == ye.shape and [p.shape for p in parts_of(finals)] == [p.shape for p in parts_of(finals_ref)]
    y.sum().backward()
    assert empty.grad.shape == empty.shape


def test_batch_first_output_layout_as_nn_lstm():
    reference = torch.nn.LSTM(3, 4, batch_first=True)
    module = ft.LSTM.from_torch(reference, backend="numpy")
    y, _ = module(torch.randn(2, 5, 3))
    expected, _ = reference(torch.randn(2, 5, 3))
    assert y.shape == expected.shape and y.stride() == expected.stride()


BAD_CALLS = {
    "4-D input": lambda m: m(torch.zeros(2, 2, 2, 3)),
    "1-D input": lambda m: m(torch.zeros(3)),
    "input size": lambda m: m(torch.zeros(5, 2, 4)),
    "dtype": lambda m: m(torch.zeros(5, 2, 3, dtype=torch.float64)),
    "h size": lambda m: m(torch.zeros(5, 2, 3), (torch.zeros(2, 3, 4), torch.zeros(2, 2, 4))),
    "c size": lambda m: m(torch.zeros(5, 2, 3), (torch.zeros(2, 2, 4), torch.zeros(1, 2, 4))),
    "hx dims batched": lambda m: m(torch.zeros(5, 2, 3), (torch.zeros(2, 4), torch.zeros(2, 4))),
    "hx dims unbatched": lambda m: m(torch.zeros(5, 3), (torch.zeros(2, 1, 4), torch.zeros(2, 1, 4))),
    "no steps": lambda m: m(torch.zeros(0, 2, 3)),
    "packed input size": lambda m: m(pack_padded_sequence(torch.zeros(5, 2, 4), torch.tensor([5, 3]))),
}


BAD_GRU_CALLS = {
    "h size": lambda m: m(torch.zeros(5, 2, 3), torch.zeros(2, 3, 4)),
    "hx dims batched": lambda m: m(torch.zeros(5, 2, 3), torch.zeros(2, 4)),
    "hx dims unbatched": lambda m: m(torch.zeros(5, 3), torch.zeros(2, 1, 4)),
    "packed h size": lambda m: m(pack_padded_sequence(torch.zeros(5, 2, 3), torch.tensor([5, 3])), torch.zeros(2, 3, 4)),
}
SHARED = ("4-D input", "1-D input", "input size", "dtype", "no steps", "packed input size")
CASES = [pytest.param("lstm", call, id=f"lstm-{name}") for name, call in BAD_CALLS.items()] + [
    pytest.param("gru", call, id=f"gru-{name}")
    for name, call in [*((n, BAD_CALLS[n]) for n in SHARED), *BAD_GRU_CALLS.items()]
]


@pytest.mark.parametrize("cell, call", CASES)
def test_bad_input_raises_what_torch_raises(cell, call):
    torch_class, ours = CELLS[cell]
    reference = torch_class(3, 4, num_layers=2)
    module = ours.from_torch(reference, backend="numpy")
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(Exception) as theirs:
        call(reference)
    with pytest.raises(type(theirs.value)) as ours:
        call(module)
    assert str(ours.value)
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())
    assert all(p.grad is None for p in module.parameters())


BAD_CONSTRUCTORS = {
    "input_size type": dict(input_size=2.0),
    "hidden_size zero": dict(hidden_size=0),
    "num_layers zero": dict(num_layers=0),
    "bias type": dict(bias=1),
    "batch_first type": dict(batch_first="yes"),
    "dropout range": dict(dropout=1.5),
    "dropout bool": dict(dropout=True),
    "proj_size negative": dict(proj_size=-1),
}


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("kwargs", list(BAD_CONSTRUCTORS.values()), ids=list(BAD_CONSTRUCTORS))
def test_bad_arguments_raise_what_torch_raises(kwargs, cell):
    if cell == "gru" and "proj_size" in kwargs:
        pytest.skip("nn.GRU has no proj_size")
    torch_class, ours = CELLS[cell]
    args = dict(input_size=3, hidden_size=4) | kwargs
    with pytest.raises(Exception) as theirs:
        torch_class(**args)
    with pytest.raises(type(theirs.value)):
        ours(**args)


def test_what_is_refused_and_why():
    with pytest.raises(ValueError, match=r"proj_size=2.*nn.LSTM.*nn.Linear"):
        ft.LSTM(3, 4, proj_size=2)
    with pytest.raises(TypeError, match="float32 or torch.float64.*autocast"):
        ft.LSTM(3, 4, dtype=torch.float16)
    module = ft.LSTM(3, 4).half()
    with pytest.raises(TypeError, match="float32 or torch.float64"):
        module(torch.zeros(5, 2, 3, dtype=torch.float16))
    with pytest.raises(ValueError, match="unknown backend"):
        ft.LSTM(3, 4, backend="tpu")
    with pytest.raises(TypeError, match=r"hx: expected a tuple \(h_0, c_0\)"):
        ft.LSTM(3, 4)(torch.zeros(5, 2, 3), torch.zeros(1, 2, 4))
    with pytest.raises(TypeError, match="hx: expected a tensor h_0 \\(a GRU has no cell state\\)"):
        ft.GRU(3, 4)(torch.zeros(5, 2, 3), (torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)))
    with pytest.raises(TypeError, match="reset_after should be of type bool"):
        ft.GRU(3, 4, reset_after=1)


# -- backends ---------------------------------------------------------------------------
def test_backend_follows_the_device_and_the_choice_in_effect(monkeypatch):
    x = torch.zeros(5, 2, 3)
    cpu = "numba" if fastlstm.available_backends()["numba"].available else "numpy"
    assert _torch_ops.resolve_backend("", x.device).name == cpu
    with fastlstm.use_backend("numpy"):
        assert _torch_ops.resolve_backend("", x.device).name == "numpy"
    assert _torch_ops.resolve_backend("numpy", x.device).name == "numpy"
    seen = []
    real = fastlstm.stack.forward
    monkeypatch.setattr(fastlstm.stack, "forward", lambda spec, backend, *a: seen.append(backend.name) or real(spec, backend, *a))
    ft.LSTM(3, 4, backend="numpy")(x)
    with fastlstm.use_backend("numpy"):
        ft.LSTM(3, 4)(x)
    assert seen == ["numpy", "numpy"]


def test_cuda_tensors_without_cupy_get_a_clear_error(monkeypatch):
    from fastlstm import registry

    monkeypatch.setitem(registry._probed, "cupy", (registry.BackendStatus("cupy", False, "no GPU here", "hint"), None))
    with pytest.raises(fastlstm.BackendUnavailableError, match=r"'cuda'.*cupy: no GPU here"):
        _torch_ops.resolve_backend("", torch.device("cuda", 0))


# -- the NumPy-level layer refuses tensors autograd tracks --------------------------------
def test_core_layer_refuses_tensors_that_require_grad():
    lstm = fastlstm.LSTM(3, 4, backend="numpy")
    x = torch.zeros(5, 2, 3, requires_grad=True)
    with pytest.raises(TypeError, match=r"x: this torch tensor requires grad.*fastlstm\.torch\.LSTM"):
        lstm(x)
    state = (torch.zeros(1, 2, 4, requires_grad=True), torch.zeros(1, 2, 4))
    with pytest.raises(TypeError, match=r"state\[h\]: .*requires grad"):
        lstm(x.detach(), state)
    y, _ = lstm(x.detach())
    with pytest.raises(TypeError, match="dy: .*requires grad"):
        lstm.backward(torch.ones(y.shape, requires_grad=True))
    lstm.backward(torch.ones(y.shape))  # the failed call changed nothing
    with torch.no_grad():
        lstm(x)  # no graph is being built: fine


def test_op_checks_direct_callers():
    x = torch.zeros(5, 2, 3)
    module = ft.LSTM(3, 4, backend="numpy")
    weights = list(module.parameters())
    h = torch.zeros(1, 2, 4)
    with pytest.raises(ValueError, match="weights: expected 4 tensors"):
        _torch_ops.lstm(x, h, h, weights[:3], None, [], 1, False, True, False, "")
    with pytest.raises(ValueError, match=r"hx: expected shape \(1, 2, 4\)"):
        _torch_ops.lstm(x, torch.zeros(1, 3, 4), h, weights, None, [], 1, False, True, False, "")
    with pytest.raises(ValueError, match=r"lengths: expected values in 1..5"):
        _torch_ops.lstm(x, h, h, weights, torch.tensor([6, 1]), [], 1, False, True, False, "")
    y = torch.zeros(5, 2, 4)
    _, _, _, handle = _torch_ops.lstm(x, h, h, weights, None, [], 1, False, True, False, "")
    with pytest.raises(RuntimeError, match="without keeping a record"):
        _torch_ops.lstm_backward(handle, y, h, h, x, weights)
    _, _, _, kept = _torch_ops.lstm(x, h, h, weights, None, [], 1, False, True, True, "")
    gru_weights = [w.detach() for w in ft.GRU(3, 4).parameters()]
    with pytest.raises(ValueError, match="belongs to a fastlstm::lstm call"):
        _torch_ops.gru_backward(kept, y, h, x, gru_weights)


def test_torch_threads_running_vjp_and_modules_at_once():
    """Two threads, one module, separate graphs: each gets its own gradients."""
    torch.manual_seed(0)
    module = ft.LSTM(4, 8, num_layers=2, backend="numpy")
    inputs = [torch.randn(6, 3, 4) for _ in range(2)]

    def grads_of(x):
        xin = x.clone().requires_grad_(True)
        y, _ = module(xin)
        (gx,) = torch.autograd.grad(y.square().sum(), xin)
        return gx

    expected = [grads_of(x) for x in inputs]
    results = [None, None]

    def work(i):
        for _ in range(5):
            results[i] = grads_of(inputs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_cuda_calls_run_on_torchs_stream_device_and_allocator(monkeypatch):
    """The wiring of _cuda_context, with stand-ins for CuPy and torch.cuda (no GPU here;
    tests/test_gpu_torch.py checks the real thing on a GPU)."""
    import contextlib
    import types

    entered, calls = [], []

    def context(*what):
        entered.append(what)
        return contextlib.nullcontext()

    cuda = types.SimpleNamespace(
        Device=lambda index: context("device", index),
        ExternalStream=lambda pointer, device: context("stream", pointer, device),
        using_allocator=lambda malloc: context("allocator", malloc),
        PythonFunctionAllocator=lambda malloc, free: types.SimpleNamespace(malloc=malloc, free=free),
    )
    backend = types.SimpleNamespace(name="cupy", xp=types.SimpleNamespace(cuda=cuda))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=1234))
    monkeypatch.setattr(torch.cuda, "caching_allocator_alloc",
                        lambda size, device, stream: calls.append(("alloc", size, device, stream.cuda_stream)) or 4096)
    monkeypatch.setattr(torch.cuda, "caching_allocator_delete", lambda pointer: calls.append(("free", pointer)))
    monkeypatch.setattr(_torch_ops, "_allocators", {})
    with _torch_ops._cuda_context(backend, torch.device("cpu")):
        pass
    assert entered == []  # CPU tensors: nothing to set up
    with _torch_ops._cuda_context(backend, torch.device("cuda", 1)):
        pass
    allocator = _torch_ops._torch_allocator(backend.xp)
    assert entered == [("device", 1), ("stream", 1234, 1), ("allocator", allocator.malloc)]
    assert allocator.malloc(256, 1) == 4096 and allocator.malloc(0, 1) == 0
    allocator.free(4096, 1)
    allocator.free(0, 1)
    assert calls == [("alloc", 256, 1, 1234), ("free", 4096)]


def test_registered_ops_pass_opcheck_and_direct_calls_are_differentiable():
    """torch.ops.fastlstm.lstm on its own: schema, fake tensors and its registered autograd
    (the module goes through RecurrentFunction; callers of the op get the same formula). The
    handle output differs per call by design, so opcheck's eager-vs-AOT output comparison is
    left to the compile tests above."""
    torch.manual_seed(0)
    module = ft.LSTM(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64, backend="numpy")
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    h, c = (torch.randn(4, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    weights = list(module.parameters())
    masks = [torch.full((5, 2, 8), 2.0, dtype=torch.float64)]
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    for lengths, mask in ((None, []), (torch.tensor([5, 3]), masks)):
        args = (x, h, c, weights, lengths, mask, 2, True, True, True, "numpy")
        assert set(torch.library.opcheck(_torch_ops.lstm, args, test_utils=checks).values()) == {"SUCCESS"}

        def direct(x, h, c, *w):
            return _torch_ops.lstm(x, h, c, list(w), lengths, mask, 2, True, True, True, "numpy")[:3]

        assert torch.autograd.gradcheck(direct, (x, h, c, *weights))
    y, h_n, c_n, handle = _torch_ops.lstm(x, h, c, weights, None, [], 2, True, True, True, "numpy")
    args = (handle, torch.ones_like(y), torch.ones_like(h_n), torch.ones_like(c_n), x.detach(),
            [w.detach() for w in weights])
    checks = ("test_schema", "test_faketensor")
    assert set(torch.library.opcheck(_torch_ops.lstm_backward, args, test_utils=checks).values()) == {"SUCCESS"}

    gru = ft.GRU(3, 4, num_layers=2, dtype=torch.float64, backend="numpy")
    weights = list(gru.parameters())
    h = torch.randn(2, 2, 4, dtype=torch.float64, requires_grad=True)
    for reset_after in (True, False):
        args = (x, h, weights, torch.tensor([5, 3]), [], 2, False, True, True, "numpy", reset_after)
        checks = ("test_schema", "test_autograd_registration", "test_faketensor")
        assert set(torch.library.opcheck(_torch_ops.gru, args, test_utils=checks).values()) == {"SUCCESS"}

        def direct_gru(x, h, *w):
            return _torch_ops.gru(x, h, list(w), None, [], 2, False, True, True, "numpy", reset_after)[:2]

        assert torch.autograd.gradcheck(direct_gru, (x, h, *weights))
    y, h_n, handle = _torch_ops.gru(x, h, weights, None, [], 2, False, True, True, "numpy", True)
    args = (handle, torch.ones_like(y), torch.ones_like(h_n), x.detach(), [w.detach() for w in weights])
    assert set(torch.library.opcheck(_torch_ops.gru_backward, args, test_utils=("test_schema", "test_faketensor"))
               .values()) == {"SUCCESS"}


def test_cpu_tensors_reach_the_kernels_and_come_back_without_copies(monkeypatch):
    seen = {}
    real_forward, real_backward = fastlstm.stack.forward, fastlstm.stack.backward

    def forward(spec, backend, params, x, states0, *rest):
        seen.update(x=x, w=params["weight_hh_l0"], h0=states0[0])
        result = real_forward(spec, backend, params, x, states0, *rest)
        seen["y"] = result[0]
        return result

    def backward(record, d_out, dstates_n):
        seen["dy"] = d_out
        result = real_backward(record, d_out, dstates_n)
        seen.update(dx=result[0], dw=result[2]["weight_hh_l0"])
        return result

    monkeypatch.setattr(fastlstm.stack, "forward", forward)
    monkeypatch.setattr(fastlstm.stack, "backward", backward)
    module = ft.LSTM(3, 4, backend="numpy")
    x = torch.randn(5, 2, 3, requires_grad=True)
    h0 = torch.zeros(1, 2, 4)
    y, _ = module(x, (h0, torch.zeros(1, 2, 4)))
    dy = torch.randn(5, 2, 4)
    y.backward(dy)
    assert seen["x"].ctypes.data == x.data_ptr() and seen["h0"].ctypes.data == h0.data_ptr()
    assert seen["w"].ctypes.data == module.weight_hh_l0.data_ptr()
    assert y.data_ptr() == seen["y"].ctypes.data
    assert seen["dy"].ctypes.data == dy.data_ptr()
    assert x.grad.data_ptr() == seen["dx"].ctypes.data
    assert module.weight_hh_l0.grad.data_ptr() == seen["dw"].ctypes.data


def test_meta_and_fake_tensors_get_shapes_through_the_op():
    """Shape inference without running anything (meta device, FakeTensorMode) goes through the
    op's fake implementation; only plain eager tensors take the direct path."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    module = ft.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True, device="meta")
    y, (h, c) = module(torch.empty(2, 5, 3, device="meta"))
    assert y.shape == (2, 5, 8) and y.device.type == "meta" and h.shape == c.shape == (4, 2, 4)
    with FakeTensorMode():
        module = ft.LSTM(3, 4, num_layers=2)
        y, (h, c) = module(torch.empty(5, 2, 3))
        y.sum().backward()
        assert y.shape == (5, 2, 4) and module.weight_hh_l1.grad.shape == (16, 4)


def test_dispatch_modes_see_the_op():
    """A dispatch mode (profilers, flop counters, tracers) sees fastlstm's ops even on plain
    eager tensors: the direct path is taken only when nothing is watching."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    module = ft.LSTM(3, 4, backend="numpy")
    x = torch.randn(5, 2, 3, requires_grad=True)
    with Record() as record:
        y, _ = module(x)
        y.sum().backward()
    assert "fastlstm.lstm.default" in record.ops and "fastlstm.lstm_backward.default" in record.ops
    unwatched, _ = module(x)
    torch.testing.assert_close(unwatched, y, rtol=0, atol=0)
