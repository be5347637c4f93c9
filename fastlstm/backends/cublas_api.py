"""The five cuBLAS C functions the CuPy backend calls, through ctypes on the libcublas
that CuPy has already loaded into this process.

Why not CuPy's own binding (``cupy.cuda.cublas``): every one of its calls checks whether
the stream is being captured into a CUDA graph and refuses if so ("calling cuBLAS API
during stream capture is currently unsupported", seen on an H200 with CuPy 14), although
cuBLAS itself can be captured (CUDA 12.2 and later allocate its workspace stream-ordered).
The per-step time loop is replayed as a graph (cuda_graphs.py), so its GEMMs must be
capturable. The methods keep the names and argument order of CuPy's binding, so either
one can serve ``CublasGemm``.

The handle comes from CuPy, and a handle is only valid in the library instance that made
it, so the functions are looked up through CuPy's binding module itself: dlsym on it
resolves to the very libcublas it was linked against. (A process can map two copies,
e.g. CuPy's and PyTorch's, from different paths.)
"""

from __future__ import annotations

import ctypes
import os

# cublasStatus_t values (cublas_api.h) for error messages.
_STATUS_NAMES = {
    1: "CUBLAS_STATUS_NOT_INITIALIZED",
    3: "CUBLAS_STATUS_ALLOC_FAILED",
    7: "CUBLAS_STATUS_INVALID_VALUE",
    8: "CUBLAS_STATUS_ARCH_MISMATCH",
    11: "CUBLAS_STATUS_MAPPING_ERROR",
    13: "CUBLAS_STATUS_EXECUTION_FAILED",
    14: "CUBLAS_STATUS_INTERNAL_ERROR",
    15: "CUBLAS_STATUS_NOT_SUPPORTED",
}


def loaded_library_path(prefix: str, maps: str = "/proc/self/maps") -> str | None:
    """Path of a shared object mapped into this process whose file name starts with
    `prefix` (e.g. "libcublas.so", which "libcublasLt.so..." does not match), or None."""
    try:
        with open(maps) as lines:
            for line in lines:
                fields = line.split(None, 5)
                if len(fields) == 6:
                    path = fields[5].strip()
                    if os.path.basename(path).startswith(prefix):
                        return path
    except OSError:
        return None
    return None


class CublasError(RuntimeError):
    pass


class CtypesCublas:
    """cublasSetStream_v2, cublasSetWorkspace_v2, cublasSetPointerMode_v2, cublasSgemm_v2 and
    cublasDgemm_v2 of the library at `path`, named as in CuPy's binding. Handles, streams
    and device pointers are integers (addresses); alpha and beta are host addresses
    (pointer mode host)."""

    CUBLAS_POINTER_MODE_HOST = 0

    def __init__(self, path: str):
        self.path = path
        library = ctypes.CDLL(path)
        p, i = ctypes.c_void_p, ctypes.c_int
        gemm_args = (p, i, i, i, i, i, p, p, i, p, i, p, p, i)
        self._functions = {}
        for name, argtypes in (("cublasSetStream_v2", (p, p)), ("cublasSetWorkspace_v2", (p, p, ctypes.c_size_t)),
                               ("cublasSetPointerMode_v2", (p, i)), ("cublasSgemm_v2", gemm_args),
                               ("cublasDgemm_v2", gemm_args)):
            function = getattr(library, name)
            function.argtypes, function.restype = argtypes, ctypes.c_int
            self._functions[name] = function

    def _call(self, name, *args):
        status = self._functions[name](*args)
        if status != 0:
            raise CublasError(f"{name} returned {status} ({_STATUS_NAMES.get(status, 'unknown status')})")

    def setStream(self, handle, stream):  # noqa: N802 - the binding's names
        self._call("cublasSetStream_v2", handle, stream)

    def setWorkspace(self, handle, workspace, nbytes):  # noqa: N802
        self._call("cublasSetWorkspace_v2", handle, workspace, nbytes)

    def setPointerMode(self, handle, mode):  # noqa: N802
        self._call("cublasSetPointerMode_v2", handle, mode)

    def sgemm(self, handle, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
        self._call("cublasSgemm_v2", handle, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)

    def dgemm(self, handle, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
        self._call("cublasDgemm_v2", handle, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)


def load(binding=None, prefix: str = "libcublas.so") -> tuple[CtypesCublas | None, str]:
    """(the ctypes API, "") or (None, why not). Looked up through `binding`, CuPy's cuBLAS
    binding module (its shared object's file), else on the first libcublas mapped into
    this process. Call after CuPy has loaded cuBLAS (cupy.cuda.get_cublas_handle())."""
    candidates = [path for path in (getattr(binding, "__file__", None), loaded_library_path(prefix)) if path]
    errors = []
    for path in candidates:
        try:
            return CtypesCublas(path), ""
        except (OSError, AttributeError) as error:  # not a shared object, or not linked to cuBLAS
            errors.append(f"{path}: {error}")
    return None, "; ".join(errors) or f"no {prefix}* mapped in this process"
