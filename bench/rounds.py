"""Alternated rounds in one process, for the bench scripts that compare runners on a noisy
host (bench/inference_rounds.py, bench/workspaces_ab.py): every round times each runner
once, in an order that rotates from round to round, so a drift of the host's speed hits
every runner alike and ratios are taken within a round.
"""

from __future__ import annotations

import argparse
import json
import time

import fastlstm
from fastlstm import bench
from fastlstm._arrays import module_available

SETTLE_S = 0.3  # thread pools of the previous runner stop spinning (fastlstm.bench)


def arguments(description: str, configs: str) -> argparse.Namespace:
    """--configs (comma-separated names of fastlstm.bench.CONFIGS), --rounds, --json."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--configs", default=configs)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", metavar="PATH")
    return parser.parse_args()


def same_threads_everywhere() -> int:
    """fastlstm's thread count, given to torch as well (when it is installed); returns it."""
    threads = fastlstm.get_num_threads()
    if module_available("torch"):
        import torch

        torch.set_num_threads(threads)
    return threads


def alternate(timers: dict, rounds: int) -> dict:
    """name -> [timer(), one value per round]; each timer runs after SETTLE_S of quiet."""
    values = {name: [] for name in timers}
    names = list(timers)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            time.sleep(SETTLE_S)
            values[name].append(timers[name]())
    return values


def seconds_per_call(call, min_seconds: float = 0.2) -> float:
    """A call's time: one call first (wakes sleeping threads, warms caches), then at least 3
    calls and `min_seconds`."""
    call()
    start = time.perf_counter()
    repeats = 0
    while repeats < 3 or time.perf_counter() - start < min_seconds:
        call()
        repeats += 1
    return (time.perf_counter() - start) / repeats


def write_json(path: str, threads: int, results: dict) -> None:
    """Results with the machine and library versions, written atomically."""
    from fastlstm.checkpoint import write_atomic

    data = {"threads": threads, "machine": bench.machine_info(), "versions": bench.library_versions(),
            "results": results}
    write_atomic(path, lambda handle: handle.write(json.dumps(data, indent=1).encode("utf-8")))
