"""First-call cost of the Numba backend in a fresh process, cold and warm cache.

    python bench/compile_time.py [--json PATH]

Cold: NUMBA_CACHE_DIR points at a new empty folder, so every kernel compiles.
Warm: the same folder again, so every kernel loads from Numba's cache. Each run is a
new interpreter that imports fastlstm, then times the first forward + backward of a
float32 layer big enough to take the parallel path, then a second one.
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
import json, time
t0 = time.perf_counter()
import numpy as np, fastlstm
t_import = time.perf_counter() - t0
lstm = fastlstm.LSTM(64, 128, backend="numba")
x = np.ones((20, 32, 64), np.float32)
def step():
    s = time.perf_counter(); y, _ = lstm(x); lstm.backward(np.ones_like(y)); return time.perf_counter() - s
first = step()
second = step()
print(json.dumps({"import_s": t_import, "first_call_s": first, "second_call_s": second}))
"""


def run_child(cache_dir: str) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        cold = run_child(cache)
        warm = run_child(cache)
    for label, r in (("cold cache", cold), ("warm cache", warm)):
        print(f"{label}: import {r['import_s']:.2f} s, first forward+backward {r['first_call_s']:.2f} s, "
              f"second {r['second_call_s'] * 1e3:.1f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps({"cold": cold, "warm": warm}, indent=1))


if __name__ == "__main__":
    main()
