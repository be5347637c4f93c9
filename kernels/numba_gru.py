"""Numba CPU kernels for one GRU layer and direction over a whole sequence (the time loop).

Built on ``numba_common.py`` (blocking, step barrier, per-step GEMMs, activations; its
docstring describes the scheme). A block owns the three gates r, z, n of its units. Per
time step each block runs its recurrent GEMM (float32: the packed micro-kernel; otherwise
single-threaded BLAS, or a hand-written kernel for batch 1) and then the fused pointwise
cell update. The input projection x W_ih^T, and after the backward loop dx and the weight
gradients, are large GEMMs over all T*B rows: on the parallel plan each block's share runs
on the loop's own threads (the projection at the first step, or each step's rows just
before the step; ``gradients`` after the loop), because a multi-threaded BLAS call next to
the loop leaves BLAS's threads spinning on the cores the loop needs (stream-1: 8 ms
instead of 0.5); on one block the caller runs them on NumPy's BLAS.

The two conventions differ in how many GEMMs a step needs:

- ``reset_after`` (torch, cuDNN): ``n = tanh(x_n + b_in + r * (W_hn h + b_hn))``. One GEMM
  h @ W_hh^T for all three gates of a block; one barrier per step.
- Cho et al.: ``n = tanh(x_n + b_in + W_hn (r * h) + b_hn)``. W_hn multiplies r * h, and r
  of *every* unit must be known first: each step is two phases with a barrier after each.
  Phase 1: h @ W_hr,hz^T, r and z, and this block's units of r * h into a shared row.
  Phase 2: (r * h) @ W_hn^T and n, h'. The backward mirrors it (d(r * h) is a sum over
  blocks, like dh).

Layouts: the gate buffers (``gates``: input projection in, activated gates r, z, n out;
``d_in``: gradients of the input-side pre-activations) are (T*B, 3H) in torch's column
order, so the caller's GEMMs use them as they are; a block writes its units' columns of
each gate. The recurrent GEMM's operands are the weights in block order
(``numba_common.block_permutation``), and its output / input rows are per-block scratch
(``rec``, ``d_rec``) laid out [r(nu), z(nu), n(nu)].
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .numba_common import (
    _ONE,
    _CALLED_OPTS,
    _OPTS,
    GEMM_PACKED,
    PANEL,
    PROJECT_AT_FIRST_STEP,
    PROJECT_EACH_STEP,
    _add,
    _backward_times,
    _blas_product,
    _block_done,
    _block_view,
    _call,
    _claim_block,
    _copy,
    _fill,
    _gemm_packed,
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
    _view,
    _worker_started,
    sigmoid,
    tanh,
)

# The digest of numba_common.py this file was last compiled against (see its docstring).
COMMON_SOURCE_DIGEST = "eeb3b0f2670a2cc6"


# -- pointwise cell (see numba_lstm.py on how these loops are written to vectorize) ---------
# The per-row views here are slices, not numba_common._units as in the LSTM's loops: with
# _units the GRU's small-config forward (T=200, B=16, H=64) measured 8-12 % slower (its
# cell loops each read up to eight such views), where the LSTM's gained 5-14 %.
@njit(inline="always")
def _unit_views(row, hidden, u0, nu):
    """A (3H,) torch-ordered gate row's r, z and n entries of units [u0, u0 + nu)."""
    return row[u0 : u0 + nu], row[hidden + u0 : hidden + u0 + nu], row[2 * hidden + u0 : 2 * hidden + u0 + nu]


@njit(inline="always")
def _activate_update_and_reset(gr, gz, rec_r, rec_z, b_ir, b_iz, b_hr, b_hz):
    """gr, gz: input projections in, activated gates r and z out; rec_*: the recurrent parts."""
    for j in range(gr.shape[0]):
        gr[j] = sigmoid(gr[j] + b_ir[j] + (rec_r[j] + b_hr[j]))
    for j in range(gz.shape[0]):
        gz[j] = sigmoid(gz[j] + b_iz[j] + (rec_z[j] + b_hz[j]))


@njit(inline="always")
def _new_state(gn, gz, h, h_new):
    for j in range(h.shape[0]):
        h_new[j] = (_ONE - gz[j]) * gn[j] + gz[j] * h[j]


@njit(inline="always")
def _cell_forward_reset_after(gr, gz, gn, rec, b_ir, b_iz, b_in, b_hr, b_hz, b_hn, h, h_new):
    """rec: (3*nu) h W_hh^T of the block's units [r z n]; its n part becomes W_hn h + b_hn."""
    nu = h.shape[0]
    rec_n = rec[2 * nu : 3 * nu]
    _activate_update_and_reset(gr, gz, rec[:nu], rec[nu : 2 * nu], b_ir, b_iz, b_hr, b_hz)
    for j in range(nu):
        rec_n[j] += b_hn[j]
    for j in range(nu):
        gn[j] = tanh(gn[j] + b_in[j] + gr[j] * rec_n[j])
    _new_state(gn, gz, h, h_new)


@njit(inline="always")
def _cell_forward_new_gate(gn, gz, rec_n, b_in, b_hn, h, h_new):
    """Cho et al.'s second phase: rec_n = W_hn (r * h) of the block's units."""
    for j in range(gn.shape[0]):
        gn[j] = tanh(gn[j] + b_in[j] + (rec_n[j] + b_hn[j]))
    _new_state(gn, gz, h, h_new)


@njit(inline="always")
def _cell_backward_new_and_update(gz, gn, h_prev, dh, dz, dn):
    """Gradients of the n and z pre-activations from dh (w.r.t. h_t)."""
    for j in range(dh.shape[0]):
        dn[j] = dh[j] * (_ONE - gz[j]) * (_ONE - gn[j] * gn[j])
    for j in range(dh.shape[0]):
        dz[j] = dh[j] * (h_prev[j] - gn[j]) * gz[j] * (_ONE - gz[j])


@njit(inline="always")
def _reset_gradient(d_reset, other, gr, dr):
    """dr = d_reset * other * r (1 - r): r met `other` (W_hn h + b_hn, or h) in a product."""
    for j in range(gr.shape[0]):
        dr[j] = d_reset[j] * other[j] * gr[j] * (_ONE - gr[j])


# -- forward ------------------------------------------------------------------------------
@njit(**_CALLED_OPTS)  # compiled on its own (_call), as numba_lstm._forward_block_step
def _forward_block_phase(k, t, row0, phase, bounds, gates, w_ops, w_ops_n, b_ih, b_hh, h, h_next, reset_h,
                         rec, lengths, y, h_states, hidden_n, training, mode):
    """Block k's share of step t, whose gate rows start at row0: the whole step (reset_after:
    w_ops_n None), or Cho's phase 0 (r and z, r * h) or phase 1 (n and h')."""
    reset_after = w_ops_n is None
    batch, hidden = h.shape
    u0 = bounds[k]
    nu = bounds[k + 1] - u0
    b_ir, b_iz, b_in = _unit_views(b_ih, hidden, u0, nu)
    b_hr, b_hz, b_hn = _unit_views(b_hh, hidden, u0, nu)
    if reset_after:
        rec_k = _block_view(rec, k, batch, 3 * nu)
        _product(h, w_ops[k], hidden, 3 * nu, rec_k, mode)
    elif phase == 0:
        rec_k = _block_view(rec, k, batch, 2 * nu)
        _product(h, w_ops[k], hidden, 2 * nu, rec_k, mode)
    else:
        rec_k = rec[k, batch * 2 * nu : batch * 3 * nu].reshape((batch, nu))
        _product(reset_h, w_ops_n[k], hidden, nu, rec_k, mode)
    for b in range(batch):
        gr, gz, gn = _unit_views(gates[row0 + b], hidden, u0, nu)
        h_row, h_new = h[b, u0 : u0 + nu], h_next[b, u0 : u0 + nu]
        active = t < lengths[b]
        if reset_after or phase == 1:
            if active:
                if reset_after:
                    _cell_forward_reset_after(gr, gz, gn, rec_k[b], b_ir, b_iz, b_in, b_hr, b_hz, b_hn, h_row, h_new)
                else:
                    _cell_forward_new_gate(gn, gz, rec_k[b], b_in, b_hn, h_row, h_new)
                _copy(h_new, y[t, b, u0 : u0 + nu])
            else:  # past this sequence's end: carry the state, output zeros
                _copy(h_row, h_new)
                _fill(y[t, b, u0 : u0 + nu], 0)
            if training:
                _copy(h_new, h_states[t, b, u0 : u0 + nu])
                # What the reset met; the backward reads it only where the sequence runs (and
                # Cho's weight gradient reads r * h everywhere: zero past the end, phase 0).
                if reset_after:
                    if active:
                        _copy(rec_k[b, 2 * nu : 3 * nu], hidden_n[t, b, u0 : u0 + nu])
                else:
                    _copy(reset_h[b, u0 : u0 + nu], hidden_n[t, b, u0 : u0 + nu])
        else:  # Cho's phase 0
            rh = reset_h[b, u0 : u0 + nu]
            if active:
                _activate_update_and_reset(gr, gz, rec_k[b, :nu], rec_k[b, nu : 2 * nu], b_ir, b_iz, b_hr, b_hz)
                for j in range(nu):
                    rh[j] = gr[j] * h_row[j]
            else:  # this row's n is computed and then not used: keep it finite
                _fill(rh, 0)


@njit(**_CALLED_OPTS)
def _project_block(k, bounds, x2, w_ih_ops, mode, gates):
    """Block k's units' columns of the input projection x2 W_ih^T into the rows of `gates`
    (as many as x2 has), gate by gate."""
    hidden = gates.shape[1] // 3
    inner = x2.shape[1]
    u0 = bounds[k]
    nu = bounds[k + 1] - u0
    if mode is GEMM_PACKED:  # nu is whole panels: each gate's columns are its own panels
        panels = _panels(w_ih_ops[k], inner, 3 * nu)
        per_gate = nu // PANEL
        for q in range(3):
            _gemm_packed(x2, panels[q * per_gate : (q + 1) * per_gate], gates[:, q * hidden + u0 : q * hidden + u0 + nu],
                         False)
    else:
        w = w_ih_ops[k, : inner * 3 * nu].reshape((inner, 3 * nu))
        for q in range(3):  # each gate's columns straight into its columns of `gates`
            g0 = q * hidden + u0
            _blas_product(x2, False, w[:, q * nu : (q + 1) * nu], gates[:, g0 : g0 + nu], False)


@njit(**_OPTS)
def forward(x2, w_ih_ops, projection, gates, w_ops, w_ops_n, b_ih, b_hh, h0, lengths, reverse, bounds,
            training, mode, rec, y, h_states, hidden_n):
    """Whole-sequence forward, one block of hidden units per thread. Returns h_n.

    projection: PROJECT_AT_FIRST_STEP or PROJECT_EACH_STEP, where each block projects its
    columns of the input (x2 (T*B, I) @ its rows of W_ih, laid out by pack_operands as
    w_ih_ops); or PROJECTED_BY_CALLER, and x2 and w_ih_ops are not read. A multi-threaded
    BLAS call just before the time loop would leave BLAS's threads spinning on the cores
    the loop's workers need.
    gates: (R, 3H) input projection x W_ih^T (no bias) in (or projected here), activated
    gates out; R = B for PROJECT_EACH_STEP in inference (one step's), T*B otherwise;
    w_ops: each block's rows of W_hh (reset_after) or of W_hr, W_hz (Cho) as GEMM operands
    for `mode` (numba_common.pack_operands); w_ops_n: Cho's W_hn rows likewise, or None for
    reset_after (torch's GRU; None, as GEMM_PACKED, so that the kernel compiled for it holds
    none of Cho's code: it would not even type, as Cho's code indexes w_ops_n, were the
    branches not pruned); rec: (num_blocks, B*3*max_nu) scratch; h_states, hidden_n: (T, B, H)
    the carried state and what the reset met (W_hn h + b_hn, or r * h), written only when
    training.
    """
    num_blocks = bounds.shape[0] - 1
    phases = 1 if w_ops_n is None else 2  # reset_after: one phase a step
    h_buffers = _hidden_buffers(h0)  # step s reads h from [s % 2], writes the other
    reset_h = np.zeros_like(h0)  # Cho: r * h of the current step, all units
    sync = _new_sync(y.shape[0] * phases, num_blocks)
    _launch(_forward_worker, num_blocks, (x2, w_ih_ops, projection, gates, w_ops, w_ops_n, b_ih, b_hh, lengths, reverse,
                                          bounds, training, mode, rec, y, h_states, hidden_n, h_buffers, reset_h,
                                          sync))
    return h_buffers[y.shape[0] % 2].copy()


@njit(**_CALLED_OPTS)
def _forward_worker(w, x2, w_ih_ops, projection, gates, w_ops, w_ops_n, b_ih, b_hh, lengths, reverse, bounds,
                    training, mode, rec, y, h_states, hidden_n, h_buffers, reset_h, sync):
    """Worker w of forward: the whole time loop, running its own block each phase (or another's)."""
    num_blocks = bounds.shape[0] - 1
    num_steps, batch = y.shape[0], y.shape[1]
    phases = 1 if w_ops_n is None else 2
    _worker_started(sync)
    for s in range(num_steps):
        t = num_steps - 1 - s if reverse else s
        h, h_next = h_buffers[s & 1], h_buffers[(s + 1) & 1]
        row0 = 0 if projection == PROJECT_EACH_STEP and not training else t * batch  # this step's gate rows
        for phase in range(phases):
            p = s * phases + phase
            while True:  # one claim site: each inlined copy of _claim_block is ~230 IR statements
                k = _claim_block(sync, p, w, num_blocks)
                if k < 0:
                    break
                # A block's steps read only its own gate columns: it can project its input
                # for all steps at the first step, or each step's just before it.
                if projection == PROJECT_AT_FIRST_STEP and p == 0:
                    _call(_project_block, (k, bounds, x2, w_ih_ops, mode, gates))
                elif projection == PROJECT_EACH_STEP and phase == 0:
                    x_t = _view(x2, t * batch * x2.shape[1], (batch, x2.shape[1]))
                    gates_t = _view(gates, row0 * gates.shape[1], (batch, gates.shape[1]))
                    _call(_project_block, (k, bounds, x_t, w_ih_ops, mode, gates_t))
                _call(_forward_block_phase, (k, t, row0, phase, bounds, gates, w_ops, w_ops_n, b_ih, b_hh, h,
                                             h_next, reset_h, rec, lengths, y, h_states, hidden_n, training, mode))
                _block_done(sync, p, num_blocks)


@njit(**_OPTS)
def forward_sequences(x2, w_ih_ops, projection, w_ops, w_ops_n, b_ih, b_hh, h0, lengths, reverse, bounds, mode,
                      slices, x_parts, y_parts, gates, rec, y, h_n):
    """Inference forward with the batch cut instead of the units, as numba_lstm.forward_sequences:
    worker w runs sequences slices[w] .. slices[w + 1] through forward's one-block time loop on
    its own thread (bounds = [0, H], operands packed for it; projection PROJECT_AT_FIRST_STEP or
    PROJECT_EACH_STEP). x_parts / y_parts / gates / rec: (slices, ...) scratch for a slice's
    input, output, gates ((T or 1) * rows * 3H) and rec. Fills y and h_n."""
    _launch(_sequences_worker, slices.shape[0] - 1,
            (x2, w_ih_ops, projection, w_ops, w_ops_n, b_ih, b_hh, h0, lengths, reverse, bounds, mode, slices,
             x_parts, y_parts, gates, rec, y, h_n))


@njit(**_CALLED_OPTS)
def _sequences_worker(w, x2, w_ih_ops, projection, w_ops, w_ops_n, b_ih, b_hh, h0, lengths, reverse, bounds, mode,
                      slices, x_parts, y_parts, gates, rec, y, h_n):
    """Worker w of forward_sequences: forward's one-block time loop over its slice's copies."""
    b0, batch, x_part, y_part, h_buffers = _slice_in(w, slices, x2, x_parts, y_parts, h0, y)
    num_steps, hidden = y.shape[0], y.shape[2]
    gate_rows = batch if projection == PROJECT_EACH_STEP else num_steps * batch
    phases = 1 if w_ops_n is None else 2
    no_states = np.empty((1, 1, 1), y.dtype)
    _call(_forward_worker, (0, x_part, w_ih_ops, projection, _view(gates, w * gates.shape[1], (gate_rows, 3 * hidden)),
                            w_ops, w_ops_n, b_ih, b_hh, lengths[b0 : b0 + batch], reverse, bounds, False, mode,
                            _view(rec, w * rec.shape[1], (1, rec.shape[1])), y_part, no_states, no_states, h_buffers,
                            np.zeros((batch, hidden), y.dtype), _new_sync(num_steps * phases, 1)))
    _slice_out(b0, y_part, h_buffers, y, h_n)


# -- backward -----------------------------------------------------------------------------
@njit(**_CALLED_OPTS)  # compiled on its own (_call), as numba_lstm._backward_block_step
def _backward_block_phase(k, t, t_prev, phase, bounds, gates, h_states, h0, hidden_n, w_ops, w_ops_n,
                          dy, lengths, dh_pass, partial, partial_next, partial_reset, dh_t, d_in, d_hidden_n, d_rec,
                          scratch, mode):
    """Block k's share of backward step t (phases as in the forward, in reverse order: Cho's
    phase 0 here is the n and z gradients and d(r * h)'s share, phase 1 the reset's; w_ops_n
    None: reset_after, one phase)."""
    reset_after = w_ops_n is None
    batch, hidden = dh_pass.shape
    num_blocks = bounds.shape[0] - 1
    u0 = bounds[k]
    nu = bounds[k + 1] - u0
    width = 3 * nu if reset_after else (nu if phase == 0 else 2 * nu)
    d_rec_k = _block_view(d_rec, k, batch, width)  # this phase's GEMM input rows
    h_start = h0 if t_prev < 0 else h_states[t_prev]  # the state each sequence entered step t with
    for b in range(batch):
        row = t * batch + b
        gr, gz, gn = _unit_views(gates[row], hidden, u0, nu)
        dr, dz, dn = _unit_views(d_in[row], hidden, u0, nu)
        h_prev = h_start[b, u0 : u0 + nu]
        passed = dh_pass[b, u0 : u0 + nu]
        dh = dh_t[b, u0 : u0 + nu]
        active = t < lengths[b]
        if reset_after or phase == 0:
            # dh w.r.t. h_t: what flowed back from step t+1 (plus dy[t] if active).
            _copy(passed, dh)
            for kk in range(num_blocks):
                _add(partial[kk, b, u0 : u0 + nu], dh)
            if active:
                _add(dy[t, b, u0 : u0 + nu], dh)
                _cell_backward_new_and_update(gz, gn, h_prev, dh, dz, dn)
        if not active:  # no gate gradient; the carry passes through
            _fill(d_rec_k[b], 0)
            if reset_after or phase == 0:
                _fill(dr, 0)
                _fill(dz, 0)
                _fill(dn, 0)
                _copy(dh, passed)
            if reset_after:
                _fill(d_hidden_n[row, u0 : u0 + nu], 0)
        elif reset_after:
            d_rec_r, d_rec_z, d_rec_n = d_rec_k[b, :nu], d_rec_k[b, nu : 2 * nu], d_rec_k[b, 2 * nu :]
            _reset_gradient(dn, hidden_n[t, b, u0 : u0 + nu], gr, dr)
            for j in range(nu):
                d_rec_n[j] = dn[j] * gr[j]  # W_hn h + b_hn met r
            _copy(dr, d_rec_r)
            _copy(dz, d_rec_z)
            _copy(d_rec_n, d_hidden_n[row, u0 : u0 + nu])
            for j in range(nu):
                passed[j] = dh[j] * gz[j]
        elif phase == 0:
            _copy(dn, d_rec_k[b])  # W_hn met r * h: its input gradient is dn itself
        else:
            d_reset_h = scratch[k, :nu]  # d(r * h) of this block's units: a sum over blocks
            _fill(d_reset_h, 0)
            for kk in range(num_blocks):
                _add(partial_reset[kk, b, u0 : u0 + nu], d_reset_h)
            _reset_gradient(d_reset_h, h_prev, gr, dr)
            _copy(dr, d_rec_k[b, :nu])
            _copy(dz, d_rec_k[b, nu:])
            for j in range(nu):
                passed[j] = dh[j] * gz[j] + d_reset_h[j] * gr[j]
    # This block's share of dh_{t-1} (or, Cho's phase 0, of d(r * h)): d_rec_k @ W[block rows].
    if reset_after:
        _product(d_rec_k, w_ops[k], width, hidden, partial_next[k], mode)
    elif phase == 0:
        _product(d_rec_k, w_ops_n[k], width, hidden, partial_reset[k], mode)
    else:
        _product(d_rec_k, w_ops[k], width, hidden, partial_next[k], mode)


@njit(**_OPTS)
def backward_loop(gates, h_states, h0, hidden_n, w_ops, w_ops_n, dy, dh_n, lengths, reverse, bounds,
                  max_nu, mode, d_in, d_hidden_n):
    """Backward through time, one block per thread. Returns dh0.

    Fills d_in (T*B, 3H): the gradients of the input-side pre-activations (x W_ih^T + b_ih)
    in torch's order, which for r and z are those of the recurrent side too; with
    reset_after, d_hidden_n (T*B, H): the gradient of W_hn h + b_hn (Cho's is d_in's n part).
    w_ops / w_ops_n: the blocks' weight rows as backward GEMM operands (rows_are_inputs);
    w_ops_n None for reset_after, as in forward.
    """
    num_blocks = bounds.shape[0] - 1
    num_steps, batch, hidden = dy.shape
    phases = 1 if w_ops_n is None else 2
    dh_pass = dh_n.copy()
    partials = np.zeros((2, num_blocks, batch, hidden), dh_n.dtype)  # each block's share of dh, by step parity
    partial_reset = np.zeros((num_blocks, batch, hidden), dh_n.dtype)  # Cho: each block's share of d(r * h)
    dh_t = np.empty_like(dh_n)
    d_rec = np.empty((num_blocks, batch * 3 * max_nu), dh_n.dtype)
    scratch = np.empty((num_blocks, max_nu), dh_n.dtype)
    sync = _new_sync(num_steps * phases, num_blocks)
    _launch(_backward_worker, num_blocks, (gates, h_states, h0, hidden_n, w_ops, w_ops_n, dy, lengths, reverse,
                                           bounds, mode, d_in, d_hidden_n, dh_pass, partials, partial_reset, dh_t,
                                           d_rec, scratch, sync))
    return _sum_carry(dh_pass, partials[num_steps % 2])


@njit(**_CALLED_OPTS)
def _backward_worker(w, gates, h_states, h0, hidden_n, w_ops, w_ops_n, dy, lengths, reverse, bounds,
                     mode, d_in, d_hidden_n, dh_pass, partials, partial_reset, dh_t, d_rec, scratch, sync):
    """Worker w of backward_loop: the whole time loop, running its own block each phase (or another's)."""
    num_blocks = bounds.shape[0] - 1
    num_steps = dy.shape[0]
    phases = 1 if w_ops_n is None else 2
    _worker_started(sync)
    for s in range(num_steps):
        t, t_prev = _backward_times(s, num_steps, reverse)
        for phase in range(phases):
            p = s * phases + phase
            while True:  # one claim site: each inlined copy of _claim_block is ~230 IR statements
                k = _claim_block(sync, p, w, num_blocks)
                if k < 0:
                    break
                _call(_backward_block_phase, (k, t, t_prev, phase, bounds, gates, h_states, h0,
                                              hidden_n, w_ops, w_ops_n, dy, lengths, dh_pass, partials[s & 1],
                                              partials[(s + 1) & 1], partial_reset, dh_t, d_in, d_hidden_n, d_rec,
                                              scratch, mode))
                _block_done(sync, p, num_blocks)


# -- weight and input gradients ------------------------------------------------------------
@njit(**_CALLED_OPTS)  # compiled on its own (_call), as numba_lstm._backward_block_step
def _weight_grads_block(k, bounds, d_in, d_hidden_n, x2, h_states, h0, hidden_n, reverse, reset_after, packed,
                        dw_ih, dw_hh, db_ih, db_hh):
    """Block k's units' rows of dW_ih, dW_hh, db_ih and db_hh (torch's order), gate by gate:
    GEMMs over all T*B rows, column sums in row order (deterministic)."""
    hidden = d_in.shape[1] // 3
    rows = d_in.shape[0]
    u0 = bounds[k]
    nu = bounds[k + 1] - u0
    for q in range(3):
        c0 = q * hidden + u0
        d_q = d_in[:, c0 : c0 + nu]
        _gemm_tall(d_q, True, x2, dw_ih[c0 : c0 + nu], False, packed)
        acc = db_ih[c0 : c0 + nu]
        _fill(acc, 0)
        for r in range(rows):
            _add(d_q[r], acc)
        if q < 2:  # r and z: the recurrent side's pre-activation gradient is the input side's
            _times_previous_states(d_q, h_states, h0, reverse, dw_hh[c0 : c0 + nu], packed)
            _copy(acc, db_hh[c0 : c0 + nu])
        elif reset_after:  # W_hn h + b_hn met r
            d_n = d_hidden_n[:, u0 : u0 + nu]
            _times_previous_states(d_n, h_states, h0, reverse, dw_hh[c0 : c0 + nu], packed)
            acc = db_hh[c0 : c0 + nu]
            _fill(acc, 0)
            for r in range(rows):
                _add(d_n[r], acc)
        else:  # W_hn met r * h
            _gemm_tall(d_q, True, hidden_n.reshape((rows, hidden)), dw_hh[c0 : c0 + nu], False, packed)
            _copy(acc, db_hh[c0 : c0 + nu])


@njit(**_OPTS)
def gradients(d_in, d_hidden_n, x2, h_states, h0, hidden_n, w_ih, reverse, reset_after, bounds, packed,
              dw_ih, dw_hh, db_ih, db_hh, dx2):
    """After the backward loop (parallel plan): thread k computes block k's rows of the
    weight and bias gradients, then part k of dx's rows (d_in @ W_ih). packed: as
    numba_lstm.gradients's."""
    _launch(_gradients_worker, bounds.shape[0] - 1, (d_in, d_hidden_n, x2, h_states, h0, hidden_n, w_ih, reverse,
                                                     reset_after, bounds, packed, dw_ih, dw_hh, db_ih, db_hh, dx2))


@njit(**_CALLED_OPTS)
def _gradients_worker(k, d_in, d_hidden_n, x2, h_states, h0, hidden_n, w_ih, reverse, reset_after, bounds, packed,
                      dw_ih, dw_hh, db_ih, db_hh, dx2):
    """Thread k of gradients."""
    num_blocks = bounds.shape[0] - 1
    rows = dx2.shape[0]
    _call(_weight_grads_block, (k, bounds, d_in, d_hidden_n, x2, h_states, h0, hidden_n, reverse, reset_after, packed,
                                dw_ih, dw_hh, db_ih, db_hh))
    r0, r1 = rows * k // num_blocks, rows * (k + 1) // num_blocks
    if r1 > r0:
        _gemm_tall(d_in[r0:r1], False, w_ih, dx2[r0:r1], False, packed)
