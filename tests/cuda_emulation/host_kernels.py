"""The CUDA kernels of kernels/*.cu compiled for the host and driven like CupyKernels.

``build()`` compiles kernels_host.cpp (the same .cu sources under cuda_host.h) with
the system C++ compiler; ``HostKernels`` has CupyKernels' methods, launching the
host build over NumPy arrays with the same launch shapes; ``numpy_gemm`` is the GEMM
seam. Together they run the CuPy backend's sequence logic on a machine without a GPU.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np

from fastlstm.backends.cupy_backend import launch_shape, kernel_dir

HERE = Path(__file__).resolve().parent


def compiler() -> str | None:
    return shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def build(out_dir: Path) -> Path:
    library = out_dir / "fastlstm_kernels_host.so"
    cmd = [compiler(), "-O1", "-shared", "-fPIC", "-std=c++17", f"-I{kernel_dir()}", f"-I{HERE}",
           str(HERE / "kernels_host.cpp"), "-o", str(library)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return library


def numpy_gemm(transa, transb, a, b, out, beta):
    op_a = a.T if transa == "T" else a
    op_b = b.T if transb == "T" else b
    out[...] = op_a @ op_b + (beta * out if beta else 0)


def _ptr(array):
    assert array.flags.c_contiguous, "kernels take contiguous arrays"
    return ctypes.c_void_p(array.ctypes.data)


class HostKernels:
    def __init__(self, library: Path):
        self._lib = ctypes.CDLL(str(library))

    def _fn(self, name, array):
        return getattr(self._lib, f"{name}_{'f32' if array.dtype == np.float32 else 'f64'}")

    def forward_step(self, t, training, gates_t, bias, h_prev, c_prev, h_out, c_out, y_t, lengths):
        batch, hidden = h_out.shape
        grid, block = launch_shape(batch * hidden)
        self._fn("forward_step", h_out)(
            ctypes.c_uint(grid), ctypes.c_uint(block), ctypes.c_int(int(training)), ctypes.c_int(batch),
            ctypes.c_int(hidden), ctypes.c_int(t), *map(_ptr, (gates_t, bias, h_prev, c_prev, h_out, c_out, y_t, lengths)),
        )

    def backward_step(self, t, gates_t, c_t, c_before, dy_t, dh_in, dh_out, dc, d_gates_t, lengths):
        batch, hidden = dc.shape
        grid, block = launch_shape(batch * hidden)
        self._fn("backward_step", dc)(
            ctypes.c_uint(grid), ctypes.c_uint(block), ctypes.c_int(batch), ctypes.c_int(hidden), ctypes.c_int(t),
            *map(_ptr, (gates_t, c_t, c_before, dy_t, dh_in, dh_out, dc, d_gates_t, lengths)),
        )

    def column_sum(self, a2, rows_per_chunk, partial):
        rows, cols = a2.shape
        grid_x, block = launch_shape(cols)
        self._fn("column_sum", a2)(
            ctypes.c_uint(grid_x), ctypes.c_uint(partial.shape[0]), ctypes.c_uint(block), ctypes.c_longlong(rows),
            ctypes.c_int(cols), ctypes.c_longlong(rows_per_chunk), _ptr(a2), _ptr(partial),
        )
