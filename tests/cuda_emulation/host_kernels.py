"""The CUDA kernels of kernels/*.cu compiled for the host and driven by the real CupyKernels.

``build()`` compiles kernels_host.cpp (the same .cu sources under cuda_host.h) with
the system C++ compiler; ``emulated_kernels`` is CupyKernels over the fake ``cupy``
module (fake_cupy.py), whose RawModule functions launch that host build, so the
backend's own launchers (names, argument types, launch shapes) are what the tests run;
``numpy_gemm`` is the GEMM seam. Together they run the CuPy backend's sequence logic on
a machine without a GPU.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from fastlstm.backends.cupy_backend import CupyKernels, kernel_dir

from .fake_cupy import make_fake_cupy

HERE = Path(__file__).resolve().parent


def compiler() -> str | None:
    return shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


def build(out_dir: Path) -> Path:
    library = out_dir / "fastlstm_kernels_host.so"
    cmd = [compiler(), "-O1", "-shared", "-fPIC", "-std=c++20", "-pthread", f"-I{kernel_dir()}", f"-I{HERE}",
           str(HERE / "kernels_host.cpp"), "-o", str(library)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return library


def build_fake_cublas(out_dir: Path) -> tuple[Path, Path]:
    """cublas_host.c as a shared library (the C functions cublas_api binds, on the host), and
    an empty library linked against it, as CuPy's binding module is linked against libcublas."""
    library = out_dir / "libfakecublas_host.so"
    binding = out_dir / "fake_cublas_binding.so"
    empty = out_dir / "empty.c"
    empty.write_text("/* nothing of its own: its cuBLAS functions come from the library it links */\n")
    for cmd in ([compiler(), "-O1", "-shared", "-fPIC", "-x", "c", str(HERE / "cublas_host.c"), "-o", str(library)],
                [compiler(), "-shared", "-fPIC", "-x", "c", str(empty), "-o", str(binding), f"-L{out_dir}",
                 "-Wl,--no-as-needed", "-lfakecublas_host", f"-Wl,-rpath,{out_dir}"]):
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    return library, binding


def numpy_gemm(transa, transb, a, b, out, beta):
    op_a = a.T if transa == "T" else a
    op_b = b.T if transb == "T" else b
    out[...] = op_a @ op_b + (beta * out if beta else 0)


def emulated_kernels(library: Path, blocks: int = 3, threads: int = 32, shared_limit: int = 3072) -> CupyKernels:
    """CupyKernels launching the host build. The persistent kernels run on a small 'GPU':
    at most `blocks` blocks (so that blocks own several units) of `threads` threads, with
    `shared_limit` bytes of shared memory (small: several k-tiles per product)."""
    kernels = CupyKernels(make_fake_cupy(library))
    kernels.persistent_blocks = blocks
    kernels.persistent_threads = {4: threads, 8: threads}
    kernels.persistent_shared_limit = shared_limit
    return kernels
