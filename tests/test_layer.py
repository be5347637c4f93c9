"""The layer's behaviour: modes, gradient accumulation, dropout, dtypes, files, numerics."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

import fastlstm
from lstm_testing import ALL_CPU_BACKENDS, assert_close


@pytest.fixture(params=ALL_CPU_BACKENDS)
def backend(request):
    return request.param


def test_shapes_and_types(backend):
    lstm = fastlstm.LSTM(3, 5, num_layers=2, bidirectional=True, backend=backend)
    y, (h, c) = lstm(np.zeros((7, 4, 3)))
    assert y.shape == (7, 4, 10) and h.shape == c.shape == (4, 4, 5)
    assert y.dtype == h.dtype == c.dtype == np.float32
    assert isinstance(y, np.ndarray)
    assert lstm.backend == backend


def test_batch_first_is_a_transpose(backend):
    a = fastlstm.LSTM(3, 4, num_layers=2, backend=backend, seed=0)
    b = fastlstm.LSTM(3, 4, num_layers=2, batch_first=True, backend=backend)
    b.load_state_dict(a.state_dict())
    x = np.random.default_rng(0).standard_normal((6, 2, 3))
    ya, (ha, ca) = a(x, lengths=[6, 3])
    yb, (hb, cb) = b(x.transpose(1, 0, 2), lengths=[6, 3])
    np.testing.assert_allclose(yb, ya.transpose(1, 0, 2), rtol=1e-6)
    np.testing.assert_allclose(hb, ha, rtol=1e-6)
    dy = np.random.default_rng(1).standard_normal(ya.shape)
    dxa, _ = a.backward(dy)
    dxb, _ = b.backward(dy.transpose(1, 0, 2))
    np.testing.assert_allclose(dxb, dxa.transpose(1, 0, 2), rtol=1e-5, atol=1e-7)


def test_unbatched_input_matches_batch_of_one(backend):
    lstm = fastlstm.LSTM(3, 4, num_layers=2, bidirectional=True, backend=backend, dtype="float64")
    x = np.random.default_rng(0).standard_normal((6, 3))
    state = tuple(np.random.default_rng(1).standard_normal((4, 4)) for _ in range(2))
    y, (h, c) = lstm(x, state)
    assert y.shape == (6, 8) and h.shape == (4, 4)
    dx, (dh0, dc0) = lstm.backward(np.ones_like(y), (np.ones_like(h), None))
    assert dx.shape == (6, 3) and dh0.shape == dc0.shape == (4, 4)
    y1, (h1, _) = lstm(x[:, None], tuple(s[:, None] for s in state))
    np.testing.assert_allclose(y1[:, 0], y, rtol=1e-12)
    np.testing.assert_allclose(h1[:, 0], h, rtol=1e-12)


def test_gradients_accumulate_until_zero_grad(backend):
    lstm = fastlstm.LSTM(3, 4, backend=backend, dtype="float64", seed=0)
    x = np.random.default_rng(0).standard_normal((5, 2, 3))
    y, _ = lstm(x)
    lstm.backward(np.ones_like(y))
    once = {k: v.copy() for k, v in lstm.grads.items()}
    y, _ = lstm(x)
    lstm.backward(np.ones_like(y))
    for k in once:
        np.testing.assert_allclose(lstm.grads[k], 2 * once[k], rtol=1e-12)
    lstm.zero_grad()
    assert all(not np.any(v) for v in lstm.grads.values())
    assert list(lstm.grads) == list(lstm.state_dict())
    assert all(lstm.grads[k].shape == v.shape for k, v in lstm.state_dict().items())


def test_eval_keeps_nothing_and_uses_no_dropout(backend):
    lstm = fastlstm.LSTM(3, 4, num_layers=3, dropout=0.5, backend=backend, seed=0)
    x = np.random.default_rng(0).standard_normal((5, 2, 3))
    lstm.eval()
    y1, _ = lstm(x)
    y2, _ = lstm(x)
    np.testing.assert_array_equal(y1, y2)  # no dropout
    assert lstm._last.call is None
    no_dropout = fastlstm.LSTM(3, 4, num_layers=3, backend=backend)
    no_dropout.load_state_dict(lstm.state_dict())
    np.testing.assert_allclose(no_dropout(x)[0], y1, rtol=1e-6)


def test_dropout_is_reproducible_from_seed_and_differs_between_calls(backend):
    def outputs(seed):
        lstm = fastlstm.LSTM(3, 8, num_layers=2, dropout=0.5, backend=backend, seed=seed)
        x = np.random.default_rng(0).standard_normal((5, 2, 3))
        return lstm(x)[0], lstm(x)[0]

    a1, a2 = outputs(11)
    b1, b2 = outputs(11)
    np.testing.assert_array_equal(a1, b1)
    np.testing.assert_array_equal(a2, b2)
    assert not np.allclose(a1, a2)  # a new mask each forward


def test_dropout_masks_have_the_right_rate():
    lstm = fastlstm.LSTM(2, 2, num_layers=2, dropout=0.3, seed=0)
    mask = lstm._inverted_mask((200, 50, 4), 0.7)
    kept = mask > 0
    assert abs(kept.mean() - 0.7) < 0.01
    np.testing.assert_allclose(mask[kept], 1 / 0.7, rtol=1e-6)


def test_dropout_one_zeroes_the_upper_layer_input(backend):
    lstm = fastlstm.LSTM(3, 4, num_layers=2, dropout=1.0, backend=backend, seed=0)
    reference = fastlstm.LSTM(4, 4, backend=backend)
    reference.load_state_dict({k.replace("_l1", "_l0"): v for k, v in lstm.state_dict().items() if "_l1" in k})
    y, _ = lstm(np.random.default_rng(0).standard_normal((5, 2, 3)))
    np.testing.assert_allclose(y, reference(np.zeros((5, 2, 4)))[0], rtol=1e-6)


def test_dropout_with_single_layer_warns():
    with pytest.warns(UserWarning, match="no effect"):
        fastlstm.LSTM(3, 4, dropout=0.5)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_floating_inputs_are_converted_to_the_layer_dtype(backend, dtype):
    lstm = fastlstm.LSTM(3, 4, backend=backend, dtype="float64")
    x = (np.arange(30).reshape(5, 2, 3) % 3).astype(dtype)
    y, _ = lstm(x)
    assert y.dtype == np.float64
    np.testing.assert_allclose(y, lstm(x.astype(np.float64))[0], rtol=1e-12)
    y_list, _ = lstm(x.tolist())
    np.testing.assert_allclose(y_list, y, rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, bool])
def test_integer_and_boolean_inputs_are_refused(backend, dtype):
    lstm = fastlstm.LSTM(3, 4, backend=backend, dtype="float64")
    x = (np.arange(30).reshape(5, 2, 3) % 3).astype(dtype)
    for value in (x, x.tolist()):
        with pytest.raises(TypeError, match="x: expected floating-point numbers"):
            lstm(value)


def test_extreme_inputs_give_no_warning_and_no_nan(backend):
    lstm = fastlstm.LSTM(3, 4, num_layers=2, backend=backend, dtype="float32", seed=0)
    x = np.full((5, 2, 3), 1e4)
    x[:, 1] = -1e4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(over="raise", invalid="raise", divide="raise"):
            y, (h, c) = lstm(x)
            dx, _ = lstm.backward(np.ones_like(y))
    for a in (y, h, c, dx, *lstm.grads.values()):
        assert np.all(np.isfinite(a))


def test_save_load_round_trip(tmp_path, backend):
    lstm = fastlstm.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True, dropout=0.1,
                         dtype="float64", backend=backend)
    path = tmp_path / "model.npz"
    lstm.save(path)
    loaded = fastlstm.LSTM.load(path, backend=backend)
    assert loaded.config() == lstm.config()
    for k, v in lstm.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[k], v)
    assert [p.name for p in tmp_path.iterdir()] == ["model.npz"]  # no temp file left


def test_save_is_atomic(tmp_path, monkeypatch):
    lstm = fastlstm.LSTM(3, 4)
    path = tmp_path / "model.npz"
    lstm.save(path)
    original = path.read_bytes()

    def broken_savez(handle, **arrays):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        fastlstm.LSTM(3, 4, seed=1).save(path)
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["model.npz"]


def test_load_refuses_truncated_and_foreign_files(tmp_path):
    lstm = fastlstm.LSTM(3, 4)
    good = tmp_path / "good.npz"
    lstm.save(good)
    data = good.read_bytes()
    cases = {
        "truncated.npz": data[: len(data) // 2],
        "empty.npz": b"",
        "garbage.npz": os.urandom(300),
        "text.npz": b"hello world\n",
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(fastlstm.CheckpointError, match=name):
            fastlstm.LSTM.load(tmp_path / name)
    np.save(tmp_path / "array.npy", np.zeros(3))
    with pytest.raises(fastlstm.CheckpointError, match="single .npy array"):
        fastlstm.LSTM.load(tmp_path / "array.npy")
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(fastlstm.CheckpointError, match="not a fastlstm file"):
        fastlstm.LSTM.load(tmp_path / "other.npz")
    with pytest.raises(FileNotFoundError):
        fastlstm.LSTM.load(tmp_path / "missing.npz")


def test_load_refuses_a_file_whose_parameters_do_not_fit(tmp_path):
    from fastlstm.checkpoint import save_arrays

    lstm = fastlstm.LSTM(3, 4)
    arrays = lstm.state_dict()
    arrays["weight_hh_l0"] = np.zeros((16, 5), np.float32)
    save_arrays(tmp_path / "bad.npz", "fastlstm-lstm", {"config": lstm.config()}, arrays)
    with pytest.raises(ValueError, match="do not match the configuration"):
        fastlstm.LSTM.load(tmp_path / "bad.npz")


def test_params_are_live_for_optimizers(backend):
    lstm = fastlstm.LSTM(3, 4, backend=backend, dtype="float64", seed=0)
    x = np.random.default_rng(0).standard_normal((5, 2, 3))
    y, _ = lstm(x)
    loss_before = float(np.sum(y**2))
    lstm.backward(2 * y)
    for name, p in lstm.params.items():  # plain SGD on every parameter group
        p -= 0.05 * lstm.grads[name]
    y, _ = lstm(x)
    assert float(np.sum(y**2)) < loss_before
    with pytest.raises(TypeError):
        lstm.params["weight_ih_l0"] = np.zeros((16, 3))  # read-only mapping


def test_repr():
    assert repr(fastlstm.LSTM(3, 4, num_layers=2, bidirectional=True, backend="numpy")) == (
        "LSTM(3, 4, num_layers=2, bidirectional=True, backend='numpy', dtype='float32')"
    )


def test_lengths_equal_to_running_each_sequence_alone(backend):
    lstm = fastlstm.LSTM(3, 4, num_layers=2, bidirectional=True, backend=backend, dtype="float64", seed=0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 3, 3))
    lengths = np.array([6, 2, 4])
    y, (h, c) = lstm(x, lengths=lengths)
    for b, n in enumerate(lengths):
        yb, (hb, cb) = lstm(x[:n, b : b + 1])
        assert_close(y[:n, b], yb[:, 0], 1e-12, "y")
        assert not np.any(y[n:, b])
        assert_close(h[:, b], hb[:, 0], 1e-12, "h_n")
        assert_close(c[:, b], cb[:, 0], 1e-12, "c_n")
