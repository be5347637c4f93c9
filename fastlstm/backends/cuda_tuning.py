"""Choosing the CuPy backend's time loop by timing it (opt-in: FASTLSTM_CUDA_TUNE=1).

Which time loop is fastest for a shape -- the per-step loop, or the persistent kernels,
and on how many blocks -- depends on the card, and is known only by measuring it (on an
H200 the crossovers moved between runs: bench/results/2026-11-27-gpu-h200.md). The
fixed rule (cupy_backend.PERSISTENT_MAX_STATE, one block per multiprocessor) is the
default. With a tuner, the first call of each shape runs every candidate a few times,
timed on the GPU, and that shape keeps the fastest from then on.

Off by default, as cuDNN's benchmark mode is in torch: the first call of every shape is
several times slower, and timing noise can make two processes choose differently, and
so round differently.
"""

from __future__ import annotations

import threading

TUNE_ENV_VAR = "FASTLSTM_CUDA_TUNE"  # "1": time the candidates on the first call of each shape


class LoopTuner:
    """choose(key, candidates, run): the candidate run(candidate) was fastest with, timed the
    first time `key` is seen and remembered after that (candidates() is called only then:
    working out the candidates costs host time that a remembered key need not pay).

    timer(run) -> seconds the device spent on run(). Each candidate runs `warmup` times
    untimed (kernels compile, a per-step loop is captured into a graph on its second run)
    and is then timed `repeats` times, the best kept.
    """

    def __init__(self, timer, warmup: int = 2, repeats: int = 2):
        self._timer = timer
        self.warmup = warmup
        self.repeats = repeats
        self.choices = {}  # key -> (label chosen, {label: seconds, or why it could not run})
        self._chosen = {}  # key -> the candidate chosen
        self._lock = threading.Lock()  # one shape timed at a time: two timings at once would skew both

    def choose(self, key, candidates, run):
        """candidates() -> {label: candidate}, in order of preference on a tie."""
        if key not in self._chosen:
            with self._lock:
                if key not in self._chosen:
                    options = candidates()
                    self.choices[key] = self._time(key, options, run)
                    self._chosen[key] = options[self.choices[key][0]]
        return self._chosen[key]

    def _time(self, key, candidates: dict, run):
        results = {}
        for label, candidate in candidates.items():
            try:
                for _ in range(self.warmup):
                    run(candidate)
                results[label] = min(self._timer(lambda chosen=candidate: run(chosen)) for _ in range(self.repeats))
            except Exception as error:  # noqa: BLE001 - a candidate that cannot run (resources) is not chosen
                results[label] = f"{type(error).__name__}: {error}"
        timed = [label for label in candidates if not isinstance(results[label], str)]
        if not timed:
            raise RuntimeError(f"no time loop could run for {key}: {results}")
        return min(timed, key=lambda label: results[label]), results


def device_timer(cuda):
    """timer(run) on CUDA events around run() on the current stream."""

    def seconds(run) -> float:
        start, stop = cuda.Event(), cuda.Event()
        start.record()
        run()
        stop.record()
        stop.synchronize()
        return cuda.get_elapsed_time(start, stop) / 1e3

    return seconds
