"""A stand-in for the ``cupy`` package, for testing the CuPy backend's host-side logic on a
machine without a GPU: "device" arrays are a NumPy subclass, cuBLAS's C API is emulated
with NumPy on raw pointers (column-major, as the real one), and RawModule functions
launch the host build of kernels/*.cu (host_kernels.py).
"""

from __future__ import annotations

import ctypes
import re
import types

import numpy as np


class ndarray(np.ndarray):  # noqa: N801 - mirrors cupy.ndarray
    """A 'device' array: NumPy memory, but a different type, as a CuPy array would be."""

    @property
    def data(self):  # cupy.ndarray.data is a MemoryPointer: .ptr is the address
        return types.SimpleNamespace(ptr=self.ctypes.data)


ndarray.__module__ = "cupy"


def _device(array):
    return np.ascontiguousarray(array).view(ndarray) if not isinstance(array, ndarray) else array


def _arg(value):
    if isinstance(value, np.ndarray):
        assert value.flags.c_contiguous
        return ctypes.c_void_p(value.ctypes.data)
    if isinstance(value, np.int32):
        return ctypes.c_int(int(value))
    if isinstance(value, np.int64):
        return ctypes.c_longlong(int(value))
    raise TypeError(f"kernel argument of type {type(value).__name__}: pass NumPy scalars of the C type")


class _Function:
    """A RawModule function: launch(grid, block, args) -> the host build's entry point."""

    def __init__(self, library, name):
        match = re.fullmatch(r"(\w+)<(float|double)(?:, (true|false))?>", name)
        assert match, name
        kernel, ctype, training = match.groups()
        entry = kernel.removeprefix("lstm_")
        self._fn = getattr(library, f"{entry}_{'f32' if ctype == 'float' else 'f64'}")
        self._training = training
        self._persistent = entry.endswith("_persistent")  # host threads, shared memory
        self.launches = 0

    def __call__(self, grid, block, args, shared_mem=0):
        self.launches += 1
        shape = [ctypes.c_uint(g) for g in grid] + [ctypes.c_uint(block[0])]
        if self._persistent:
            shape.append(ctypes.c_ulonglong(shared_mem))
        else:
            assert shared_mem == 0
        if self._training is not None:
            shape.append(ctypes.c_int(self._training == "true"))
        self._fn(*shape, *map(_arg, args))


def make_fake_cupy(library_path) -> types.ModuleType:
    library = ctypes.CDLL(str(library_path))
    cupy = types.ModuleType("cupy")
    cupy.__version__ = "0.0-fake"
    cupy.ndarray = ndarray
    cupy.compiled = []  # what RawModule was asked to compile
    cupy.is_available = lambda: True
    cupy.asarray = lambda a, dtype=None: _device(np.asarray(a, dtype=dtype))
    cupy.asnumpy = lambda a: np.array(a, copy=True).view(np.ndarray)
    cupy.from_dlpack = lambda a: _device(np.from_dlpack(a))
    for name in ("zeros", "empty", "full", "zeros_like", "empty_like", "concatenate", "ascontiguousarray", "where"):
        setattr(cupy, name, (lambda f: lambda *a, **k: _device(f(*a, **k)))(getattr(np, name)))
    cupy.arange = lambda *a, **k: _device(np.arange(*a, **k))
    cupy.tanh, cupy.exp, cupy.abs = np.tanh, np.exp, np.abs

    class RawModule:
        def __init__(self, code, options, name_expressions):
            assert '#include "lstm_common.cuh"' in code
            assert any(o.startswith("-I") for o in options)
            cupy.compiled.append(tuple(name_expressions))
            self._functions = {name: _Function(library, name) for name in name_expressions}

        def get_function(self, name):
            return self._functions[name]

    cupy.RawModule = RawModule
    cuda = types.SimpleNamespace(
        Device=lambda: types.SimpleNamespace(id=0),
        runtime=types.SimpleNamespace(getDeviceProperties=lambda i: {"name": b"Fake GPU", "multiProcessorCount": 3}),
        cublas=FakeCublas(),
        get_cublas_handle=lambda: FakeCublas.HANDLE,
        get_current_stream=lambda: types.SimpleNamespace(ptr=FakeCublas.STREAM),
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
    """cuBLAS's C gemm on host pointers, column-major like the real one, recording its calls."""

    CUBLAS_POINTER_MODE_HOST = 0
    HANDLE, STREAM = 7, 11

    def __init__(self):
        self.calls = []
        self.stream = self.pointer_mode = None

    def setStream(self, handle, stream):  # noqa: N802 - the binding's name
        assert handle == self.HANDLE
        self.stream = stream

    def setPointerMode(self, handle, mode):  # noqa: N802
        assert handle == self.HANDLE
        self.pointer_mode = mode

    def sgemm(self, *args):
        self._gemm(np.float32, *args)

    def dgemm(self, *args):
        self._gemm(np.float64, *args)

    def _gemm(self, dtype, handle, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
        assert handle == self.HANDLE and self.stream == self.STREAM
        assert self.pointer_mode == self.CUBLAS_POINTER_MODE_HOST
        self.calls.append((np.dtype(dtype).name, transa, transb, m, n, k))
        scalar = np.ctypeslib.as_ctypes_type(dtype)
        alpha, beta = scalar.from_address(alpha).value, scalar.from_address(beta).value
        op_a = _column_major(a, *((m, k) if transa == 0 else (k, m)), lda, dtype)
        op_b = _column_major(b, *((k, n) if transb == 0 else (n, k)), ldb, dtype)
        op_a = op_a if transa == 0 else op_a.T
        op_b = op_b if transb == 0 else op_b.T
        out = _column_major(c, m, n, ldc, dtype)
        product = alpha * (op_a @ op_b)
        out[...] = product if beta == 0 else product + beta * out  # beta 0: C is not read
