"""Where the cupy backend's time goes on a GPU; run by bench/gpu_check.sh after the parity tests.

For each configuration and mode, in one process and on one card:
  path      the time loop the backend chose: resident kernels, persistent kernels or per step
  floor     METHOD.md's floor: the larger of the GEMM flops at the measured GEMM ceiling
            and the fewest bytes (bench.Config.min_bytes) at the measured copy rate
  total     one whole call, synchronized (what `fastlstm bench` reports)
  host      the time until the call returns, before synchronizing: when it is close to
            `total`, the GPU waits on Python (launch-bound), not the other way round
  per-step  `total` with the persistent kernels switched off (a GEMM and a kernel per step,
            replayed from a CUDA graph: cuda_graphs.py)
  launched  the same loop launched from Python every step (no graphs)
  persistent `total` with the persistent kernels wherever they apply, whatever the size
  resident  `total` with the resident kernels (lstm_resident.cu), where W_hh fits a block
  tuned     `total` with the time loop chosen by timing (FASTLSTM_CUDA_TUNE=1,
            cuda_tuning.py), and `choice`: what it chose, forward / backward
  cudnn     torch.nn.LSTM on cuDNN, IEEE float32, same shapes (the bench's torch-cuda)
plus the two ceilings METHOD.md asks for: cuBLAS float32 GEMM and a device-to-device copy,
the graph cache's counts (eager / captured / replayed loops), and the persistent kernels'
time by the most blocks they may use (`blocks_sweep`: for small H a step is bound by the
grid barrier and L2 round trips, not by arithmetic, so fewer blocks owning more units
each may win; a grid of one block synchronizes with __syncthreads alone).
(CuPy's own cuBLAS binding refuses calls during stream capture, "calling cuBLAS API
during stream capture is currently unsupported": the backend calls cuBLAS through
ctypes instead, fastlstm/backends/cublas_api.py.)

Usage: python bench/gpu_probe.py OUT_DIR   (writes gpu_probe.json there; prints a table)
       python bench/gpu_probe.py --once CONFIG LOOP   (one forward on that time loop, for ncu)
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import cupy

from fastlstm import bench, registry
from fastlstm.backends.cuda_tuning import LoopTuner, device_timer
from fastlstm.backends.cupy_backend import ResidentPlan

CONFIGS = ("wide-512", "train-m", "train-l", "small", "stream-1", "stream-b1", "stream-b8", "sweep-b16", "sweep-b32")
# Between stream-b8 (8 x 256) and train-m (64 x 256): where the two time loops cross.
SWEEP = {name: bench.Config(name, 100, batch, 256, 256) for name, batch in (("sweep-b16", 16), ("sweep-b32", 32))}
CONFIG_BY_NAME = {**bench.CONFIGS, **bench.EXTRA_CONFIGS, **SWEEP}
REPEATS = 20
SWEEP_BLOCKS = (1, 2, 4, 8, 16, 32, 64)  # and every multiprocessor (the default)
BLOCK_SWEEP_CONFIGS = ("small", "stream-1", "stream-b1", "stream-b8", "train-m")


def median_s(call, repeats=REPEATS, until_done=True) -> float:
    """Median time of `call`: until the GPU has finished it, or (until_done=False) until it
    returns to Python with its work queued (the host's share)."""
    times = []
    for _ in range(repeats):
        cupy.cuda.Device().synchronize()
        start = time.perf_counter()
        call()
        if until_done:
            cupy.cuda.Device().synchronize()
        times.append(time.perf_counter() - start)
    cupy.cuda.Device().synchronize()
    return statistics.median(times)


def host_costs_us(repeats=500) -> dict:
    """Host time per call of what the per-step loop does each step (wide-512 shapes), in us."""
    import cupy.cublas

    from fastlstm.backends import cublas_api
    from fastlstm.backends.cupy_backend import CublasGemm

    backend = registry.backend_object("cupy")
    kernels, gemm = backend._kernels, CublasGemm(cupy.cuda)
    ctypes_gemm = CublasGemm(cupy.cuda, cublas_api.load(cupy.cuda.cublas)[0])
    steps, batch, hidden = 100, 64, 512
    gates = cupy.zeros((steps, batch, 4 * hidden), dtype=cupy.float32)
    states = cupy.zeros((steps, batch, hidden), dtype=cupy.float32)
    w_hh = cupy.zeros((4 * hidden, hidden), dtype=cupy.float32)
    bias = cupy.zeros(4 * hidden, dtype=cupy.float32)
    lengths = cupy.full(batch, steps, dtype=cupy.int64)
    h, g = states[0], gates[0]
    calls = {
        "view a[t]": lambda: gates[7],
        "pointwise kernel launch": lambda: kernels.forward_step(0, True, g, bias, *states[:5], lengths),
        "CublasGemm (CuPy's cuBLAS binding)": lambda: gemm("N", "T", h, w_hh, g, 1.0),
        "CublasGemm (ctypes cuBLAS)": lambda: ctypes_gemm("N", "T", h, w_hh, g, 1.0),
        "cupy.cublas.gemm": lambda: cupy.cublas.gemm("N", "T", h, w_hh, out=g, alpha=1.0, beta=1.0),
    }
    costs = {}
    for name, call in calls.items():
        call()
        cupy.cuda.Device().synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            call()
        costs[name] = (time.perf_counter() - start) / repeats * 1e6
        cupy.cuda.Device().synchronize()
    return costs


def copy_bandwidth_gbs(size_bytes=2**31) -> float:
    a = cupy.empty(size_bytes // 4, dtype=cupy.float32)
    a.fill(1.0)
    b = cupy.empty_like(a)
    b[...] = a
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    times = []
    for _ in range(5):
        start.record()
        b[...] = a
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop) / 1e3)
    return 2 * size_bytes / statistics.median(times) / 1e9  # bytes read + written


def probe(config: bench.Config, mode: str) -> dict:
    call, lstm = bench.fastlstm_call("cupy", config, mode)
    backend = lstm._current_backend()
    call()
    row = {"config": config.name, "mode": mode, "gflop": config.flops(mode) / 1e9,
           "min_mb": config.min_bytes(mode, 4) / 1e6}
    row["path"] = loop_name(backend._plan(config.B, config.H, "float32"))
    row["total"] = median_s(call)
    row["host"] = median_s(call, until_done=False)
    graphs = backend.graphs
    try:
        for loop in ("per-step", "persistent", "resident"):
            backend.loop = loop
            if loop != "per-step" and backend._plan(config.B, config.H, "float32") is None:
                row[loop] = None  # does not apply: it would run the per-step loop
                continue
            call()
            call()  # a per-step loop is captured the second time
            row[loop] = median_s(call)
        backend.loop, backend.graphs = "per-step", None
        call()
        row["launched"] = median_s(call)
        backend.loop, backend.graphs = None, graphs
        backend.tuner = LoopTuner(device_timer(cupy.cuda))
        call()  # times every candidate of each loop of the call, then runs the chosen ones
        row["tuned"] = median_s(call)
        row["choice"] = " / ".join(label for label, _ in backend.tuner.choices.values())
        row["candidates_ms"] = {str(key): {label: t * 1e3 if isinstance(t, float) else t for label, t in times.items()}
                                for key, (_, times) in backend.tuner.choices.items()}
    finally:
        backend.loop, backend.graphs, backend.tuner = None, graphs, None
    torch_call = bench.make_runner("torch-cuda", config, mode)
    torch_call()
    row["cudnn"] = median_s(torch_call)
    return row


def loop_name(plan) -> str:
    return "per-step" if plan is None else "resident" if isinstance(plan, ResidentPlan) else "persistent"


def blocks_sweep() -> list[dict]:
    """Median time of each config and mode with the persistent kernels on at most N blocks
    (None where they do not fit), in seconds, keyed by N."""
    backend = registry.backend_object("cupy")
    kernels = backend._kernels
    every = kernels.persistent_blocks
    rows = []
    try:
        backend.loop = "persistent"
        for name in BLOCK_SWEEP_CONFIGS:
            config = CONFIG_BY_NAME[name]
            for mode in bench.MODES:
                call, _ = bench.fastlstm_call("cupy", config, mode)
                row = {"config": name, "mode": mode, "times": {}}
                for blocks in (*SWEEP_BLOCKS, every):
                    kernels.persistent_blocks = blocks
                    if backend._plan(config.B, config.H, "float32") is None:
                        row["times"][blocks] = None
                        continue
                    call()
                    row["times"][blocks] = median_s(call)
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        kernels.persistent_blocks, backend.loop = None, None  # the device's own count again
    return rows


def main(out_dir: str) -> int:
    props = cupy.cuda.runtime.getDeviceProperties(0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    ceilings = {
        "gpu": name,
        "multiprocessors": props["multiProcessorCount"],
        "sgemm_gflops": bench.gpu_gemm_ceiling("float32"),
        "copy_gbs": copy_bandwidth_gbs(),
    }
    print(f"{name}: cuBLAS sgemm 8192^3 {ceilings['sgemm_gflops'] / 1e3:.1f} TFLOP/s (IEEE float32), "
          f"device copy {ceilings['copy_gbs']:.0f} GB/s (read + write)", flush=True)
    costs = host_costs_us()
    print("host time per call (us): " + ", ".join(f"{k} {v:.1f}" for k, v in costs.items()), flush=True)
    rows = []
    for config_name in CONFIGS:
        for mode in bench.MODES:
            rows.append(probe(CONFIG_BY_NAME[config_name], mode))
            print(json.dumps(rows[-1]), flush=True)
    sweep = blocks_sweep()
    graphs = registry.backend_object("cupy").graphs
    graph_state = "on" if graphs.enabled else f"off ({graphs.disabled_reason})"
    print(f"CUDA graphs {graph_state}; loops: {dict(graphs.counts)}", flush=True)
    results = {"ceilings": ceilings, "host_costs_us": costs, "rows": rows, "graphs": graph_state,
               "graph_counts": dict(graphs.counts), "blocks_sweep": sweep}
    Path(out_dir, "gpu_probe.json").write_text(json.dumps(results, indent=1))

    def ms(value):
        return "-" if value is None else f"{value * 1e3:.3f}"

    def ratio(value, base):
        return "-" if value is None else f"{value / base:.2f}"

    def floor_s(row):  # METHOD.md's two times: GEMM flops at the GEMM ceiling, fewest bytes at the copy rate
        return max(row["gflop"] / ceilings["sgemm_gflops"], row["min_mb"] / 1e3 / ceilings["copy_gbs"])

    header = ("config", "mode", "default path", "floor ms", "total ms", "host ms", "per-step ms", "launched ms",
              "persistent ms", "resident ms", "tuned ms", "cudnn ms", "total/cudnn", "per-step/cudnn",
              "persistent/cudnn", "resident/cudnn", "tuned/cudnn", "TFLOP/s total", "TFLOP/s cudnn")
    lines = [header]
    for r in rows:
        lines.append((r["config"], r["mode"], r["path"], ms(floor_s(r)), ms(r["total"]), ms(r["host"]), ms(r["per-step"]),
                      ms(r["launched"]), ms(r["persistent"]), ms(r["resident"]), ms(r["tuned"]), ms(r["cudnn"]),
                      ratio(r["total"], r["cudnn"]), ratio(r["per-step"], r["cudnn"]),
                      ratio(r["persistent"], r["cudnn"]), ratio(r["resident"], r["cudnn"]),
                      ratio(r["tuned"], r["cudnn"]), f"{r['gflop'] / r['total'] / 1e3:.2f}",
                      f"{r['gflop'] / r['cudnn'] / 1e3:.2f}"))
    print_table(lines)
    print_table([("config", "mode", "tuned choice (forward / backward)")]
                + [(r["config"], r["mode"], r["choice"]) for r in rows])
    block_counts = list(sweep[0]["times"]) if sweep else []
    lines = [("config", "mode", *(f"<={n} blocks ms" for n in block_counts))]
    for r in sweep:
        lines.append((r["config"], r["mode"], *("-" if t is None else ms(t) for t in r["times"].values())))
    print_table(lines)
    return 0


def print_table(lines):
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(lines[0]))]
    print("\n".join("  ".join(str(v).ljust(w) for v, w in zip(line, widths)) for line in lines), flush=True)


def once(config_name: str, loop: str) -> int:
    """One forward with the time loop `loop` forced, for a profiler (ncu) to catch."""
    call, lstm = bench.fastlstm_call("cupy", CONFIG_BY_NAME[config_name], "forward")
    lstm._current_backend().loop = loop
    call()
    cupy.cuda.Device().synchronize()
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--once":
        sys.exit(once(sys.argv[2], sys.argv[3]))
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "."))
