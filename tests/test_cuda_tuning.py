"""Choosing the CuPy backend's time loop by timing it (fastlstm/backends/cuda_tuning.py), on
the fake device: the tuner, the candidates it is given, and tuned training through the layer."""

from __future__ import annotations

import numpy as np
import pytest
from cuda_emulation import host_kernels
from lstm_testing import assert_close, assert_layers_agree, random_problem

import fastlstm
from fastlstm.backends import cupy_backend
from fastlstm.backends.cuda_tuning import TUNE_ENV_VAR, LoopTuner, device_timer

pytestmark = pytest.mark.skipif(host_kernels.compiler() is None, reason="no C++ compiler to build host kernels")


def scripted_timer(costs, calls):
    """A timer whose result depends on the candidate last run (run records it in `calls`)."""

    def seconds(run):
        run()
        return costs[calls[-1]]

    return seconds


# -- the tuner ------------------------------------------------------------------------------
def test_the_fastest_candidate_is_chosen_once_per_key():
    calls = []
    tuner = LoopTuner(scripted_timer({"a": 3.0, "b": 1.0, "c": 2.0}, calls), warmup=2, repeats=2)
    asked = []

    def candidates():  # the timer knows a candidate by what run() was given
        asked.append(1)
        return {"a": "a", "b": "b", "c": "c"}

    assert tuner.choose("key", candidates, calls.append) == "b"
    assert calls == ["a"] * 4 + ["b"] * 4 + ["c"] * 4  # two untimed, two timed each
    assert tuner.choose("key", candidates, calls.append) == "b" and len(calls) == 12  # remembered
    assert len(asked) == 1  # the candidates are worked out for a new key only
    label, results = tuner.choices["key"]
    assert label == "b" and results == {"a": 3.0, "b": 1.0, "c": 2.0}
    assert tuner.choose("other", lambda: {"a": "a"}, calls.append) == "a" and len(calls) == 16  # timed anew


def test_a_tie_goes_to_the_earlier_candidate_and_the_best_repeat_counts():
    calls, times = [], iter([5.0, 1.0, 1.0, 9.0])  # a: 5 then 1; b: 1 then 9
    tuner = LoopTuner(lambda run: (run(), next(times))[1], warmup=0, repeats=2)
    assert tuner.choose("key", lambda: {"a": 1, "b": 2}, calls.append) == 1


def test_a_candidate_that_cannot_run_is_skipped_with_its_reason():
    calls = []

    def run(candidate):
        calls.append(candidate)
        if candidate == "big":
            raise RuntimeError("too many resources requested for launch")

    tuner = LoopTuner(scripted_timer({"small": 2.0, "big": 0.5}, calls), warmup=1, repeats=1)
    assert tuner.choose("key", lambda: {"big": "big", "small": "small"}, run) == "small"
    assert "too many resources" in tuner.choices["key"][1]["big"]
    with pytest.raises(RuntimeError, match="no time loop could run for other.*too many resources"):
        tuner.choose("other", lambda: {"big": "big"}, run)


def test_the_device_timer_measures_the_work_between_its_events(fake):
    import time

    seconds = device_timer(fake.cuda)(lambda: time.sleep(0.02))
    assert 0.015 < seconds < 1.0


# -- the candidates -----------------------------------------------------------------------
@pytest.fixture
def fake(library):
    from cuda_emulation.fake_cupy import make_fake_cupy

    return make_fake_cupy(library)


def backend_on(library, blocks):
    kernels = host_kernels.emulated_kernels(library, blocks=blocks, threads=32, shared_limit=16384)
    return cupy_backend.CudaSequenceBackend(np, host_kernels.numpy_gemm, kernels)


def test_candidates_are_the_per_step_loop_the_resident_kernels_and_each_distinct_persistent_plan(library):
    backend = backend_on(library, blocks=6)
    candidates = backend.loop_candidates(batch=2, hidden=8, dtype=np.float64)
    assert list(candidates)[:2] == ["per-step", "resident, 1 sequences a block"]
    assert candidates["per-step"] is None
    assert candidates.pop("resident, 1 sequences a block") == backend._resident_plan(2, 8, 8)
    plans = [plan for plan in candidates.values() if plan is not None]
    assert len(plans) == len(set(plans)) >= 3  # e.g. 4 blocks of 2 units, 2 of 4, 1 of 8
    for label, plan in candidates.items():
        if plan is not None:
            assert plan.blocks <= 6 and plan.blocks * plan.units >= 8 and label == f"persistent on {plan.blocks} blocks"
    assert any(plan.blocks == 1 for plan in plans)
    # where neither kernel set fits (more register tiles than threads, W_hh beyond shared memory),
    # only the per-step loop
    assert list(backend.loop_candidates(batch=64, hidden=512, dtype=np.float64)) == ["per-step"]


# -- tuned training through the layer ------------------------------------------------------
def test_tuned_training_runs_the_chosen_loops_and_matches_numpy(fake_cupy):
    """A timer that favours the persistent kernels on one block: every later call runs
    them (forward and backward), results as NumPy's, and no shape is timed twice."""
    kwargs = dict(num_layers=2, bidirectional=True, dtype="float64", seed=5)
    gpu = fastlstm.LSTM(3, 6, backend="cupy", **kwargs)
    cpu = fastlstm.LSTM(3, 6, backend="numpy", **kwargs)
    cpu.load_state_dict(gpu.state_dict())
    backend = gpu._current_backend()
    ran, launched = [], []

    def timer(run):
        run()
        plan = ran[-1]
        if plan is None:  # the per-step loop
            return 3.0
        return 1.0 if plan.blocks == 1 else 2.0

    forward, backward = backend._forward, backend._backward
    backend._forward = lambda plan, *args: (ran.append(plan), forward(plan, *args))[1]
    backend._backward = lambda plan, *args: (ran.append(plan), backward(plan, *args))[1]
    tuner = backend.tuner = LoopTuner(timer, warmup=1, repeats=1)
    real_forward_persistent = backend._kernels.forward_persistent

    def spy_forward_persistent(plan, *args):
        launched.append(plan.blocks)
        real_forward_persistent(plan, *args)

    backend._kernels.forward_persistent = spy_forward_persistent
    try:
        for step in range(3):
            problem = random_problem(cpu, 5, 2, seed=step, lengths=np.array([5, 3]))
            assert_layers_agree(gpu, cpu, problem, 1e-12, f"step {step}: ")
            if step == 0:
                timed = len(ran)
                launched.clear()
    finally:
        backend.tuner = None
    # both layers (inputs 3 and 12) and both directions share a key: the input size does not enter it
    assert set(tuner.choices) == {("forward", True, 5, 2, 6, "<f8"), ("backward", 5, 2, 6, "<f8")}
    assert {label for label, _ in tuner.choices.values()} == {"persistent on 1 blocks"}
    assert len(ran) == timed + 2 * 8  # steps 1 and 2: each loop once, with its choice, nothing timed again
    assert all(plan is not None and plan.blocks == 1 for plan in ran[timed:])
    assert launched and set(launched) == {1}


def test_tuning_is_switched_on_from_the_environment(fake_cupy, monkeypatch):
    monkeypatch.setenv(TUNE_ENV_VAR, "1")
    lstm = fastlstm.LSTM(3, 4, backend="cupy", dtype="float64", seed=0)
    backend = lstm._current_backend()
    assert isinstance(backend.tuner, LoopTuner)
    assert f"time loops chosen by timing ({TUNE_ENV_VAR})" in fastlstm.available_backends()["cupy"].reason
    x = np.random.default_rng(0).standard_normal((4, 2, 3))
    reference = fastlstm.LSTM(3, 4, backend="numpy", dtype="float64")
    reference.load_state_dict(lstm.state_dict())
    assert_close(lstm(x)[0], reference(x)[0], 1e-12, "y")  # timed on the fake's events, then run
    ((key, (label, results)),) = backend.tuner.choices.items()
    assert key[0] == "forward" and label in results and all(isinstance(t, float) for t in results.values())


@pytest.mark.parametrize("value", [None, "", "0", "off", "False"])
def test_without_the_switch_there_is_no_tuner(fake_cupy, monkeypatch, value):
    if value is None:
        monkeypatch.delenv(TUNE_ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(TUNE_ENV_VAR, value)
    backend = fastlstm.LSTM(3, 4, backend="cupy")._current_backend()
    assert backend.tuner is None and "timing" not in fastlstm.available_backends()["cupy"].reason


def test_a_bad_switch_value_makes_the_backend_unavailable_and_says_why(fake_cupy, monkeypatch):
    monkeypatch.setenv(TUNE_ENV_VAR, "maybe")
    status = fastlstm.available_backends()["cupy"]
    assert not status.available
    assert f"{TUNE_ENV_VAR}: expected 1 or 0" in status.reason and "'maybe'" in status.reason
