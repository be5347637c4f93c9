"""The Numba backend: the sequence primitives of both cells as compiled CPU kernels
(``kernels/numba_lstm.py``, ``kernels/numba_gru.py``, on ``kernels/numba_common.py``).

Importing this module imports numba, scipy (the kernels call scipy's BLAS through Numba's helper)
and threadpoolctl; the registry does that only when this backend is asked for.
Nothing is compiled at import: kernels compile (or load from Numba's cache) on
first use.

Threads: ``fastlstm.set_num_threads`` sets how many run. The kernels run one block
of hidden units per Numba thread (inference with small steps: one slice of the batch
per thread, ``_sequence_slices``); where they call BLAS from those threads (float64,
sizes that are not whole 32-column panels), BLAS is held to one thread for the call
(threadpoolctl), so the two pools never oversubscribe the cores. Problems too small
to split run on one thread, and their large GEMMs (input projection, weight
gradients) go to NumPy's BLAS with the same thread count.

Calls from several Python threads: every section that uses more than one core (a
parallel kernel, a multi-threaded BLAS call) or sets BLAS's thread count runs one at a
time in the process (``_MULTICORE``); single-threaded kernels that call no BLAS run side
by side. Numba's workqueue threading layer aborts the process when two threads launch
parallel kernels at once; on the thread-safe layers two launches that each want every
core only slow each other down; and BLAS's thread count is process-wide, so two
overlapping threadpoolctl limits would restore each other's value and leave BLAS limited
after the calls.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from dataclasses import dataclass

import numba
import numpy as np
import scipy
import scipy.linalg.cython_blas  # noqa: F401  - the kernels' BLAS (numba_common._xgemm); fail here, not mid-call
import threadpoolctl
from llvmlite import binding as llvm_binding

from .. import threads
from ..kernels import numba_common as common
from ..kernels import numba_gru as gru_kernels
from ..kernels import numba_lstm as kernels
from .base import ReferenceBackend, input_and_weight_grads, previous_states
from .numba_compile_ahead import CompileAhead, cached_here
from .workspaces import Workspaces

# Below this many multiply-adds per step, the per-step barrier and moving h between cores
# cost more than a second thread saves (measured: batch 1, H = 64 breaks even; H = 128 gains).
_PARALLEL_MIN_STEP_WORK = 32 * 1024
# Batches up to this size use the hand-written GEMM (kernels._matmul_small) when the packed
# float32 kernel does not apply; BLAS wins above (measured on AVX-512).
_SMALL_BATCH = 1
# Single-block plan: input projections smaller than this (multiply-adds) stay in the kernel.
_NUMPY_PROJECTION_MIN_WORK = 8 * 1024 * 1024
# From this batch size on each step's input is projected just before the step, with its
# recurrent product where the GEMM is packed: the projection is not written for all T steps
# and read back from memory (train-m: the inference forward ~9 % faster, the training
# forward ~13 %, its gate rows written once, as gates). Below it, one tall GEMM over all
# steps reuses each weight panel far more (batch 1: per-step projection is ~16 % slower).
# Training with BLAS keeps the tall GEMM (BLAS is far better at one tall product than at T
# short ones).
_STEPWISE_PROJECTION_MIN_BATCH = 16
# Inference on more than one thread cuts the batch instead of the units where a step's work is
# small (kernels.forward_sequences): each thread runs its sequences' whole time loop alone,
# with no barrier a step, but reads all the weights every step, not its block's. Measured
# (one process, alternated, against the units cut; T x B x I x H): 200x16x32x64 1.12-1.22x,
# 100x32x64x64 1.19x, 100x16x64x128 1.0-1.14x faster; 100x32x128x128 (4.2 M multiply-adds a step)
# 0.89-1.01x; 4-row slices (B = 8) 1.0x at H = 128 and 0.86x at I = H = 256 (the 4-row tile
# does fewer FMAs a load than the 8-row one). So: slices of at least _SLICE_MIN_ROWS sequences, steps
# of at most _SLICE_MAX_STEP_WORK multiply-adds (B * (I + H) * 4H).
_SLICE_MIN_ROWS = 8
_SLICE_MAX_STEP_WORK = 2 * 2**20
# Plans kept (least recently used dropped first): one per shape, dtype, cell and thread count.
_PLANS_KEPT = 64
# Packed forward weights kept for inference calls (numba_backend._forward_operand), at most
# this many bytes of them (with the copies they are checked against), least recently used
# dropped first; a weight that would take more than half of it is never kept. Models whose
# weights exceed it pay, for the weights not kept, a copy on top of the packing.
_KEPT_OPERAND_BYTES = 256 * 2**20
# Scratch buffers and those a training forward saves for its backward, kept for the next
# calls (numba_backend.Workspaces): at most this many bytes of them, least recently used
# dropped first.
_WORKSPACE_BYTES = 512 * 2**20
# The LSTM's GEMMs after the backward loop (weight and input gradients; on the parallel plan,
# each block's share on its own thread): BLAS, single-threaded per block, or the float32
# micro-kernel on copies of the operands' chunks. Measured on the 2-core Intel Xeon (Emerald
# Rapids) VM, whole training steps, BLAS against the micro-kernel: train-m and train-l 1.15x
# faster while the micro-kernel read a in place; since it copies a's rows, train-m level
# (micro / BLAS time 0.95-1.01), train-l 1.05x (1.01-1.27); small, stream-1 and deep (B*T =
# 800) 0.91-1.0x; the GRU's 0.88x (measured while its gate columns were copied for BLAS).
# On the 2-core AMD Zen 4 VM the micro-kernel was 1.2x faster than BLAS at train-m
# (bench/results/2026-11-27-cpu-2core.md). So: BLAS for large LSTM layers
# (_GRADIENTS_BLAS_MIN_ROWS steps x sequences, 4H >= _GRADIENTS_BLAS_MIN_COLUMNS) except on
# AMD Zen; the micro-kernel otherwise. Deterministic either way (one order of sums a shape).
_GRADIENTS_BY_BLAS = not llvm_binding.get_host_cpu_name().startswith("znver")
_GRADIENTS_BLAS_MIN_ROWS = 1024
_GRADIENTS_BLAS_MIN_COLUMNS = 512
# Fewest hidden units worth a thread of their own.
_MIN_UNITS_PER_BLOCK = 16
# Held by every section that uses more than one core or sets BLAS's thread count (see the
# module docstring).
_MULTICORE = threading.RLock()


@dataclass(frozen=True)
class _Plan:
    bounds: np.ndarray  # block boundaries over hidden units
    mode: int | None  # common.GEMM_BLAS, GEMM_SMALL or GEMM_PACKED (None)
    num_blocks: int
    max_units: int
    gates: int  # gate blocks of the plan's cell

    @property
    def parallel(self) -> bool:
        """One block per thread; a single block runs on the calling thread."""
        return self.num_blocks > 1

    def permute(self, array, gates=None):
        """Rows (or entries) of a weight in the blocks' order; no copy for a single block.
        `gates`: how many gate blocks `array` has when not the plan's cell's (Cho's parts)."""
        if self.num_blocks == 1:
            return np.ascontiguousarray(array)
        return self.permute_into(array, np.empty(array.shape, array.dtype), gates)

    def permute_into(self, array, out, gates=None):
        """out = array's rows in the blocks' order (common.block_permutation's), as runs of
        whole rows: slice copies, ~3x faster than a gather by index (2 MB: 0.75 -> ~0.2 ms).
        Returns out."""
        for dst, src, count in self._runs(len(array), gates):
            out[dst : dst + count] = array[src : src + count]
        return out

    def unpermute_into(self, array_p, out):
        """out = array_p's rows (blocks' order) back in torch's order: permute_into undone. Returns out."""
        for dst, src, count in self._runs(len(array_p)):
            out[src : src + count] = array_p[dst : dst + count]
        return out

    def _runs(self, rows: int, gates=None):
        """(row in the blocks' order, row in torch's order, count) for each block and gate."""
        gates = self.gates if gates is None else gates
        hidden = rows // gates
        dst = 0
        for u0, u1 in zip(self.bounds[:-1].tolist(), self.bounds[1:].tolist()):
            for gate in range(gates):
                yield dst, gate * hidden + u0, u1 - u0
                dst += u1 - u0


@dataclass(frozen=True)
class _KeptOperand:
    source: np.ndarray  # the weights it was packed from (a copy)
    operand: np.ndarray  # pack_operands' layout

    @functools.cached_property
    def source_bits(self) -> np.ndarray:
        return _bits(self.source)

    @property
    def nbytes(self) -> int:
        return self.source.nbytes + self.operand.nbytes


def _bits(w: np.ndarray) -> np.ndarray:
    """A C-contiguous float array's bits as one flat unsigned array (no copy), for same_bits:
    uint64 where its size allows (half the items to compare), else uint32."""
    flat = w.reshape(-1)
    return flat.view(np.uint64 if flat.nbytes % 8 == 0 else np.uint32)


@dataclass
class _NumbaSaved:
    plan: _Plan
    x2: np.ndarray
    w_ih_p: np.ndarray
    w_hh_p: np.ndarray
    h0: np.ndarray
    c0: np.ndarray
    lengths: np.ndarray
    reverse: bool
    gates: np.ndarray
    h_states: np.ndarray
    c_states: np.ndarray


@dataclass
class _NumbaSavedGRU:
    plan: _Plan
    x2: np.ndarray
    w_ih: np.ndarray
    w_hh: np.ndarray
    h0: np.ndarray
    lengths: np.ndarray
    reverse: bool
    reset_after: bool
    gates: np.ndarray  # (T*B, 3H) activated r, z, n
    hidden_n: np.ndarray  # (T, B, H) what the reset met: W_hn h + b_hn, or r * h
    h_states: np.ndarray


class NumbaBackend(ReferenceBackend):
    name = "numba"
    xp = np

    def __init__(self):
        self._blas = threadpoolctl.ThreadpoolController()
        self._plans = {}
        self._plans_lock = threading.Lock()  # callers on several threads share the cache
        self._kept = {}  # (weights' array id, layout) -> _KeptOperand, most recently used last
        self._kept_lock = threading.Lock()
        self._workspaces = Workspaces(_WORKSPACE_BYTES)
        self._compile_ahead = CompileAhead()  # a cold first training step's gradients kernel, on another core

    def describe(self) -> str:
        used = _numba_threads()
        limit = f" (NUMBA_NUM_THREADS={numba.config.NUMBA_NUM_THREADS})" if used < threads.get_num_threads() else ""
        return f"numba {numba.__version__} with scipy {scipy.__version__} BLAS, {used} threads{limit}"

    def empty_cache(self) -> None:
        """Drop the kept workspaces and packed inference weights (streams keep their own)."""
        self._workspaces.clear()
        with self._kept_lock:
            self._kept.clear()

    # -- planning ---------------------------------------------------------------------
    def _plan(self, batch: int, hidden: int, dtype, gates: int = 4, widths: tuple = (4,), num_threads=None) -> _Plan:
        """Blocks and GEMM mode for a cell with `gates` gate blocks whose per-step GEMMs have
        `widths` columns per unit (LSTM (4,); GRU (3,), or (2, 1) for Cho's two products), on
        `num_threads` threads at most (default: all the kernels may use)."""
        num_threads = _numba_threads() if num_threads is None else num_threads
        key = (batch, hidden, np.dtype(dtype), num_threads, gates, widths)
        with self._plans_lock:
            return self._plan_for(key, batch, hidden, dtype, num_threads, gates, widths)

    def _plan_for(self, key, batch, hidden, dtype, num_threads, gates, widths) -> _Plan:
        plan = self._plans.pop(key, None)
        if plan is None:
            step_work = batch * hidden * gates * hidden
            parallel = num_threads > 1 and step_work >= _PARALLEL_MIN_STEP_WORK
            num_blocks = min(num_threads, max(1, hidden // _MIN_UNITS_PER_BLOCK)) if parallel else 1
            bounds = common.block_bounds(hidden, num_blocks)
            sizes = np.diff(bounds)
            aligned = hidden % common.PANEL == 0 and all(np.all(w * sizes % common.PANEL == 0) for w in widths)
            if np.dtype(dtype) == np.float32 and aligned:
                mode = common.GEMM_PACKED
            else:
                mode = common.GEMM_SMALL if batch <= _SMALL_BATCH else common.GEMM_BLAS
            plan = _Plan(bounds, mode, len(bounds) - 1, int(sizes.max()), gates)
        self._plans[key] = plan  # most recently used last
        while len(self._plans) > _PLANS_KEPT:  # batch sizes that keep changing must not grow it forever
            del self._plans[next(iter(self._plans))]
        return plan

    def _run(self, plan: _Plan, kernel, *args, calls_blas=None, workers=None):
        """Run a kernel (one worker per block of the plan, or `workers`) with Numba's thread
        count set. Where it calls BLAS from its threads (calls_blas; default: unless the packed
        kernel does every GEMM), BLAS runs on one."""
        if calls_blas is None:
            calls_blas = plan.mode != common.GEMM_PACKED
        workers = plan.num_blocks if workers is None else workers
        if not calls_blas and workers == 1:  # one thread, no BLAS: runs beside other threads' calls
            return kernel(*args)
        with _MULTICORE, self._blas.limit(limits=1, user_api="blas") if calls_blas else contextlib.nullcontext():
            if workers > 1:
                numba.set_num_threads(workers)
            return kernel(*args)

    @contextlib.contextmanager
    def _numpy_blas(self):
        """For the single-block plan's large GEMMs (projection, weight gradients): NumPy's
        multi-threaded BLAS, held to fastlstm's thread count. No Numba thread runs then."""
        with _MULTICORE, self._blas.limit(limits=threads.get_num_threads(), user_api="blas"):
            yield

    def _operands(self, plan: _Plan, w_p: np.ndarray, rows_are_inputs: bool, gates: int = 4,
                  scratch: bool = False) -> np.ndarray:
        """Each block's rows of w_p (`gates` gate blocks, in block order) laid out as a per-step
        GEMM operand (numba_common.pack_operands); `scratch`: in a workspace, for the caller
        to give back."""
        shape = (plan.num_blocks, w_p.shape[1] * gates * plan.max_units)
        out = self._workspaces.take(shape, w_p.dtype) if scratch else np.empty(shape, w_p.dtype)
        common.pack_operands(w_p, plan.bounds, gates, plan.mode, rows_are_inputs, out)
        return out

    def _forward_operand(self, plan: _Plan, w: np.ndarray, gates: int, keep: bool, permute_gates=None):
        """The forward's per-step GEMM operand of `w` (torch's row order, `gates` gate blocks;
        permute_gates: as _Plan.permute). With `keep` (inference): the operand packed from
        this same array earlier, while its bits are still the ones it was packed from
        (compared on every call: a weight changed in place is packed again), else packed now
        and kept. Packing a large layer costs milliseconds (I = H = 512: 8 MB read, permuted
        and written, mostly to fresh pages); the comparison reads the weights and a copy."""
        if not keep or not w.flags.c_contiguous or 2 * w.nbytes > _KEPT_OPERAND_BYTES // 2:
            return self._operands(plan, plan.permute(w, permute_gates), rows_are_inputs=False, gates=gates)
        # Keyed by the array object: only where to look. What decides is the comparison (an
        # array freed and another made with the same id differs in its bits, or is packed alike).
        key = (id(w), w.shape, w.dtype, gates, plan.mode, plan.bounds.tobytes())
        with self._kept_lock:
            kept = self._kept.pop(key, None)
            if kept is not None:
                self._kept[key] = kept  # most recently used last
        if kept is not None and common.same_bits(kept.source_bits, _bits(w)):
            return kept.operand
        source = w.copy()  # packed from the copy: what is kept is what was compared
        kept = _KeptOperand(source, self._operands(plan, plan.permute(source, permute_gates), False, gates))
        with self._kept_lock:
            self._kept[key] = kept
            total = sum(entry.nbytes for entry in self._kept.values())
            while total > _KEPT_OPERAND_BYTES and len(self._kept) > 1:
                total -= self._kept.pop(next(iter(self._kept))).nbytes
        return kept.operand

    # -- primitives -------------------------------------------------------------------
    def forward_sequence(self, x, w_ih, w_hh, bias, h0, c0, lengths, reverse, training):
        num_steps, batch, input_size = x.shape
        hidden = w_hh.shape[1]
        dtype = x.dtype
        plan = self._plan(batch, hidden, dtype)
        slices = None if training else _sequence_slices(plan, batch, input_size, hidden)
        if slices is not None:  # inference, the batch cut across threads
            one = self._plan(slices.rows, hidden, dtype, num_threads=1)
            projection = _slice_projection(one, slices)
            y, h_n, c_n = self._by_sequences(
                kernels.forward_sequences, one, x, hidden, slices, projection, 2,
                self._forward_operand(one, w_ih, 4, keep=True), self._forward_operand(one, w_hh, 4, keep=True),
                np.ascontiguousarray(bias), np.ascontiguousarray(h0), np.ascontiguousarray(c0),
                _lengths(lengths, num_steps, batch), reverse, one.bounds, one.mode, projection)
            return y, h_n, c_n, None
        if training and plan.parallel:
            self._compile_ahead.start("lstm", _call_description(batch, input_size, hidden, dtype))
        bias_p = plan.permute(bias)
        take = self._workspaces.take
        scratch = []  # given back after the kernel
        saved_buffers = []  # given back once the saved forward is freed
        if training:  # the permuted weights: packed now, and kept for the backward
            if plan.parallel:  # copies in a workspace (one block: the weights themselves, no copy)
                w_ih_p, w_hh_p = take(w_ih.shape, w_ih.dtype), take(w_hh.shape, w_hh.dtype)
                plan.permute_into(w_ih, w_ih_p)
                plan.permute_into(w_hh, w_hh_p)
                saved_buffers += [w_ih_p, w_hh_p]
            else:
                w_ih_p, w_hh_p = plan.permute(w_ih), plan.permute(w_hh)
            w_hh_ops = self._operands(plan, w_hh_p, rows_are_inputs=False, scratch=True)
            scratch.append(w_hh_ops)
        else:
            w_hh_ops = self._forward_operand(plan, w_hh, 4, keep=True)
        step_lengths = _lengths(lengths, num_steps, batch)
        x2 = x.reshape(num_steps * batch, input_size)
        # The input projection: per block inside the kernel (each step's just before it at
        # batch >= 16, packed or for inference; else all steps at the first step), or, for a
        # large one on the single-block plan, one GEMM on NumPy's BLAS threads.
        if _projects_each_step(plan, batch, training):
            projection = common.PROJECT_EACH_STEP
        elif plan.parallel or x2.size * 4 * hidden < _NUMPY_PROJECTION_MIN_WORK:
            projection = common.PROJECT_AT_FIRST_STEP
        else:
            projection = common.PROJECTED_BY_CALLER
        gate_rows = _gate_rows(projection, training, num_steps, batch)
        gates = take((plan.num_blocks, gate_rows * 4 * plan.max_units), dtype)
        rec = take((plan.num_blocks, batch * 4 * plan.max_units), dtype)
        scratch.append(rec)
        y = np.empty((num_steps, batch, hidden), dtype)
        if training:
            h_states, c_states = take((num_steps, batch, hidden), dtype), take((num_steps, batch, hidden), dtype)
            saved_buffers += [gates, h_states, c_states]
        else:
            h_states = c_states = np.empty((1, 1, 1), dtype)
            scratch.append(gates)
        if projection == common.PROJECTED_BY_CALLER:
            w_ih_ops = np.empty((1, 1), dtype)
            with self._numpy_blas():
                np.dot(x2, w_ih.T, out=gates.reshape(num_steps * batch, 4 * hidden))
        elif training:
            w_ih_ops = self._operands(plan, w_ih_p, rows_are_inputs=False, scratch=True)
            scratch.append(w_ih_ops)
        else:
            w_ih_ops = self._forward_operand(plan, w_ih, 4, keep=True)
        h_n, c_n = self._run(
            plan, kernels.forward,
            x2, w_ih_ops, w_hh_ops, bias_p, np.ascontiguousarray(h0), np.ascontiguousarray(c0),
            step_lengths, reverse, plan.bounds, training, plan.mode, projection, 0, gates, rec, y,
            h_states, c_states,
        )
        self._workspaces.give(*scratch)
        saved = None
        if training:
            saved = _NumbaSaved(plan, x2, w_ih_p, w_hh_p, h0, c0, step_lengths, reverse, gates, h_states, c_states)
            self._workspaces.give_when_freed(saved, *saved_buffers)  # its backward may run twice, or never
        return y, h_n, c_n, saved

    def _by_sequences(self, kernel, plan, x, hidden, slices, projection, num_states, *args):
        """Run a cell's forward_sequences kernel (inference, the batch cut into `slices`, each
        slice's input projected as `projection` says): kernel(x2, *args, slices, its scratch, y,
        final states). Returns y and the `num_states` final states."""
        num_steps, batch, input_size = x.shape
        count, rows = slices.count, slices.rows
        gate_rows = _gate_rows(projection, False, num_steps, rows)
        gate_columns = plan.gates * hidden
        take = self._workspaces.take
        scratch = [take((count, size), x.dtype) for size in (num_steps * rows * input_size, num_steps * rows * hidden,
                                                            gate_rows * gate_columns, rows * gate_columns)]
        y = np.empty((num_steps, batch, hidden), x.dtype)
        states = [np.empty((batch, hidden), x.dtype) for _ in range(num_states)]
        self._run(plan, kernel, x.reshape(num_steps * batch, input_size), *args, slices.bounds, *scratch, y, *states,
                  workers=count)
        self._workspaces.give(*scratch)
        return (y, *states)

    def backward_sequence(self, saved: _NumbaSaved, dy, dh_n, dc_n):
        plan = saved.plan
        num_steps, batch, hidden = saved.h_states.shape
        rows, input_size = saved.x2.shape
        dtype = saved.x2.dtype
        take = self._workspaces.take
        d_gates = take(saved.gates.shape, dtype)
        w_hh_ops = self._operands(plan, saved.w_hh_p, rows_are_inputs=True, scratch=True)
        dh0, dc0 = self._run(
            plan, kernels.backward_loop,
            saved.gates, saved.c_states, np.ascontiguousarray(saved.c0), w_hh_ops, dy,
            np.ascontiguousarray(dh_n), np.ascontiguousarray(dc_n), saved.lengths, saved.reverse,
            plan.bounds, plan.max_units, plan.mode, d_gates,
        )
        if not plan.parallel:  # one block, torch's row order: the reference's GEMMs on NumPy's threads
            with self._numpy_blas():
                dx2, dw_ih, dw_hh, dbias = input_and_weight_grads(
                    np, d_gates.reshape(rows, 4 * hidden), saved.x2, saved.w_ih_p, saved.h_states, saved.h0,
                    saved.reverse,
                )
            self._workspaces.give(d_gates, w_hh_ops)
            return dx2.reshape(num_steps, batch, input_size), dh0, dc0, dw_ih, dw_hh, dbias
        dw_ih_p = take((4 * hidden, input_size), dtype)
        dw_hh_p = take((4 * hidden, hidden), dtype)
        dbias_p = take((4 * hidden,), dtype)
        dx2 = np.empty((rows, input_size), dtype)
        mode = _gradients_mode(plan, rows, hidden)
        self._compile_ahead.wait("lstm")
        self._run(
            plan, kernels.gradients,
            d_gates, saved.x2, saved.h_states, np.ascontiguousarray(saved.h0), saved.w_ih_p, saved.reverse,
            plan.bounds, mode is common.GEMM_PACKED, dw_ih_p, dw_hh_p, dbias_p, dx2,
            calls_blas=_gradients_call_blas(mode, input_size),
        )
        # Back from the blocked row order to torch's [i; f; g; o].
        dw_ih, dw_hh, dbias = (plan.unpermute_into(g, np.empty_like(g)) for g in (dw_ih_p, dw_hh_p, dbias_p))
        self._workspaces.give(d_gates, w_hh_ops, dw_ih_p, dw_hh_p, dbias_p)
        return dx2.reshape(num_steps, batch, input_size), dh0, dc0, dw_ih, dw_hh, dbias

    # -- GRU ----------------------------------------------------------------------------
    def _gru_plan(self, batch, hidden, dtype, reset_after, num_threads=None):
        return self._plan(batch, hidden, dtype, gates=3, widths=(3,) if reset_after else (2, 1),
                          num_threads=num_threads)

    def _gru_operands(self, plan, w_hh, reset_after, rows_are_inputs, keep=False):
        """The blocks' rows of W_hh as per-step GEMM operands: (all three gates, None), or
        Cho's (W_hr and W_hz, W_hn). keep: forward operands kept for inference (_forward_operand).
        The backward's (rows_are_inputs) are scratch, for the caller to give back."""
        hidden = w_hh.shape[1]

        def operand(w, gates, permute_gates=None):
            if rows_are_inputs:
                return self._operands(plan, plan.permute(w, permute_gates), rows_are_inputs, gates=gates,
                                      scratch=True)
            return self._forward_operand(plan, w, gates, keep, permute_gates)

        if reset_after:
            return operand(w_hh, 3), None
        return operand(w_hh[: 2 * hidden], 2, permute_gates=2), operand(w_hh[2 * hidden :], 1, permute_gates=1)

    def gru_forward_sequence(self, x, w_ih, w_hh, b_ih, b_hh, h0, lengths, reverse, training, reset_after):
        num_steps, batch, input_size = x.shape
        hidden = w_hh.shape[1]
        dtype = x.dtype
        plan = self._gru_plan(batch, hidden, dtype, reset_after)
        slices = None if training else _sequence_slices(plan, batch, input_size, hidden)
        if slices is not None:  # inference, the batch cut across threads
            one = self._gru_plan(slices.rows, hidden, dtype, reset_after, num_threads=1)
            projection = _slice_projection(one, slices)
            y, h_n = self._by_sequences(
                gru_kernels.forward_sequences, one, x, hidden, slices, projection, 1,
                self._forward_operand(one, w_ih, 3, keep=True), projection,
                *self._gru_operands(one, w_hh, reset_after, rows_are_inputs=False, keep=True),
                np.ascontiguousarray(b_ih), np.ascontiguousarray(b_hh), np.ascontiguousarray(h0),
                _lengths(lengths, num_steps, batch), reverse, one.bounds, one.mode)
            return y, h_n, None
        if training and plan.parallel:
            self._compile_ahead.start("gru", {**_call_description(batch, input_size, hidden, dtype),
                                              "reset_after": bool(reset_after)})
        take = self._workspaces.take
        x2 = x.reshape(num_steps * batch, input_size)
        # The input projection: on the parallel plan each block's, in the kernel (each step's
        # just before it, as the LSTM's, else all steps at the first step; see
        # numba_gru.forward); on one block, all steps in one GEMM on NumPy's BLAS threads.
        if not plan.parallel:
            projection = common.PROJECTED_BY_CALLER
        elif _projects_each_step(plan, batch, training):
            projection = common.PROJECT_EACH_STEP
        else:
            projection = common.PROJECT_AT_FIRST_STEP
        gates = take((_gate_rows(projection, training, num_steps, batch), 3 * hidden), dtype)
        if projection == common.PROJECTED_BY_CALLER:
            w_ih_ops = np.empty((1, 1), dtype)
            with self._numpy_blas():
                np.dot(x2, w_ih.T, out=gates)
        else:
            w_ih_ops = self._forward_operand(plan, w_ih, 3, keep=not training)
        w_ops, w_ops_n = self._gru_operands(plan, w_hh, reset_after, rows_are_inputs=False, keep=not training)
        step_lengths = _lengths(lengths, num_steps, batch)
        rec = take((plan.num_blocks, batch * 3 * plan.max_units), dtype)
        y = np.empty((num_steps, batch, hidden), dtype)
        if training:
            h_states, hidden_n = take((num_steps, batch, hidden), dtype), take((num_steps, batch, hidden), dtype)
        else:
            h_states = hidden_n = np.empty((1, 1, 1), dtype)
        h_n = self._run(
            plan, gru_kernels.forward,
            x2, w_ih_ops, projection, gates, w_ops, w_ops_n, np.ascontiguousarray(b_ih), np.ascontiguousarray(b_hh),
            np.ascontiguousarray(h0),
            step_lengths, reverse, plan.bounds, training, plan.mode, rec, y, h_states, hidden_n,
        )
        self._workspaces.give(rec)
        saved = None
        if training:
            saved = _NumbaSavedGRU(plan, x2, w_ih, w_hh, h0, step_lengths, reverse, reset_after, gates, hidden_n,
                                   h_states)
            self._workspaces.give_when_freed(saved, gates, hidden_n, h_states)  # its backward may run twice, or never
        else:
            self._workspaces.give(gates)
        return y, h_n, saved

    def gru_backward_sequence(self, saved: _NumbaSavedGRU, dy, dh_n):
        plan = saved.plan
        num_steps, batch, hidden = saved.h_states.shape
        rows = num_steps * batch
        two = 2 * hidden
        take = self._workspaces.take
        d_in = take(saved.gates.shape, dy.dtype)
        d_hidden_n = take((rows, hidden), dy.dtype) if saved.reset_after else d_in[:, two:]
        scratch = [d_in, d_hidden_n] if saved.reset_after else [d_in]
        w_ops, w_ops_n = self._gru_operands(plan, saved.w_hh, saved.reset_after, rows_are_inputs=True)
        scratch += [w_ops] if saved.reset_after else [w_ops, w_ops_n]
        dh0 = self._run(
            plan, gru_kernels.backward_loop,
            saved.gates, saved.h_states, np.ascontiguousarray(saved.h0), saved.hidden_n, w_ops, w_ops_n,
            np.ascontiguousarray(dy), np.ascontiguousarray(dh_n), saved.lengths, saved.reverse, plan.bounds,
            plan.max_units, plan.mode, d_in, d_hidden_n if saved.reset_after else d_in,
        )
        # After the loop: dx and the weight gradients as GEMMs over all T*B rows; per block on
        # the parallel plan (Numba's threads, no BLAS threads left spinning), else on NumPy's BLAS.
        dx2 = np.empty(saved.x2.shape, dy.dtype)
        dw_ih = np.empty(saved.w_ih.shape, dy.dtype)
        dw_hh = np.empty((3 * hidden, hidden), dy.dtype)
        db_ih, db_hh = np.empty(3 * hidden, dy.dtype), np.empty(3 * hidden, dy.dtype)
        if plan.parallel:
            self._compile_ahead.wait("gru")
            self._run(
                plan, gru_kernels.gradients,
                d_in, d_hidden_n if saved.reset_after else np.empty((1, 1), dy.dtype), saved.x2, saved.h_states,
                np.ascontiguousarray(saved.h0), saved.hidden_n, np.ascontiguousarray(saved.w_ih), saved.reverse,
                saved.reset_after, plan.bounds, plan.mode is common.GEMM_PACKED, dw_ih, dw_hh, db_ih, db_hh, dx2,
                calls_blas=_gradients_call_blas(plan.mode, saved.x2.shape[1]),
            )
            self._workspaces.give(*scratch)
            return dx2.reshape(num_steps, batch, -1), dh0, dw_ih, dw_hh, db_ih, db_hh
        h_prev = previous_states(np, saved.h_states, saved.h0, saved.reverse).reshape(rows, hidden)
        with self._numpy_blas():
            np.dot(d_in, saved.w_ih, out=dx2)
            np.dot(d_in.T, saved.x2, out=dw_ih)
            np.dot(d_in[:, :two].T, h_prev, out=dw_hh[:two])  # r and z met h
            # W_hn met h (reset_after) or r * h (Cho)
            met = h_prev if saved.reset_after else saved.hidden_n.reshape(rows, hidden)
            np.dot(d_hidden_n.T, met, out=dw_hh[two:])
        np.sum(d_in, axis=0, out=db_ih)
        db_hh[:two] = db_ih[:two]
        np.sum(d_hidden_n, axis=0, out=db_hh[two:])
        self._workspaces.give(*scratch)
        return dx2.reshape(num_steps, batch, -1), dh0, dw_ih, dw_hh, db_ih, db_hh

    # -- streams ------------------------------------------------------------------------
    # A stream's calls run the whole-sequence kernels on weights packed once (per thread
    # count, see _StreamRun), projecting each step's input in the kernel.
    def lstm_stream(self, w_ih, w_hh, bias, batch):
        hidden, dtype = w_hh.shape[1], w_hh.dtype
        unused = np.empty((1, 1, 1), dtype)

        def pack(num_threads):
            plan = self._plan(batch, hidden, dtype, num_threads=num_threads)
            return plan, (self._forward_operand(plan, w_ih, 4, keep=False),
                          self._forward_operand(plan, w_hh, 4, keep=False), plan.permute(bias))

        def run(plan, packed, x2, states, lengths, y, parity):
            w_ih_ops, w_hh_ops, bias_p = packed
            gates = np.empty((plan.num_blocks, batch * 4 * plan.max_units), dtype)
            rec = np.empty_like(gates)
            return self._run(
                plan, kernels.forward,
                x2, w_ih_ops, w_hh_ops, bias_p, *states, lengths, False, plan.bounds, False, plan.mode,
                common.PROJECT_EACH_STEP, parity, gates, rec, y, unused, unused,
                calls_blas=plan.mode == common.GEMM_BLAS,  # batch 1 unpacked: the batch-1 kernel only
            )

        return _StreamRun(pack, run, batch * 4 * hidden * (w_ih.shape[1] + hidden), hidden)

    def gru_stream(self, w_ih, w_hh, b_ih, b_hh, batch, reset_after):
        hidden, dtype = w_hh.shape[1], w_hh.dtype
        unused = np.empty((1, 1, 1), dtype)

        def pack(num_threads):
            plan = self._gru_plan(batch, hidden, dtype, reset_after, num_threads=num_threads)
            w_ops, w_ops_n = self._gru_operands(plan, w_hh, reset_after, rows_are_inputs=False)
            return plan, (self._forward_operand(plan, w_ih, 3, keep=False), w_ops, w_ops_n)

        def run(plan, packed, x2, states, lengths, y, parity):  # no zig-zag: parity unused
            w_ih_ops, w_ops, w_ops_n = packed
            gates = np.empty((x2.shape[0], 3 * hidden), dtype)
            rec = np.empty((plan.num_blocks, batch * 3 * plan.max_units), dtype)
            h_n = self._run(
                plan, gru_kernels.forward,
                x2, w_ih_ops, common.PROJECT_AT_FIRST_STEP, gates, w_ops, w_ops_n, b_ih, b_hh, states[0], lengths,
                False, plan.bounds, False, plan.mode, rec, y, unused, unused,
            )
            return (h_n,)

        return _StreamRun(pack, run, batch * 3 * hidden * (w_ih.shape[1] + hidden), hidden)


# A stream call of fewer multiply-adds than this runs on one thread: a parallel region's start
# and end (~10 us) cost more than a second core saves (one step, batch 1, measured: 4H(I+H) =
# 246K runs 26 us on one thread, 35 on two; 393K: 54 and 42).
_STREAM_PARALLEL_MIN_WORK = 320 * 1024
# Chunk lengths whose lengths array a stream keeps (the first ones seen; a stream's calls
# mostly have one or two).
_STREAM_LENGTHS_KEPT = 8


class _StreamRun:
    """One layer of a stream on the numba backend: ``run(x (T, B, I), states) -> y, states_n``.

    The weights are packed for a thread count the first time a call needs it (one thread for
    calls too small to split, else every thread the kernels may use, which
    ``fastlstm.set_num_threads`` may change between calls) and kept; a call then costs its
    kernel and a few small buffers. What a call changes is a speed hint only (the LSTM's
    first panel order, zig-zag from call to call): any number of streams and threads may
    share it."""

    def __init__(self, pack, run, step_work: int, hidden: int):
        self._pack, self._run, self._step_work, self._hidden = pack, run, step_work, hidden
        self._packed = {}  # threads -> (plan, packed weights)
        self._lengths = {}  # T -> (B,) array of T (the kernels' lengths: every step runs), never written
        self._parity = 0  # the next call's first panel order (zig-zag across calls, numba_common)

    def __call__(self, x, states):
        num_steps, batch, _ = x.shape
        num_threads = _numba_threads() if num_steps * self._step_work >= _STREAM_PARALLEL_MIN_WORK else 1
        entry = self._packed.get(num_threads)
        if entry is None:  # two threads may both pack: either result is right, one is kept
            entry = self._packed.setdefault(num_threads, self._pack(num_threads))
        lengths = self._lengths.get(num_steps)
        if lengths is None:
            lengths = np.full(batch, num_steps, np.int64)
            if len(self._lengths) < _STREAM_LENGTHS_KEPT:
                self._lengths[num_steps] = lengths
        plan, packed = entry
        y = np.empty((num_steps, batch, self._hidden), x.dtype)
        parity = self._parity
        self._parity = (parity + num_steps) & 1  # raced by streams on other threads: costs speed, no bit
        states_n = self._run(plan, packed, x.reshape(num_steps * batch, -1), tuple(states), lengths, y, parity)
        return y, states_n


def _projects_each_step(plan: _Plan, batch: int, training: bool) -> bool:
    """Whether a forward kernel projects each step's input just before the step
    (_STEPWISE_PROJECTION_MIN_BATCH): from batch 16 on, for inference, or for training with
    the packed GEMM."""
    return batch >= _STEPWISE_PROJECTION_MIN_BATCH and (not training or plan.mode is common.GEMM_PACKED)


@dataclass(frozen=True)
class _Slices:
    """An inference call's batch cut into slices of sequences, one a thread (forward_sequences)."""
    bounds: np.ndarray  # slice w: sequences bounds[w] .. bounds[w + 1]
    rows: int  # sequences of the largest slice

    @property
    def count(self) -> int:
        return len(self.bounds) - 1


def _sequence_slices(plan: _Plan, batch: int, input_size: int, hidden: int):
    """The slices for an inference call, or None where the units stay cut (one thread, few
    sequences, much work a step)."""
    step_work = batch * (input_size + hidden) * plan.gates * hidden
    if not plan.parallel or batch < 2 * _SLICE_MIN_ROWS or step_work > _SLICE_MAX_STEP_WORK:
        return None
    return _slices(batch, min(plan.num_blocks, batch // _SLICE_MIN_ROWS))


@functools.lru_cache(maxsize=_PLANS_KEPT)
def _slices(batch: int, count: int) -> _Slices:
    bounds = common.block_bounds(batch, count)
    bounds.flags.writeable = False  # shared by every call of this shape
    return _Slices(bounds, int(np.diff(bounds).max()))


def _slice_projection(plan: _Plan, slices: _Slices) -> int:
    """How a forward_sequences kernel projects its slices' input (their one-block plan)."""
    stepwise = _projects_each_step(plan, slices.rows, False)
    return common.PROJECT_EACH_STEP if stepwise else common.PROJECT_AT_FIRST_STEP


def _lengths(lengths, num_steps: int, batch: int) -> np.ndarray:
    """Each sequence's length (all num_steps where `lengths` is None)."""
    return np.full(batch, num_steps, np.int64) if lengths is None else lengths


def _gate_rows(projection: int, training: bool, num_steps: int, batch: int) -> int:
    """Rows of a forward's gate buffer: one step's where each step is projected just before
    it and nothing is kept (inference), else every step's (the kernels index it alike)."""
    return batch if projection == common.PROJECT_EACH_STEP and not training else num_steps * batch


def _call_description(batch: int, input_size: int, hidden: int, dtype) -> dict:
    """What a compile-ahead helper needs to compile a training call's gradients kernel
    (numba_compile_ahead): what decides its argument types (the plan, the dtype)."""
    return {"batch": batch, "input_size": input_size, "hidden": hidden, "dtype": np.dtype(dtype).name,
            "threads": _numba_threads()}


def _gradients_mode(plan: _Plan, rows: int, hidden: int) -> int:
    """The GEMM mode of the LSTM's gradients after the backward loop over `rows` (T*B) rows
    (see _GRADIENTS_BY_BLAS)."""
    large = rows >= _GRADIENTS_BLAS_MIN_ROWS and 4 * hidden >= _GRADIENTS_BLAS_MIN_COLUMNS
    return common.GEMM_BLAS if _GRADIENTS_BY_BLAS and large else plan.mode


def _gradients_call_blas(mode: int, input_size: int) -> bool:
    """Whether a gradients kernel (LSTM's or GRU's) calls BLAS: unless the micro-kernel does all
    its GEMMs, which needs every output's width (input_size, hidden; hidden already is) in
    whole panels (numba_common._gemm_tall). Where it does not, no BLAS limit is set (threadpoolctl
    takes ~20-40 us a call)."""
    return mode != common.GEMM_PACKED or input_size % common.PANEL != 0


def _cached_functions() -> list:
    """Every compiled function of the kernels' modules: the kernels a call starts and those
    they call (numba_common._call, _launch), each compiled and cached on its own."""
    return [function for module in (common, kernels, gru_kernels) for function in vars(module).values()
            if isinstance(function, numba.core.registry.CPUDispatcher) and function.py_func.__module__ == module.__name__
            and isinstance(function._cache, numba.core.caching.FunctionCache)]


def cache_status() -> str:
    """What `fastlstm info` says of Numba's cache: how many of the kernels' compiled functions
    have code compiled for this CPU in it (loaded in well under a second), and where it is; a
    function not there compiles on its first call (seconds each). Reads Numba's cache index
    through its internals: "unknown" where they differ."""
    try:
        functions = _cached_functions()
        cached = sum(cached_here(function) for function in functions)
        folder = functions[0]._cache._cache_path
    except Exception as exc:  # noqa: BLE001 - a report, never a failure
        return f"unknown ({type(exc).__name__}: {exc})"
    state = "warm" if cached == len(functions) else "cold" if cached == 0 else "partly warm"
    return (f"{state}: {cached} of {len(functions)} compiled functions of the kernels are there for this CPU, in "
            f"{folder} (one not there compiles on its first call: 1-5 s each)")


def _numba_threads() -> int:
    """Threads the kernels run on: fastlstm's count, at most the size of Numba's pool
    (NUMBA_NUM_THREADS, fixed when Numba starts, e.g. by a narrowed CPU affinity); one in a
    child forked after GNU OpenMP ran here (see _after_fork_in_child)."""
    if _openmp_unusable_after_fork:
        return 1
    return min(threads.get_num_threads(), numba.config.NUMBA_NUM_THREADS)


# GNU OpenMP cannot run in a child forked after it started (Numba's omp layer aborts the
# child: "fork() called from a process already using GNU OpenMP"): such a child runs every
# kernel on its own thread (one worker calls no OpenMP). The other layers (tbb,
# workqueue) keep their threads across fork.
_openmp_unusable_after_fork = False


def _after_fork_in_child() -> None:
    global _openmp_unusable_after_fork
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel kernel has run: nothing started yet
        return
    if layer == "omp":
        _openmp_unusable_after_fork = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def create_backend() -> NumbaBackend:
    if numba.config.DISABLE_JIT:
        raise RuntimeError(
            "NUMBA_DISABLE_JIT is set: the numba backend's kernels must be compiled (they use LLVM "
            "intrinsics that have no pure-Python form); unset it, or use backend='numpy'"
        )
    return NumbaBackend()
