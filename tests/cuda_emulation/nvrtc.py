"""NVRTC, the compiler CuPy runs on kernels/*.cu at first use on a GPU, through ctypes: it
needs no GPU, so the tests compile every kernel exactly as CuPy will (same options, same
name expressions) on a machine without one. nvcc accepting a source is not enough: NVRTC
has no host headers and its own defaults.

The library comes from the `nvidia-cuda-nvrtc` wheel (the test extra installs it on
Linux x86-64), the system's library path, or the CUDA toolkit beside nvcc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import importlib.util
import os
import shutil


def find_library() -> str | None:
    """Path of a libnvrtc shared object, or None."""
    candidates = []
    spec = importlib.util.find_spec("nvidia")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        # cu13/lib/libnvrtc.so.13 (CUDA 13 wheels), cuda_nvrtc/lib/libnvrtc.so.12 (CUDA 12)
        candidates += sorted(glob.glob(os.path.join(folder, "*", "lib", "libnvrtc.so*")))
    found = ctypes.util.find_library("nvrtc")
    if found:
        candidates.append(found)
    nvcc = shutil.which("nvcc")
    if nvcc:
        toolkit = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        candidates += sorted(glob.glob(os.path.join(toolkit, "lib*", "libnvrtc.so*")))
    for path in candidates:
        if "builtins" not in os.path.basename(path):
            try:
                ctypes.CDLL(path)
                return path
            except OSError:
                continue
    return None


class NvrtcError(RuntimeError):
    pass


class Nvrtc:
    def __init__(self, path: str):
        self._lib = ctypes.CDLL(path)
        self._lib.nvrtcGetErrorString.restype = ctypes.c_char_p

    def _check(self, status: int, what: str, log: str = "") -> None:
        if status != 0:
            message = self._lib.nvrtcGetErrorString(status).decode()
            raise NvrtcError(f"{what}: {message}" + (f"\n{log}" if log else ""))

    def version(self) -> tuple[int, int]:
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(self._lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
        return major.value, minor.value

    def compile(self, source: str, name: str, options, name_expressions) -> dict[str, str]:
        """Compile `source`; {name expression: lowered (mangled) name}. Raises NvrtcError
        with the compiler's log if it refuses."""
        program = ctypes.c_void_p()
        self._check(self._lib.nvrtcCreateProgram(ctypes.byref(program), source.encode(), name.encode(), 0, None, None),
                    "nvrtcCreateProgram")
        try:
            for expression in name_expressions:
                self._check(self._lib.nvrtcAddNameExpression(program, expression.encode()), "nvrtcAddNameExpression")
            encoded = [option.encode() for option in options]
            array = (ctypes.c_char_p * len(encoded))(*encoded)
            status = self._lib.nvrtcCompileProgram(program, len(encoded), array)
            self._check(status, f"nvrtcCompileProgram({name}, {' '.join(options)})", self._log(program))
            lowered = {}
            for expression in name_expressions:
                result = ctypes.c_char_p()
                self._check(self._lib.nvrtcGetLoweredName(program, expression.encode(), ctypes.byref(result)),
                            f"nvrtcGetLoweredName({expression})")
                lowered[expression] = result.value.decode()
            return lowered
        finally:
            self._lib.nvrtcDestroyProgram(ctypes.byref(program))

    def _log(self, program) -> str:
        size = ctypes.c_size_t()
        if self._lib.nvrtcGetProgramLogSize(program, ctypes.byref(size)) != 0:
            return ""
        buffer = ctypes.create_string_buffer(size.value)
        self._lib.nvrtcGetProgramLog(program, buffer)
        return buffer.value.decode(errors="replace")
