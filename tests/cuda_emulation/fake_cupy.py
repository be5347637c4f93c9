"""A stand-in for the ``cupy`` package, for testing the CuPy backend's host-side logic on a
machine without a GPU: "device" arrays are a NumPy subclass, cuBLAS's C API is emulated
with NumPy on raw pointers (column-major, as the real one), and RawModule functions
launch the host build of kernels/*.cu (host_kernels.py).

Streams and graph capture behave as CUDA's do where it matters to a caller: work queued
on a stream that is being captured is recorded, not run (a graph runs it when launched,
with the addresses and scalars it was recorded with); capturing the legacy stream, work
on the legacy stream while another is capturing, and allocating while capturing raise.
Allocations come from a pool, as CuPy's do: a freed block is handed out again to the next
request of its size, so a launch or graph that kept the address of an array freed since
reads another array's values, as it would on a GPU.
"""

from __future__ import annotations

import ctypes
import re
import time
import types
import weakref
from collections import defaultdict

import numpy as np

LEGACY_STREAM = 0
DEFAULT_SHARED_BYTES = 48 * 1024  # dynamic shared memory a kernel gets without opting in
OPTIN_SHARED_BYTES = 227 * 1024  # the most a kernel may opt in to (sharedMemPerBlockOptin, Hopper)
_capturing = set()  # streams being captured, in every fake module


def _refuse_allocation_while_capturing():
    if _capturing:
        raise RuntimeError("cudaErrorStreamCaptureUnsupported: memory allocated while a stream is being captured")


class _Pool:
    """CuPy's memory pool in miniature: blocks of whole 512 bytes; a block comes back when
    the array made on it (and every view of it) is gone, and the next request of its size
    takes the block freed last."""

    UNIT = 512

    def __init__(self):
        self._free = defaultdict(list)

    def allocate(self, shape, dtype):
        _refuse_allocation_while_capturing()
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        size = max(1, -(-nbytes // self.UNIT)) * self.UNIT
        free = self._free[size]
        block = free.pop() if free else np.empty(size, dtype=np.uint8)
        array = block[:nbytes].view(dtype).reshape(shape).view(ndarray)
        # Views of `array` of this type keep it (their base) alive: NumPy does not collapse
        # a view's base past an array of another type. (Plain NumPy views of it do not:
        # np.asarray(array) must not outlive it.)
        weakref.finalize(array, free.append, block)
        return array

    def device_copy(self, value, dtype=None):
        value = np.asarray(value, dtype=dtype)
        array = self.allocate(value.shape, value.dtype)
        array[...] = value
        return array


_POOL = _Pool()


class ndarray(np.ndarray):  # noqa: N801 - mirrors cupy.ndarray
    """A 'device' array: NumPy memory, but a different type, as a CuPy array would be."""

    @property
    def data(self):  # cupy.ndarray.data is a MemoryPointer: .ptr is the address
        return types.SimpleNamespace(ptr=self.ctypes.data)

    def copy(self, order="C"):
        return _POOL.device_copy(self)


ndarray.__module__ = "cupy"


def _arg(value):
    if isinstance(value, np.ndarray):
        assert value.flags.c_contiguous
        return ctypes.c_void_p(value.ctypes.data)
    if isinstance(value, np.int32):
        return ctypes.c_int(int(value))
    if isinstance(value, np.int64):
        return ctypes.c_longlong(int(value))
    raise TypeError(f"kernel argument of type {type(value).__name__}: pass NumPy scalars of the C type")


class Graph:
    """What a capture recorded; launch() runs it (on the stream given or the current one)."""

    def __init__(self, streams, work):
        self._streams, self._work = streams, work
        self.launches = 0

    def launch(self, stream=None):
        self.launches += 1
        target = stream if stream is not None else self._streams.current()
        for item in self._work:
            self._streams.submit(target.ptr, item)


class Event:
    """A CUDA event: record() queues taking the host clock on the current stream (the fake
    runs work as it is queued, so that is when the work before it has finished)."""

    def __init__(self, streams):
        self._streams = streams
        self.time = None

    def record(self, stream=None):
        target = stream if stream is not None else self._streams.current()
        self._streams.submit(target.ptr, lambda: setattr(self, "time", time.perf_counter()))

    def synchronize(self):
        assert self.time is not None, "synchronized on an event never recorded"


def get_elapsed_time(start: Event, stop: Event) -> float:
    """Milliseconds between two recorded events, as cupy.cuda.get_elapsed_time."""
    return (stop.time - start.time) * 1e3


class Streams:
    """The fake's streams: a stack of current streams and each stream's capture, if any."""

    def __init__(self):
        self.by_ptr = {}
        self.stack = [self.Stream(self, ptr=LEGACY_STREAM)]

    class Stream:
        def __init__(self, streams, non_blocking=False, ptr=None):
            self._streams = streams
            self.ptr = ptr if ptr is not None else 1000 + len(streams.by_ptr)
            self.captured = None  # the recorded work while capturing
            streams.by_ptr[self.ptr] = self

        def __enter__(self):
            self._streams.stack.append(self)
            return self

        def __exit__(self, *exc):
            self._streams.stack.pop()

        def begin_capture(self, mode=None):
            if self.ptr == LEGACY_STREAM:
                raise RuntimeError("cudaErrorStreamCaptureUnsupported: the legacy stream cannot be captured")
            self.captured = []
            _capturing.add(self)

        def end_capture(self):
            work, self.captured = self.captured, None
            _capturing.discard(self)
            return Graph(self._streams, work)

        def is_capturing(self):
            return self.captured is not None

    def new_stream(self, non_blocking=False):
        return self.Stream(self, non_blocking)

    def current(self):
        return self.stack[-1]

    def submit(self, stream_ptr, work):
        """Run `work` now, or record it if its stream is being captured."""
        stream = self.by_ptr[stream_ptr]
        if stream.captured is not None:
            stream.captured.append(work)
        elif _capturing and stream_ptr == LEGACY_STREAM:
            raise RuntimeError("cudaErrorStreamCaptureImplicit: legacy-stream work while a stream is captured")
        else:
            work()


class _Function:
    """A RawModule function: launch(grid, block, args) -> the host build's entry point, on
    the current stream."""

    def __init__(self, library, name, streams):
        match = re.fullmatch(r"(\w+)<(float|double)(?:, (true|false))?>", name)
        assert match, name
        kernel, ctype, training = match.groups()
        entry = kernel.removeprefix("lstm_")
        self._fn = getattr(library, f"{entry}_{'f32' if ctype == 'float' else 'f64'}")
        self._training = training
        self._threads = entry.endswith(("_persistent", "_resident"))  # host threads, shared memory
        self._streams = streams
        self.launches = 0
        self._shared_allowed = DEFAULT_SHARED_BYTES  # CUDA's default; a kernel may be allowed more

    @property
    def max_dynamic_shared_size_bytes(self):  # RawKernel's attribute: cuFuncSetAttribute
        return self._shared_allowed

    @max_dynamic_shared_size_bytes.setter
    def max_dynamic_shared_size_bytes(self, size):
        if size > OPTIN_SHARED_BYTES:
            raise RuntimeError(f"CUDA_ERROR_INVALID_VALUE: {size} bytes of dynamic shared memory > {OPTIN_SHARED_BYTES}")
        self._shared_allowed = size

    def __call__(self, grid, block, args, shared_mem=0):
        self.launches += 1
        shape = [ctypes.c_uint(g) for g in grid] + [ctypes.c_uint(block[0])]
        if shared_mem > self.max_dynamic_shared_size_bytes:  # cudaErrorInvalidValue on a GPU
            raise RuntimeError(f"launch asks for {shared_mem} bytes of dynamic shared memory; the kernel may use "
                               f"{self.max_dynamic_shared_size_bytes}")
        if self._threads:
            shape.append(ctypes.c_ulonglong(shared_mem))
        else:
            assert shared_mem == 0
        if self._training is not None:
            shape.append(ctypes.c_int(self._training == "true"))
        arguments = [*shape, *map(_arg, args)]  # the values of now, as a captured launch keeps them
        self._streams.submit(self._streams.current().ptr, lambda: self._fn(*arguments))


def make_fake_cupy(library_path) -> types.ModuleType:
    library = ctypes.CDLL(str(library_path))
    streams = Streams()
    cupy = types.ModuleType("cupy")
    cupy.__version__ = "0.0-fake"
    cupy.ndarray = ndarray
    cupy.compiled = []  # what RawModule was asked to compile
    cupy.is_available = lambda: True

    def asarray(a, dtype=None):
        same = isinstance(a, ndarray) and (dtype is None or a.dtype == dtype)
        return a if same else _POOL.device_copy(a, dtype)

    cupy.asarray = asarray
    cupy.asnumpy = lambda a: np.array(a, copy=True).view(np.ndarray)
    cupy.from_dlpack = lambda a: np.from_dlpack(a).view(ndarray)  # no copy, as through DLPack

    def allocating(function):
        return lambda *args, **kwargs: _POOL.device_copy(function(*args, **kwargs))

    for name in ("zeros", "empty", "full", "zeros_like", "empty_like", "concatenate", "stack", "where", "arange"):
        setattr(cupy, name, allocating(getattr(np, name)))

    def ascontiguousarray(a, dtype=None):
        same = isinstance(a, ndarray) and a.flags.c_contiguous and (dtype is None or a.dtype == dtype)
        return a if same else _POOL.device_copy(np.ascontiguousarray(a, dtype=dtype))

    cupy.ascontiguousarray = ascontiguousarray
    cupy.tanh, cupy.exp, cupy.abs = np.tanh, np.exp, np.abs

    class RawModule:
        def __init__(self, code, options, name_expressions):
            assert '#include "rnn_common.cuh"' in code or '#include "resident_common.cuh"' in code
            assert any(o.startswith("-I") for o in options)
            cupy.compiled.append(tuple(name_expressions))
            self._functions = {name: _Function(library, name, streams) for name in name_expressions}

        def get_function(self, name):
            return self._functions[name]

    cupy.RawModule = RawModule
    cuda = types.SimpleNamespace(
        Device=lambda: types.SimpleNamespace(id=0),
        runtime=types.SimpleNamespace(
            getDeviceProperties=lambda i: {"name": b"Fake GPU", "multiProcessorCount": 3, "major": 9,
                                           "sharedMemPerBlockOptin": OPTIN_SHARED_BYTES}),
        cublas=FakeCublas(streams),
        get_cublas_handle=lambda: FakeCublas.HANDLE,
        get_current_stream=streams.current,
        Stream=streams.new_stream,
        Event=lambda: Event(streams),
        get_elapsed_time=get_elapsed_time,
        streams=streams,
    )
    cupy.cuda = cuda
    return cupy


def _column_major(address, rows, cols, ld, dtype):
    """A NumPy view of a column-major (rows x cols) matrix with leading dimension ld at address."""
    assert ld >= max(1, rows), f"cuBLAS would refuse ld={ld} for {rows} rows (CUBLAS_STATUS_INVALID_VALUE)"
    itemsize = np.dtype(dtype).itemsize
    count = ld * (cols - 1) + rows
    flat = np.frombuffer((ctypes.c_char * (count * itemsize)).from_address(address), dtype=dtype)
    return np.lib.stride_tricks.as_strided(flat, shape=(rows, cols), strides=(itemsize, ld * itemsize))


class FakeCublas:
    """cuBLAS's C gemm on host pointers, column-major like the real one, recording its calls
    and the workspace each was given ((address, bytes), or None: the default, which
    setStream restores as cuBLAS's does); run on the stream last set (recorded there while
    it is being captured)."""

    CUBLAS_POINTER_MODE_HOST = 0
    HANDLE = 7

    def __init__(self, streams):
        self._streams = streams
        self.calls = []
        self.workspaces = []  # per call
        self.stream = self.pointer_mode = self.workspace = None

    def setStream(self, handle, stream):  # noqa: N802 - the binding's name
        assert handle == self.HANDLE
        self.stream = stream
        self.workspace = None

    def setWorkspace(self, handle, workspace, nbytes):  # noqa: N802
        assert handle == self.HANDLE and nbytes > 0
        self.workspace = (workspace, nbytes)

    def setPointerMode(self, handle, mode):  # noqa: N802
        assert handle == self.HANDLE
        self.pointer_mode = mode

    def sgemm(self, *args):
        self._gemm(np.float32, *args)

    def dgemm(self, *args):
        self._gemm(np.float64, *args)

    def _gemm(self, dtype, handle, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
        assert handle == self.HANDLE and self.stream in self._streams.by_ptr
        assert self.pointer_mode == self.CUBLAS_POINTER_MODE_HOST
        self.calls.append((np.dtype(dtype).name, transa, transb, m, n, k))
        self.workspaces.append(self.workspace)
        scalar = np.ctypeslib.as_ctypes_type(dtype)
        alpha, beta = scalar.from_address(alpha).value, scalar.from_address(beta).value
        op_a = _column_major(a, *((m, k) if transa == 0 else (k, m)), lda, dtype)
        op_b = _column_major(b, *((k, n) if transb == 0 else (n, k)), ldb, dtype)
        op_a = op_a if transa == 0 else op_a.T
        op_b = op_b if transb == 0 else op_b.T
        out = _column_major(c, m, n, ldc, dtype)

        def run():
            product = alpha * (op_a @ op_b)
            out[...] = product if beta == 0 else product + beta * out  # beta 0: C is not read

        self._streams.submit(self.stream, run)
