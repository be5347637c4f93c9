"""The sequence-level primitives every backend implements, and their reference version.

A backend runs one layer in one direction over a whole sequence, for each cell; the
stack (``fastlstm.stack``, through ``fastlstm.cells``) builds layers, directions, dropout
and state handling on top and never talks to a backend in any other way:

    forward_sequence(x, w_ih, w_hh, bias, h0, c0, lengths, reverse, training)      (LSTM)
        -> y (T, B, H), h_n (B, H), c_n (B, H), saved
    backward_sequence(saved, dy, dh_n, dc_n)
        -> dx (T, B, I), dh0 (B, H), dc0 (B, H), dw_ih (4H, I), dw_hh (4H, H), dbias (4H,)
    gru_forward_sequence(x, w_ih, w_hh, b_ih, b_hh, h0, lengths, reverse, training, reset_after)
        -> y (T, B, H), h_n (B, H), saved                                          (GRU)
    gru_backward_sequence(saved, dy, dh_n)
        -> dx (T, B, I), dh0 (B, H), dw_ih (3H, I), dw_hh (3H, H), db_ih (3H,), db_hh (3H,)
    lstm_stream(w_ih, w_hh, bias, batch) -> run(x, (h, c)) -> y, (h_n, c_n)
    gru_stream(w_ih, w_hh, b_ih, b_hh, batch, reset_after) -> run(x, (h,)) -> y, (h_n,)

The stream primitives serve ``Stream`` (``fastlstm.stream``): inference on one layer, forward
direction, many short calls in a row with the same weights and batch size. They return a
``run`` that a backend may have prepared for that (packed the weights once); it keeps the
weights it was given (the caller hands over its own snapshot), holds no other state and
may be called from several threads at once.

Conventions (those of ``torch.nn.LSTM`` and ``torch.nn.GRU``): LSTM gate order i, f, g,
o, ``bias`` is ``b_ih + b_hh``; GRU gate order r, z, n, the biases apart (``b_hn`` sits
inside the reset), ``h' = (1 - z) * n + z * h``, and with ``reset_after`` (torch, cuDNN)
``n = tanh(W_in x + b_in + r * (W_hn h + b_hn))``, without it (Cho et al. 2014)
``n = tanh(W_in x + b_in + W_hn (r * h) + b_hn)``, a second recurrent product per step
after r. ``lengths`` is None or a (B,) integer array with values in 1..T.
A sequence is active at step t when t < length. Inactive steps carry the state
through unchanged and output zeros, so the forward direction ends each sequence
at its own last step and the reverse direction starts there. ``saved`` is opaque
to the layer and None when ``training`` is False (nothing is kept for backward).

``ReferenceBackend`` implements the primitives with array operations on ``self.xp``
(NumPy, or CuPy for a GPU fallback): one GEMM for the input projection of all
steps, one recurrent GEMM per step, the weight gradients as GEMMs over all steps
after the loop. Faster backends subclass it and override the primitives; what they do
not override (the GRU's, on cupy for now) runs this reference on their arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._arrays import host_result, to_numpy


@dataclass
class SavedSequence:
    """What the reference backward needs from its forward (one layer, one direction)."""

    x: object  # (T, B, I) layer input
    w_ih: object
    w_hh: object
    h0: object
    c0: object
    lengths: object  # (B,) or None
    reverse: bool
    gates: object  # (T, B, 4H) activated gates i, f, g, o
    h_states: object  # (T, B, H) carried hidden state after each step
    c_states: object  # (T, B, H) carried cell state after each step


@dataclass
class SavedGRUSequence:
    """What the reference GRU backward needs from its forward (one layer, one direction)."""

    x: object  # (T, B, I) layer input
    w_ih: object
    w_hh: object
    h0: object
    lengths: object  # (B,) or None
    reverse: bool
    reset_after: bool
    gates: object  # (T, B, 3H) activated gates r, z, n
    hidden_n: object  # (T, B, H) W_hn h + b_hn (reset_after), else r * h: what the reset met
    h_states: object  # (T, B, H) carried hidden state after each step


def step_order(num_steps: int, reverse: bool) -> range:
    """The order in which a direction visits the time steps."""
    return range(num_steps - 1, -1, -1) if reverse else range(num_steps)


def previous_states(xp, states, initial, reverse: bool):
    """(T, B, H): the state each step started from, in that direction's order."""
    shifted = xp.empty_like(states)
    if reverse:
        shifted[-1] = initial
        shifted[:-1] = states[1:]
    else:
        shifted[0] = initial
        shifted[1:] = states[:-1]
    return shifted


def active_steps(xp, lengths, num_steps: int):
    """(T, B, 1) boolean: is sequence b still running at step t; None without lengths."""
    if lengths is None:
        return None
    return (xp.arange(num_steps)[:, None] < lengths[None, :])[:, :, None]


def project_inputs(x, w_ih, bias):
    """(T, B, G*H): x W_ih^T + bias for every step at once (one GEMM over all T*B rows);
    the recurrent part is added per step."""
    num_steps, batch, _ = x.shape
    projected = (x.reshape(num_steps * batch, -1) @ w_ih.T).reshape(num_steps, batch, w_ih.shape[0])
    projected += bias
    return projected


def step_mask(active, t: int):
    """(B, 1) boolean for step t, or None when every sequence runs to the end."""
    return None if active is None else active[t]


def after_step(xp, mask, new, old):
    """A carried state after a step: `new` where the sequence still runs, `old` past its end."""
    return new if mask is None else xp.where(mask, new, old)


def input_and_weight_grads(xp, d_rows, x_rows, w_ih, h_states, h0, reverse):
    """After the time loop: dx, dW_ih, dW_hh and dbias as GEMMs over all T*B rows.

    d_rows: (T*B, 4H) gate gradients; x_rows: (T*B, I) layer input; h_states: (T, B, H)
    carried states (h_{t-1} of each step is built from them and h0). The bias gradient
    is a plain column sum: rows in order, the same result run to run.
    """
    num_steps, batch, hidden = h_states.shape
    h_prev = previous_states(xp, h_states, h0, reverse).reshape(num_steps * batch, hidden)
    return d_rows @ w_ih, d_rows.T @ x_rows, d_rows.T @ h_prev, d_rows.sum(axis=0)


def sigmoid(xp, a):
    """Logistic function without overflow or warnings for any input (NaN stays NaN)."""
    with np.errstate(under="ignore"):  # exp(-|a|) of a large |a| is rightly 0
        e = xp.exp(-xp.abs(a))
    return xp.where(a >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(a.dtype, copy=False)


class ReferenceBackend:
    """Array-module-generic LSTM primitives: the reference every backend must agree with."""

    name = "reference"
    xp = np

    def describe(self) -> str:
        return f"{self.xp.__name__} {self.xp.__version__}"

    def empty_cache(self) -> None:
        """Drop the memory this backend keeps between calls for speed (none here)."""

    # -- array plumbing -------------------------------------------------------------
    def from_user(self, value, name: str):
        """A caller's array (any framework) as this backend's array, dtype unchanged."""
        return to_numpy(value, name)

    def to_user(self, array, like):
        """A result for a caller whose input was `like`: a torch tensor on its device for a
        torch caller, NumPy otherwise (host backends)."""
        return host_result(array, like)

    def asarray(self, array, dtype=None):
        """`array` on this backend's device (no copy when it is already there)."""
        return self.xp.asarray(array, dtype=dtype)

    def to_host(self, array) -> np.ndarray:
        return np.asarray(array)

    # -- primitives -----------------------------------------------------------------
    def forward_sequence(self, x, w_ih, w_hh, bias, h0, c0, lengths, reverse, training):
        xp = self.xp
        num_steps, batch, _ = x.shape
        hidden = w_hh.shape[1]
        gates = project_inputs(x, w_ih, bias)
        active = active_steps(xp, lengths, num_steps)
        y = xp.empty((num_steps, batch, hidden), dtype=x.dtype)
        if training:
            h_states = xp.empty_like(y)
            c_states = xp.empty_like(y)
        h, c = h0, c0
        for t in step_order(num_steps, reverse):
            a = gates[t]
            a += h @ w_hh.T
            # Activate in place: in training the buffer becomes the saved gates.
            a[:, : 2 * hidden] = sigmoid(xp, a[:, : 2 * hidden])
            a[:, 2 * hidden : 3 * hidden] = xp.tanh(a[:, 2 * hidden : 3 * hidden])
            a[:, 3 * hidden :] = sigmoid(xp, a[:, 3 * hidden :])
            i, f, g, o = (a[:, k * hidden : (k + 1) * hidden] for k in range(4))
            c_new = f * c + i * g
            h_new = o * xp.tanh(c_new)
            mask = step_mask(active, t)
            h, c = after_step(xp, mask, h_new, h), after_step(xp, mask, c_new, c)
            y[t] = after_step(xp, mask, h_new, 0)  # outputs past a sequence's end are zero
            if training:
                h_states[t] = h
                c_states[t] = c
        saved = None
        if training:
            saved = SavedSequence(x, w_ih, w_hh, h0, c0, lengths, reverse, gates, h_states, c_states)
        return y, h, c, saved

    def backward_sequence(self, saved: SavedSequence, dy, dh_n, dc_n):
        xp = self.xp
        num_steps, batch, input_size = saved.x.shape
        hidden = saved.w_hh.shape[1]
        active = active_steps(xp, saved.lengths, num_steps)
        c_prev = previous_states(xp, saved.c_states, saved.c0, saved.reverse)
        d_gates = xp.empty_like(saved.gates)
        dh, dc = dh_n, dc_n
        for t in reversed(step_order(num_steps, saved.reverse)):
            i, f, g, o = (saved.gates[t][:, k * hidden : (k + 1) * hidden] for k in range(4))
            tanh_c = xp.tanh(saved.c_states[t])
            dh_t = dh + (dy[t] if active is None else xp.where(active[t], dy[t], 0))
            dc_t = dc + dh_t * o * (1 - tanh_c * tanh_c)
            da = d_gates[t]
            da[:, :hidden] = dc_t * g * i * (1 - i)
            da[:, hidden : 2 * hidden] = dc_t * c_prev[t] * f * (1 - f)
            da[:, 2 * hidden : 3 * hidden] = dc_t * i * (1 - g * g)
            da[:, 3 * hidden :] = dh_t * tanh_c * o * (1 - o)
            if active is None:
                dc = dc_t * f
                dh = da @ saved.w_hh
            else:
                # Inactive steps pass both carries through untouched.
                da *= active[t]
                dc = xp.where(active[t], dc_t * f, dc)
                dh = da @ saved.w_hh + xp.where(active[t], 0, dh_t)
        dx, dw_ih, dw_hh, dbias = input_and_weight_grads(
            xp, d_gates.reshape(num_steps * batch, 4 * hidden), saved.x.reshape(num_steps * batch, input_size),
            saved.w_ih, saved.h_states, saved.h0, saved.reverse,
        )
        return dx.reshape(num_steps, batch, input_size), dh, dc, dw_ih, dw_hh, dbias

    def lstm_stream(self, w_ih, w_hh, bias, batch):
        def run(x, states):
            y, h_n, c_n, _ = self.forward_sequence(x, w_ih, w_hh, bias, *states, None, False, False)
            return y, (h_n, c_n)
        return run

    # -- GRU ----------------------------------------------------------------------------
    def gru_stream(self, w_ih, w_hh, b_ih, b_hh, batch, reset_after):
        def run(x, states):
            y, h_n, _ = self.gru_forward_sequence(x, w_ih, w_hh, b_ih, b_hh, states[0], None, False, False,
                                                  reset_after)
            return y, (h_n,)
        return run

    def gru_forward_sequence(self, x, w_ih, w_hh, b_ih, b_hh, h0, lengths, reverse, training, reset_after):
        xp = self.xp
        num_steps, batch, _ = x.shape
        hidden = w_hh.shape[1]
        two = 2 * hidden
        gates = project_inputs(x, w_ih, b_ih)  # in training the buffer becomes the gates
        active = active_steps(xp, lengths, num_steps)
        y = xp.empty((num_steps, batch, hidden), dtype=x.dtype)
        if training:
            h_states = xp.empty_like(y)
            hidden_n = xp.empty_like(y)
        h = h0
        for t in step_order(num_steps, reverse):
            g = gates[t]
            if reset_after:
                gh = h @ w_hh.T + b_hh  # all three recurrent blocks in one product
                g[:, :two] = sigmoid(xp, g[:, :two] + gh[:, :two])
                hn = gh[:, two:]
                r = g[:, :hidden]
                g[:, two:] = xp.tanh(g[:, two:] + r * hn)
            else:
                # r first, then the reset hidden state through W_hn: a second product
                g[:, :two] = sigmoid(xp, g[:, :two] + h @ w_hh[:two].T + b_hh[:two])
                r = g[:, :hidden]
                hn = r * h
                g[:, two:] = xp.tanh(g[:, two:] + hn @ w_hh[two:].T + b_hh[two:])
            z, n = g[:, hidden:two], g[:, two:]
            h_new = (1 - z) * n + z * h
            mask = step_mask(active, t)
            h = after_step(xp, mask, h_new, h)
            y[t] = after_step(xp, mask, h_new, 0)  # outputs past a sequence's end are zero
            if training:
                h_states[t] = h
                hidden_n[t] = hn
        saved = None
        if training:
            saved = SavedGRUSequence(x, w_ih, w_hh, h0, lengths, reverse, reset_after, gates, hidden_n, h_states)
        return y, h, saved

    def gru_backward_sequence(self, saved: SavedGRUSequence, dy, dh_n):
        xp = self.xp
        num_steps, batch, input_size = saved.x.shape
        hidden = saved.w_hh.shape[1]
        two = 2 * hidden
        w_hh = saved.w_hh
        active = active_steps(xp, saved.lengths, num_steps)
        h_prev = previous_states(xp, saved.h_states, saved.h0, saved.reverse)
        d_input_side = xp.empty_like(saved.gates)  # gradients of x W_ih^T + b_ih, per gate
        d_hidden_side = xp.empty_like(saved.gates)  # gradients of the recurrent products' outputs
        dh = dh_n
        for t in reversed(step_order(num_steps, saved.reverse)):
            g = saved.gates[t]
            r, z, n = g[:, :hidden], g[:, hidden:two], g[:, two:]
            mask = step_mask(active, t)
            dh_t = dh + after_step(xp, mask, dy[t], 0)  # outputs past the end had no effect
            da_n = dh_t * (1 - z) * (1 - n * n)
            da_z = dh_t * (h_prev[t] - n) * z * (1 - z)
            if saved.reset_after:
                dr = da_n * saved.hidden_n[t]
                dn_hidden = da_n * r
            else:
                d_reset_h = da_n @ w_hh[two:]  # through W_hn to r * h
                dr = d_reset_h * h_prev[t]
                dn_hidden = da_n
            da_r = dr * r * (1 - r)
            di, dhid = d_input_side[t], d_hidden_side[t]
            di[:, :hidden], di[:, hidden:two], di[:, two:] = da_r, da_z, da_n
            dhid[:, :two], dhid[:, two:] = di[:, :two], dn_hidden
            if saved.reset_after:
                dh_prev = dh_t * z + dhid @ w_hh
            else:
                dh_prev = dh_t * z + dhid[:, :two] @ w_hh[:two] + d_reset_h * r
            # Inactive steps pass the carry through untouched (where, not a product: whatever
            # the padding held, it reaches no gradient through the state)
            if mask is not None:
                di[...] = xp.where(mask, di, 0)
                dhid[...] = xp.where(mask, dhid, 0)
            dh = after_step(xp, mask, dh_prev, dh)
        rows = num_steps * batch
        d_in = d_input_side.reshape(rows, 3 * hidden)
        d_hid = d_hidden_side.reshape(rows, 3 * hidden)
        x_rows = saved.x.reshape(rows, input_size)
        h_rows = h_prev.reshape(rows, hidden)
        dx = (d_in @ saved.w_ih).reshape(num_steps, batch, input_size)
        dw_ih = d_in.T @ x_rows
        if saved.reset_after:
            dw_hh = d_hid.T @ h_rows
        else:  # W_hn met r * h, not h
            dw_hh = xp.concatenate(
                [d_hid[:, :two].T @ h_rows, d_hid[:, two:].T @ saved.hidden_n.reshape(rows, hidden)], axis=0
            )
        return dx, dh, dw_ih, dw_hh, d_in.sum(axis=0), d_hid.sum(axis=0)
