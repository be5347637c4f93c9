"""Numba CPU kernels for one LSTM layer and direction over a whole sequence.

Built on ``numba_common.py`` (blocking, step barrier, per-step GEMMs, activations; its
docstring describes the scheme). A block owns the four gates of its units. Per time step
each block runs one GEMM for all four gates of its units (float32: the packed micro-kernel;
otherwise single-threaded BLAS, or a hand-written kernel for batch 1) and then the fused
pointwise cell update. Each kernel runs one worker per block through
``numba_common._launch``: on threads, or on the calling thread for problems too small to
split (one block), whose caller does the input projection and the weight gradients as
NumPy GEMMs on BLAS's own threads. On the parallel plan the weight and input gradients
after the loop run per block too (``gradients``), through the same micro-kernel with the
operands read in place. Inference with small steps and enough sequences cuts the batch
instead (``forward_sequences``): each thread runs the one-block time loop over its own
sequences, waiting for no other.

Gate buffers: block k's gate columns are [i(u0:u1), f(u0:u1), g(u0:u1), o(u0:u1)], stored
contiguously per block as (T*B, 4*nu) in a flat (num_blocks, T*B*4*max_nu) buffer.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .numba_common import (  # noqa: F401  - PANEL, the GEMM and projection modes are this module's interface too
    _CALLED_OPTS,
    _OPTS,
    GEMM_BLAS,
    GEMM_PACKED,
    GEMM_SMALL,
    PANEL,
    PROJECT_AT_FIRST_STEP,
    PROJECT_EACH_STEP,
    PROJECTED_BY_CALLER,
    _add,
    _backward_times,
    _block_done,
    _block_view,
    _call,
    _claim_block,
    _copy,
    _fill,
    _gemm_packed,
    _gemm_packed_in_order,
    _gemm_packed_sum,
    _gemm_tall,
    _hidden_buffers,
    _launch,
    _new_sync,
    _panels,
    _product,
    _slice_in,
    _slice_out,
    _sum_carry,
    _times_previous_states,
    _units,
    _view,
    _worker_started,
    sigmoid,
    tanh,
)

# The digest of numba_common.py this file was last compiled against (see its docstring).
COMMON_SOURCE_DIGEST = "eeb3b0f2670a2cc6"


# -- pointwise cell ---------------------------------------------------------------------
# One sequence's units of one block. Written (here and in numba_gru.py) so that LLVM vectorizes every loop: each
# loop touches few arrays (with more it gives up proving they do not overlap), and
# indexes a view from 0 (an offset index j + 2*nu defeats Numba's proof that the index
# is not negative, and the wraparound select that remains stops vectorization).
@njit(inline="always")
def _gate_views(a, nu):
    return a[:nu], a[nu : 2 * nu], a[2 * nu : 3 * nu], a[3 * nu : 4 * nu]


@njit(inline="always")
def _cell_forward(a, bias, c, h):
    """a: (4*nu) gate pre-activations without the bias in, activated gates [i f g o] out;
    c: (nu) cell state, updated in place; h: (nu) new hidden state out."""
    nu = c.shape[0]
    for j in range(4 * nu):
        a[j] += bias[j]
    ig, fg, gg, og = _gate_views(a, nu)
    for j in range(nu):
        ig[j] = sigmoid(ig[j])
    for j in range(nu):
        fg[j] = sigmoid(fg[j])
    for j in range(nu):
        gg[j] = tanh(gg[j])
    for j in range(nu):
        og[j] = sigmoid(og[j])
    for j in range(nu):
        c[j] = fg[j] * c[j] + ig[j] * gg[j]
    for j in range(nu):
        h[j] = og[j] * tanh(c[j])


@njit(inline="always")
def _cell_backward(a, c_t, c_before, dh, dc, tanh_c, da):
    """a: (4*nu) activated gates; c_t / c_before: (nu) cell state after / before the step;
    dh: (nu) gradient w.r.t. h_t; dc: (nu) carry, in: from step t+1, out: to step t-1;
    tanh_c: (nu) scratch; da: (4*nu) out, gradient w.r.t. the gate pre-activations."""
    nu = c_t.shape[0]
    ig, fg, gg, og = _gate_views(a, nu)
    di, df, dg, do = _gate_views(da, nu)
    for j in range(nu):
        tanh_c[j] = tanh(c_t[j])
    for j in range(nu):
        dc[j] += dh[j] * og[j] * (1 - tanh_c[j] * tanh_c[j])
    for j in range(nu):
        do[j] = dh[j] * tanh_c[j] * og[j] * (1 - og[j])
    for j in range(nu):
        di[j] = dc[j] * gg[j] * ig[j] * (1 - ig[j])
    for j in range(nu):
        df[j] = dc[j] * c_before[j] * fg[j] * (1 - fg[j])
    for j in range(nu):
        dg[j] = dc[j] * ig[j] * (1 - gg[j] * gg[j])
    for j in range(nu):
        dc[j] *= fg[j]


# -- forward ----------------------------------------------------------------------------
# Compiled on its own and called through _call, as the backward's step is: inlined into the
# worker, Numba copied, typed and lowered all of its IR there again (1-2 s of a cold first
# inference here); a call per block and step measured level (one step of batch 1, H = 128).
@njit(**_CALLED_OPTS)
def _forward_block_step(k, t, row0, bounds, gates, w_hh_ops, bias_p, h, h_next, c, rec,
                        lengths, y, h_states, c_states, training, mode, recurrent_done, descending):
    """Block k's step t: its gate rows row0 .. row0 + B of `gates` hold the input projection
    (and the recurrent product too if `recurrent_done`) and become the activated gates.
    descending: the packed GEMM's panel order (zig-zag, numba_common)."""
    batch, hidden = h.shape
    u0 = bounds[k]
    nu = bounds[k + 1] - u0
    g_t = _block_view(gates, k, row0 + batch, 4 * nu)[row0:]
    if recurrent_done:
        pass
    elif mode is GEMM_PACKED:  # the recurrent part accumulates straight into the gate rows
        _gemm_packed_in_order(h, _panels(w_hh_ops[k], hidden, 4 * nu), g_t, True, descending)
    else:
        r = _block_view(rec, k, batch, 4 * nu)
        _product(h, w_hh_ops[k], hidden, 4 * nu, r, mode)
        for b in range(batch):
            _add(r[b], g_t[b])
    b_k = bias_p[4 * u0 : 4 * u0 + 4 * nu]
    for b in range(batch):
        h_row = _units(h_next, b, u0, nu)
        c_row = _units(c, b, u0, nu)
        y_row = _units(y, t * batch + b, u0, nu)
        if t < lengths[b]:
            _cell_forward(g_t[b], b_k, c_row, h_row)
            _copy(h_row, y_row)
        else:  # past this sequence's end: carry the state, output zeros
            _copy(_units(h, b, u0, nu), h_row)
            _fill(y_row, 0)
        if training:
            _copy(h_row, _units(h_states, t * batch + b, u0, nu))
            _copy(c_row, _units(c_states, t * batch + b, u0, nu))


@njit(**_CALLED_OPTS)
def _input_projection_block(k, bounds, x2, w_ih_ops, gates, row0, mode):
    """Block k's input projection of the rows of x2 into its gate rows from row0 on
    (unpacked: one row by the batch-1 kernel, more by BLAS)."""
    nu = bounds[k + 1] - bounds[k]
    g_k = _view(gates, k * gates.shape[1] + row0 * 4 * nu, (x2.shape[0], 4 * nu))
    if mode is GEMM_PACKED or (mode == GEMM_SMALL and x2.shape[0] == 1):
        _product(x2, w_ih_ops[k], x2.shape[1], 4 * nu, g_k, mode)
    else:
        _product(x2, w_ih_ops[k], x2.shape[1], 4 * nu, g_k, GEMM_BLAS)


@njit(**_CALLED_OPTS)
def _input_and_recurrent_block(k, bounds, x_t, h, w_ih_ops, w_hh_ops, gates, row0, descending):
    """Block k's gate rows row0 .. row0 + B of one step (float32, packed): x_t W_ih^T + h W_hh^T."""
    nu = bounds[k + 1] - bounds[k]
    g_k = _view(gates, k * gates.shape[1] + row0 * 4 * nu, (x_t.shape[0], 4 * nu))
    _gemm_packed_sum(x_t, _panels(w_ih_ops[k], x_t.shape[1], 4 * nu), h, _panels(w_hh_ops[k], h.shape[1], 4 * nu),
                     g_k, descending)


@njit(**_OPTS)
def forward(x2, w_ih_ops, w_hh_ops, bias_p, h0, c0, lengths, reverse, bounds, training,
            mode, projection, parity, gates, rec, y, h_states, c_states):
    """Whole-sequence forward, one block of hidden units per thread. Returns (h_n, c_n).

    x2: (T*B, I) input; w_ih_ops / w_hh_ops: each block's weight rows laid out as GEMM
    operands for `mode` (pack_operands); projection: PROJECTED_BY_CALLER, PROJECT_AT_FIRST_STEP
    or PROJECT_EACH_STEP; parity: 0 or 1, the packed GEMMs' panel order at the first step
    (zig-zag, numba_common: a caller running steps call after call flips it as it goes);
    gates: (num_blocks, R*4*max_nu) scratch, R = B for PROJECT_EACH_STEP in inference
    and T*B otherwise, that holds the activated gates of every step afterwards when training;
    rec: (num_blocks, B*4*max_nu) scratch; h_states / c_states: (T, B, H) carried states,
    written only when training.
    """
    num_blocks = bounds.shape[0] - 1
    h_buffers = _hidden_buffers(h0)  # step s reads h from [s % 2], writes the other
    c = c0.copy()
    sync = _new_sync(y.shape[0], num_blocks)
    _launch(_forward_worker, num_blocks, (x2, w_ih_ops, w_hh_ops, bias_p, lengths, reverse, bounds, training, mode,
                                          projection, parity, gates, rec, y, h_states, c_states, h_buffers, c, sync))
    return h_buffers[y.shape[0] % 2].copy(), c


@njit(**_CALLED_OPTS)
def _forward_worker(w, x2, w_ih_ops, w_hh_ops, bias_p, lengths, reverse, bounds, training, mode, projection, parity,
                    gates, rec, y, h_states, c_states, h_buffers, c, sync):
    """Worker w of forward: the whole time loop, running its own block each step (or another's)."""
    num_blocks = bounds.shape[0] - 1
    num_steps, batch = y.shape[0], y.shape[1]
    _worker_started(sync)
    for s in range(num_steps):
        t = num_steps - 1 - s if reverse else s
        h, h_next = h_buffers[s & 1], h_buffers[(s + 1) & 1]
        row0 = 0 if projection == PROJECT_EACH_STEP and not training else t * batch  # this step's gate rows
        descending = ((s + parity) & 1) == 1
        # Packed, each step's input projected just before it: both products in one pass
        # over the panels (zig-zag order).
        fused = projection == PROJECT_EACH_STEP and mode is GEMM_PACKED
        while True:  # one claim site: each inlined copy of _claim_block is ~230 IR statements
            k = _claim_block(sync, s, w, num_blocks)
            if k < 0:
                break
            # A block's steps read only its own gate columns: it can project its input
            # for all steps at the first step, or each step's just before it.
            if fused:
                _call(_input_and_recurrent_block,
                      (k, bounds, x2[t * batch : (t + 1) * batch], h, w_ih_ops, w_hh_ops, gates, row0, descending))
            elif projection == PROJECT_EACH_STEP:
                _call(_input_projection_block,
                      (k, bounds, x2[t * batch : (t + 1) * batch], w_ih_ops, gates, row0, mode))
            elif projection == PROJECT_AT_FIRST_STEP and s == 0:
                _call(_input_projection_block, (k, bounds, x2, w_ih_ops, gates, 0, mode))
            _call(_forward_block_step, (k, t, row0, bounds, gates, w_hh_ops, bias_p, h, h_next, c, rec,
                                        lengths, y, h_states, c_states, training, mode, fused, descending))
            _block_done(sync, s, num_blocks)


@njit(**_OPTS)
def forward_sequences(x2, w_ih_ops, w_hh_ops, bias_p, h0, c0, lengths, reverse, bounds, mode, projection, slices,
                      x_parts, y_parts, gates, rec, y, h_n, c_n):
    """Inference forward with the batch cut instead of the units: worker w runs sequences
    slices[w] .. slices[w + 1] through the whole time loop on its own thread, with all the
    weights (one block: bounds = [0, H], operands packed for it), so that no step waits for
    another thread. x_parts / y_parts: (slices, T * max rows * I / H) scratch for a slice's
    input and output; gates / rec: (slices, ...) as forward's for one block and a slice's
    rows. Fills y, h_n and c_n."""
    _launch(_sequences_worker, slices.shape[0] - 1,
            (x2, w_ih_ops, w_hh_ops, bias_p, h0, c0, lengths, reverse, bounds, mode, projection, slices,
             x_parts, y_parts, gates, rec, y, h_n, c_n))


@njit(**_CALLED_OPTS)
def _sequences_worker(w, x2, w_ih_ops, w_hh_ops, bias_p, h0, c0, lengths, reverse, bounds, mode, projection, slices,
                      x_parts, y_parts, gates, rec, y, h_n, c_n):
    """Worker w of forward_sequences: forward's one-block time loop over its slice's copies."""
    b0, batch, x_part, y_part, h_buffers = _slice_in(w, slices, x2, x_parts, y_parts, h0, y)
    hidden = y.shape[2]
    c = _view(c_n, b0 * hidden, (batch, hidden))
    for b in range(batch):
        _copy(_units(c0, b0 + b, 0, hidden), _units(c, b, 0, hidden))
    no_states = np.empty((1, 1, 1), y.dtype)
    _call(_forward_worker, (0, x_part, w_ih_ops, w_hh_ops, bias_p, lengths[b0 : b0 + batch], reverse, bounds, False,
                            mode, projection, 0, _view(gates, w * gates.shape[1], (1, gates.shape[1])),
                            _view(rec, w * rec.shape[1], (1, rec.shape[1])), y_part, no_states, no_states,
                            h_buffers, c, _new_sync(y.shape[0], 1)))
    _slice_out(b0, y_part, h_buffers, y, h_n)


# -- backward ---------------------------------------------------------------------------
# Compiled on its own and called through _call: inlining it made Numba copy all of its
# inlined IR (up to ~0.8 s of a cold compile here, ~0.9 s for the GRU's step), and a call
# per block and step measured level in the backward.
@njit(**_CALLED_OPTS)
def _backward_block_step(k, t, t_prev, bounds, gates, c_states, c0, w_hh_ops, dy, lengths, dh_pass,
                         partial, partial_next, dc, d_gates, scratch, mode):
    batch, hidden = dc.shape
    num_steps = dy.shape[0]
    num_blocks = bounds.shape[0] - 1
    u0 = bounds[k]
    nu = bounds[k + 1] - u0
    g_k = _block_view(gates, k, num_steps * batch, 4 * nu)
    d_k = _block_view(d_gates, k, num_steps * batch, 4 * nu)
    dhr = scratch[k, :nu]
    tanh_c = scratch[k, nu : 2 * nu]
    c_start = c0 if t_prev < 0 else c_states[t_prev]  # cell state each sequence entered step t with
    for b in range(batch):
        row = t * batch + b
        # dh for this block's units: what flowed back from step t+1 (plus dy[t] if active).
        passed = _units(dh_pass, b, u0, nu)
        _copy(passed, dhr)
        for kk in range(num_blocks):
            _add(_units(partial, kk * batch + b, u0, nu), dhr)
        da = d_k[row]
        if t < lengths[b]:
            _add(_units(dy, row, u0, nu), dhr)
            _cell_backward(g_k[row], _units(c_states, row, u0, nu), _units(c_start, b, u0, nu), dhr,
                           _units(dc, b, u0, nu), tanh_c, da)
            _fill(passed, 0)
        else:  # inactive: no gate gradient, both carries pass through
            _fill(da, 0)
            _copy(dhr, passed)
    # This block's share of dh_{t-1}: d_gates[t][:, block] @ W_hh_p[block rows].
    da_t = d_k[t * batch : (t + 1) * batch]
    _product(da_t, w_hh_ops[k], 4 * nu, hidden, partial_next[k], mode)


@njit(inline="always")
def _backward_loop_setup(dh_n, dc_n, num_blocks, max_nu):
    batch, hidden = dh_n.shape
    dh_pass = dh_n.copy()
    dc = dc_n.copy()
    partials = np.zeros((2, num_blocks, batch, hidden), dh_n.dtype)  # each block's share of dh, by step parity
    scratch = np.empty((num_blocks, 2 * max_nu), dh_n.dtype)  # per block: dh row, tanh(c) row
    return dh_pass, dc, partials, scratch


@njit(**_OPTS)
def backward_loop(gates, c_states, c0, w_hh_ops, dy, dh_n, dc_n, lengths, reverse, bounds, max_nu, mode, d_gates):
    """Backward through time, one block per thread; fills d_gates. Returns (dh0, dc0)."""
    num_blocks = bounds.shape[0] - 1
    dh_pass, dc, partials, scratch = _backward_loop_setup(dh_n, dc_n, num_blocks, max_nu)
    sync = _new_sync(dy.shape[0], num_blocks)
    _launch(_backward_worker, num_blocks, (gates, c_states, c0, w_hh_ops, dy, lengths, reverse, bounds, mode, d_gates,
                                           dh_pass, dc, partials, scratch, sync))
    return _sum_carry(dh_pass, partials[dy.shape[0] % 2]), dc


@njit(**_CALLED_OPTS)
def _backward_worker(w, gates, c_states, c0, w_hh_ops, dy, lengths, reverse, bounds, mode, d_gates, dh_pass, dc,
                     partials, scratch, sync):
    """Worker w of backward_loop: the whole time loop, running its own block each step (or another's)."""
    num_blocks = bounds.shape[0] - 1
    num_steps = dy.shape[0]
    _worker_started(sync)
    for s in range(num_steps):
        t, t_prev = _backward_times(s, num_steps, reverse)
        # step s reads the blocks' dh_{t} shares from partials[s % 2], writes the other
        while True:  # one claim site: each inlined copy of _claim_block is ~230 IR statements
            k = _claim_block(sync, s, w, num_blocks)
            if k < 0:
                break
            _call(_backward_block_step, (k, t, t_prev, bounds, gates, c_states, c0, w_hh_ops, dy, lengths, dh_pass,
                                         partials[s & 1], partials[(s + 1) & 1], dc, d_gates, scratch, mode))
            _block_done(sync, s, num_blocks)


# -- weight gradients -------------------------------------------------------------------
@njit(inline="always")  # see _gradients_worker
def _weight_grads_block(k, bounds, d_gates, x2, h_states, h0, reverse, packed, dw_ih_p, dw_hh_p, dbias_p):
    """Block k's rows of dW_ih, dW_hh and dbias: GEMMs over all T*B rows, column sums."""
    rows = x2.shape[0]
    u0 = bounds[k]
    nu = bounds[k + 1] - u0
    r0, r1 = 4 * u0, 4 * u0 + 4 * nu
    d_k = _block_view(d_gates, k, rows, 4 * nu)
    _gemm_tall(d_k, True, x2, dw_ih_p[r0:r1], False, packed)
    _times_previous_states(d_k, h_states, h0, reverse, dw_hh_p[r0:r1], packed)
    # Deterministic column sums: rows in order, no atomics.
    acc = dbias_p[r0:r1]
    _fill(acc, 0)
    for r in range(rows):
        _add(d_k[r], acc)


@njit(inline="always")  # see _gradients_worker
def _input_grad_rows(p, num_parts, bounds, d_gates, w_ih_p, packed, dx2):
    """Rows of dx (T*B, I) for part p: sum over blocks of d_gates[block] @ W_ih_p[block rows]."""
    rows = dx2.shape[0]
    r0 = rows * p // num_parts
    r1 = rows * (p + 1) // num_parts
    if r1 <= r0:
        return
    for k in range(bounds.shape[0] - 1):
        u0 = bounds[k]
        nu = bounds[k + 1] - u0
        d_k = _block_view(d_gates, k, rows, 4 * nu)
        _gemm_tall(d_k[r0:r1], False, w_ih_p[4 * u0 : 4 * u0 + 4 * nu], dx2[r0:r1], k > 0, packed)


@njit(**_OPTS)
def gradients(d_gates, x2, h_states, h0, w_ih_p, reverse, bounds, packed, dw_ih_p, dw_hh_p, dbias_p, dx2):
    """After the loop: weight, bias and input gradients, in parallel over blocks / rows.
    packed: the float32 micro-kernel where widths allow (_gemm_tall), else BLAS. A flag, not
    the GEMM mode: its code has both either way (widths are known at run time), and one
    compiled kernel serves the packed and the BLAS plans."""
    _launch(_gradients_worker, bounds.shape[0] - 1,
            (d_gates, x2, h_states, h0, w_ih_p, reverse, bounds, packed, dw_ih_p, dw_hh_p, dbias_p, dx2))


# The worker's callees are inlined: small enough that Numba's copy of their IR costs
# ~0.15 s, less than compiling one more function (the GRU's larger block is _call'ed).
@njit(**_CALLED_OPTS)
def _gradients_worker(k, d_gates, x2, h_states, h0, w_ih_p, reverse, bounds, packed, dw_ih_p, dw_hh_p, dbias_p,
                      dx2):
    """Thread k of gradients: block k's weight rows, then part k of dx's rows."""
    num_blocks = bounds.shape[0] - 1
    _weight_grads_block(k, bounds, d_gates, x2, h_states, h0, reverse, packed, dw_ih_p, dw_hh_p, dbias_p)
    _input_grad_rows(k, num_blocks, bounds, d_gates, w_ih_p, packed, dx2)
