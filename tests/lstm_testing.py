"""Helpers shared by the tests: backends to parametrize over, tolerances, random problems."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import fastlstm

CPU_BACKENDS = [name for name in ("numpy", "numba") if fastlstm.available_backends()[name].available]
ALL_CPU_BACKENDS = [
    pytest.param(
        name,
        marks=pytest.mark.skipif(
            not fastlstm.available_backends()[name].available,
            reason=f"{name} backend unavailable: {fastlstm.available_backends()[name].reason}",
        ),
    )
    for name in ("numpy", "numba")
]

# Every feature of a stack against torch.nn.LSTM (lengths: a PackedSequence for torch).
FEATURE_CONFIGS = [
    dict(num_layers=layers, bidirectional=bidirectional, batch_first=batch_first, with_state=with_state, lengths=lengths)
    for layers, bidirectional, batch_first, with_state, lengths in itertools.product(
        (1, 2, 3), (False, True), (False, True), (False, True), (False, True)
    )
    # the full product of the two binary options that interact least is covered by the rest
    if not (layers == 3 and batch_first and not with_state)
]


def config_id(cfg):
    return "L{num_layers}-{b}-{bf}-{s}-{l}".format(
        num_layers=cfg["num_layers"],
        b="bi" if cfg["bidirectional"] else "uni",
        bf="bf" if cfg["batch_first"] else "tf",
        s="state" if cfg["with_state"] else "nostate",
        l="lengths" if cfg["lengths"] else "full",
    )


# Largest error relative to the largest magnitude of the reference array.
TOLERANCE = {"float32": 1e-5, "float64": 1e-10}


def relative_error(actual, expected, floor: float = 1e-30) -> float:
    """Largest error over the largest magnitude of `expected`, or over `floor` if larger."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"shape {actual.shape} != {expected.shape}"
    scale = max(float(np.max(np.abs(expected))) if expected.size else 0.0, floor)
    return float(np.max(np.abs(actual - expected))) / scale if expected.size else 0.0


def assert_close(actual, expected, rtol: float, what: str = "", floor: float = 1e-30) -> None:
    err = relative_error(actual, expected, floor)
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.1e}"


def random_problem(lstm, num_steps, batch, seed=0, with_state=True, lengths=None):
    """x, state, lengths and the loss weights (dy, dh_n, dc_n) for a layer, in its layout."""
    rng = np.random.default_rng(seed)
    d = lstm.num_layers * lstm.num_directions
    if lstm.batch_first:
        x = rng.standard_normal((batch, num_steps, lstm.input_size))
    else:
        x = rng.standard_normal((num_steps, batch, lstm.input_size))
    state = None
    if with_state:
        state = tuple(0.5 * rng.standard_normal((d, batch, lstm.hidden_size)) for _ in range(2))
    out_shape = x.shape[:2] + (lstm.hidden_size * lstm.num_directions,)
    dy = rng.standard_normal(out_shape)
    dstate = tuple(rng.standard_normal((d, batch, lstm.hidden_size)) for _ in range(2))
    return x, state, lengths, dy, dstate


def snapshot(lstm) -> dict:
    """Copies of everything a failing call must leave alone."""
    return {
        "params": {k: np.array(v, copy=True) for k, v in lstm.state_dict().items()},
        "grads": {k: np.array(lstm._storage.to_host(v), copy=True) for k, v in lstm.grads.items()},
        "call": getattr(lstm._last, "call", None),
        "rng": lstm._dropout_rng.bit_generator.state,
        "training": lstm.training,
    }


def assert_unchanged(lstm, before: dict) -> None:
    after = snapshot(lstm)
    for group in ("params", "grads"):
        for name, value in before[group].items():
            assert np.array_equal(after[group][name], value), f"{group}[{name}] changed"
    assert after["call"] is before["call"], "the saved forward changed"
    assert after["rng"] == before["rng"], "the dropout generator advanced"
    assert after["training"] == before["training"]


def forward_backward(layer, x, state, lengths, dy, dstate) -> dict:
    """Outputs, final states and every gradient of one forward + backward, as host arrays of
    their own (an LSTM's state parts h and c, a GRU's h)."""
    y, final = layer(x, state, lengths)
    dx, dstate0 = layer.backward(dy, dstate)
    parts = layer._spec.cell.state_parts
    if len(parts) == 1:
        final, dstate0 = (final,), (dstate0,)
    out = {"y": y, "dx": dx, **{f"{part}_n": value for part, value in zip(parts, final)}}
    if state is not None:
        out.update({f"d{part}0": value for part, value in zip(parts, dstate0)})
    out.update(layer.grads)
    # copies: the layer's grads are live arrays that its next backward adds into
    return {k: np.array(layer._storage.to_host(v), copy=True) for k, v in out.items()}


def record_argument(monkeypatch, module, name: str, index: int) -> list:
    """Wrap module.name (a kernel) for the test: each call appends its argument `index` to
    the list returned, then runs the kernel."""
    seen = []
    original = getattr(module, name)

    def spy(*args):
        seen.append(args[index])
        return original(*args)

    monkeypatch.setattr(module, name, spy)
    return seen


def run_workers_in_turn(monkeypatch) -> None:
    """From now on in the test, the numba backend's kernels run their workers one after another
    on one thread (Numba's thread count held at 1, the plans keep their blocks), as a threading
    layer may (TBB under nested parallelism)."""
    import numba

    set_num_threads = numba.set_num_threads
    monkeypatch.setattr(numba, "set_num_threads", lambda n: set_num_threads(1))


def assert_layers_agree(layer, reference, problem, rtol: float, what: str = "", floor: float = 1e-30) -> None:
    """One forward + backward of `problem` (x, state, lengths, dy, dstate) on both layers:
    outputs, final states and every gradient of `layer` against `reference`'s (errors
    relative to each result's largest magnitude, but at least to `floor`)."""
    expected, actual = forward_backward(reference, *problem), forward_backward(layer, *problem)
    for name in expected:
        assert_close(actual[name], expected[name], rtol, f"{what}{name}", floor=floor)


def torch_forward_backward(module, x, state, lengths, dy, dstate, batch_first, dtype, device="cpu") -> dict:
    """torch.nn.LSTM's counterpart of forward_backward (same loss), as host arrays; lengths go
    through pack_padded_sequence(enforce_sorted=False). `module` is already on `device`."""
    import torch

    tt = getattr(torch, dtype)

    def tensor(a, grad=False):
        return torch.tensor(a, dtype=tt, device=device, requires_grad=grad)

    xt = tensor(x, grad=True)
    state_t = None if state is None else tuple(tensor(s, grad=True) for s in state)
    if lengths is None:
        y, (h_n, c_n) = module(xt, state_t)
    else:
        packed = torch.nn.utils.rnn.pack_padded_sequence(
            xt, torch.tensor(lengths), batch_first=batch_first, enforce_sorted=False
        )
        out, (h_n, c_n) = module(packed, state_t)
        total = x.shape[1] if batch_first else x.shape[0]
        y, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=batch_first, total_length=total)
    loss = (y * tensor(dy)).sum() + (h_n * tensor(dstate[0])).sum() + (c_n * tensor(dstate[1])).sum()
    loss.backward()
    results = {"y": y, "h_n": h_n, "c_n": c_n, "dx": xt.grad}
    if state is not None:
        results.update(dh0=state_t[0].grad, dc0=state_t[1].grad)
    results.update({name: p.grad for name, p in module.named_parameters()})
    return {k: v.detach().cpu().numpy() for k, v in results.items()}


def central_differences(loss, array, eps=1e-6) -> np.ndarray:
    """d loss() / d array by central differences, perturbing `array` in place entry by entry."""
    grad = np.zeros_like(array)
    flat, gflat = array.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        keep = flat[i]
        flat[i] = keep + eps
        up = loss()
        flat[i] = keep - eps
        down = loss()
        flat[i] = keep
        gflat[i] = (up - down) / (2 * eps)
    return grad


def assert_compiled_matches_eager(loss_fn, args, parameters, before=None) -> None:
    """loss_fn(*args) and the gradients of `parameters`, eager and through
    torch.compile(fullgraph=True, backend="aot_eager"): bitwise equal. `before()` runs
    ahead of each (to seed torch's RNG, say)."""
    import torch

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (loss_fn, compiled):
        for p in parameters:
            p.grad = None
        if before is not None:
            before()
        loss = fn(*args)
        loss.backward()
        results.append([loss.detach()] + [p.grad.clone() for p in parameters])
    for eager, traced in zip(*results):
        torch.testing.assert_close(traced, eager, rtol=0, atol=0)
