"""Peak extra memory of one training forward + backward, fastlstm against torch.nn.LSTM,
each in a fresh process measured the same way: the process's peak resident memory
(ru_maxrss) after one call, minus its peak before the call (after the model, the inputs and
the output gradient exist, and after a small call of another shape has loaded the kernels).
Also the minor page faults (fresh pages touched) of the next calls, per call.

    python bench/training_memory.py [--config train-m] [--backend numba]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, resource, sys
import numpy as np
from fastlstm import bench
runner, name, backend = sys.argv[1], sys.argv[2], sys.argv[3]
config = bench.CONFIGS[name]
small = bench.Config("warm-up", 3, 2, config.I, config.H, config.layers, config.bidirectional, config.cell)
if runner == "fastlstm":
    bench.fastlstm_call(backend, small, "forward+backward")[0]()  # loads or compiles the kernels
    call, _ = bench.fastlstm_call(backend, config, "forward+backward")
else:
    bench.make_runner("torch", small, "forward+backward")()
    call = bench.make_runner("torch", config, "forward+backward")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
call()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    call()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / 3
print(json.dumps({"runner": runner, "extra_peak_mib": (after - before) / 1024, "faults_per_call": faults}))
"""


def measure(runner: str, config: str, backend: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", CHILD, runner, config, backend], capture_output=True, text=True,
                         env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="train-m")
    parser.add_argument("--backend", default="numba")
    args = parser.parse_args()
    for runner in ("fastlstm", "torch"):
        found = measure(runner, args.config, args.backend)
        label = f"fastlstm ({args.backend})" if runner == "fastlstm" else "torch.nn.LSTM"
        print(f"{args.config}: {label}: {found['extra_peak_mib']:.1f} MiB of peak memory beyond what was there "
              f"before the call; {found['faults_per_call']:.0f} minor page faults per call after it")


if __name__ == "__main__":
    main()
