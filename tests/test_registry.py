"""The backend registry: detection, selection, fallback, and what importing costs."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import fastlstm
from fastlstm import registry

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def clean_registry(monkeypatch):
    """Registry state restored after the test; FASTLSTM_BACKEND unset."""
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    saved = dict(registry._probed), registry._default_choice
    yield registry
    registry._probed.clear()
    registry._probed.update(saved[0])
    registry._default_choice = saved[1]


@pytest.fixture
def numba_missing(clean_registry, monkeypatch):
    monkeypatch.setitem(registry._MODULES, "numba", "fastlstm_tests_no_such_module")
    registry._probed.pop("numba", None)
    return registry


def run_python(code: str, env_extra: dict | None = None) -> dict:
    """Run code in a fresh interpreter with the checkout importable; it prints one JSON line."""
    import os

    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop(registry.ENV_VAR, None)
    env.update(env_extra or {})
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         env=env, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_available_backends_reports_every_backend():
    statuses = fastlstm.available_backends()
    assert list(statuses) == ["numpy", "numba", "cupy"]
    for name, status in statuses.items():
        assert isinstance(status, fastlstm.BackendStatus) and status.name == name
        assert isinstance(status.available, bool) and status.reason
    assert statuses["numpy"].available


def test_unknown_backend_lists_the_valid_ones(clean_registry):
    for call in (lambda: fastlstm.set_backend("jax"), lambda: fastlstm.LSTM(2, 3, backend="jax")):
        with pytest.raises(ValueError, match="backend: unknown backend 'jax'; expected one of numpy, numba, cupy, auto"):
            call()
    with pytest.raises(ValueError):
        with fastlstm.use_backend("jax"):
            pass


def test_explicit_unavailable_backend_names_what_is_missing(numba_missing):
    assert issubclass(fastlstm.BackendUnavailableError, RuntimeError)
    status = fastlstm.available_backends()["numba"]
    assert not status.available and "fastlstm_tests_no_such_module" in status.reason
    with pytest.raises(fastlstm.BackendUnavailableError, match=r"backend 'numba' is not available: .*pip install 'fastlstm\[numba\]'"):
        fastlstm.LSTM(2, 3, backend="numba")
    with pytest.raises(fastlstm.BackendUnavailableError):
        fastlstm.set_backend("numba")
    with pytest.raises(fastlstm.BackendUnavailableError):
        with fastlstm.use_backend("numba"):
            pass


def test_auto_falls_back_and_logs_why(numba_missing, caplog):
    registry._auto_explained = False
    with caplog.at_level(logging.INFO, logger="fastlstm"):
        lstm = fastlstm.LSTM(2, 3, backend="auto")
    if fastlstm.available_backends()["cupy"].available:
        pytest.skip("a usable GPU: auto picks cupy")
    assert lstm.backend == "numpy"
    text = caplog.text
    assert "skipped cupy" in text and "skipped numba" in text and "using numpy" in text


@pytest.mark.skipif(not fastlstm.available_backends()["numba"].available, reason="numba backend unavailable")
def test_use_backend_set_backend_and_env(clean_registry, monkeypatch):
    expected_auto = "cupy" if fastlstm.available_backends()["cupy"].available else "numba"
    assert fastlstm.get_backend() == expected_auto
    lstm = fastlstm.LSTM(3, 4)  # follows the choice in effect at each call
    x = np.ones((4, 2, 3))
    with fastlstm.use_backend("numpy") as name:
        assert name == "numpy" and fastlstm.get_backend() == "numpy" and lstm.backend == "numpy"
        y_numpy, _ = lstm(x)
        with fastlstm.use_backend("numba"):
            assert lstm.backend == "numba"
            y_numba, _ = lstm(x)
        assert fastlstm.get_backend() == "numpy"
    np.testing.assert_allclose(y_numba, y_numpy, rtol=1e-5, atol=1e-7)
    fastlstm.set_backend("numpy")
    assert fastlstm.get_backend() == "numpy"
    fixed = fastlstm.LSTM(3, 4, backend="numba")
    assert fixed.backend == "numba"  # an explicit choice wins over the global one
    fastlstm.set_backend(None)
    monkeypatch.setenv(registry.ENV_VAR, "numpy")
    assert fastlstm.get_backend() == "numpy"
    monkeypatch.setenv(registry.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="FASTLSTM_BACKEND: unknown backend 'bogus'"):
        fastlstm.get_backend()


def test_layer_moves_between_backends_keeping_weights(clean_registry):
    lstm = fastlstm.LSTM(3, 4, backend="numpy")
    before = lstm.state_dict()
    target = "numba" if fastlstm.available_backends()["numba"].available else "numpy"
    assert lstm.to(target) is lstm and lstm.backend == target
    for k, v in lstm.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_import_imports_no_framework_and_compiles_nothing():
    result = run_python(
        """
        import sys, json
        import fastlstm
        heavy = [m for m in ("numba", "cupy", "scipy", "torch", "threadpoolctl") if m in sys.modules]
        statuses = fastlstm.available_backends()
        compiled = None
        if statuses["numba"].available:
            from fastlstm.kernels import numba_common as c, numba_gru as g, numba_lstm as k
            kernels = [f for m in (k, g) for f in (m.forward, m.forward_sequences, m.backward_loop, m.gradients)]
            compiled = sum(len(f.signatures) for f in kernels + [c._packed_product, c._gemm])
        print(json.dumps({"heavy": heavy, "compiled": compiled}))
        """
    )
    assert result["heavy"] == []
    assert result["compiled"] in (None, 0)


def test_missing_numba_makes_auto_use_numpy():
    result = run_python(
        """
        import sys, json
        sys.modules["numba"] = None  # as if numba were not installed
        import fastlstm
        s = fastlstm.available_backends()["numba"]
        lstm = fastlstm.LSTM(2, 3)
        print(json.dumps({"available": s.available, "reason": s.reason,
                          "auto": fastlstm.get_backend(), "layer": lstm.backend}))
        """
    )
    assert result["available"] is False and "numba" in result["reason"]
    assert result["auto"] in ("numpy", "cupy") and result["layer"] == result["auto"]


def test_broken_cupy_install_does_not_break_import(tmp_path):
    fake = tmp_path / "cupy"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise OSError('libcudart.so.13: cannot open shared object file')\n")
    result = run_python(
        f"""
        import sys, json
        sys.path.insert(0, {str(tmp_path)!r})
        import fastlstm
        s = fastlstm.available_backends()["cupy"]
        print(json.dumps({{"available": s.available, "reason": s.reason, "auto": fastlstm.get_backend()}}))
        """
    )
    assert result["available"] is False and "libcudart" in result["reason"]
    assert result["auto"] in ("numba", "numpy")
