"""Parity with torch.nn.LSTM (CPU): outputs, final states and every gradient.

Tolerances (largest error relative to the largest magnitude): 1e-5 in float32,
1e-10 in float64. Sequences with lengths are compared against
pack_padded_sequence(..., enforce_sorted=False). Run for every CPU backend.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastlstm
from lstm_testing import (
    ALL_CPU_BACKENDS, FEATURE_CONFIGS, TOLERANCE, assert_close, config_id, forward_backward, random_problem,
    torch_forward_backward,
)

torch = pytest.importorskip("torch", reason="PyTorch is not installed: pip install torch==2.13.0")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("cfg", FEATURE_CONFIGS, ids=config_id)
@pytest.mark.parametrize("backend", ALL_CPU_BACKENDS)
def test_matches_torch(backend, cfg, dtype):
    input_size, hidden, num_steps, batch = 4, 6, 5, 3
    torch.manual_seed(0)
    module = torch.nn.LSTM(
        input_size, hidden, num_layers=cfg["num_layers"], bidirectional=cfg["bidirectional"],
        batch_first=cfg["batch_first"],
    ).to(getattr(torch, dtype))
    lstm = fastlstm.LSTM(
        input_size, hidden, num_layers=cfg["num_layers"], bidirectional=cfg["bidirectional"],
        batch_first=cfg["batch_first"], backend=backend, dtype=dtype,
    )
    lstm.load_state_dict(module.state_dict())
    lengths = np.array([5, 2, 4]) if cfg["lengths"] else None
    x, state, lengths, dy, dstate = random_problem(lstm, num_steps, batch, seed=1, with_state=cfg["with_state"], lengths=lengths)
    expected = torch_forward_backward(module, x, state, lengths, dy, dstate, cfg["batch_first"], dtype)
    actual = forward_backward(lstm, x, state, lengths, dy, dstate)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert_close(actual[name], expected[name], TOLERANCE[dtype], name)


@pytest.mark.parametrize("backend", ALL_CPU_BACKENDS)
def test_larger_float32_problem(backend):
    """Long enough for the compiled kernels' parallel and BLAS paths (T=30, B=16, H=96)."""
    torch.manual_seed(1)
    module = torch.nn.LSTM(20, 96, num_layers=2, bidirectional=True)
    lstm = fastlstm.LSTM(20, 96, num_layers=2, bidirectional=True, backend=backend)
    lstm.load_state_dict(module.state_dict())
    lengths = np.random.default_rng(2).integers(1, 31, size=16)
    x, state, lengths, dy, dstate = random_problem(lstm, 30, 16, seed=3, lengths=lengths)
    expected = torch_forward_backward(module, x, state, lengths, dy, dstate, False, "float32")
    actual = forward_backward(lstm, x, state, lengths, dy, dstate)
    for name in expected:
        assert_close(actual[name], expected[name], TOLERANCE["float32"], name)


def test_state_dict_names_shapes_and_order_match_torch():
    module = torch.nn.LSTM(5, 7, num_layers=2, bidirectional=True)
    lstm = fastlstm.LSTM(5, 7, num_layers=2, bidirectional=True)
    ours = lstm.state_dict()
    theirs = module.state_dict()
    assert list(ours) == list(theirs)
    assert {k: v.shape for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    # and back: torch loads ours
    module.load_state_dict({k: torch.from_numpy(v) for k, v in ours.items()})


def test_load_accepts_tensors_that_require_grad_and_dlpack():
    module = torch.nn.LSTM(3, 4)
    lstm = fastlstm.LSTM(3, 4)
    lstm.load_state_dict(dict(module.named_parameters()))  # requires_grad=True tensors
    for name, p in module.named_parameters():
        np.testing.assert_array_equal(lstm.state_dict()[name], p.detach().numpy())

    class DLPackOnly:  # exposes DLPack but not __array__
        def __init__(self, tensor):
            self.tensor = tensor

        def __dlpack__(self, **kwargs):
            return self.tensor.__dlpack__(**kwargs)

        def __dlpack_device__(self):
            return self.tensor.__dlpack_device__()

    doubled = {k: DLPackOnly(v * 2) for k, v in module.state_dict().items()}
    lstm.load_state_dict(doubled)
    for name, v in module.state_dict().items():
        np.testing.assert_allclose(lstm.state_dict()[name], 2 * v.numpy())


def test_initialisation_range_matches_torch():
    lstm = fastlstm.LSTM(10, 25, num_layers=2, seed=0)
    bound = 1 / np.sqrt(25)
    for name, value in lstm.state_dict().items():
        assert np.all(np.abs(value) <= bound), name
        assert np.max(np.abs(value)) > 0.9 * bound, name  # uses the whole range


@pytest.mark.parametrize("layout", ["time-major", "batch_first", "unbatched"])
@pytest.mark.parametrize("backend", ALL_CPU_BACKENDS)
def test_torch_tensors_in_torch_tensors_out(backend, layout):
    """A torch caller gets torch tensors back (outputs, final states, input gradients), with
    the values a NumPy caller gets; a NumPy caller still gets NumPy."""
    lstm = fastlstm.LSTM(4, 6, num_layers=2, batch_first=layout == "batch_first", backend=backend, seed=0)
    rng = np.random.default_rng(0)
    shape = {"time-major": (5, 3, 4), "batch_first": (3, 5, 4), "unbatched": (5, 4)}[layout]
    x = rng.standard_normal(shape).astype(np.float32)
    y_np, (h_np, c_np) = lstm(x)
    grads_np = lstm.backward(np.ones_like(y_np))
    y_t, (h_t, c_t) = lstm(torch.from_numpy(x))
    dx_t, (dh0_t, dc0_t) = lstm.backward(torch.ones(y_np.shape))
    for expected, actual in zip((y_np, h_np, c_np, grads_np[0], *grads_np[1]), (y_t, h_t, c_t, dx_t, dh0_t, dc0_t)):
        assert isinstance(expected, np.ndarray)
        assert isinstance(actual, torch.Tensor) and actual.device.type == "cpu" and actual.dtype == torch.float32
        np.testing.assert_array_equal(actual.numpy(), expected)
