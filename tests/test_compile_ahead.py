"""The cold first training step's gradients kernel compiled in a helper process
(fastlstm.backends.numba_compile_ahead)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastlstm

if not fastlstm.available_backends()["numba"].available:
    pytest.skip(f"numba backend unavailable: {fastlstm.available_backends()['numba'].reason}", allow_module_level=True)

from fastlstm import threads  # noqa: E402
from fastlstm.backends import numba_compile_ahead as ahead  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.skipif(threads.available_cores() < 2, reason="a helper starts only with a second core")
def test_a_cold_training_step_takes_its_gradients_kernel_from_the_helper(tmp_path):
    """A fresh process on an empty cache: the first training step of an LSTM and of a GRU
    (plans of two blocks) loads the gradients kernel from the cache, where only the helper can
    have put it (nothing else compiled it), and compiles the rest itself; the gradients agree
    with the NumPy backend's."""
    script = tmp_path / "cold.py"
    script.write_text(textwrap.dedent("""
        import json
        import numpy as np
        import fastlstm
        from fastlstm.kernels import numba_gru, numba_lstm

        def error(actual, expected):
            return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))

        report = {}
        rng = np.random.default_rng(0)
        for name, make, module in (("lstm", fastlstm.LSTM, numba_lstm), ("gru", fastlstm.GRU, numba_gru)):
            layers = [make(16, 64, backend=backend, seed=0) for backend in ("numba", "numpy")]
            x = rng.standard_normal((3, 8, 16)).astype(np.float32)
            dy = rng.standard_normal((3, 8, 64)).astype(np.float32)
            grads = []
            for layer in layers:
                layer.train()(x)
                dx, _ = layer.backward(dy)
                grads.append({"dx": dx, **layer.grads})
            kernels = (module.backward_loop, module.gradients)
            report[name] = {
                "hits": {f.__name__: sum(f.stats.cache_hits.values()) for f in kernels},
                "misses": {f.__name__: sum(f.stats.cache_misses.values()) for f in kernels},
                "error": max(error(grads[0][key], grads[1][key]) for key in grads[1]),
            }
        print(json.dumps(report))
    """))
    env = {key: value for key, value in os.environ.items() if key != "FASTLSTM_COMPILE_AHEAD"}
    env.update(NUMBA_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for name in ("lstm", "gru"):
        assert report[name]["hits"] == {"backward_loop": 0, "gradients": 1}, report
        assert report[name]["misses"] == {"backward_loop": 1, "gradients": 0}, report
        assert report[name]["error"] < 1e-4, report


class _FakeHelper:
    def __init__(self, waits_out=False):
        self.waits_out, self.killed, self.waited = waits_out, False, 0

    def wait(self, timeout=None):
        self.waited += 1
        if self.waits_out and not self.killed:
            raise subprocess.TimeoutExpired("helper", timeout)
        return 1

    def kill(self):
        self.killed = True


@pytest.mark.skipif(threads.available_cores() < 2, reason="the gradients kernel runs on plans of two blocks")
def test_no_helper_when_switched_off_or_the_kernels_are_compiled(monkeypatch):
    """FASTLSTM_COMPILE_AHEAD=0 starts none; nor does a process whose kernels are compiled
    (this one, after a training step on two blocks): the rest would compile no faster beside
    a helper."""
    started = []
    monkeypatch.setattr(ahead.subprocess, "Popen", lambda *args, **kwargs: started.append(args) or _FakeHelper())
    monkeypatch.setattr(threads, "_requested", 2)  # whatever an earlier test left
    layer = fastlstm.LSTM(16, 64, backend="numba").train()
    y, _ = layer(np.ones((3, 8, 16), np.float32))
    layer.backward(np.ones_like(y))
    description = {"batch": 8, "input_size": 16, "hidden": 64, "dtype": "float32", "threads": 2}
    for switch in ("0", "1"):
        monkeypatch.setenv("FASTLSTM_COMPILE_AHEAD", switch)
        compile_ahead = ahead.CompileAhead()
        compile_ahead.start("lstm", description)
        assert compile_ahead.started() == []
    assert started == []


def test_a_helper_that_fails_or_hangs_is_given_up_on(monkeypatch):
    """wait() returns after a helper that failed; one that runs past _WAIT_S is killed. Either
    way the cell is settled: no second helper, no second wait."""
    monkeypatch.setattr(ahead, "_worth_a_helper", lambda cell: True)
    helpers = [_FakeHelper(), _FakeHelper(waits_out=True)]
    monkeypatch.setattr(ahead.subprocess, "Popen", lambda *args, **kwargs: helpers.pop(0))
    compile_ahead = ahead.CompileAhead()
    for cell in ("lstm", "gru"):
        compile_ahead.start(cell, {})
    failed, hung = compile_ahead._helpers["lstm"], compile_ahead._helpers["gru"]
    assert compile_ahead.started() == ["lstm", "gru"]
    for cell in ("lstm", "gru"):
        compile_ahead.wait(cell)
        compile_ahead.wait(cell)
        compile_ahead.start(cell, {})
    assert (failed.waited, failed.killed) == (1, False)
    assert hung.killed and hung.waited == 2
    assert compile_ahead.started() == [] and helpers == []


def test_the_helper_refuses_a_bad_description():
    command = [sys.executable, "-m", "fastlstm.backends.numba_compile_ahead", json.dumps({"cell": "rnn"})]
    result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)),
                            timeout=120)
    assert result.returncode != 0
    assert "cell: expected one of ['gru', 'lstm'], got 'rnn'" in result.stderr


def test_the_helper_gets_numba_settings_made_in_the_process(monkeypatch):
    """A cache folder or target CPU set through numba.config (not the environment) reaches
    the helper: otherwise it would compile into another cache, or for another CPU."""
    monkeypatch.setattr(ahead, "_worth_a_helper", lambda cell: True)
    monkeypatch.setattr(ahead.numba.config, "CACHE_DIR", "/somewhere/cache")
    monkeypatch.setattr(ahead.numba.config, "CPU_NAME", "haswell")
    monkeypatch.setattr(ahead.numba.config, "CPU_FEATURES", "")
    monkeypatch.setenv("FASTLSTM_COMPILE_AHEAD", "1")
    calls = []
    monkeypatch.setattr(ahead.subprocess, "Popen", lambda args, **kwargs: calls.append((args, kwargs)) or _FakeHelper())
    ahead.CompileAhead().start("gru", {"batch": 8})
    (args, kwargs), = calls
    assert args[1:3] == ["-m", "fastlstm.backends.numba_compile_ahead"]
    assert json.loads(args[3]) == {"cell": "gru", "batch": 8}
    env = kwargs["env"]
    settings = (env["NUMBA_CACHE_DIR"], env["NUMBA_CPU_NAME"], env["NUMBA_CPU_FEATURES"])
    assert settings == ("/somewhere/cache", "haswell", "")
    assert env["FASTLSTM_COMPILE_AHEAD"] == "0"  # the helper starts no helper
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(REPO)


def test_fastlstm_info_says_whether_it_is_on(monkeypatch):
    monkeypatch.setenv("FASTLSTM_COMPILE_AHEAD", "0")
    assert ahead.describe() == "off (FASTLSTM_COMPILE_AHEAD=0)"
    monkeypatch.setenv("FASTLSTM_COMPILE_AHEAD", "1")
    monkeypatch.setattr(ahead.threads, "available_cores", lambda: 1)
    assert ahead.describe() == "off (one core)"
    monkeypatch.setattr(ahead.threads, "available_cores", lambda: 2)
    assert ahead.describe().startswith("on: a cold first training step compiles its gradients kernel")
    result = subprocess.run([sys.executable, "-m", "fastlstm", "info"], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=str(REPO), FASTLSTM_COMPILE_AHEAD="0"))
    assert "numba compile ahead: off (FASTLSTM_COMPILE_AHEAD=0)" in result.stdout, result.stdout + result.stderr
