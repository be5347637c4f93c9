"""First-call cost of the Numba backend in a fresh process, cold and warm cache.

    python bench/compile_time.py [--cell lstm|gru] [--training-first] [--rounds N] [--json PATH]

Cold: NUMBA_CACHE_DIR points at a new empty folder, so every kernel compiles.
Warm: the same folder again, so every kernel loads from Numba's cache. Each run is a
new interpreter that imports fastlstm and times, one after the other, the phases a new
user meets (issue #15's targets are per phase):

- inference: the first ``layer(x)`` in eval mode (T=20, B=32, I=64, H=128, float32: the
  parallel plan);
- training: then the first training forward + backward (what it compiles beyond inference);
- stream: then the first one-step stream call (batch 1: the single-thread kernel);

and a second training step (nothing left to compile). With --training-first the training
phase comes first (a new user who trains: what the first training step waits for), then
inference (nothing left to compile) and the stream. Wall time and the process's CPU
time: compiling runs on one thread, so on a host whose vCPUs see steal time the CPU time
is the steadier number; except for a cold training phase that starts its compile-ahead
helper (fastlstm.backends.numba_compile_ahead: the gradients kernel compiled in a second
process, on a second core), whose work this process's CPU time does not count: there wall
time is the number (FASTLSTM_COMPILE_AHEAD=0 gives the one-process figure).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time
def clocks():
    return time.perf_counter(), time.process_time()
w0, c0 = clocks()
import numpy as np, fastlstm
out = {"import": (time.perf_counter() - w0, time.process_time() - c0)}
layer = (fastlstm.GRU if sys.argv[1] == "gru" else fastlstm.LSTM)(64, 128, backend="numba")
x = np.ones((20, 32, 64), np.float32)
def infer():
    layer.eval(); layer(x)
def train():
    layer.train(); y, _ = layer(x); layer.backward(np.ones_like(y))
def stream():
    layer.eval(); layer.stream(1)(np.ones((1, 64), np.float32))
order = [("inference", infer), ("training", train)]
if sys.argv[2] == "training-first":
    order.reverse()
for name, phase in order + [("stream", stream), ("second_training", train)]:
    w, c = clocks(); phase(); w1, c1 = clocks()
    out[name] = (w1 - w, c1 - c)
print(json.dumps({k: {"wall_s": round(v[0], 3), "cpu_s": round(v[1], 3)} for k, v in out.items()}))
"""

PHASES = ("import", "inference", "training", "stream", "second_training")


def run_child(cache_dir: str, cell: str, training_first: bool) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    order = "training-first" if training_first else "inference-first"
    out = subprocess.run([sys.executable, "-c", CHILD, cell, order], env=env, cwd=REPO, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cell", choices=("lstm", "gru"), default="lstm")
    parser.add_argument("--training-first", action="store_true", help="the first call trains (see above)")
    parser.add_argument("--rounds", type=int, default=1, help="cold + warm pairs, each with a new cache folder")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    rounds = []
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as cache:
            rounds.append({"cold": run_child(cache, args.cell, args.training_first),
                           "warm": run_child(cache, args.cell, args.training_first)})
    phases = ("import", "training", "inference", *PHASES[3:]) if args.training_first else PHASES
    for i, r in enumerate(rounds):
        for label in ("cold", "warm"):
            cells = ", ".join(f"{phase} {r[label][phase]['wall_s']:.2f} s ({r[label][phase]['cpu_s']:.2f} s CPU)"
                              for phase in phases)
            print(f"{args.cell} round {i + 1}, {label} cache: {cells}")
    if args.json:
        Path(args.json).write_text(json.dumps({"cell": args.cell, "training_first": args.training_first, "rounds": rounds},
                                              indent=1))


if __name__ == "__main__":
    main()
