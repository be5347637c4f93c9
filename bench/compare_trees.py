"""Two checkouts of fastlstm against each other, and each against torch.nn.LSTM: child
processes, one per tree, alternated (ABBA...), each timing the numba backend and torch in
alternated rounds; the comparison is the torch / numba ratio, which a drift of the host's
speed between processes moves less than it moves either time.

    git worktree add /tmp/base <commit> && ln -s ../kernels /tmp/base/fastlstm/kernels
    python bench/compare_trees.py /tmp/base . [--specs train-m:forward,small:forward] [--processes 4]

A tree's kernels compile on its first child if its Numba cache is cold (the children run
with the tree as working directory and on PYTHONPATH, so each imports its own code).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent

# The child imports fastlstm from its tree and the round-robin helpers (rounds.py) from here.
CHILD = r"""
import json, statistics, sys
sys.path.append(sys.argv[3])
import rounds
from fastlstm import bench
from fastlstm.kernels import numba_lstm
tree = sys.argv[1]
assert numba_lstm.__file__.startswith(tree), f"imported {numba_lstm.__file__}, not from {tree}"
rounds.same_threads_everywhere()
out = {}
for spec in sys.argv[2].split(","):
    name, mode = spec.split(":")
    config = bench.CONFIGS[name]
    runs = {"numba": bench.make_runner("numba", config, mode), "torch": bench.make_runner("torch", config, mode)}
    for call in runs.values():
        call()
    seconds = rounds.alternate({runner: (lambda call=call: rounds.seconds_per_call(call, 0.4))
                                for runner, call in runs.items()}, 3)
    out[spec] = {"numba_s": statistics.median(seconds["numba"]),
                 "torch_over_numba": statistics.median(t / n for n, t in zip(seconds["numba"], seconds["torch"]))}
print("RESULT " + json.dumps(out))
"""


def run_child(tree: Path, specs: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree))
    done = subprocess.run([sys.executable, "-c", CHILD, str(tree), specs, str(BENCH)], env=env, cwd=tree,
                          capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"child in {tree} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--specs", default="train-m:forward,train-l:forward,small:forward,stream-1:forward,"
                                           "train-m:forward+backward,train-l:forward+backward")
    parser.add_argument("--processes", type=int, default=4, help="children per tree")
    args = parser.parse_args()
    trees = {"base": args.base.resolve(), "new": args.new.resolve()}
    found = {name: [] for name in trees}
    for k in range(args.processes):
        for name in (("base", "new") if k % 2 == 0 else ("new", "base")):
            found[name].append(run_child(trees[name], args.specs))
    for spec in args.specs.split(","):
        line = f"{spec:26s}"
        for name in trees:
            rows = [child[spec] for child in found[name]]
            ratios = [row["torch_over_numba"] for row in rows]
            line += (f" | {name}: {statistics.median(r['numba_s'] for r in rows) * 1e3:7.2f} ms, torch/numba "
                     f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})")
        print(line)


if __name__ == "__main__":
    main()
