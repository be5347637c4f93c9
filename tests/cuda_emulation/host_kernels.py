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
    cmd = [compiler(), "-O1", "-shared", "-fPIC", "-std=c++20", "-pthread", f"-I{kernel_dir()}", f"-I{HERE}",
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
    """CupyKernels' interface on the host build. The persistent kernels run on a small
    'GPU': at most `blocks` blocks (so that blocks own several units) of `threads` threads,
    with `shared_limit` bytes of shared memory (small: several k-tiles per product)."""

    def __init__(self, library: Path, blocks: int = 3, threads: int = 32, shared_limit: int = 3072):
        self._lib = ctypes.CDLL(str(library))
        self.persistent_blocks = blocks
        self.persistent_threads = {4: threads, 8: threads}
        self.persistent_shared_limit = shared_limit

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

    def forward_persistent(self, plan, training, reverse, gates, bias, w_hh, h0, c0, h_states, c_states, y,
                           h_n, c_n, lengths, barrier):
        steps, batch, hidden = y.shape
        self._fn("forward_persistent", y)(
            ctypes.c_uint(plan.blocks), ctypes.c_uint(plan.threads), ctypes.c_ulonglong(plan.shared_forward),
            *map(ctypes.c_int, (int(training), steps, batch, hidden, plan.units, int(reverse), plan.tile_forward)),
            *map(_ptr, (gates, bias, w_hh, h0, c0, h_states, c_states, y, h_n, c_n, lengths, barrier)),
        )

    def backward_persistent(self, plan, reverse, gates, c_states, c0, dy, w_hh_t, dh_n, dc_n, d_gates, dh0, dc0,
                            lengths, barrier):
        steps, batch, hidden = dy.shape
        self._fn("backward_persistent", dy)(
            ctypes.c_uint(plan.blocks), ctypes.c_uint(plan.threads), ctypes.c_ulonglong(plan.shared_backward),
            *map(ctypes.c_int, (steps, batch, hidden, plan.units, int(reverse), plan.tile_backward)),
            *map(_ptr, (gates, c_states, c0, dy, w_hh_t, dh_n, dc_n, d_gates, dh0, dc0, lengths, barrier)),
        )
