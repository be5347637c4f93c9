"""The recurrent cells: what the stack (``stack.py``) needs to know of each, and nothing more.

A cell says how many gate blocks its weights have (rows of W_ih and W_hh come in blocks of
H), which state parts it carries ((h, c) for the LSTM, h for the GRU), and how one layer
and direction runs on a backend: it hands the backend its sequence primitives' arguments
and gives the stack its results in one shape for every cell:

    forward(backend, x, weights, states0, lengths, reverse, keep) -> y, states_n, saved
    backward(backend, saved, dy, dstates_n) -> dx, dstates0, grads
    stream(backend, weights, batch) -> run(x, states) -> y, states_n   (inference, forward direction)

``weights`` maps the roles ``weight_ih``, ``weight_hh`` and, with biases, ``bias_ih`` and
``bias_hh`` to arrays; ``grads`` maps the same roles to gradients. States are tuples with
one array per part, (B, H) each.

Conventions are torch's: ``nn.LSTM`` (gates i, f, g, o; the two biases enter as one sum)
and ``nn.GRU`` (gates r, z, n; ``b_hn`` stays inside the reset, so the biases stay apart).
"""

from __future__ import annotations

from dataclasses import dataclass


def _biases(backend, weights) -> tuple:
    """(b_ih, b_hh); zeros for a layer without biases."""
    if "bias_ih" in weights:
        return weights["bias_ih"], weights["bias_hh"]
    zeros = backend.xp.zeros(weights["weight_hh"].shape[0], dtype=weights["weight_hh"].dtype)
    return zeros, zeros


def _summed_bias(backend, weights):
    """b_ih + b_hh: the LSTM's gates see only the sum."""
    b_ih, b_hh = _biases(backend, weights)
    return b_ih + b_hh


@dataclass(frozen=True)
class LSTMCell:
    name = "lstm"
    gates = 4
    state_parts = ("h", "c")

    def forward(self, backend, x, weights, states0, lengths, reverse, keep):
        w_ih, w_hh = weights["weight_ih"], weights["weight_hh"]
        bias = _summed_bias(backend, weights)
        y, h_n, c_n, saved = backend.forward_sequence(x, w_ih, w_hh, bias, *states0, lengths, reverse, keep)
        return y, (h_n, c_n), saved

    def backward(self, backend, saved, dy, dstates_n):
        dx, dh0, dc0, dw_ih, dw_hh, dbias = backend.backward_sequence(saved, dy, *dstates_n)
        # b_ih and b_hh enter the gates as one sum: one gradient, for each (the same array)
        grads = {"weight_ih": dw_ih, "weight_hh": dw_hh, "bias_ih": dbias, "bias_hh": dbias}
        return dx, (dh0, dc0), grads

    def stream(self, backend, weights, batch):
        w_ih, w_hh = weights["weight_ih"], weights["weight_hh"]
        bias = _summed_bias(backend, weights)
        return backend.lstm_stream(w_ih, w_hh, bias, batch)


@dataclass(frozen=True)
class GRUCell:
    """torch.nn.GRU's cell (``reset_after=True``, as cuDNN), or Cho et al.'s original with the
    reset applied to h before the recurrent product (``reset_after=False``)."""

    reset_after: bool = True
    name = "gru"
    gates = 3
    state_parts = ("h",)

    def forward(self, backend, x, weights, states0, lengths, reverse, keep):
        w_ih, w_hh = weights["weight_ih"], weights["weight_hh"]
        b_ih, b_hh = _biases(backend, weights)
        y, h_n, saved = backend.gru_forward_sequence(
            x, w_ih, w_hh, b_ih, b_hh, states0[0], lengths, reverse, keep, self.reset_after
        )
        return y, (h_n,), saved

    def backward(self, backend, saved, dy, dstates_n):
        dx, dh0, dw_ih, dw_hh, db_ih, db_hh = backend.gru_backward_sequence(saved, dy, dstates_n[0])
        grads = {"weight_ih": dw_ih, "weight_hh": dw_hh, "bias_ih": db_ih, "bias_hh": db_hh}
        return dx, (dh0,), grads

    def stream(self, backend, weights, batch):
        w_ih, w_hh = weights["weight_ih"], weights["weight_hh"]
        b_ih, b_hh = _biases(backend, weights)
        return backend.gru_stream(w_ih, w_hh, b_ih, b_hh, batch, self.reset_after)


LSTM_CELL = LSTMCell()
# Each cell by name, with its default options (what --cell and config files name).
BY_NAME = {"lstm": LSTM_CELL, "gru": GRUCell()}
