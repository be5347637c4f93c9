"""Two Python threads running vjp + pullback on one numba layer, against the same steps run
one after the other in one thread (alternated rounds, medians), per step.

    python bench/concurrent_calls.py                 # train-m, small, stream-1
    python bench/concurrent_calls.py --unserialized  # without the backend's one-multicore-section-at-a-time rule

Numba's workqueue threading layer aborts the process when two threads launch parallel
kernels at once; run --unserialized only on the omp or tbb layers.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import threading
import time

import numpy as np

import fastlstm
from fastlstm.bench import CONFIGS


def measure(config, rounds: int = 6) -> dict:
    lstm = fastlstm.LSTM(config.I, config.H, backend="numba", seed=0)
    x = np.random.default_rng(0).standard_normal((config.T, config.B, config.I)).astype(np.float32)
    dy = np.ones((config.T, config.B, config.H), np.float32)

    def step():
        _, _, pullback = lstm.vjp(x)
        pullback(dy)

    def one_after_the_other(n):
        start = time.perf_counter()
        for _ in range(2 * n):
            step()
        return (time.perf_counter() - start) / (2 * n)

    def two_threads_at_once(n):
        def work():
            for _ in range(n):
                step()

        workers = [threading.Thread(target=work) for _ in range(2)]
        start = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        return (time.perf_counter() - start) / (2 * n)

    for _ in range(3):
        step()
    n = max(2, int(0.3 / one_after_the_other(1)))
    runs = [one_after_the_other, two_threads_at_once]
    times = {run.__name__: [] for run in runs}
    for r in range(rounds):
        for run in runs if r % 2 == 0 else runs[::-1]:
            time.sleep(0.05)
            times[run.__name__].append(run(n))
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--unserialized", action="store_true")
    args = parser.parse_args()
    if args.unserialized:
        from fastlstm.backends import numba_backend

        numba_backend._MULTICORE = contextlib.nullcontext()
    for name in ("train-m", "small", "stream-1"):
        result = measure(CONFIGS[name])
        print(f"{name}: " + ", ".join(f"{k.replace('_', ' ')} {v * 1e3:.2f} ms/step" for k, v in result.items()),
              flush=True)


if __name__ == "__main__":
    main()
