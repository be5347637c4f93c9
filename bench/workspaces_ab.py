"""Training steps with the numba backend's workspaces kept between calls against the same
steps with nothing kept (every buffer new, as before the workspaces), and torch.nn.LSTM, in
alternated rounds in one process: time and minor page faults (fresh pages touched) per
forward+backward call.

    python bench/workspaces_ab.py [--configs train-m,train-l,deep] [--rounds 7] [--json PATH]

"Nothing kept" sets the workspaces' budget to 0 for its rounds: every take is a new array,
every give drops it, which is what the backend did before it kept them.
"""

from __future__ import annotations

import resource
import statistics
import time

import rounds

from fastlstm import bench, registry
from fastlstm._arrays import module_available


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure(call, seconds: float = 1.0) -> tuple[float, float]:
    """(ms per call, minor faults per call) over about `seconds`, after two warm-up calls."""
    call()
    call()
    faults, start, count = minor_faults(), time.perf_counter(), 0
    while count < 3 or time.perf_counter() - start < seconds:
        call()
        count += 1
    return (time.perf_counter() - start) / count * 1e3, (minor_faults() - faults) / count


def main() -> None:
    args = rounds.arguments(__doc__.splitlines()[0], "train-m,train-l,deep")
    threads = rounds.same_threads_everywhere()
    workspaces = registry.backend_object("numba")._workspaces
    budget = workspaces.max_bytes
    results = {}
    for name in args.configs.split(","):
        config = bench.CONFIGS[name]
        numba_call = bench.make_runner("numba", config, "forward+backward")

        def with_budget(kept_bytes):
            workspaces.max_bytes = kept_bytes
            workspaces.clear()
            return measure(numba_call)

        timers = {"kept": lambda: with_budget(budget), "nothing kept": lambda: with_budget(0)}
        if module_available("torch"):
            torch_call = bench.make_runner("torch", config, "forward+backward")
            timers["torch"] = lambda: measure(torch_call)
        rows = rounds.alternate(timers, args.rounds)
        workspaces.max_bytes = budget
        print(f"{config.name} forward+backward ({threads} threads), median of {args.rounds} alternated rounds:")
        for runner, values in rows.items():
            ms = statistics.median(v[0] for v in values)
            faults = statistics.median(v[1] for v in values)
            line = f"  numba, {runner}" if runner != "torch" else "  torch"
            print(f"{line:<22}{ms:8.1f} ms  {faults:8.0f} minor faults per call")
        ratios = [k[0] / n[0] for k, n in zip(rows["kept"], rows["nothing kept"])]
        print(f"  kept / nothing kept time: {statistics.median(ratios):.3f} (rounds {min(ratios):.3f}-{max(ratios):.3f})")
        if "torch" in rows:
            vs_torch = [t[0] / k[0] for k, t in zip(rows["kept"], rows["torch"])]
            print(f"  torch / numba kept: {statistics.median(vs_torch):.2f}x "
                  f"(rounds {min(vs_torch):.2f}-{max(vs_torch):.2f})")
        results[name] = {runner: [{"ms": v[0], "faults": v[1]} for v in values] for runner, values in rows.items()}
    if args.json:
        rounds.write_json(args.json, threads, results)


if __name__ == "__main__":
    main()
