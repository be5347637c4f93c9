"""Numba CPU kernels for one LSTM layer and direction over a whole sequence.

Work is split by hidden units into blocks, one block per thread. A block owns the
four gates of its units: its rows of the (permuted) weights, its columns of the
gate buffers, its units of the cell state. Per time step each block runs one GEMM
for all four gates of its units (float32: a register-tiled micro-kernel over weights
packed once per sequence; otherwise single-threaded BLAS, or a hand-written kernel
for batch 1) and then the fused pointwise cell update. The whole time loop is one
parallel region: the workers meet at a spin barrier after each step (see "step
synchronisation"), and the only state shared between blocks is h (dh in the
backward), double-buffered. So there is one fork/join per sequence, no BLAS thread
pool competing with Numba's threads, and each thread's weights stay in its core's
cache from step to step. Problems too small to split run one block on the calling
thread (the ``*_serial`` kernels); their caller does the input projection and the
weight gradients as NumPy GEMMs on BLAS's own threads. On the parallel plan the
weight and input gradients after the loop run per block too (``gradients``),
through the same micro-kernel with the operands read in place.

Permuted layout: block k covers units [u0, u1) (nu of them); its gate columns are
[i(u0:u1), f(u0:u1), g(u0:u1), o(u0:u1)], stored contiguously per block as
(T*B, 4*nu) in a flat (num_blocks, T*B*4*max_nu) buffer. ``block_permutation``
gives the row order of the weights that matches.

Activations: float32 uses a clamped odd rational approximation of tanh (own fit,
max abs error 3.7e-7 in float32 arithmetic; sigma(x) = tanh(x/2)/2 + 1/2), built
from multiply, add, divide and compares only so that LLVM vectorizes it; float64
uses libm (exact, scalar). They live in this file rather than their own module
because Numba's cache only checks the source file of the cached function itself.

All kernels use error_model="numpy": the default "python" model puts a zero test
before every division, which stops the loops from vectorizing.
"""

from __future__ import annotations

import math
from types import FunctionType

import numpy as np
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

_OPTS = dict(cache=True, error_model="numpy", fastmath={"contract"})


def _parallel_and_serial(body):
    """Compile one body twice: on threads (prange runs in parallel) and on the calling
    thread (prange is then a plain range: no threads to start for small problems).

    The serial copy gets its own qualified name because Numba's cache tells cached
    functions apart by name and line, not by compile options.
    """
    serial_body = FunctionType(body.__code__, body.__globals__, body.__name__ + "_serial",
                               body.__defaults__, body.__closure__)
    serial_body.__qualname__ = body.__qualname__ + "_serial"
    serial_body.__doc__ = body.__doc__
    return njit(parallel=True, **_OPTS)(body), njit(**_OPTS)(serial_body)


# -- activations ----------------------------------------------------------------------
_F = np.float32
_CLAMP = _F(7.9)  # tanh(7.9) = 1 - 2.7e-7
_P0, _P1, _P2, _P3, _P4, _P5 = (
    _F(1.0000000346190072),
    _F(0.1288114704612534),
    _F(0.0028790625605799865),
    _F(8.86499076751633e-06),
    _F(-1.1450219355761799e-08),
    _F(1.4370813822891392e-11),
)
_Q0, _Q1, _Q2 = _F(0.4621443089688248), _F(0.023594652236063395), _F(0.00022220457612625707)
_ONE, _HALF = _F(1.0), _F(0.5)


@njit(inline="always")
def _tanh_rational(x):
    # Compare-and-select (not min/max) so that NaN passes through as NaN.
    y = x
    if y > _CLAMP:
        y = _CLAMP
    if y < -_CLAMP:
        y = -_CLAMP
    z = y * y
    num = y * (_P0 + z * (_P1 + z * (_P2 + z * (_P3 + z * (_P4 + z * _P5)))))
    out = num / (_ONE + z * (_Q0 + z * (_Q1 + z * _Q2)))
    if x >= _CLAMP:  # saturated: exactly +-1 (the fit gives 1 - 3.6e-7 there)
        out = _ONE
    if x <= -_CLAMP:
        out = -_ONE
    return out


def tanh(x):
    """tanh for float32 (vectorizing approximation) and float64 (libm) inside kernels."""
    raise NotImplementedError("only callable from Numba-compiled code")


def sigmoid(x):
    """Logistic function inside kernels; never overflows."""
    raise NotImplementedError("only callable from Numba-compiled code")


@overload(tanh)
def _tanh_overload(x):
    if x == types.float32:
        return lambda x: _tanh_rational(x)
    return lambda x: math.tanh(x)


@overload(sigmoid)
def _sigmoid_overload(x):
    if x == types.float32:
        return lambda x: _HALF * _tanh_rational(_HALF * x) + _HALF

    def exact(x):
        e = math.exp(-abs(x))
        return 1.0 / (1.0 + e) if x >= 0 else e / (1.0 + e)

    return exact


@njit(**_OPTS)
def apply_tanh(values, out):
    """Elementwise tanh as the kernels compute it (for tests of accuracy)."""
    for n in range(values.shape[0]):
        out[n] = tanh(values[n])


@njit(**_OPTS)
def apply_sigmoid(values, out):
    for n in range(values.shape[0]):
        out[n] = sigmoid(values[n])


# -- blocking -------------------------------------------------------------------------
def block_bounds(hidden: int, num_blocks: int) -> np.ndarray:
    """Unit boundaries of `num_blocks` near-equal blocks (sizes kept multiples of 8 when possible)."""
    num_blocks = max(1, min(num_blocks, hidden))
    step = hidden / num_blocks
    cuts = [0]
    for k in range(1, num_blocks):
        cut = int(round(k * step / 8.0)) * 8 if hidden >= 8 * num_blocks else int(round(k * step))
        cuts.append(min(max(cut, cuts[-1] + 1), hidden - (num_blocks - k)))
    cuts.append(hidden)
    return np.asarray(cuts, dtype=np.int64)


def block_permutation(bounds: np.ndarray, hidden: int) -> np.ndarray:
    """Row order that turns torch's [i; f; g; o] gate rows into per-block gate groups."""
    rows = []
    for u0, u1 in zip(bounds[:-1], bounds[1:]):
        for gate in range(4):
            rows.append(np.arange(gate * hidden + u0, gate * hidden + u1))
    return np.concatenate(rows).astype(np.int64)


@njit(inline="always")
def _block_view(flat, k, rows, cols):
    """Block k's contiguous (rows, cols) region of a flat per-block buffer."""
    return flat[k, : rows * cols].reshape((rows, cols))


# -- step synchronisation ---------------------------------------------------------------
# The parallel kernels run the whole time loop inside one parallel region: worker w does
# block w at every step and waits at a spin barrier for the other blocks before the next
# step (a fork/join per step costs ~1.6 us on this machine; a barrier ~0.1-0.3 us). Blocks
# are *claimed* (an atomic counter per block and step), not owned: a worker that has waited
# long for a block nobody has started, or whose partner worker has not even started (a
# threading layer may run the workers one after another, e.g. TBB under nested
# parallelism), does that block itself. So no schedule can deadlock; normally each worker
# only ever claims its own block, and its weights stay in its core's cache.
#
# Layout of the int64 sync array: a header [workers started, lone worker seen], then per
# step the claim count of each block and the step's done count.
_SYNC_HEADER = 2
_SPINS_BEFORE_STEALING = 1 << 16  # pause instructions, ~1-3 ms: far above a normal wait


@intrinsic
def _atomic_add(typingctx, address, value):
    """*address += value as one atomic read-modify-write (sequentially consistent); returns
    the old value. The barrier's release: every write before it is visible to whoever sees it."""
    sig = types.int64(types.intp, types.int64)

    def codegen(context, builder, signature, args):
        pointer = builder.inttoptr(args[0], ir.IntType(64).as_pointer())
        return builder.atomic_rmw("add", pointer, args[1], "seq_cst")

    return sig, codegen


@intrinsic
def _atomic_load(typingctx, address):
    """*address read atomically with acquire order: no later read moves before it."""
    sig = types.int64(types.intp)

    def codegen(context, builder, signature, args):
        pointer = builder.inttoptr(args[0], ir.IntType(64).as_pointer())
        return builder.load_atomic(pointer, "acquire", 8)

    return sig, codegen


_X86 = llvm_binding.get_process_triple().startswith(("x86_64", "i686", "i386"))


@intrinsic
def _spin_pause(typingctx):
    """A spin-wait hint (x86 `pause`: frees the core's resources, saves power); a no-op elsewhere."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        if _X86:
            pause = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                   "llvm.x86.sse2.pause")
            builder.call(pause, [])
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always")
def _new_sync(num_steps, num_blocks):
    """A fresh sync array for one call of a time-loop kernel."""
    return np.zeros(_SYNC_HEADER + num_steps * (num_blocks + 1), np.int64)


@njit(inline="always")
def _try_claim(address):
    # Read first: a claimed block costs a shared read, not a write to the other core's line.
    return _atomic_load(address) == 0 and _atomic_add(address, 1) == 0


@njit(inline="always")
def _claim_block(sync, s, w, num_blocks):
    """The next block of step s for worker w (one worker per block) to run, or -1 once all
    the step's blocks are done (the barrier). Own block first. Another block only if
    nobody has claimed it and this worker has waited long for it, or a worker is missing
    (not started) and one has already waited long for it once in this call. Call again
    after running the block."""
    started, lone = sync.ctypes.data, sync.ctypes.data + 8
    base = sync.ctypes.data + 8 * (_SYNC_HEADER + s * (num_blocks + 1))
    done = base + 8 * num_blocks
    if _try_claim(base + 8 * w):
        return np.int64(w)  # a prange index may be unsigned: keep one signed return type
    spins = 0
    while _atomic_load(done) < num_blocks:
        missing = _atomic_load(started) < num_blocks
        if spins >= _SPINS_BEFORE_STEALING or (missing and _atomic_load(lone) > 0):
            if missing:
                _atomic_add(lone, 1)
            for k in range(num_blocks):
                if _try_claim(base + 8 * k):
                    return np.int64(k)
        spins += 1
        _spin_pause()
    return np.int64(-1)


@njit(inline="always")
def _block_done(sync, s, num_blocks):
    _atomic_add(sync.ctypes.data + 8 * (_SYNC_HEADER + s * (num_blocks + 1) + num_blocks), 1)


@njit(inline="always")
def _worker_started(sync):
    _atomic_add(sync.ctypes.data, 1)


# -- per-step GEMMs ---------------------------------------------------------------------
# How a kernel multiplies by a weight block (the caller lays the operand out to match):
GEMM_BLAS = 0  # np.dot (scipy's BLAS, one thread); operand (K, N) row-major
GEMM_SMALL = 1  # _matmul_small, batch 1; operand (K, N) row-major
GEMM_PACKED = 2  # _gemm_packed, float32; operand (N / PANEL, K, PANEL) column panels

# Packed float32 GEMM: the operand is packed once per sequence into column panels, and
# a register-tiled micro-kernel (LLVM vector IR, below) multiplies by it with no
# per-call packing, which is what BLAS spends 20-40 % of a small per-step GEMM on.
# Tile shapes fit the vector registers: 32 of 512 bits with AVX-512, 16 of 256 without.
_AVX512 = "+avx512f" in llvm_binding.get_host_cpu_features().flatten().split(",")
_LANES = 16 if _AVX512 else 8  # float32 per vector register
PANEL = 2 * _LANES  # columns per panel: two vectors
_TILE_ROWS = 8 if _AVX512 else 6  # 16 (12) accumulators + 2 operand vectors + 1 broadcast


def _tile_kernel(rows):
    """An intrinsic computing C[rows, PANEL] (+)= A[rows, K] @ B[K, PANEL] for one panel.

    Arguments are addresses and element strides: (a, a_row, a_col, b, ldb, c, ldc, K,
    accumulate): A[m, k] at a + m * a_row + k * a_col (so A may be a transposed view),
    B[k, 0:PANEL] at b + k * ldb (a packed panel: ldb = PANEL), C[m, 0:PANEL] at c + m * ldc.
    The accumulators stay in registers across the whole K loop (SSA phi values).
    """
    vec = ir.VectorType(ir.FloatType(), _LANES)
    i64 = ir.IntType(64)

    @intrinsic
    def tile(typingctx, a, a_row, a_col, b, ldb, c, ldc, inner, accumulate):
        sig = types.void(*([types.intp] * 8), types.boolean)

        def codegen(context, builder, signature, args):
            a_addr, a_row_v, a_col_v, p_addr, ldb_v, c_addr, ldc_v, k_count, accum = args
            fptr = ir.FloatType().as_pointer()
            a_ptr, p_ptr, c_ptr = (builder.inttoptr(v, fptr) for v in (a_addr, p_addr, c_addr))
            fma = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(vec, [vec, vec, vec]), f"llvm.fma.v{_LANES}f32")
            zero = ir.Constant(vec, [0.0] * _LANES)
            splat_mask = ir.Constant(ir.VectorType(ir.IntType(32), _LANES), [0] * _LANES)
            entry = builder.block
            loop = builder.append_basic_block("tile_loop")
            done = builder.append_basic_block("tile_done")
            builder.cbranch(builder.icmp_signed(">", k_count, ir.Constant(i64, 0)), loop, done)

            builder.position_at_end(loop)
            kk = builder.phi(i64)
            kk.add_incoming(ir.Constant(i64, 0), entry)
            acc = [[builder.phi(vec) for _ in range(2)] for _ in range(rows)]
            for row in acc:
                for phi in row:
                    phi.add_incoming(zero, entry)
            p_row = builder.mul(kk, ldb_v)
            a_col_offset = builder.mul(kk, a_col_v)
            operands = []
            for v in range(2):
                address = builder.gep(p_ptr, [builder.add(p_row, ir.Constant(i64, v * _LANES))])
                load = builder.load(builder.bitcast(address, vec.as_pointer()))
                load.align = 4
                operands.append(load)
            updated = []
            for m in range(rows):
                a_offset = builder.add(builder.mul(ir.Constant(i64, m), a_row_v), a_col_offset)
                a_val = builder.load(builder.gep(a_ptr, [a_offset]))
                splat = builder.shuffle_vector(
                    builder.insert_element(ir.Constant(vec, ir.Undefined), a_val, ir.Constant(ir.IntType(32), 0)),
                    ir.Constant(vec, ir.Undefined), splat_mask)
                updated.append([builder.call(fma, [splat, operands[v], acc[m][v]]) for v in range(2)])
            k_next = builder.add(kk, ir.Constant(i64, 1))
            kk.add_incoming(k_next, loop)
            for m in range(rows):
                for v in range(2):
                    acc[m][v].add_incoming(updated[m][v], loop)
            builder.cbranch(builder.icmp_signed("<", k_next, k_count), loop, done)

            builder.position_at_end(done)
            totals = [[builder.phi(vec) for _ in range(2)] for _ in range(rows)]  # phis first
            for m in range(rows):
                for v in range(2):
                    totals[m][v].add_incoming(zero, entry)
                    totals[m][v].add_incoming(updated[m][v], loop)
            for m in range(rows):
                for v in range(2):
                    total = totals[m][v]
                    offset = builder.add(builder.mul(ir.Constant(i64, m), ldc_v), ir.Constant(i64, v * _LANES))
                    address = builder.bitcast(builder.gep(c_ptr, [offset]), vec.as_pointer())
                    old = builder.load(address)
                    old.align = 4
                    store = builder.store(builder.select(accum, builder.fadd(old, total), total), address)
                    store.align = 4
            return context.get_dummy_value()

        return sig, codegen

    return tile


_tile_big = _tile_kernel(_TILE_ROWS)
_tile_4 = _tile_kernel(4)
_tile_1 = _tile_kernel(1)


@njit(inline="always")
def _tiles_of_panel(a_addr, a_row, a_col, rows, b_addr, ldb, c_addr, ldc, inner, accumulate):
    """C[:, panel] (+)= A @ B[:, panel] for all `rows` rows of A, in register tiles."""
    m = 0
    while m + _TILE_ROWS <= rows:
        _tile_big(a_addr + m * a_row * 4, a_row, a_col, b_addr, ldb, c_addr + m * ldc * 4, ldc, inner, accumulate)
        m += _TILE_ROWS
    while m + 4 <= rows:
        _tile_4(a_addr + m * a_row * 4, a_row, a_col, b_addr, ldb, c_addr + m * ldc * 4, ldc, inner, accumulate)
        m += 4
    while m < rows:
        _tile_1(a_addr + m * a_row * 4, a_row, a_col, b_addr, ldb, c_addr + m * ldc * 4, ldc, inner, accumulate)
        m += 1


@njit(inline="always")
def _gemm_packed(a, panels, c, accumulate):
    """c (M, N) (+)= a (M, K) @ W for float32, W packed as panels (N / PANEL, K, PANEL).

    a and c may be row slices of larger arrays (unit stride along rows).
    """
    rows, inner = a.shape
    lda = a.strides[0] // 4
    ldc = c.strides[0] // 4
    a_addr, c_addr, p_addr = a.ctypes.data, c.ctypes.data, panels.ctypes.data
    for p in range(panels.shape[0]):
        _tiles_of_panel(a_addr, lda, 1, rows, p_addr + p * inner * PANEL * 4, PANEL, c_addr + p * PANEL * 4, ldc,
                        inner, accumulate)


# The weight and input gradients multiply tall operands (K = T*B rows): K is cut into
# chunks whose A and B parts stay in L2 (1 MiB a core here) while every tile reuses them.
_K_CHUNK = 128


@njit(inline="always")
def _gemm_unpacked(a, a_transposed, b, c, accumulate):
    """c (M, N) (+)= op(a) @ b for float32 with N a multiple of PANEL, b read in place.

    op(a) = a (M, K), or a.T when a_transposed (a is (K, M)); a, b and c may be row
    slices of larger arrays (unit stride along rows).
    """
    rows, cols = c.shape
    inner = a.shape[0] if a_transposed else a.shape[1]
    lda, ldb, ldc = a.strides[0] // 4, b.strides[0] // 4, c.strides[0] // 4
    a_row, a_col = (1, lda) if a_transposed else (lda, 1)
    for k0 in range(0, inner, _K_CHUNK):
        kc = min(_K_CHUNK, inner - k0)
        a_addr = a.ctypes.data + k0 * a_col * 4
        b_addr = b.ctypes.data + k0 * ldb * 4
        for p in range(cols // PANEL):
            _tiles_of_panel(a_addr, a_row, a_col, rows, b_addr + p * PANEL * 4, ldb, c.ctypes.data + p * PANEL * 4,
                            ldc, kc, accumulate or k0 > 0)


@njit(inline="always")
def _panels(operand, inner, cols):
    """A flat GEMM_PACKED operand as its (cols / PANEL, inner, PANEL) column panels."""
    return operand[: inner * cols].reshape((cols // PANEL, inner, PANEL))


@njit(inline="always")
def _gemm(a, operand, inner, cols, out, mode):
    """out (M, cols) = a (M, inner) @ W, W the flat block operand laid out for `mode`."""
    if mode == GEMM_PACKED:
        _gemm_packed(a, _panels(operand, inner, cols), out, False)
    else:
        w = operand[: inner * cols].reshape((inner, cols))
        if mode == GEMM_SMALL:
            _matmul_small(a, w, out)
        else:
            np.dot(a, w, out)


@intrinsic
def _transpose_tile(typingctx, src, src_stride, dst, dst_stride):
    """dst[j, i] = src[i, j] for a _LANES x _LANES float32 tile: (src, src_stride) and
    (dst, dst_stride) are the tiles' addresses and row strides in elements. The rows are
    loaded as vectors and transposed in registers (log2(_LANES) rounds of shuffles that
    swap the off-diagonal blocks of every 2b x 2b block): 3-6x faster than element copies."""
    vec = ir.VectorType(ir.FloatType(), _LANES)
    i64 = ir.IntType(64)
    sig = types.void(types.intp, types.intp, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        src_addr, src_step, dst_addr, dst_step = args

        def row_pointer(address, step, i):
            offset = builder.mul(ir.Constant(i64, i * 4), step)
            return builder.inttoptr(builder.add(address, offset), vec.as_pointer())

        rows = []
        for i in range(_LANES):
            load = builder.load(row_pointer(src_addr, src_step, i))
            load.align = 4
            rows.append(load)
        mask_type = ir.VectorType(ir.IntType(32), _LANES)
        block = 1
        while block < _LANES:  # rows i and i + block swap their off-diagonal block x block parts
            low = ir.Constant(mask_type, [j if j & block == 0 else _LANES + (j ^ block) for j in range(_LANES)])
            high = ir.Constant(mask_type, [j ^ block if j & block == 0 else _LANES + j for j in range(_LANES)])
            swapped = list(rows)
            for i in range(_LANES):
                if i & block == 0:
                    swapped[i] = builder.shuffle_vector(rows[i], rows[i + block], low)
                    swapped[i + block] = builder.shuffle_vector(rows[i], rows[i + block], high)
            rows = swapped
            block *= 2
        for j in range(_LANES):
            store = builder.store(rows[j], row_pointer(dst_addr, dst_step, j))
            store.align = 4
        return context.get_dummy_value()

    return sig, codegen


@njit(**_OPTS)
def pack_operands(w_p, bounds, mode, rows_are_inputs, out):
    """Lay out each block's weight rows as the operand of a per-step GEMM, flat in out[k].

    w_p: (4H, K) permuted weights; block k owns rows [4*u0, 4*u1). rows_are_inputs:
    False for the forward (block rows are GEMM outputs: W_blk^T, (K, 4nu)), True for the
    backward's recurrent GEMM (block rows are GEMM inputs: W_blk itself, (4nu, K)).
    """
    width = w_p.shape[1]
    for k in range(bounds.shape[0] - 1):
        r0 = 4 * bounds[k]
        n_rows = 4 * bounds[k + 1] - r0
        if rows_are_inputs:  # operand (4nu, K)
            if mode == GEMM_PACKED:
                dst = out[k, : n_rows * width].reshape((width // PANEL, n_rows, PANEL))
                for p in range(width // PANEL):
                    for i in range(n_rows):
                        for q in range(PANEL):  # a plain loop: a slice copy per row costs a view
                            dst[p, i, q] = w_p[r0 + i, p * PANEL + q]
            else:
                out[k, : n_rows * width] = w_p[r0 : r0 + n_rows].ravel()
        elif mode == GEMM_PACKED:  # operand (K, 4nu) as column panels: float32 only
            dst = out[k, : n_rows * width].reshape((n_rows // PANEL, width, PANEL))
            ld = w_p.strides[0] // 4
            whole = width - width % _LANES
            for p in range(n_rows // PANEL):
                for i0 in range(0, PANEL, _LANES):  # dst[p, j, i] = w_p[r0 + p * PANEL + i, j]
                    row0 = r0 + p * PANEL + i0
                    for j0 in range(0, whole, _LANES):
                        _transpose_tile(w_p.ctypes.data + (row0 * ld + j0) * 4, ld,
                                        dst.ctypes.data + ((p * width + j0) * PANEL + i0) * 4, PANEL)
                    for j in range(whole, width):
                        for i in range(_LANES):
                            dst[p, j, i0 + i] = w_p[row0 + i, j]
        else:  # operand (K, 4nu): the transpose, in 16x16 tiles
            dst = _block_view(out, k, width, n_rows)
            for i0 in range(0, n_rows, 16):
                for j0 in range(0, width, 16):
                    for i in range(i0, min(i0 + 16, n_rows)):
                        for j in range(j0, min(j0 + 16, width)):
                            dst[j, i] = w_p[r0 + i, j]


# -- small GEMMs ------------------------------------------------------------------------
@njit(inline="always")
def _matmul_small(a, b, out):
    """out (M, N) = a (M, K) @ b (K, N) as rank-four updates that vectorize along N.

    For batch 1, where BLAS dispatches to a slower matrix-vector path and its call
    overhead is a large share; BLAS wins from batch 2 on (measured on AVX-512).
    """
    rows, inner = a.shape
    cols = b.shape[1]
    inner4 = inner - inner % 4
    for m in range(rows):
        o = out[m]
        o[:] = 0
        for q in range(0, inner4, 4):
            s0, s1, s2, s3 = a[m, q], a[m, q + 1], a[m, q + 2], a[m, q + 3]
            b0, b1, b2, b3 = b[q], b[q + 1], b[q + 2], b[q + 3]
            for n in range(cols):
                o[n] += s0 * b0[n] + s1 * b1[n] + s2 * b2[n] + s3 * b3[n]
        for q in range(inner4, inner):
            s = a[m, q]
            bq = b[q]
            for n in range(cols):
                o[n] += s * bq[n]


# -- pointwise cell ---------------------------------------------------------------------
# Row copies as plain loops: Numba's slice assignment and in-place array operators check
# for overlap and broadcast on every call, which costs more than the few vectors they move.
@njit(inline="always")
def _copy(src, dst):
    for j in range(dst.shape[0]):
        dst[j] = src[j]


@njit(inline="always")
def _add(src, dst):
    for j in range(dst.shape[0]):
        dst[j] += src[j]


@njit(inline="always")
def _fill(dst, value):
    for j in range(dst.shape[0]):
        dst[j] = value


# One sequence's units of one block. Written so that LLVM vectorizes every loop: each
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
@njit(**_OPTS)
def _forward_block_step(k, t, row0, bounds, gates, w_hh_ops, bias_p, h, h_next, c, rec,
                        lengths, y, h_states, c_states, training, mode):
    """Block k's step t: its gate rows row0 .. row0 + B of `gates` hold the input projection
    and become the activated gates."""
    batch, hidden = h.shape
    u0 = bounds[k]
    nu = bounds[k + 1] - u0
    g_t = _block_view(gates, k, row0 + batch, 4 * nu)[row0:]
    if mode == GEMM_PACKED:  # the recurrent part accumulates straight into the gate rows
        _gemm_packed(h, _panels(w_hh_ops[k], hidden, 4 * nu), g_t, True)
    else:
        r = _block_view(rec, k, batch, 4 * nu)
        _gemm(h, w_hh_ops[k], hidden, 4 * nu, r, mode)
        for b in range(batch):
            _add(r[b], g_t[b])
    b_k = bias_p[4 * u0 : 4 * u0 + 4 * nu]
    for b in range(batch):
        h_row = h_next[b, u0 : u0 + nu]
        c_row = c[b, u0 : u0 + nu]
        y_row = y[t, b, u0 : u0 + nu]
        if t < lengths[b]:
            _cell_forward(g_t[b], b_k, c_row, h_row)
            _copy(h_row, y_row)
        else:  # past this sequence's end: carry the state, output zeros
            _copy(h[b, u0 : u0 + nu], h_row)
            _fill(y_row, 0)
        if training:
            _copy(h_row, h_states[t, b, u0 : u0 + nu])
            _copy(c_row, c_states[t, b, u0 : u0 + nu])


@njit(**_OPTS)
def _input_projection_block(k, bounds, x2, w_ih_ops, gates, mode):
    """Block k's input projection of the rows of x2 into the first rows of its gate buffer."""
    nu = bounds[k + 1] - bounds[k]
    g_k = _block_view(gates, k, x2.shape[0], 4 * nu)
    _gemm(x2, w_ih_ops[k], x2.shape[1], 4 * nu, g_k, GEMM_PACKED if mode == GEMM_PACKED else GEMM_BLAS)


# Where the forward's input projection x W_ih^T comes from:
PROJECTED_BY_CALLER = 0  # the caller has put it into the gate buffer (all steps)
PROJECT_AT_FIRST_STEP = 1  # each block projects all steps at the first step (a tall GEMM)
PROJECT_EACH_STEP = 2  # each block projects each step's rows just before it (inference only:
#                        the gate buffer holds one step, so no gates go through memory)


def _forward(x2, w_ih_ops, w_hh_ops, bias_p, h0, c0, lengths, reverse, bounds, training,
             mode, projection, gates, rec, y, h_states, c_states):
    """Whole-sequence forward, one block of hidden units per thread. Returns (h_n, c_n).

    x2: (T*B, I) input; w_ih_ops / w_hh_ops: each block's weight rows laid out as GEMM
    operands for `mode` (pack_operands); projection: PROJECTED_BY_CALLER, PROJECT_AT_FIRST_STEP
    or PROJECT_EACH_STEP; gates: (num_blocks, R*4*max_nu) scratch, R = B for PROJECT_EACH_STEP
    and T*B otherwise, that holds the activated gates of every step afterwards when training;
    rec: (num_blocks, B*4*max_nu) scratch; h_states / c_states: (T, B, H) carried states,
    written only when training.
    """
    num_blocks = bounds.shape[0] - 1
    num_steps, batch = y.shape[0], y.shape[1]
    h_buffers = np.empty((2,) + h0.shape, h0.dtype)  # step s reads h from [s % 2], writes the other
    h_buffers[0] = h0
    c = c0.copy()
    sync = _new_sync(num_steps, num_blocks)
    for w in prange(num_blocks):  # one worker per block, each running the whole time loop
        _worker_started(sync)
        for s in range(num_steps):
            t = num_steps - 1 - s if reverse else s
            h, h_next = h_buffers[s & 1], h_buffers[(s + 1) & 1]
            row0 = 0 if projection == PROJECT_EACH_STEP else t * batch  # this step's gate rows
            k = _claim_block(sync, s, w, num_blocks)
            while k >= 0:
                # A block's steps read only its own gate columns: it can project its input
                # for all steps at the first step, or each step's just before it.
                if projection == PROJECT_EACH_STEP:
                    _input_projection_block(k, bounds, x2[t * batch : (t + 1) * batch], w_ih_ops, gates, mode)
                elif projection == PROJECT_AT_FIRST_STEP and s == 0:
                    _input_projection_block(k, bounds, x2, w_ih_ops, gates, mode)
                _forward_block_step(k, t, row0, bounds, gates, w_hh_ops, bias_p, h, h_next, c, rec,
                                    lengths, y, h_states, c_states, training, mode)
                _block_done(sync, s, num_blocks)
                k = _claim_block(sync, s, w, num_blocks)
    return h_buffers[num_steps % 2].copy(), c


forward_parallel, forward_serial = _parallel_and_serial(_forward)


# -- backward ---------------------------------------------------------------------------
@njit(**_OPTS)
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
        passed = dh_pass[b, u0 : u0 + nu]
        _copy(passed, dhr)
        for kk in range(num_blocks):
            _add(partial[kk, b, u0 : u0 + nu], dhr)
        da = d_k[row]
        if t < lengths[b]:
            _add(dy[t, b, u0 : u0 + nu], dhr)
            _cell_backward(g_k[row], c_states[t, b, u0 : u0 + nu], c_start[b, u0 : u0 + nu], dhr,
                           dc[b, u0 : u0 + nu], tanh_c, da)
            _fill(passed, 0)
        else:  # inactive: no gate gradient, both carries pass through
            _fill(da, 0)
            _copy(dhr, passed)
    # This block's share of dh_{t-1}: d_gates[t][:, block] @ W_hh_p[block rows].
    da_t = d_k[t * batch : (t + 1) * batch]
    _gemm(da_t, w_hh_ops[k], 4 * nu, hidden, partial_next[k], mode)


@njit(inline="always")
def _backward_loop_setup(dh_n, dc_n, num_blocks, max_nu):
    batch, hidden = dh_n.shape
    dh_pass = dh_n.copy()
    dc = dc_n.copy()
    partials = np.zeros((2, num_blocks, batch, hidden), dh_n.dtype)  # each block's share of dh, by step parity
    scratch = np.empty((num_blocks, 2 * max_nu), dh_n.dtype)  # per block: dh row, tanh(c) row
    return dh_pass, dc, partials, scratch


@njit(inline="always")
def _sum_carry(dh_pass, partial):
    dh0 = dh_pass.copy()
    for kk in range(partial.shape[0]):
        dh0 += partial[kk]
    return dh0


def _backward_loop(gates, c_states, c0, w_hh_ops, dy, dh_n, dc_n, lengths, reverse, bounds,
                   max_nu, mode, d_gates):
    """Backward through time, one block per thread; fills d_gates. Returns (dh0, dc0)."""
    num_blocks = bounds.shape[0] - 1
    num_steps = dy.shape[0]
    dh_pass, dc, partials, scratch = _backward_loop_setup(dh_n, dc_n, num_blocks, max_nu)
    sync = _new_sync(num_steps, num_blocks)
    for w in prange(num_blocks):  # one worker per block, each running the whole time loop
        _worker_started(sync)
        for s in range(num_steps):
            t = s if reverse else num_steps - 1 - s
            t_prev = t + 1 if reverse else t - 1
            if t_prev == num_steps:
                t_prev = -1
            # step s reads the blocks' dh_{t} shares from partials[s % 2], writes the other
            k = _claim_block(sync, s, w, num_blocks)
            while k >= 0:
                _backward_block_step(k, t, t_prev, bounds, gates, c_states, c0, w_hh_ops, dy, lengths, dh_pass,
                                     partials[s & 1], partials[(s + 1) & 1], dc, d_gates, scratch, mode)
                _block_done(sync, s, num_blocks)
                k = _claim_block(sync, s, w, num_blocks)
    return _sum_carry(dh_pass, partials[num_steps % 2]), dc


backward_loop_parallel, backward_loop_serial = _parallel_and_serial(_backward_loop)


# -- weight gradients -------------------------------------------------------------------
@njit(**_OPTS)  # not inlined: its four call sites share one compiled body (compile time)
def _gemm_tall(a, a_transposed, b, c, accumulate, packed):
    """c (+)= op(a) @ b, op(a) = a.T if a_transposed: the float32 micro-kernel, reading the
    operands in place, when `packed` (a float32 plan) and c's width is whole panels; else BLAS."""
    if packed and c.shape[1] % PANEL == 0:
        _gemm_unpacked(a, a_transposed, b, c, accumulate)
    elif accumulate:
        c += np.dot(a.T, b) if a_transposed else np.dot(a, b)
    elif a_transposed:
        np.dot(a.T, b, c)
    else:
        np.dot(a, b, c)


@njit(**_OPTS)
def _weight_grads_block(k, bounds, d_gates, x2, h_states, h0, reverse, packed, dw_ih_p, dw_hh_p, dbias_p):
    """Block k's rows of dW_ih, dW_hh and dbias: GEMMs over all T*B rows, column sums."""
    num_steps, batch, hidden = h_states.shape
    rows = num_steps * batch
    u0 = bounds[k]
    nu = bounds[k + 1] - u0
    r0, r1 = 4 * u0, 4 * u0 + 4 * nu
    d_k = _block_view(d_gates, k, rows, 4 * nu)
    _gemm_tall(d_k, True, x2, dw_ih_p[r0:r1], False, packed)
    # h_{t-1} of every step but the first is another step's h: two GEMMs into one output.
    h2 = h_states.reshape((rows, hidden))
    out = dw_hh_p[r0:r1]
    if reverse:  # the first step is the last time step; it started from h0
        _gemm_tall(d_k[rows - batch :], True, h0, out, False, packed)
        if rows > batch:
            _gemm_tall(d_k[: rows - batch], True, h2[batch:], out, True, packed)
    else:
        _gemm_tall(d_k[:batch], True, h0, out, False, packed)
        if rows > batch:
            _gemm_tall(d_k[batch:], True, h2[: rows - batch], out, True, packed)
    # Deterministic column sums: rows in order, no atomics.
    acc = dbias_p[r0:r1]
    _fill(acc, 0)
    for r in range(rows):
        _add(d_k[r], acc)


@njit(**_OPTS)
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


@njit(parallel=True, **_OPTS)
def gradients(d_gates, x2, h_states, h0, w_ih_p, reverse, bounds, mode, dw_ih_p, dw_hh_p, dbias_p, dx2):
    """After the loop: weight, bias and input gradients, in parallel over blocks / rows."""
    num_blocks = bounds.shape[0] - 1
    packed = mode == GEMM_PACKED
    for k in prange(num_blocks):  # thread k: block k's weight rows, then part k of dx's rows
        _weight_grads_block(k, bounds, d_gates, x2, h_states, h0, reverse, packed, dw_ih_p, dw_hh_p, dbias_p)
        _input_grad_rows(k, num_blocks, bounds, d_gates, w_ih_p, packed, dx2)
