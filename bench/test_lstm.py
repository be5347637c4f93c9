"""DESIGN.md's configurations as pytest-benchmark cases, one per (config, mode, backend),
plus the GPU issue's configurations on the GPU runners (cupy, torch-cuda, torch-cuda-tf32).

    pytest bench/ --benchmark-only                      # every available backend and torch
    pytest bench/ --benchmark-only -k "train-m and numba"
    pytest bench/ --benchmark-only --benchmark-save=NAME / --benchmark-compare

Cases are grouped by configuration and mode, so the table puts the backends side by
side. The runners are the ones ``fastlstm bench`` uses (fastlstm/bench.py).
"""

from __future__ import annotations

import time

import pytest

from fastlstm import bench

RUNNERS = bench.available_runners()
CASES = [
    pytest.param(config, mode, runner, id=f"{config.name}-{mode}-{runner}")
    for config in bench.CONFIGS.values()
    for mode in bench.MODES
    for runner in RUNNERS
    if bench.runs(runner, config, mode)
] + [  # the GPU issue's shapes (wide-512, stream-b1/b4/b8), on the GPU runners only
    pytest.param(config, mode, runner, id=f"{config.name}-{mode}-{runner}")
    for config in bench.EXTRA_CONFIGS.values()
    for mode in bench.MODES
    for runner in RUNNERS
    if runner in bench.GPU_RUNNERS and bench.runs(runner, config, mode)
]


@pytest.mark.parametrize("config, mode, runner", CASES)
def test_lstm(benchmark, config, mode, runner):
    run = bench.make_runner(runner, config, mode)
    run()  # warm-up: compiles kernels on first use, allocates
    time.sleep(bench.SETTLE_S)  # let thread pools of the previous case go idle
    benchmark.group = f"{config.name} {mode}"
    benchmark.extra_info.update(flops=config.flops(mode), min_bytes=config.min_bytes(mode, 4), T=config.T, B=config.B,
                                I=config.I, H=config.H)
    benchmark.pedantic(run, rounds=7, iterations=1, warmup_rounds=1)
