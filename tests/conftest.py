"""Fixtures shared by the CUDA-emulation tests (test_cuda_host.py, test_cuda_graphs.py)."""

from __future__ import annotations

import ctypes
import sys

import pytest
from cuda_emulation import host_kernels
from cuda_emulation.fake_cupy import make_fake_cupy

from fastlstm import registry
from fastlstm.backends import cublas_api


@pytest.fixture(scope="session")
def library(tmp_path_factory):
    """kernels/*.cu built for the host."""
    return host_kernels.build(tmp_path_factory.mktemp("cuda_host"))


@pytest.fixture
def fake_cupy(library, monkeypatch):
    """A usable 'cupy' backend built from the fake module, its per-step loops replayed as
    graphs (cuBLAS through the fake's capture-aware emulation); registry restored afterwards."""
    fake = make_fake_cupy(library)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(cublas_api, "load", lambda binding=None, prefix="libcublas.so": (fake.cuda.cublas, ""))
    saved = dict(registry._probed)
    registry._probed.pop("cupy", None)
    yield fake
    registry._probed.clear()
    registry._probed.update(saved)


@pytest.fixture(scope="session")
def fake_cublas_library(tmp_path_factory):
    """(library, binding): cublas_host.c built and mapped into this process, as libcublas is
    once CuPy has loaded it, and a library linked against it, as CuPy's binding module is."""
    library, binding = host_kernels.build_fake_cublas(tmp_path_factory.mktemp("fake_cublas"))
    ctypes.CDLL(str(library))
    return library, binding
