#!/usr/bin/env bash
# The GPU check, in one command: GPU parity tests (cupy vs the NumPy reference, cupy vs
# torch.nn.LSTM on CUDA, every feature), the GPU benchmark against cuDNN (torch-cuda in
# IEEE float32, torch-cuda-tf32 with torch's default TF32) and a probe of where the cupy
# backend's time goes (bench/gpu_probe.py). Needs only the device image (CuPy, PyTorch
# with cuDNN, pytest); no network, no install: the checkout goes on PYTHONPATH.
# Then fastlstm.torch on CUDA tensors: its GPU tests (tests/test_gpu_torch.py: parity with
# cuDNN through autograd, torch's stream and allocator, compile, autocast) and a whole
# training step against nn.LSTM on cuDNN (fastlstm bench --torch --device cuda).
# Results go under $OUT (default bench/results/gpu-local): 7 files, 8 with FASTLSTM_NCU=1
# (the device tool returns at most 8: write nothing else there). Budget: about 5 minutes (each
# step has a timeout: 180 + 120 + 60 + 90 + 80 s at most; runs 8-10 took 84-98 s for all but the
# torch and GRU steps; FASTLSTM_NCU=1 adds two profiles, 90 s each at most).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu-local}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
status=0

{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  echo "commit: ${FASTLSTM_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader 2>&1 | sed 's/^/gpu: /'
  "$PY" -c "import cupy, torch; print('cupy', cupy.__version__, '| torch', torch.__version__, '| cudnn', torch.backends.cudnn.version())"
  "$PY" -m fastlstm info
} > "$OUT/gpu_tests.log" 2>&1  # the machine and versions head the test log (the files that come back are few)
cat "$OUT/gpu_tests.log"

# 1. parity (fails the script if any test fails)
timeout 180 "$PY" -m pytest -q -p no:cacheprovider -rfEs --tb=short -m gpu tests/test_gpu.py tests/test_gpu_torch.py 2>&1 | tee -a "$OUT/gpu_tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "gpu_check: ${SECONDS}s so far"

# 2. benchmark against cuDNN: the design configs plus the issue's GPU targets
timeout 120 "$PY" -m fastlstm bench --backends cupy,torch-cuda,torch-cuda-tf32 \
  --configs wide-512,train-m,train-l,small,stream-1,stream-b1,stream-b4,stream-b8 \
  --repeats 10 --json "$OUT/gpu_bench.json" 2>&1 | tee "$OUT/gpu_bench.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "gpu_check: ${SECONDS}s so far"

# 2a. the GRU against cuDNN's GRU on the design configs (per-step kernels, graphs)
timeout 60 "$PY" -m fastlstm bench --cell gru --backends cupy,torch-cuda,torch-cuda-tf32 \
  --configs train-m,train-l,small,stream-1 --repeats 5 --json "$OUT/gpu_gru_bench.json" 2>&1 | tee -a "$OUT/gpu_bench.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "gpu_check: ${SECONDS}s so far"

# 2b. a whole PyTorch training step (LSTM + Linear + cross-entropy + Adam): fastlstm.torch on
#     cupy against nn.LSTM on cuDNN (IEEE float32 and TF32), and the adapter's cost over the
#     bare call; the table goes after the layer benchmark's in gpu_bench.txt
timeout 90 "$PY" -m fastlstm bench --torch --device cuda --configs train-m,train-l,wide-512,small,stream-1 \
  --repeats 7 --json "$OUT/gpu_torch_bench.json" 2>&1 | tee -a "$OUT/gpu_bench.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "gpu_check: ${SECONDS}s so far"

# 3. where the time goes: host vs device, per-step loop from graphs vs launched, GEMM call
#    paths, ceilings, persistent kernels by block count (rows print as they finish)
timeout 80 "$PY" bench/gpu_probe.py "$OUT" 2>&1 | tee "$OUT/gpu_probe.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "gpu_check: ${SECONDS}s so far"

# 4. where the single-launch forwards' time goes: only with FASTLSTM_NCU=1 and ncu on PATH
#    (up to 2 x 90 s more): the resident kernel at small, the persistent kernel at
#    wide-512 (run 7's profile of that is in bench/results); --clock-control none: the
#    card's clocks are left as they are
if [ "${FASTLSTM_NCU:-0}" = 1 ] && command -v ncu >/dev/null; then
  for profile in "resident small" "persistent wide-512"; do
    set -- $profile
    timeout 90 ncu --clock-control none --kernel-name "regex:lstm_forward_$1" --launch-count 1 \
      --section SpeedOfLight --section WarpStateStats --section MemoryWorkloadAnalysis --section LaunchStats \
      --section SchedulerStats "$PY" bench/gpu_probe.py --once "$2" "$1" >> "$OUT/ncu.txt" 2>&1 \
      || echo "ncu $1 $2 failed (not counted)"
    tail -n 70 "$OUT/ncu.txt"
    echo "gpu_check: ${SECONDS}s so far"
  done
fi

echo "gpu_check: exit $status after ${SECONDS}s; results in $OUT"
exit $status
