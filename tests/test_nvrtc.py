"""Every kernel compiled by NVRTC as CuPy compiles it on a GPU (the backend's own source
list, name expressions and options), for the two architectures the benchmarks' cards
have: a source that nvcc builds but NVRTC refuses fails here, not on a lent GPU."""

from __future__ import annotations

import re

import pytest
from cuda_emulation import nvrtc

from fastlstm.backends.cupy_backend import kernel_dir, kernel_sources, nvrtc_options

LIBRARY = nvrtc.find_library()
pytestmark = pytest.mark.skipif(LIBRARY is None, reason="no libnvrtc (pip install nvidia-cuda-nvrtc, Linux x86-64)")
ARCHITECTURES = ("compute_80", "sm_90")  # A100 as PTX, H100 / H200 as a binary


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("source", sorted(kernel_sources()))
def test_kernels_compile_with_nvrtc_as_cupy_compiles_them(source, architecture):
    names = kernel_sources()[source]
    compiler = nvrtc.Nvrtc(LIBRARY)
    lowered = compiler.compile((kernel_dir() / source).read_text(), source,
                               (*nvrtc_options(), f"--gpu-architecture={architecture}"), names)
    assert sorted(lowered) == sorted(names)
    for expression, mangled in lowered.items():  # each instantiation found, under its own C++ name
        assert mangled.startswith("_Z") and re.match(r"\w+", expression).group() in mangled, (expression, mangled)


def test_nvrtc_refusals_come_back_with_the_log():
    """The check above can fail: a source NVRTC refuses raises, with the compiler's message."""
    compiler = nvrtc.Nvrtc(LIBRARY)
    assert compiler.version() >= (12, 0)
    with pytest.raises(nvrtc.NvrtcError, match="cmath"):
        compiler.compile('#include <cmath>\n__global__ void k(float* x) { x[0] = std::sqrt(x[0]); }',
                         "host_header.cu", ("--std=c++14",), ())
    with pytest.raises(nvrtc.NvrtcError, match="identifier \"not_there\" is undefined"):  # a name expression
        compiler.compile("template <typename T> __global__ void k(T* x) {}", "missing.cu", ("--std=c++14",),
                         ("k<float>", "not_there<int>"))
