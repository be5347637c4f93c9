"""Where the cupy backend's time goes on a GPU; run by bench/gpu_check.sh after the parity tests.

For each configuration and mode, in one process and on one card:
  total     one whole call, synchronized (what `fastlstm bench` reports)
  host      the time until the call returns, before synchronizing: when it is close to
            `total`, the GPU waits on Python (launch-bound), not the other way round
  graph     the same call captured once as a CUDA graph and replayed (no Python, no launch
            gaps): the GPU time of this backend's kernels and GEMMs
  cupy-gemm `total` with cupy.cublas.gemm instead of the backend's direct cuBLAS calls
  cudnn     torch.nn.LSTM on cuDNN, IEEE float32, same shapes (the bench's torch-cuda)
plus the two ceilings METHOD.md asks for: cuBLAS float32 GEMM and a device-to-device copy.

Usage: python bench/gpu_probe.py OUT_DIR   (writes gpu_probe.json there; prints a table)
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import cupy

from fastlstm import bench
from fastlstm.layer import LSTM

CONFIGS = ("wide-512", "train-m", "train-l", "stream-b1", "stream-b8")
REPEATS = 20


def median_s(call, repeats=REPEATS) -> float:
    times = []
    for _ in range(repeats):
        cupy.cuda.Device().synchronize()
        start = time.perf_counter()
        call()
        cupy.cuda.Device().synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def host_s(call, repeats=REPEATS) -> float:
    times = []
    for _ in range(repeats):
        cupy.cuda.Device().synchronize()
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
        cupy.cuda.Device().synchronize()
    return statistics.median(times)


def graph_s(call, repeats=REPEATS):
    """Median replay time of `call` captured as one CUDA graph, or the reason it could not be."""
    stream = cupy.cuda.Stream(non_blocking=True)
    try:
        with stream:
            call()  # warm the memory pool of this stream: no cudaMalloc during capture
            call()
            stream.synchronize()
            stream.begin_capture(mode=cupy.cuda.runtime.streamCaptureModeRelaxed)
            try:
                call()
            finally:
                graph = stream.end_capture()
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        graph.launch(stream)
        times = []
        for _ in range(repeats):
            start.record(stream)
            graph.launch(stream)
            stop.record(stream)
            stop.synchronize()
            times.append(cupy.cuda.get_elapsed_time(start, stop) / 1e3)
        return statistics.median(times)
    except Exception as exc:  # noqa: BLE001 - a diagnostic: report why and go on
        return f"{type(exc).__name__}: {exc}"[:200]


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
    x, dy = bench._inputs(config, "float32")
    lstm = LSTM(config.I, config.H, num_layers=config.layers, bidirectional=config.bidirectional,
                backend="cupy", seed=0)
    backend = lstm._current_backend()
    x_dev, dy_dev = cupy.asarray(x), cupy.asarray(dy)
    if mode == "forward":
        lstm.eval()

        def call():
            lstm(x_dev)
    else:

        def call():
            lstm(x_dev)
            lstm.backward(dy_dev)
    call()
    row = {"config": config.name, "mode": mode, "gflop": config.flops(mode) / 1e9}
    row["total"] = median_s(call)
    row["host"] = host_s(call)
    row["graph"] = graph_s(call)
    direct = backend._gemm
    backend._gemm = lambda ta, tb, a, b, out, beta: cupy.cublas.gemm(ta, tb, a, b, out=out, alpha=1.0, beta=beta)
    try:
        call()
        row["cupy-gemm"] = median_s(call)
    finally:
        backend._gemm = direct
    torch_call = bench.make_runner("torch-cuda", config, mode)
    torch_call()
    row["cudnn"] = median_s(torch_call)
    return row


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
    configs = {**bench.CONFIGS, **bench.EXTRA_CONFIGS}
    rows = []
    for config_name in CONFIGS:
        for mode in bench.MODES:
            rows.append(probe(configs[config_name], mode))
            print(json.dumps(rows[-1]), flush=True)
    Path(out_dir, "gpu_probe.json").write_text(json.dumps({"ceilings": ceilings, "rows": rows}, indent=1))

    def ms(value):
        return f"{value * 1e3:.3f}" if isinstance(value, float) else "failed"

    header = ("config", "mode", "total ms", "host ms", "graph ms", "cupy-gemm ms", "cudnn ms", "total/cudnn",
              "graph/cudnn", "TFLOP/s total", "TFLOP/s cudnn")
    lines = [header]
    for r in rows:
        graph = r["graph"]
        lines.append((r["config"], r["mode"], ms(r["total"]), ms(r["host"]), ms(graph), ms(r["cupy-gemm"]),
                      ms(r["cudnn"]), f"{r['total'] / r['cudnn']:.2f}",
                      f"{graph / r['cudnn']:.2f}" if isinstance(graph, float) else "-",
                      f"{r['gflop'] / r['total'] / 1e3:.2f}", f"{r['gflop'] / r['cudnn'] / 1e3:.2f}"))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    print("\n".join("  ".join(str(v).ljust(w) for v, w in zip(line, widths)) for line in lines))
    for r in rows:
        if not isinstance(r["graph"], float):
            print(f"graph capture failed for {r['config']} {r['mode']}: {r['graph']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "."))
