#!/usr/bin/env bash
# The GPU check, in one command: GPU parity tests (cupy vs the NumPy reference, cupy vs
# torch.nn.LSTM on CUDA, every feature) and the GPU benchmark against cuDNN (torch-cuda).
# Needs only the device image (CuPy, PyTorch with cuDNN, pytest); no network, no install:
# the checkout goes on PYTHONPATH. Results go under $OUT (default bench/results/gpu-local).
# Budget: a few minutes on an H100.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu-local}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
status=0

{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | sed 's/^/gpu: /'
  python -m fastlstm info
} > "$OUT/gpu_info.txt" 2>&1
cat "$OUT/gpu_info.txt"

# 1. parity (fails the script if any test fails)
timeout 240 python -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

# 2. benchmark against cuDNN: the design configs plus the issue's GPU targets
timeout 240 python -m fastlstm bench --backends cupy,torch-cuda \
  --configs train-m,train-l,small,stream-1,wide-512,stream-b1,stream-b4,stream-b8 \
  --repeats 10 --json "$OUT/gpu_bench.json" 2>&1 | tee "$OUT/gpu_bench.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "gpu_check: exit $status; results in $OUT"
exit $status
