"""What the Numba CPU kernels of every cell share: activations, the blocking of hidden units,
the step barrier, the per-step GEMMs (a register-tiled float32 micro-kernel over packed
weights, BLAS, a batch-1 kernel) and the operand packing. The cells' time loops live in
``numba_lstm.py`` and ``numba_gru.py``.

Work is split by hidden units into blocks, one block per thread. A block owns all gates
of its units: its rows of the (permuted) weights and its units of the state. The whole
time loop of a cell is one parallel region: the workers meet at a spin barrier after
each step (see "step synchronisation"), and the only state shared between blocks is h
(dh in the backward), double-buffered. So there is one fork/join per sequence, no BLAS
thread pool competing with Numba's threads, and each thread's weights stay in its core's
cache from step to step.

Permuted layout: block k covers units [u0, u1) (nu of them); its weight rows are the
cell's gate blocks restricted to those units, gate after gate (``block_permutation``).

Activations: float32 uses a clamped odd rational approximation of tanh (own fit,
max abs error 3.7e-7 in float32 arithmetic; sigma(x) = tanh(x/2)/2 + 1/2), built
from multiply, add, divide and compares only so that LLVM vectorizes it; float64
uses libm (exact, scalar).

Numba's cache checks only the source file of a cached function, not the files whose
functions it inlines: each cell's kernel file carries ``COMMON_SOURCE_DIGEST``, the digest
of this file, which a test keeps current, so an edit here also edits (and so recompiles)
the cells' kernels.

All kernels use error_model="numpy": the default "python" model puts a zero test
before every division, which stops the loops from vectorizing.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import math
import pathlib

import numpy as np
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.core import config as numba_config
from numba.core.imputils import impl_ret_borrowed
from numba.extending import intrinsic, overload
from numba.np import linalg as numba_linalg
from numba.np.arrayobj import populate_array

# Every compiled function is cached on its own. A kernel calls another compiled function
# (one not inlined) only through _call or _launch, by its symbol: each function's code is
# optimized and emitted once, not once more in every caller that links it in (see _call).
# No C-callable wrapper (no_cfunc_wrapper: only first-class function values use it); each
# wrapper is more code to lower, optimize and emit on a cold cache.
_OPTS = dict(cache=True, error_model="numpy", fastmath={"contract"}, no_cfunc_wrapper=True)
# For a function that only kernels call (through _call or _launch): no Python-callable wrapper
# either (its argument unboxing is more code than many a small function's own). Called from
# Python it would crash: these are private.
_CALLED_OPTS = dict(_OPTS, no_cpython_wrapper=True)


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


def block_permutation(bounds: np.ndarray, hidden: int, gates: int) -> np.ndarray:
    """Row order that turns torch's gate rows ([i; f; g; o], [r; z; n]: `gates` blocks of
    `hidden` rows) into per-block gate groups."""
    rows = []
    for u0, u1 in zip(bounds[:-1], bounds[1:]):
        for gate in range(gates):
            rows.append(np.arange(gate * hidden + u0, gate * hidden + u1))
    return np.concatenate(rows).astype(np.int64)


@njit(inline="always")
def _block_view(flat, k, rows, cols):
    """Block k's contiguous (rows, cols) region of a flat per-block buffer (a _view)."""
    return _view(flat, k * flat.shape[1], (rows, cols))


# -- step synchronisation ---------------------------------------------------------------
# The kernels run the whole time loop inside one parallel region (_launch): worker w does
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
    started = sync.ctypes.data
    lone = started + 8
    base = started + 8 * (_SYNC_HEADER + s * (num_blocks + 1))
    done = base + 8 * num_blocks
    if _try_claim(base + 8 * w):
        return w
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


@njit(inline="always")
def _backward_times(s, num_steps, reverse):
    """Backward step s's time t, and t_prev: the time whose state step t started from
    (-1: the initial state)."""
    t = s if reverse else num_steps - 1 - s
    t_prev = t + 1 if reverse else t - 1
    return t, -1 if t_prev == num_steps else t_prev


@njit(inline="always")
def _sum_carry(dh_pass, partial):
    """dh0 after a backward loop: the carry passed through plus every block's share (partial[k])."""
    dh0 = dh_pass.copy()
    for kk in range(partial.shape[0]):
        dh0 += partial[kk]
    return dh0


# -- running a kernel's workers on threads ------------------------------------------------
def _start_threading_layer():
    """Numba's threading layer, started (once), which makes its `numba_parallel_for` and
    `get_num_threads` known to the JIT linker: needed before a kernel that calls them is
    linked, and so run again before such a kernel is loaded from the cache."""
    from numba.np.ufunc.parallel import _launch_threads

    _launch_threads()


def _compile_separately(typingctx, function, arg_types):
    """The signature of `function` (a Numba dispatcher that returns None) compiled for
    arg_types, literal types taken as their plain types (one compiled body for a call with
    `True` and one with a variable); None where it does not type or returns something."""
    if not isinstance(function, types.Dispatcher):
        return None
    signature = typingctx.resolve_function_type(function, tuple(types.unliteral(t) for t in arg_types), {})
    if signature is None or signature.return_type != types.none:
        return None
    return signature


def _declare_separately_compiled(context, builder, function, signature):
    """Declare `function`'s code compiled for `signature` in the module being built, to be
    called by its symbol; and, for a load from Numba's cache, a step that defines that symbol
    first (_define_symbol)."""
    dispatcher = function.dispatcher
    compiled = dispatcher.overloads[signature.args]
    define = functools.partial(_define_symbol, dispatcher.py_func.__module__, dispatcher.py_func.__qualname__,
                               signature.args, compiled.fndesc.mangled_name)
    context.active_code_library._reload_init.add(define)
    return context.declare_function(builder.module, compiled.fndesc)


def _define_symbol(module, qualname, arg_types, symbol):
    """Before a caller is loaded from Numba's cache: compile (or load from the cache) the
    function it calls, and make `symbol`, the name the caller was compiled against, resolve
    to that code (a function compiled in another process has another unique name)."""
    dispatcher = getattr(importlib.import_module(module), qualname)
    dispatcher.compile(arg_types)
    compiled = dispatcher.overloads[arg_types]
    llvm_binding.add_symbol(symbol, compiled.library.get_pointer_to_function(compiled.fndesc.mangled_name))


def _call_values(context, builder, args, args_value, signature):
    """The args tuple's items cast to the separately compiled function's argument types."""
    values = cgutils.unpack_tuple(builder, args_value, len(args))
    return [context.cast(builder, v, t, to) for v, t, to in zip(values, args, signature.args[-len(args):])]


def _return_on_error(context, builder, status):
    with cgutils.if_unlikely(builder, status.is_error):
        context.call_conv.return_status_propagate(builder, status)


@intrinsic
def _call(typingctx, function, args):
    """function(*args) (args a tuple; function a Numba dispatcher that returns None) through
    its own compiled code, called by its symbol. An exception in it passes on.

    Why not a plain call: Numba links the callee's compiled module into its caller's, which
    optimizes and emits all of it again, and a function called from a worker called from a
    kernel was emitted three times (each time 0.2-1.6 s of LLVM on a cold cache). Here every
    function is compiled, cached and emitted once, and a caller holds only a call."""
    if not isinstance(args, types.BaseTuple):
        return None
    signature = _compile_separately(typingctx, function, args.types)
    if signature is None:
        return None

    def codegen(context, builder, call_signature, llargs):
        callee = _declare_separately_compiled(context, builder, function, signature)
        values = _call_values(context, builder, args, llargs[1], signature)
        status, _ = context.call_conv.call_function(builder, callee, types.none, signature.args, values)
        _return_on_error(context, builder, status)
        return context.get_dummy_value()

    return types.none(function, args), codegen


@intrinsic
def _launch(typingctx, worker, count, args):
    """worker(w, *args) for w in range(count) (args a tuple): on the threads of Numba's
    threading layer, at most Numba's thread count (numba.set_num_threads) at once, without
    the GIL, as a prange loop would; on the calling thread when count == 1. The worker is
    called by its symbol, as _call calls.

    Why not prange: Numba compiles a prange loop's body as a function, then two wrappers
    around it, then the kernel, and each level links the one below and optimizes and emits
    all its code again (a time loop's step function five times). Here the worker is compiled
    once, and one compiled kernel serves the one-block plan too: a third less cold compile
    (bench/results/2026-12-02-cpu-compile-launch.md).
    """
    if not (isinstance(count, types.Integer) and isinstance(args, types.BaseTuple)):
        return None
    _start_threading_layer()
    signature = _compile_separately(typingctx, worker, (types.int64, *args.types))
    if signature is None:
        return None

    def codegen(context, builder, launch_signature, llargs):
        _, count_value, args_value = llargs
        context.active_code_library._reload_init.add(_start_threading_layer)  # what Numba does for a prange kernel
        worker_fn = _declare_separately_compiled(context, builder, worker, signature)

        def call_worker(at, w, values):
            return context.call_conv.call_function(at, worker_fn, types.none, signature.args, [w, *values])[0]

        i64 = ir.IntType(64)
        n = context.cast(builder, count_value, launch_signature.args[1], types.int64)
        with builder.if_else(builder.icmp_signed("==", n, ir.Constant(i64, 1))) as (alone, on_threads):
            with alone:  # an exception (MemoryError) passes on; on threads, as in a prange loop, it cannot
                values = _without_references(context, builder, args, args_value, signature)
                _return_on_error(context, builder, call_worker(builder, ir.Constant(i64, 0), values))
            with on_threads:
                run_range = _worker_range_function(context, builder.module, worker_fn.name, args, signature,
                                                   call_worker)
                data = cgutils.alloca_once_value(builder, args_value)
                _parallel_for(context, builder, run_range, n, data)
        return context.get_dummy_value()

    return types.void(worker, count, args), codegen


def _worker_range_function(context, module, worker_name, args, signature, call_worker):
    """The function the threading layer calls on its threads, with gufunc arguments:
    void f(char **first, intp *counts, intp *steps, void *data) runs worker(w, *args) for
    w = first[0] .. first[0] + counts[0] - 1. Worker indices travel as addresses (array 0
    at address 0, step 1); data points to the args tuple."""
    name = f"worker_range.{worker_name}"
    if name in module.globals:
        return module.globals[name]
    i8p, i64 = ir.IntType(8).as_pointer(), ir.IntType(64)
    function = ir.Function(module, ir.FunctionType(ir.VoidType(), [i8p.as_pointer(), i64.as_pointer(),
                                                                   i64.as_pointer(), i8p]), name=name)
    function.linkage = "internal"
    builder = ir.IRBuilder(function.append_basic_block())
    first, counts, _, data = function.args
    start = builder.ptrtoint(builder.load(first), i64)
    args_value = builder.load(builder.bitcast(data, context.get_value_type(args).as_pointer()))
    values = _without_references(context, builder, args, args_value, signature)
    with cgutils.for_range(builder, builder.load(counts)) as loop:
        call_worker(builder, builder.add(start, loop.index), values)
    builder.ret_void()
    return function


def _without_references(context, builder, args, args_value, signature):
    """The args tuple's items, its arrays as references-free views (no meminfo, as a prange
    loop's body gets them, and as _view makes): otherwise each view a worker takes of an
    argument (a step's rows of x, h_buffers[s & 1]) adds to and subtracts from the array's
    reference count, an atomic write to a cache line that every worker's thread writes too
    (stream-1 inference measured ~10 % slower). The launching kernel holds the references."""
    values = _call_values(context, builder, args, args_value, signature)
    for i, item in enumerate(signature.args[1:]):
        if isinstance(item, types.Array):
            array = context.make_array(item)(context, builder, values[i])
            array.meminfo = cgutils.get_null_value(array.meminfo.type)
            values[i] = array._getvalue()
    return values


def _parallel_for(context, builder, function, count, data):
    """The threading layer's parallel_for (as Numba's prange wrapper calls it) over `count`
    worker indices, on at most get_num_threads() threads, the GIL released meanwhile."""
    i8p, i64 = ir.IntType(8).as_pointer(), ir.IntType(64)
    parallel_for = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [i8p] * 5 + [i64] * 3), "numba_parallel_for")
    get_num_threads = cgutils.get_or_insert_function(builder.module, ir.FunctionType(i64, []), "get_num_threads")
    first = cgutils.alloca_once_value(builder, ir.Constant(i8p, None))
    counts = cgutils.alloca_once_value(builder, count)
    steps = cgutils.alloca_once_value(builder, ir.Constant(i64, 1))
    pyapi = context.get_python_api(builder)
    gil = pyapi.gil_ensure()
    thread_state = pyapi.save_thread()
    builder.call(parallel_for, [builder.bitcast(v, i8p) for v in (function, first, counts, steps, data)]
                 + [ir.Constant(i64, 0), ir.Constant(i64, 1), builder.call(get_num_threads, [])])
    pyapi.restore_thread(thread_state)
    pyapi.gil_release(gil)


# -- the input projection ----------------------------------------------------------------
# Where a forward kernel's input projection x W_ih^T comes from (every cell's):
PROJECTED_BY_CALLER = 0  # the caller has put it into the gate buffer (all steps)
PROJECT_AT_FIRST_STEP = 1  # each block projects all steps at the first step (a tall GEMM)
PROJECT_EACH_STEP = 2  # each block projects each step's rows just before the step, while they
#                        are in cache (inference: the gate buffer holds one step, no gates go
#                        through memory; training: into the step's rows, which then hold its gates)


# -- per-step GEMMs ---------------------------------------------------------------------
# How a kernel multiplies by a weight block (the caller lays the operand out to match):
GEMM_BLAS = 0  # _blas_product (scipy's BLAS, one thread); operand (K, N) row-major
GEMM_SMALL = 1  # _matmul_small, batch 1; operand (K, N) row-major
GEMM_PACKED = None  # _gemm_packed, float32; operand (N / PANEL, K, PANEL) column panels
# GEMM_PACKED is None, not a number: None is a type of its own to Numba, which drops a branch
# on a None argument compared with a constant before typing it (dead-branch pruning, also in
# what it inlines and in a _call'ed function given the mode). So a kernel compiled for a
# packed plan holds no BLAS call and no batch-1 loops (~1 s less of a cold first inference);
# a process that also runs an unpacked plan (float64, widths not in whole panels) compiles
# such kernels once more. The kernels test the mode on its own (`if mode is GEMM_PACKED:`;
# `and` with a run-time value keeps both branches) and pass it on as it came.

# Packed float32 GEMM: the operand is packed once per sequence into column panels, and
# a register-tiled micro-kernel (LLVM vector IR, below) multiplies by it with no
# per-call packing, which is what BLAS spends 20-40 % of a small per-step GEMM on.
# Tile shapes fit the vector registers: 32 of 512 bits with AVX-512, 16 of 256 without.
# The features are those Numba compiles for: NUMBA_CPU_FEATURES where set (with
# NUMBA_CPU_NAME=haswell and NUMBA_CPU_FEATURES="", an AVX-512 machine builds and runs the
# AVX2 kernels, as the tests do), else the host's.
def _target_features() -> list:
    features = numba_config.CPU_FEATURES
    return (llvm_binding.get_host_cpu_features().flatten() if features is None else features).split(",")


_AVX512 = "+avx512f" in _target_features()
_LANES = 16 if _AVX512 else 8  # float32 per vector register
PANEL = 2 * _LANES  # columns per panel: two vectors
_TILE_ROWS = 8 if _AVX512 else 6  # 16 (12) accumulators + 2 operand vectors + 1 broadcast


def _tile_kernel(rows, steps_per_iteration, panels=1):
    """An intrinsic computing C[rows, panels * PANEL] (+)= A[rows, K] @ B[K, panels * PANEL]
    for `panels` adjacent panels.

    Arguments are addresses and element strides: (a, a_row, a_col, b, ldb, b_panel, c, ldc,
    K, accumulate): A[m, k] at a + m * a_row + k * a_col (so A may be a transposed view),
    panel j's B[k, 0:PANEL] at b + j * b_panel + k * ldb (packed panels: ldb = PANEL,
    b_panel = K * PANEL), C[m, 0:panels * PANEL] at c + m * ldc. The accumulators stay in
    registers across the whole K loop (SSA phi values). The loop runs `steps_per_iteration`
    (1 or 2) steps of k an iteration (with 2, one more step after the loop if K is odd): two
    halve the loop's own instructions per FMA (measured 1.09-1.18x faster at the kernels'
    per-step shapes with 4 and 8 rows on the Intel VM; four steps were no faster; one row
    gained nothing). One row of one panel has two accumulators, each waiting on the other's
    FMA latency; one row of several panels keeps more FMAs in flight (see _ROW_PANELS).
    Each accumulator still adds its products in k order: the result is the same, bit for
    bit, whatever the tile.
    """
    vec = ir.VectorType(ir.FloatType(), _LANES)
    i64 = ir.IntType(64)
    width = 2 * panels  # vectors a row

    @intrinsic
    def tile(typingctx, a, a_row, a_col, b, ldb, b_panel, c, ldc, inner, accumulate):
        sig = types.void(*([types.intp] * 9), types.boolean)

        def codegen(context, builder, signature, args):
            a_addr, a_row_v, a_col_v, p_addr, ldb_v, b_panel_v, c_addr, ldc_v, k_count, accum = args
            fptr = ir.FloatType().as_pointer()
            a_ptr, p_ptr, c_ptr = (builder.inttoptr(v, fptr) for v in (a_addr, p_addr, c_addr))
            fma = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(vec, [vec, vec, vec]), f"llvm.fma.v{_LANES}f32")
            zero = ir.Constant(vec, [0.0] * _LANES)
            splat_mask = ir.Constant(ir.VectorType(ir.IntType(32), _LANES), [0] * _LANES)

            def step(kk, acc):
                """The accumulators after adding step kk's products to `acc`."""
                p_row = builder.mul(kk, ldb_v)
                a_col_offset = builder.mul(kk, a_col_v)
                operands = []
                for v in range(width):
                    panel_offset = builder.mul(ir.Constant(i64, v // 2), b_panel_v)
                    offset = builder.add(builder.add(p_row, panel_offset), ir.Constant(i64, v % 2 * _LANES))
                    load = builder.load(builder.bitcast(builder.gep(p_ptr, [offset]), vec.as_pointer()))
                    load.align = 4
                    operands.append(load)
                updated = []
                for m in range(rows):
                    a_offset = builder.add(builder.mul(ir.Constant(i64, m), a_row_v), a_col_offset)
                    a_val = builder.load(builder.gep(a_ptr, [a_offset]))
                    splat = builder.shuffle_vector(
                        builder.insert_element(ir.Constant(vec, ir.Undefined), a_val, ir.Constant(ir.IntType(32), 0)),
                        ir.Constant(vec, ir.Undefined), splat_mask)
                    updated.append([builder.call(fma, [splat, operands[v], acc[m][v]]) for v in range(width)])
                return updated

            def phis(sources):
                """Accumulators merged at the current block from (block, accumulators) pairs."""
                merged = [[builder.phi(vec) for _ in range(width)] for _ in range(rows)]
                for block, acc in sources:
                    for m in range(rows):
                        for v in range(width):
                            merged[m][v].add_incoming(acc[m][v], block)
                return merged

            zeros = [[zero] * width for _ in range(rows)]
            entry = builder.block
            loop = builder.append_basic_block("tile_loop")
            after_loop = builder.append_basic_block("tile_after_loop")
            last = builder.append_basic_block("tile_last")
            done = builder.append_basic_block("tile_done")
            # the steps run steps_per_iteration at a time; with 2, the last one alone if K is odd
            in_loop = builder.and_(k_count, ir.Constant(i64, -steps_per_iteration))
            builder.cbranch(builder.icmp_signed(">", in_loop, ir.Constant(i64, 0)), loop, after_loop)

            builder.position_at_end(loop)
            kk = builder.phi(i64)
            kk.add_incoming(ir.Constant(i64, 0), entry)
            acc = phis([(entry, zeros)])
            after_iteration = step(kk, acc)
            for extra in range(1, steps_per_iteration):
                after_iteration = step(builder.add(kk, ir.Constant(i64, extra)), after_iteration)
            k_next = builder.add(kk, ir.Constant(i64, steps_per_iteration))
            kk.add_incoming(k_next, loop)
            for m in range(rows):
                for v in range(width):
                    acc[m][v].add_incoming(after_iteration[m][v], loop)
            builder.cbranch(builder.icmp_signed("<", k_next, in_loop), loop, after_loop)

            builder.position_at_end(after_loop)
            so_far = phis([(entry, zeros), (loop, after_iteration)])
            builder.cbranch(builder.icmp_signed("<", in_loop, k_count), last, done)

            builder.position_at_end(last)
            with_last = step(in_loop, so_far)
            builder.branch(done)

            builder.position_at_end(done)
            totals = phis([(after_loop, so_far), (last, with_last)])
            for m in range(rows):
                for v in range(width):
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


# One row (batch 1) over this many adjacent panels a tile: 2 * _ROW_PANELS independent FMA
# chains instead of two.
_ROW_PANELS = 4
_tile_big = _tile_kernel(_TILE_ROWS, 2)
_tile_4 = _tile_kernel(4, 2)
_tile_1 = _tile_kernel(1, 1)
_tile_row = _tile_kernel(1, 1, _ROW_PANELS)


@njit(inline="always")
def _tiles_of_panel(a_addr, a_row, a_col, rows, b_addr, ldb, c_addr, ldc, inner, accumulate):
    """C[:, panel] (+)= A @ B[:, panel] for all `rows` rows of A, in register tiles."""
    m = 0
    while m + _TILE_ROWS <= rows:
        _tile_big(a_addr + m * a_row * 4, a_row, a_col, b_addr, ldb, 0, c_addr + m * ldc * 4, ldc, inner, accumulate)
        m += _TILE_ROWS
    while m + 4 <= rows:
        _tile_4(a_addr + m * a_row * 4, a_row, a_col, b_addr, ldb, 0, c_addr + m * ldc * 4, ldc, inner, accumulate)
        m += 4
    while m < rows:
        _tile_1(a_addr + m * a_row * 4, a_row, a_col, b_addr, ldb, 0, c_addr + m * ldc * 4, ldc, inner, accumulate)
        m += 1


@njit(inline="always")
def _gemm_packed(a, panels, c, accumulate):
    """c (M, N) (+)= a (M, K) @ W for float32, W packed as panels (N / PANEL, K, PANEL).

    a and c may be row slices of larger arrays (unit stride along rows).
    """
    _gemm_packed_in_order(a, panels, c, accumulate, False)


# Zig-zag order: a time loop whose weights do not fit in a core's L2 reads a step's panels
# in the reverse of the previous step's order, so that it starts with those the previous
# step left in cache (one step of I = H = 512, batch 1, 4 MB a core: 125 us instead of 160).
# A panel's result does not depend on when it is computed: the order changes no bit.
@njit(inline="always")
def _gemm_packed_in_order(a, panels, c, accumulate, descending):
    """_gemm_packed, its panels last to first when `descending` (_packed_product)."""
    _call(_packed_product, (a.ctypes.data, a.strides[0] // 4, a.shape[0], a.shape[1], panels.ctypes.data,
                            panels.shape[0], c.ctypes.data, c.strides[0] // 4, accumulate, descending,
                            a.ctypes.data, 0, 0, panels.ctypes.data))


@njit(inline="always")
def _gemm_packed_sum(a1, panels1, a2, panels2, c, descending):
    """c = a1 @ W1 + a2 @ W2 (float32, W1 and W2 packed with the same panels), panel by panel:
    W1's product stored, then W2's added, as _gemm_packed twice would; in zig-zag order."""
    _call(_packed_product, (a1.ctypes.data, a1.strides[0] // 4, a1.shape[0], a1.shape[1], panels1.ctypes.data,
                            panels1.shape[0], c.ctypes.data, c.strides[0] // 4, False, descending,
                            a2.ctypes.data, a2.strides[0] // 4, a2.shape[1], panels2.ctypes.data))


# Every packed product of the kernels' steps runs here, compiled once for all its callers
# (its tiles were the larger part of each caller's compile when inlined) and called with
# addresses and sizes (arrays passed would cost reference counts, ~40 ns a call).
@njit(**_CALLED_OPTS)
def _packed_product(a, lda, rows, inner, panels, count, c, ldc, accumulate, descending, a2, lda2, inner2, panels2):
    """C (rows, count * PANEL) (+)= A (rows, inner) @ W: A's rows lda items apart from address
    a, W's `count` packed panels (inner, PANEL) one after another from address `panels`, C's
    rows ldc apart from address c; `descending`: the panels last to first. With inner2 > 0,
    C = A @ W + A2 @ W2 (A2 (rows, inner2) at a2, W2's panels at panels2), panel by panel:
    W's product stored, then W2's added. One row (batch 1) of a single product takes
    _ROW_PANELS panels a tile, the panels after the last whole group one at a time."""
    groups = count // _ROW_PANELS if rows == 1 and inner2 == 0 else 0
    units = groups + count - groups * _ROW_PANELS  # the groups, then the panels after them
    for q in range(units):  # one call site each: every inlined tile is compile time
        u = units - 1 - q if descending else q
        if u < groups:
            p = u * _ROW_PANELS
            _tile_row(a, lda, 1, panels + p * inner * PANEL * 4, PANEL, inner * PANEL, c + p * PANEL * 4, ldc, inner,
                      accumulate)
        else:
            p = u - groups + groups * _ROW_PANELS
            _tiles_of_panel(a, lda, 1, rows, panels + p * inner * PANEL * 4, PANEL, c + p * PANEL * 4, ldc, inner,
                            accumulate)
            if inner2 > 0:
                _tiles_of_panel(a2, lda2, 1, rows, panels2 + p * inner2 * PANEL * 4, PANEL, c + p * PANEL * 4, ldc,
                                inner2, True)


# The weight and input gradients multiply tall operands (K = T*B rows): K is cut into
# chunks whose A and B parts stay in L2 (1 MiB a core here) while every tile reuses them.
_K_CHUNK = 128


@njit(inline="always")
def _rows_into_panels(src, r0, n_rows, dst):
    """dst (n, n_rows, w) = rows r0 .. r0 + n_rows of src (., >= n * w), as column panels of
    width w (PANEL for b and the backward's weights, _LANES for op(a)'s groups)."""
    width = dst.shape[2]
    for p in range(dst.shape[0]):
        for i in range(n_rows):
            for q in range(width):  # a plain loop: a slice copy per row costs a view
                dst[p, i, q] = src[r0 + i, p * width + q]


# Rows of op(a) a chunk's copy holds at a time: 128 KB of a at _K_CHUNK, reused by every panel from L2.
_M_BLOCK = 256
# The fewest columns of c for which _gemm_unpacked copies op(a): a copy that one or two panels
# reuse costs more than it saves (small's dW and dx: one panel).
_A_COPY_MIN_COLS = 4 * PANEL


@njit(inline="always")
def _a_into_groups(a, a_transposed, m0, k0, kc, dst):
    """dst (n, kc, _LANES) = op(a)[m0 + g * _LANES + r, k0 + k] at dst[g, k, r]: op(a)'s rows in
    groups of _LANES, each group's columns one after another (the tile kernels read it in order)."""
    if a_transposed:  # op(a)'s rows are a's columns: a's rows, as column panels _LANES wide
        _rows_into_panels(a[:, m0:], k0, kc, dst)
        return
    lda = a.strides[0] // 4
    whole = kc - kc % _LANES
    for g in range(dst.shape[0]):  # a transpose, _LANES x _LANES at a time
        r0 = m0 + g * _LANES
        for j in range(0, whole, _LANES):
            _transpose_tile(a.ctypes.data + (r0 * lda + k0 + j) * 4, lda,
                            dst.ctypes.data + (g * kc + j) * _LANES * 4, _LANES)
        for k in range(whole, kc):
            for r in range(_LANES):
                dst[g, k, r] = a[r0 + r, k0 + k]


@njit(inline="always")
def _gemm_unpacked(a, a_transposed, b, c, accumulate):
    """c (M, N) (+)= op(a) @ b for float32 with N a multiple of PANEL.

    op(a) = a (M, K), or a.T when a_transposed (a is (K, M)); a, b and c may be row
    slices of larger arrays (unit stride along rows). K is cut into chunks; each chunk of
    b's rows is copied into column panels, as pack_operands lays out weights, and (c at
    least _A_COPY_MIN_COLS wide) op(a)'s rows, _M_BLOCK at a time, into groups of _LANES
    rows that the tiles read in order (the last M % _LANES read in place). Read in place,
    the operands' rows lie one row apart (0.5-8 KB at the gradients' widths): they fall
    into a few of L1's sets and evict each other before the next tile reuses them, and a's
    strides lie beyond the prefetchers' reach (one core, alternated: train-m's dW 58-80 ->
    92-103 GFLOP/s from b's copy; a's copy then dW 1.0-1.1x at train-m and 1.15-1.2x at
    train-l, dx 1.3x and 1.5x). The same products in the same order: the bits do not
    depend on the copies.
    """
    rows, cols = c.shape
    inner = a.shape[0] if a_transposed else a.shape[1]
    lda, ldc = a.strides[0] // 4, c.strides[0] // 4
    a_row, a_col = (1, lda) if a_transposed else (lda, 1)
    grouped = rows - rows % _LANES if cols >= _A_COPY_MIN_COLS else 0  # rows copied into groups
    panels = np.empty(_K_CHUNK * cols, np.float32)  # a chunk of b: (cols / PANEL, kc, PANEL)
    groups = np.empty(_K_CHUNK * min(grouped, _M_BLOCK), np.float32)  # a block of op(a): (n, kc, _LANES)
    for k0 in range(0, inner, _K_CHUNK):
        kc = min(_K_CHUNK, inner - k0)
        _rows_into_panels(b, k0, kc, _view(panels, 0, (cols // PANEL, kc, PANEL)))
        for m0 in range(0, max(grouped, 1), _M_BLOCK):  # the blocks of groups; the rows in place with the last
            n_groups = min(_M_BLOCK, grouped - m0) // _LANES
            _a_into_groups(a, a_transposed, m0, k0, kc, _view(groups, 0, (n_groups, kc, _LANES)))
            last = m0 + _M_BLOCK >= grouped
            for p in range(cols // PANEL):
                for g in range(n_groups + (1 if last and grouped < rows else 0)):
                    if g < n_groups:  # a group, read in order
                        addr = groups.ctypes.data + g * kc * _LANES * 4
                        step_m, step_k, count, row = 1, _LANES, _LANES, m0 + g * _LANES
                    else:  # the rows after the groups, read in place
                        addr = a.ctypes.data + (grouped * a_row + k0 * a_col) * 4
                        step_m, step_k, count, row = a_row, a_col, rows - grouped, grouped
                    _tiles_of_panel(addr, step_m, step_k, count, panels.ctypes.data + p * kc * PANEL * 4, PANEL,
                                    c.ctypes.data + (row * ldc + p * PANEL) * 4, ldc, kc, accumulate or k0 > 0)


@njit(inline="always")
def _panels(operand, inner, cols):
    """A flat GEMM_PACKED operand as its (cols / PANEL, inner, PANEL) column panels (a _view)."""
    return _view(operand, 0, (cols // PANEL, inner, PANEL))


@njit(**_OPTS)  # not inlined (_call): one compiled body for all call sites (compile time)
def _gemm(a, operand, inner, cols, out, mode):
    """out (M, cols) = a (M, inner) @ W, W the flat block operand laid out for `mode`."""
    if mode is GEMM_PACKED:
        _gemm_packed(a, _panels(operand, inner, cols), out, False)
    else:
        w = operand[: inner * cols].reshape((inner, cols))
        if mode == GEMM_SMALL:
            _matmul_small(a, w, out)
        else:
            _blas_product(a, False, w, out, False)


@njit(inline="always")
def _product(a, operand, inner, cols, out, mode):
    """_gemm from a kernel: packed, straight to _packed_product (one call, not two)."""
    if mode is GEMM_PACKED:
        _gemm_packed(a, _panels(operand, inner, cols), out, False)
    else:
        _call(_gemm, (a, operand, inner, cols, out, mode))


# -- BLAS ---------------------------------------------------------------------------------
# Straight to the xgemm that Numba's np.dot calls (scipy's BLAS, through Numba's helper
# library): np.dot compiles a specialization per operand layout and result (2-3 s of a cold
# first training step went to six of them), needs whole rows (a copy of a column slice),
# and adds into c only through a temporary. This is one small call for every layout.
@intrinsic
def _xgemm(typingctx, trans_a, trans_b, m, n, k, a_addr, lda, b_addr, ldb, accumulate, c, ldc):
    """Column-major BLAS C (m, n) = op(A) (m, k) @ op(B) (k, n) (+ C when `accumulate`), on
    addresses and leading dimensions (elements); c (an array) is C's first element and dtype."""
    if not isinstance(c, types.Array) or c.dtype not in (types.float32, types.float64):
        return None
    numba_linalg.ensure_blas()
    dtype = c.dtype
    sig = types.void(types.boolean, types.boolean, *([types.intp] * 5), types.intp, types.intp, types.boolean, c,
                     types.intp)

    def codegen(context, builder, signature, args):
        trans_a_v, trans_b_v, m_v, n_v, k_v, a_v, lda_v, b_v, ldb_v, accumulate_v, c_v, ldc_v = args
        char, i64, void_p = ir.IntType(8), ir.IntType(64), ir.IntType(8).as_pointer()
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), [
            char, char, char, i64, i64, i64, void_p, void_p, i64, void_p, i64, void_p, void_p, i64]), "numba_xxgemm")

        def trans(flag):
            return builder.select(flag, ir.Constant(char, ord("t")), ir.Constant(char, ord("n")))

        value_type = context.get_value_type(dtype)
        alpha = cgutils.alloca_once_value(builder, ir.Constant(value_type, 1.0))
        beta = cgutils.alloca_once_value(builder, builder.select(accumulate_v, ir.Constant(value_type, 1.0),
                                                                 ir.Constant(value_type, 0.0)))
        c_data = context.make_array(c)(context, builder, c_v).data
        res = builder.call(fn, [
            ir.Constant(char, ord(numba_linalg.get_blas_kind(dtype))), trans(trans_a_v), trans(trans_b_v), m_v, n_v,
            k_v, builder.bitcast(alpha, void_p), builder.inttoptr(a_v, void_p), lda_v, builder.inttoptr(b_v, void_p),
            ldb_v, builder.bitcast(beta, void_p), builder.bitcast(c_data, void_p), ldc_v])
        numba_linalg.check_blas_return(context, builder, res)
        return context.get_dummy_value()

    return sig, codegen


@njit(inline="always")
def _blas_product(a, a_transposed, b, c, accumulate):
    """c (M, N) (+)= op(a) @ b by BLAS, op(a) = a.T if a_transposed (a (K, M)) else a (M, K).

    Each operand unit-stride along its rows (a row slice, a column slice, or whole). Row-major
    c = op(a) b is column-major c^T = b^T op(a)^T, and a row-major array read column-major is
    its transpose: BLAS's A is b untransposed, its B is a (transposed for a_transposed).
    A leading dimension only matters with more than one row: raised to BLAS's minimum
    otherwise (a one-row view may carry any row stride)."""
    rows, cols = c.shape
    inner = b.shape[0]
    item = c.itemsize
    a_cols = rows if a_transposed else inner  # a's row length in elements
    _xgemm(False, a_transposed, cols, rows, inner, b.ctypes.data, max(b.strides[0] // item, cols, 1),
           a.ctypes.data, max(a.strides[0] // item, a_cols, 1), accumulate, c, max(c.strides[0] // item, cols, 1))


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


def pack_operands(w_p, bounds, gates, mode, rows_are_inputs, out):
    """Lay out each block's weight rows as the operand of a per-step GEMM, flat in out[k].

    w_p: (gates*H, K) permuted weights; block k owns rows [gates*u0, gates*u1).
    rows_are_inputs: False for the forward (block rows are GEMM outputs: W_blk^T,
    (K, gates*nu)), True for the backward's recurrent GEMM (block rows are GEMM inputs:
    W_blk itself, (gates*nu, K)). GEMM_PACKED: as column panels (n / PANEL, rows, PANEL).

    NumPy, not Numba: compiling it took 0.7-1 s of a cold first call; NumPy's strided copies
    take 1.1-3x as long (train-m's three operands ~0.1 ms more a training step of ~100 ms).
    """
    width = w_p.shape[1]
    for k in range(len(bounds) - 1):
        r0 = gates * int(bounds[k])
        n_rows = gates * int(bounds[k + 1]) - r0
        block = w_p[r0 : r0 + n_rows]
        dst = out[k, : n_rows * width]
        if rows_are_inputs and mode is GEMM_PACKED:  # W_blk's columns in panels
            np.copyto(dst.reshape(width // PANEL, n_rows, PANEL), block.reshape(n_rows, width // PANEL, PANEL)
                      .transpose(1, 0, 2))
        elif rows_are_inputs:  # W_blk
            np.copyto(dst.reshape(n_rows, width), block)
        elif mode is GEMM_PACKED:  # W_blk^T's columns in panels: float32 only
            np.copyto(dst.reshape(n_rows // PANEL, width, PANEL), block.reshape(n_rows // PANEL, PANEL, width)
                      .transpose(0, 2, 1))
        else:  # W_blk^T
            np.copyto(dst.reshape(width, n_rows), block.T)


@njit(**_OPTS)
def same_bits(x, y):
    """Whether two equal-length unsigned integer views hold the same bits (of float weights:
    NaN equals itself, 0.0 differs from -0.0), read a chunk at a time with an exit at the
    first chunk that differs: a changed weight is usually found at once, an unchanged one
    costs a read. Each chunk is read as four interleaved quarters, four independent OR
    chains: one chain waits on its own result each step (uint64 views, 256 KB: 15 -> 10 us)."""
    n = x.shape[0]
    start = 0
    while start < n:
        stop = min(start + 4096, n)
        xs, ys = x[start:stop], y[start:stop]
        q = xs.shape[0] // 4
        x0, x1, x2, x3 = xs[:q], xs[q : 2 * q], xs[2 * q : 3 * q], xs[3 * q : 4 * q]
        y0, y1, y2, y3 = ys[:q], ys[q : 2 * q], ys[2 * q : 3 * q], ys[3 * q : 4 * q]
        d0 = d1 = d2 = d3 = xs[0] ^ xs[0]  # zero of the views' type
        for i in range(q):
            d0 |= x0[i] ^ y0[i]
            d1 |= x1[i] ^ y1[i]
            d2 |= x2[i] ^ y2[i]
            d3 |= x3[i] ^ y3[i]
        for i in range(4 * q, xs.shape[0]):
            d0 |= xs[i] ^ ys[i]
        if (d0 | d1 | d2 | d3) != 0:
            return False
        start = stop
    return True


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


# -- views without references ----------------------------------------------------------
@intrinsic
def _view(typingctx, a, offset, shape):
    """A C-contiguous view of `shape` (a tuple of ints) over a's data from item `offset` on,
    that holds no reference to a's memory (valid while `a` is, as any array inside a kernel)
    and checks nothing (the caller's sizes are in range).

    Why not a slice (and reshape): a slice with runtime bounds is a view that Numba
    reference-counts, and in the kernels' loops its pruning leaves the increments and
    decrements in (calls, atomic adds): the LSTM's small-config forward step took ~25 %
    longer with slices in its per-row loop (T=200, B=16, H=64, one thread). Not always a
    gain: LLVM cannot tell such views apart, and the GRU's cell loops (up to eight views
    each) ran slower with them (numba_gru.py keeps slices there)."""
    if not (isinstance(a, types.Array) and a.layout == "C" and isinstance(shape, types.BaseTuple)
            and all(isinstance(n, types.Integer) for n in shape)):
        return None
    ndim = len(shape)
    view = types.Array(a.dtype, ndim, "C")

    def codegen(context, builder, signature, args):
        array = context.make_array(signature.args[0])(context, builder, args[0])
        sizes = [context.cast(builder, n, t, types.intp)
                 for n, t in zip(cgutils.unpack_tuple(builder, args[2], ndim), signature.args[2])]
        itemsize = context.get_constant(types.intp, context.get_abi_sizeof(context.get_data_type(a.dtype)))
        strides = [itemsize]
        for n in reversed(sizes[1:]):
            strides.insert(0, builder.mul(strides[0], n))
        first = context.cast(builder, args[1], signature.args[1], types.intp)
        out = context.make_array(view)(context, builder)
        populate_array(out, data=builder.gep(array.data, [first]), shape=sizes, strides=strides,
                       itemsize=itemsize, meminfo=None)
        return out._getvalue()

    return view(a, offset, shape), codegen


@intrinsic
def _any_layout(typingctx, a):
    """The array `a` typed as of any layout ('A'), as a column slice is: a separately compiled
    function called with it compiles once for contiguous arrays and slices alike (a 'C'
    array's specialization would be a second compile of seconds, for no speed)."""
    if not isinstance(a, types.Array):
        return None
    any_layout = a.copy(layout="A")

    def codegen(context, builder, signature, args):
        return impl_ret_borrowed(context, builder, any_layout, context.cast(builder, args[0], a, any_layout))

    return any_layout(a), codegen


@njit(inline="always")
def _units(a, row, start, count):
    """a's items start .. start + count of row `row`, a seen as (rows, last axis): for a
    (T, B, H) array, _units(a, t * B + b, u0, nu) is a[t, b, u0 : u0 + nu], as a view that
    holds no reference (_view)."""
    return _view(a, row * a.shape[-1] + start, (count,))


# -- row helpers -----------------------------------------------------------------------
# Row copies as plain loops: Numba's slice assignment and in-place array operators check
# for overlap and broadcast on every call, which costs more than the few vectors they move.
# The kernels assign no array to a slice at all: that compiles Numba's shape-mismatch
# message (string formatting, ~1-3 s a kernel on a cold cache).
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


@njit(inline="always")
def _hidden_buffers(h0):
    """A time loop's two hidden-state buffers, (2, B, H): step s reads h from [s % 2] and
    writes the other; [0] starts as h0."""
    buffers = np.empty((2,) + h0.shape, h0.dtype)
    for b in range(h0.shape[0]):
        _copy(h0[b], buffers[0, b])
    return buffers


# -- tall GEMMs after the time loop ------------------------------------------------------
# -- the batch cut across threads (inference: each slice of sequences on a thread of its own)
@njit(inline="always")
def _slice_in(w, slices, x2, x_parts, y_parts, h0, y):
    """Worker w's slice of a forward_sequences kernel: its first sequence b0, its number of
    sequences n, a copy of its input (x2's rows of its sequences, step by step: (T * n, I)) in
    x_parts[w], its output's place (T, n, H) in y_parts[w], and its hidden-state buffers
    (_hidden_buffers) from its rows of h0."""
    num_steps, total, hidden = y.shape
    width = x2.shape[1]
    b0 = slices[w]
    batch = slices[w + 1] - b0
    x_part = _view(x_parts, w * x_parts.shape[1], (num_steps * batch, width))
    for t in range(num_steps):
        for b in range(batch):
            _copy(_units(x2, t * total + b0 + b, 0, width), _units(x_part, t * batch + b, 0, width))
    y_part = _view(y_parts, w * y_parts.shape[1], (num_steps, batch, hidden))
    return b0, batch, x_part, y_part, _hidden_buffers(_view(h0, b0 * hidden, (batch, hidden)))


@njit(inline="always")
def _slice_out(b0, y_part, h_buffers, y, h_n):
    """A slice's output and final hidden state (after T steps) into its rows of y and h_n."""
    num_steps, batch, hidden = y_part.shape
    total = y.shape[1]
    for t in range(num_steps):
        for b in range(batch):
            _copy(_units(y_part, t * batch + b, 0, hidden), _units(y, t * total + b0 + b, 0, hidden))
    for b in range(batch):
        _copy(_units(h_buffers, (num_steps % 2) * batch + b, 0, hidden), _units(h_n, b0 + b, 0, hidden))


@njit(inline="always")
def _gemm_tall(a, a_transposed, b, c, accumulate, packed):
    """c (+)= op(a) @ b, op(a) = a.T if a_transposed: the float32 micro-kernel, reading the
    operands in place, when `packed` (a float32 plan) and c's width is whole panels; else BLAS.
    One compiled body (_tall_product) serves every call site, `a` whole rows or a column slice."""
    _call(_tall_product, (_any_layout(a), a_transposed, b, c, accumulate, packed))


@njit(**_OPTS)  # not inlined (_call): its call sites share one compiled body (compile time)
def _tall_product(a, a_transposed, b, c, accumulate, packed):
    """_gemm_tall's work."""
    if packed and c.shape[1] % PANEL == 0:
        _gemm_unpacked(a, a_transposed, b, c, accumulate)
    else:
        _blas_product(a, a_transposed, b, c, accumulate)


@njit(inline="always")  # inlined into the gradients kernels (numba_lstm.gradients)
def _times_previous_states(d, h_states, h0, reverse, out, packed):
    """out (N, H) = d.T @ h_prev over all T*B rows of d (T*B, N), h_prev being the state each
    step started from. h_{t-1} of every step but the first is another step's h: two GEMMs
    into one output, no (T, B, H) copy of the shifted states."""
    num_steps, batch, hidden = h_states.shape
    rows = num_steps * batch
    h2 = h_states.reshape((rows, hidden))
    if reverse:  # the first step is the last time step; it started from h0
        _gemm_tall(d[rows - batch :], True, h0, out, False, packed)
        if rows > batch:
            _gemm_tall(d[: rows - batch], True, h2[batch:], out, True, packed)
    else:
        _gemm_tall(d[:batch], True, h0, out, False, packed)
        if rows > batch:
            _gemm_tall(d[batch:], True, h2[: rows - batch], out, True, packed)


def source_digest() -> str:
    """The digest of this file that each cell's kernel file records (COMMON_SOURCE_DIGEST)."""
    return hashlib.sha256(pathlib.Path(__file__).read_bytes()).hexdigest()[:16]
