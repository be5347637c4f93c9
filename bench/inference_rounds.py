"""Inference against torch.nn.LSTM, ONNX Runtime and the NumPy backend in alternated rounds
in one process (a drift of the host's speed hits every runner alike; ratios are taken
within each round): the streaming configurations (one call per step, batch 1, the state
carried: fastlstm's streams, nn.LSTM one step at a time with hx under no_grad, ONNX Runtime
one run per step) and whole-sequence inference (fastlstm's layer call); the runners are
`fastlstm bench`'s (fastlstm.bench.make_runner).

    python bench/inference_rounds.py [--configs step-128,step-512,stream-1,small] [--rounds 7]

For the streaming configurations numba is also timed on one call of the 100-step chunk
(its kernels' own time per step; a one-step call adds Python and the kernel's start).
"""

from __future__ import annotations

import statistics

import numpy as np
import rounds

import fastlstm
from fastlstm import bench, bench_onnx
from fastlstm._arrays import module_available


def runners(config) -> dict:
    found = {}
    for backend in ("numba", "numpy"):
        if fastlstm.available_backends()[backend].available:
            found[backend] = bench.make_runner(backend, config, "forward")
    if config.stream and "numba" in found:
        x = np.random.default_rng(0).standard_normal((config.T, config.B, config.I)).astype(np.float32)
        chunk = fastlstm.LSTM(config.I, config.H, backend="numba", seed=0).eval().stream(config.B)
        found["numba, one chunk"] = lambda: chunk(x)
    if module_available("torch"):
        found["torch"] = bench.make_runner("torch", config, "forward")
    if bench_onnx.available():
        found["onnxruntime"] = bench.make_runner("onnxruntime", config, "forward")
    return found


def main() -> None:
    args = rounds.arguments(__doc__.splitlines()[0], "step-128,step-512,stream-1,small")
    threads = rounds.same_threads_everywhere()
    results = {}
    for name in args.configs.split(","):
        config = bench.CONFIGS[name]
        calls = runners(config)
        for call in calls.values():
            call()  # compiles, packs
        times = rounds.alternate({name: (lambda call=call: rounds.seconds_per_call(call)) for name, call in calls.items()},
                                 args.rounds)
        results[name] = times
        unit, scale = ("us/step", 1e6 / config.T) if config.stream else ("ms/call", 1e3)
        print(f"{name} (T={config.T}, B={config.B}, I={config.I}, H={config.H}; {threads} threads), "
              f"median of {args.rounds} alternated rounds:")
        for runner, values in times.items():
            line = f"  {runner:18s} {statistics.median(values) * scale:9.2f} {unit}"
            if runner in ("numpy", "torch", "onnxruntime") and "numba" in times:
                ratios = [v / n for v, n in zip(values, times["numba"])]
                line += (f"   numba {statistics.median(ratios):.2f}x faster "
                         f"(rounds {min(ratios):.2f}-{max(ratios):.2f})")
            print(line)
    if args.json:
        rounds.write_json(args.json, threads, results)  # seconds per call


if __name__ == "__main__":
    main()
