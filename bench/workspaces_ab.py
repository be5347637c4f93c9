"""Training steps with the numba backend's workspaces kept between calls against the same
steps with nothing kept (every buffer new, as before the workspaces), and torch.nn.LSTM, in
alternated rounds in one process: time and minor page faults (fresh pages touched) per
forward+backward call.

    python bench/workspaces_ab.py [--configs train-m,train-l,deep] [--rounds 7] [--json PATH]

"Nothing kept" sets the workspaces' budget to 0 for its rounds: every take is a new array,
every give drops it, which is what the backend did before it kept them.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import fastlstm
from fastlstm import bench, registry
from fastlstm._arrays import module_available

SETTLE_S = 0.2


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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="train-m,train-l,deep")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    threads = fastlstm.get_num_threads()
    if module_available("torch"):
        import torch

        torch.set_num_threads(threads)
    workspaces = registry.backend_object("numba")._workspaces
    budget = workspaces.max_bytes
    results = {}
    for name in args.configs.split(","):
        config = bench.CONFIGS[name]
        numba_call = bench.make_runner("numba", config, "forward+backward")
        runners = {"kept": (numba_call, budget), "nothing kept": (numba_call, 0)}
        if module_available("torch"):
            runners["torch"] = (bench.make_runner("torch", config, "forward+backward"), None)
        rows = {runner: [] for runner in runners}
        order = list(runners)
        for r in range(args.rounds):
            for runner in order[r % len(order):] + order[: r % len(order)]:
                call, kept_bytes = runners[runner]
                if kept_bytes is not None:
                    workspaces.max_bytes = kept_bytes
                    workspaces.clear()
                time.sleep(SETTLE_S)
                rows[runner].append(measure(call))
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
        with open(args.json, "w") as out:
            json.dump({"threads": threads, "rounds": args.rounds, "results": results}, out, indent=1)


if __name__ == "__main__":
    main()
