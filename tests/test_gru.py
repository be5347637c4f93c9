"""The GRU layer: central differences in float64 (both reset conventions), torch.nn.GRU parity
on every feature and every CPU backend, its state API, files and state dicts that belong to
another cell, and the API it shares with the LSTM."""

from __future__ import annotations

import numpy as np
import pytest

import fastlstm
from lstm_testing import (
    ALL_CPU_BACKENDS, FEATURE_CONFIGS, TOLERANCE, assert_close, central_differences, config_id, snapshot,
    assert_unchanged,
)

EPS = 1e-6


def problem(gru, num_steps, batch, seed, with_state=True):
    rng = np.random.default_rng(seed)
    d = gru.num_layers * gru.num_directions
    shape = (batch, num_steps, gru.input_size) if gru.batch_first else (num_steps, batch, gru.input_size)
    x = rng.standard_normal(shape)
    h0 = 0.5 * rng.standard_normal((d, batch, gru.hidden_size)) if with_state else None
    dy = rng.standard_normal(shape[:2] + (gru.hidden_size * gru.num_directions,))
    dh = rng.standard_normal((d, batch, gru.hidden_size))
    return x, h0, dy, dh


def analytic_and_numeric(gru, x, h0, lengths, dy, dh, rng_state=None):
    def loss():
        if rng_state is not None:
            gru._dropout_rng.bit_generator.state = rng_state
        y, h_n = gru(x, h0, lengths)
        return float(np.sum(y * dy) + np.sum(h_n * dh))

    gru.zero_grad()
    loss()
    dx, dh0 = gru.backward(dy, dh)
    analytic = {name: np.array(g) for name, g in gru.grads.items()}
    analytic.update(x=dx, h0=dh0)
    arrays = dict(gru.params, x=x, h0=h0)
    numeric = {name: central_differences(loss, array, EPS) for name, array in arrays.items()}
    return analytic, numeric


def check(analytic, numeric, atol=1e-7, rtol=1e-6):
    assert analytic.keys() == numeric.keys()
    for name in numeric:
        np.testing.assert_allclose(analytic[name], numeric[name], atol=atol, rtol=rtol, err_msg=name)


@pytest.mark.parametrize("reset_after", [True, False])
@pytest.mark.parametrize("backend", ALL_CPU_BACKENDS)
def test_gradients_match_central_differences(backend, reset_after):
    gru = fastlstm.GRU(3, 4, num_layers=2, bidirectional=True, dtype="float64", backend=backend, seed=1,
                       reset_after=reset_after)
    x, h0, dy, dh = problem(gru, num_steps=5, batch=3, seed=2)
    check(*analytic_and_numeric(gru, x, h0, np.array([5, 2, 4]), dy, dh))


@pytest.mark.parametrize("reset_after", [True, False])
def test_gradients_with_dropout_no_bias_batch_first(reset_after):
    gru = fastlstm.GRU(2, 3, num_layers=3, dropout=0.4, bias=False, batch_first=True, dtype="float64",
                       backend="numpy", seed=3, reset_after=reset_after)
    x, h0, dy, dh = problem(gru, num_steps=4, batch=2, seed=4)
    check(*analytic_and_numeric(gru, x, h0, np.array([4, 3]), dy, dh, gru._dropout_rng.bit_generator.state))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("cfg", FEATURE_CONFIGS, ids=config_id)
@pytest.mark.parametrize("backend", ALL_CPU_BACKENDS)
def test_matches_torch_gru(backend, cfg, dtype):
    torch = pytest.importorskip("torch", reason="PyTorch is not installed: pip install torch==2.13.0")
    torch.manual_seed(0)
    module = torch.nn.GRU(4, 6, num_layers=cfg["num_layers"], bidirectional=cfg["bidirectional"],
                          batch_first=cfg["batch_first"], dtype=getattr(torch, dtype))
    gru = fastlstm.GRU(4, 6, num_layers=cfg["num_layers"], bidirectional=cfg["bidirectional"],
                       batch_first=cfg["batch_first"], backend=backend, dtype=dtype)
    gru.load_state_dict(module.state_dict())
    x, h0, dy, dh = problem(gru, 5, 3, seed=1, with_state=cfg["with_state"])
    lengths = np.array([5, 2, 4]) if cfg["lengths"] else None

    tt = getattr(torch, dtype)
    xt = torch.tensor(x, dtype=tt, requires_grad=True)
    h0t = None if h0 is None else torch.tensor(h0, dtype=tt, requires_grad=True)
    if lengths is None:
        yt, ht = module(xt, h0t)
    else:
        packed = torch.nn.utils.rnn.pack_padded_sequence(xt, torch.tensor(lengths), batch_first=cfg["batch_first"],
                                                         enforce_sorted=False)
        out, ht = module(packed, h0t)
        yt, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=cfg["batch_first"], total_length=5)
    ((yt * torch.tensor(dy, dtype=tt)).sum() + (ht * torch.tensor(dh, dtype=tt)).sum()).backward()
    expected = {"y": yt, "h_n": ht, "dx": xt.grad, **({"dh0": h0t.grad} if h0 is not None else {})}
    expected.update({name: p.grad for name, p in module.named_parameters()})

    y, h_n = gru(x, h0, lengths)
    dx, dh0 = gru.backward(dy, dh)
    actual = {"y": y, "h_n": h_n, "dx": dx, **({"dh0": dh0} if h0 is not None else {}), **gru.grads}
    for name, value in expected.items():
        assert_close(np.asarray(actual[name]), value.detach().numpy(), TOLERANCE[dtype], name)


def test_numba_matches_numpy_and_is_deterministic():
    if not fastlstm.available_backends()["numba"].available:
        pytest.skip("numba backend unavailable")
    results = []
    for backend in ("numpy", "numba", "numba"):
        gru = fastlstm.GRU(8, 64, num_layers=2, bidirectional=True, backend=backend, seed=0, reset_after=False)
        x, h0, dy, dh = problem(gru, 20, 16, seed=5)
        y, h_n = gru(x.astype(np.float32), h0.astype(np.float32), lengths=np.arange(20, 4, -1))
        dx, dh0 = gru.backward(dy, dh)
        results.append([y, h_n, dx, dh0, *gru.grads.values()])
    for numpy_value, numba_value, again in zip(*results):
        assert_close(numba_value, numpy_value, 1e-5)
        np.testing.assert_array_equal(numba_value, again)


# -- the state API and what belongs to another cell ---------------------------------------
def test_state_is_one_array_and_refuses_a_pair():
    gru = fastlstm.GRU(3, 4, num_layers=2, backend="numpy", seed=0)
    x = np.zeros((5, 2, 3))
    y, h_n = gru(x)
    assert y.shape == (5, 2, 4) and h_n.shape == (2, 2, 4)
    before = snapshot(gru)
    with pytest.raises(TypeError, match=r"state: expected one array h of shape \(2, 2, 4\) \(this cell has no cell"):
        gru(x, (h_n, h_n))
    with pytest.raises(ValueError, match=r"state: expected shape \(2, 2, 4\), got \(2, 3, 4\)"):
        gru(x, np.zeros((2, 3, 4)))
    assert_unchanged(gru, before)
    y, h_n = gru(x[:, 0], np.ones((2, 4)))  # unbatched
    assert y.shape == (5, 4) and h_n.shape == (2, 4)
    dx, dh0 = gru.backward(np.ones_like(y), np.ones_like(h_n))
    assert dx.shape == (5, 3) and dh0.shape == (2, 4)
    _, _, pullback = gru.vjp(x)
    dx, dh0 = pullback(None, np.ones((2, 2, 4)))
    assert dh0.shape == (2, 2, 4)


def test_state_dicts_and_files_of_the_other_cell_are_refused(tmp_path):
    gru = fastlstm.GRU(3, 4, backend="numpy", seed=0)
    lstm = fastlstm.LSTM(3, 4, backend="numpy", seed=0)
    before = snapshot(gru)
    with pytest.raises(ValueError, match=r"state_dict\['weight_ih_l0'\]: expected shape \(12, 3\), got \(16, 3\)"):
        gru.load_state_dict(lstm.state_dict())
    assert_unchanged(gru, before)
    with pytest.raises(ValueError, match=r"expected shape \(16, 3\), got \(12, 3\)"):
        lstm.load_state_dict(gru.state_dict())
    gru.save(tmp_path / "gru.npz")
    lstm.save(tmp_path / "lstm.npz")
    with pytest.raises(fastlstm.CheckpointError, match="fastlstm-gru"):
        fastlstm.LSTM.load(tmp_path / "gru.npz")
    with pytest.raises(fastlstm.CheckpointError, match="fastlstm-lstm"):
        fastlstm.GRU.load(tmp_path / "lstm.npz")


def test_files_keep_the_reset_convention(tmp_path):
    gru = fastlstm.GRU(3, 4, num_layers=2, backend="numpy", seed=0, reset_after=False, dtype="float64")
    gru.save(tmp_path / "g.npz")
    loaded = fastlstm.GRU.load(tmp_path / "g.npz", backend="numpy")
    assert loaded.reset_after is False and repr(loaded) == repr(gru) and "reset_after=False" in repr(gru)
    x = np.random.default_rng(0).standard_normal((4, 2, 3))
    np.testing.assert_array_equal(loaded(x)[0], gru(x)[0])
    other = fastlstm.GRU(3, 4, num_layers=2, backend="numpy", dtype="float64")
    other.load_state_dict(gru.state_dict())
    assert not np.allclose(other(x)[0], gru(x)[0])  # the convention changes the function


def test_the_conventions_differ_and_reset_after_is_checked():
    with pytest.raises(TypeError, match="reset_after: expected True or False"):
        fastlstm.GRU(3, 4, reset_after="yes")
    assert fastlstm.GRU(3, 4).reset_after is True


def test_update_gate_convention_mapping_in_the_docstring():
    """The docstring's recipe: weights of h' = (1 - z) h + z n map onto ours by negating z."""
    rng = np.random.default_rng(0)
    gru = fastlstm.GRU(3, 4, backend="numpy", dtype="float64", seed=1)
    params = gru.state_dict()
    x, h0 = rng.standard_normal((6, 2, 3)), rng.standard_normal((1, 2, 4))
    ours, _ = gru(x, h0)

    def sigmoid(a):
        return 1 / (1 + np.exp(-a))

    # The other convention, written out directly, with its own (negated) update weights.
    w_ih, w_hh, b_ih, b_hh = (params[k].copy() for k in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"))
    for w in (w_ih, w_hh, b_ih, b_hh):
        w[4:8] *= -1
    h, theirs = h0[0], []
    for t in range(6):
        gi, gh = x[t] @ w_ih.T + b_ih, h @ w_hh.T + b_hh
        r, z = sigmoid(gi[:, :4] + gh[:, :4]), sigmoid(gi[:, 4:8] + gh[:, 4:8])
        n = np.tanh(gi[:, 8:] + r * gh[:, 8:])
        h = (1 - z) * h + z * n
        theirs.append(h)
    np.testing.assert_allclose(ours, np.stack(theirs), rtol=1e-12)
