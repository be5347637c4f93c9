"""Benchmarks: every available backend, torch.nn.LSTM (GRU) and, where installed, ONNX
Runtime (``bench_onnx``, inference only) on the same configurations.

Used by ``fastlstm bench`` (cli.py) and by the pytest-benchmark suite in bench/.
Each measured run is one whole call: forward inference (eval mode, nothing kept for
backward), or forward + backward in training mode; the median over rounds is
reported. A streaming configuration (``Config.stream``: step-128, step-512) runs its T
steps one call each, the state carried (fastlstm: ``layer.stream()``; torch: ``nn.LSTM``
called with ``hx`` under ``no_grad``; ONNX Runtime: one ``run`` per step), inference
only. Each runner's rounds run back to back after a pause and a warm-up, rather than
interleaved with the other runners: BLAS and OpenMP thread pools keep spinning for a
while after their last call (OpenBLAS's for up to ~0.1 s), and a runner measured right
after another one would pay for the other's idle threads (``bench/inference_rounds.py``
alternates rounds instead, with that pause between runners).
"""

from __future__ import annotations

import dataclasses
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from . import bench_onnx, cells, registry, threads
from ._arrays import module_available

MODES = ("forward", "forward+backward")
SETTLE_S = 0.3  # pause before each runner: idle thread pools stop spinning (module docstring)


@dataclass(frozen=True)
class Config:
    name: str
    T: int
    B: int
    I: int  # noqa: E741 - the design card's name
    H: int
    layers: int = 1
    bidirectional: bool = False
    cell: str = "lstm"  # a name in cells.BY_NAME
    stream: bool = False  # one call per step, the state carried (inference only)

    def runs(self, mode: str) -> bool:
        """Whether this configuration is measured in `mode` (a stream: forward only)."""
        return mode == "forward" or not self.stream

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def gates(self) -> int:
        return cells.BY_NAME[self.cell].gates

    def with_cell(self, cell: str) -> "Config":
        """The same shape with another cell ("lstm": unchanged; else named after the cell)."""
        if cell == "lstm":
            return self
        return dataclasses.replace(self, name=f"{self.name} {cell}", cell=cell)

    def layer_inputs(self) -> list[int]:
        """Each layer's input size: I, then the previous layer's output (H per direction)."""
        return [self.I if layer == 0 else self.H * self.directions for layer in range(self.layers)]

    def forward_flops(self) -> float:
        """2 * T * B * (I + H) * GH per layer and direction (the two GEMMs; G = 4 gates for
        the LSTM, 3 for the GRU)."""
        return sum(self.directions * 2.0 * self.T * self.B * (inputs + self.H) * self.gates * self.H
                   for inputs in self.layer_inputs())

    def flops(self, mode: str) -> float:
        # backward: dh = dA W_hh per step, then dx, dW_ih, dW_hh: twice the forward's GEMMs
        return self.forward_flops() * (3 if mode == "forward+backward" else 1)

    def min_bytes(self, mode: str, itemsize: int) -> float:
        """The fewest bytes any implementation moves through memory: each input and
        parameter read once, each output written once -- forward: x, the parameters, y,
        h_n and c_n; forward + backward also dy, dx, the parameter gradients, dh0 and dc0.
        Activations kept for backward and the outputs of inner layers are not counted (an
        implementation could recompute them or keep them on chip): a floor, not our count."""
        directions = self.directions
        # W_ih, W_hh, b_ih and b_hh of every layer and direction
        params = sum(directions * self.gates * self.H * (inputs + self.H + 2) for inputs in self.layer_inputs())
        sequence_in, sequence_out = self.T * self.B * self.I, self.T * self.B * self.H * directions
        parts = len(cells.BY_NAME[self.cell].state_parts)
        states = parts * self.layers * directions * self.B * self.H  # h_n (and c_n), their gradients
        elements = sequence_in + params + sequence_out + states
        if mode == "forward+backward":
            elements *= 2  # dy, dx, the gradients, dh0 and dc0: one of each, the same sizes
        return float(elements * itemsize)


# DESIGN.md's configurations (fp32).
CONFIGS = {
    "train-m": Config("train-m", 100, 64, 128, 256),
    "train-l": Config("train-l", 50, 32, 512, 512),
    "small": Config("small", 200, 16, 32, 64),
    "stream-1": Config("stream-1", 100, 1, 64, 128),
    "step-128": Config("step-128", 100, 1, 64, 128, stream=True),
    "step-512": Config("step-512", 100, 1, 512, 512, stream=True),
    "deep": Config("deep", 100, 8, 256, 256, layers=4, bidirectional=True),
}
# Named configurations outside the default set (issue targets on the GPU).
EXTRA_CONFIGS = {
    "wide-512": Config("wide-512", 100, 64, 512, 512),
    "stream-b1": Config("stream-b1", 100, 1, 256, 256),
    "stream-b4": Config("stream-b4", 100, 4, 256, 256),
    "stream-b8": Config("stream-b8", 100, 8, 256, 256),
}
# --quick: the same shapes, fewer steps.
QUICK_CONFIGS = {
    "train-m": Config("train-m/4", 25, 64, 128, 256),
    "train-l": Config("train-l/4", 12, 32, 512, 512),
    "small": Config("small/4", 50, 16, 32, 64),
    "stream-1": Config("stream-1/4", 25, 1, 64, 128),
    "step-128": Config("step-128/4", 25, 1, 64, 128, stream=True),
    "step-512": Config("step-512/4", 25, 1, 512, 512, stream=True),
    "deep": Config("deep/4", 25, 8, 256, 256, layers=4, bidirectional=True),
}


# torch.nn.LSTM on a GPU (cuDNN) in IEEE float32, the fair rival, and with TensorFloat-32
# allowed, which is torch's default for cuDNN (10-bit mantissa products, ~3e-4 relative).
TORCH_CUDA_RUNNERS = ("torch-cuda", "torch-cuda-tf32")
TORCH_RUNNERS = ("torch",) + TORCH_CUDA_RUNNERS
GPU_RUNNERS = ("cupy",) + TORCH_CUDA_RUNNERS
# Warm-up calls of a GPU runner, at least: the cupy backend captures its per-step loops into
# CUDA graphs on the second call with the same shapes, so measured calls are replays.
GPU_WARMUP = 2


def torch_devices() -> list[str]:
    """'torch' (CPU) when torch is installed, plus the torch-cuda runners when it sees a GPU."""
    if not module_available("torch"):
        return []
    import torch

    return ["torch"] + (list(TORCH_CUDA_RUNNERS) if torch.cuda.is_available() else [])


def available_runners() -> list[str]:
    names = [name for name, status in registry.available_backends().items() if status.available]
    return names + torch_devices() + ([bench_onnx.RUNNER] if bench_onnx.available() else [])


def runs(name: str, config: Config, mode: str, dtype: str = "float32") -> bool:
    """Whether runner `name` is measured on (config, mode, dtype): ONNX Runtime runs inference
    only, in float32 (its CPU LSTM and GRU refuse float64)."""
    return config.runs(mode) and (name != bench_onnx.RUNNER or (mode == "forward" and dtype == "float32"))


def _inputs(config: Config, dtype: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((config.T, config.B, config.I)).astype(dtype)
    out_features = config.H * config.directions
    dy = rng.standard_normal((config.T, config.B, out_features)).astype(dtype)
    return x, dy


def make_runner(name: str, config: Config, mode: str, dtype: str = "float32"):
    """A no-argument callable that runs (and finishes) one measured iteration."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if not runs(name, config, mode, dtype):
        raise ValueError(f"{name} does not run {config.name} {mode} in {dtype}")
    if name.startswith("torch"):
        x, dy = _inputs(config, dtype)
        return _torch_runner(name, config, mode, dtype, x, dy)
    if name == bench_onnx.RUNNER:
        return _onnx_runner(config, dtype)
    call, _ = fastlstm_call(name, config, mode, dtype)
    sync = _cupy_sync() if name == "cupy" else (lambda: None)

    def run():
        call()
        sync()
    return run


def fastlstm_call(backend: str, config: Config, mode: str, dtype: str = "float32"):
    """(call, layer): one iteration on a fastlstm backend, returning as soon as the work is
    queued (a GPU backend may still be running it), and the layer it runs."""
    from .layer import LAYERS

    x, dy = _inputs(config, dtype)
    lstm = LAYERS[config.cell](config.I, config.H, num_layers=config.layers, bidirectional=config.bidirectional,
                                backend=backend, dtype=dtype, seed=0)
    device = lstm._current_backend()
    x_dev, dy_dev = device.from_user(x, "x"), device.from_user(dy, "dy")
    if config.stream:
        lstm.eval()
        stream = lstm.stream(config.B)
        steps = [x_dev[t] for t in range(config.T)]

        def call():
            stream.reset()
            for x_t in steps:
                stream(x_t)
    elif mode == "forward":
        lstm.eval()

        def call():
            lstm(x_dev)
    else:

        def call():
            lstm(x_dev)
            lstm.backward(dy_dev)
    return call, lstm


def _onnx_runner(config: Config, dtype: str):
    """ONNX Runtime on a model of the fastlstm layer's weights (bench_onnx)."""
    from .layer import LAYERS

    x, _ = _inputs(config, dtype)
    layer = LAYERS[config.cell](config.I, config.H, num_layers=config.layers, bidirectional=config.bidirectional,
                                backend="numpy", dtype=dtype, seed=0)
    return (bench_onnx.stream_call if config.stream else bench_onnx.sequence_call)(layer, x)


def _cupy_sync():
    import cupy

    return lambda: cupy.cuda.Device().synchronize()


def _torch_runner(name, config, mode, dtype, x, dy):
    import torch

    device = "cuda" if name in TORCH_CUDA_RUNNERS else "cpu"
    allow_tf32 = name == "torch-cuda-tf32"
    module = getattr(torch.nn, config.cell.upper())(config.I, config.H, num_layers=config.layers, bidirectional=config.bidirectional)
    module = module.to(device=device, dtype=getattr(torch, dtype))
    xt = torch.from_numpy(x).to(device)
    dyt = torch.from_numpy(dy).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if config.stream:
        module.eval()
        steps = [xt[t : t + 1] for t in range(config.T)]

        def step():
            with torch.no_grad():
                state = None
                for x_t in steps:
                    _, state = module(x_t, state)
    elif mode == "forward":
        module.eval()

        def step():
            with torch.no_grad():
                module(xt)
    else:
        module.train()
        xt.requires_grad_(True)

        def step():
            y, _ = module(xt)
            y.backward(dyt)

    def run():
        # cuDNN reads the flag at each call: set it for this runner's calls only
        previous = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = allow_tf32
        try:
            step()
            sync()
        finally:
            torch.backends.cudnn.allow_tf32 = previous
    return run


def sgemm_ceiling(dtype: str = "float32", size: int = 1024, repeats: int = 10) -> float:
    """GFLOP/s of NumPy's own matmul on this machine, measured now: the best of `repeats`
    (a ceiling is what the machine can do; on a shared host the median drifts with load)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size)).astype(dtype)
    b = rng.standard_normal((size, size)).astype(dtype)
    out = np.empty_like(a)
    np.matmul(a, b, out=out)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.matmul(a, b, out=out)
        times.append(time.perf_counter() - start)
    return 2.0 * size**3 / min(times) / 1e9


def gpu_gemm_ceiling(dtype: str = "float32", size: int = 8192, repeats: int = 5) -> float:
    """GFLOP/s of cuBLAS's GEMM through CuPy (IEEE, no TF32 unless CUPY_TF32 is set), timed with
    events: the median (a GPU's clock is steady under load, unlike a shared host's)."""
    import cupy

    a = cupy.random.standard_normal((size, size)).astype(dtype)
    b = cupy.random.standard_normal((size, size)).astype(dtype)
    out = cupy.matmul(a, b)
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    times = []
    for _ in range(repeats):
        start.record()
        cupy.matmul(a, b, out=out)
        stop.record()
        stop.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, stop) / 1e3)
    return 2.0 * size**3 / statistics.median(times) / 1e9


@dataclass
class Measurement:
    config: str
    mode: str
    runner: str
    times_s: list
    flops: float
    T: int
    B: int
    I: int  # noqa: E741
    H: int
    layers: int
    bidirectional: bool
    min_bytes: float = 0.0  # Config.min_bytes (0: a file written before it was recorded)
    stream: bool = False  # T calls of one step each (Config.stream)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def gflops(self) -> float:
        return self.flops / self.median_s / 1e9

    @property
    def gbytes_per_s(self) -> float:
        """The fewest bytes over the time: far under the memory's bandwidth, the time is
        not spent moving data."""
        return self.min_bytes / self.median_s / 1e9


@dataclass
class Report:
    machine: dict
    versions: dict
    threads: int
    dtype: str
    repeats: int
    ceiling_gflops: float
    measurements: list = field(default_factory=list)
    gpu_ceiling_gflops: float | None = None  # cuBLAS GEMM, when a GPU runner was measured

    def ceiling_for(self, runner: str) -> float | None:
        return self.gpu_ceiling_gflops if runner in GPU_RUNNERS else self.ceiling_gflops

    def to_json(self) -> dict:
        data = asdict(self)
        for m, raw in zip(self.measurements, data["measurements"]):
            raw.update(median_s=m.median_s, gflops=m.gflops, gbytes_per_s=m.gbytes_per_s)
        return data

    @classmethod
    def from_json(cls, data: dict) -> "Report":
        fields = {k: v for k, v in data.items() if k != "measurements"}
        report = cls(**fields)
        for raw in data["measurements"]:
            raw = {k: v for k, v in raw.items() if k not in ("median_s", "gflops", "gbytes_per_s")}
            report.measurements.append(Measurement(**raw))
        return report


def machine_info() -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor(), "cores": threads.available_cores()}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    status = registry.available_backends()["cupy"]
    info["gpu"] = status.reason if status.available else None
    return info


def library_versions() -> dict:
    versions = {"python": sys.version.split()[0], "numpy": np.__version__}
    for module in ("numba", "scipy", "torch", "cupy", "threadpoolctl", "onnxruntime"):
        if module_available(module):
            try:
                versions[module] = __import__(module).__version__
            except Exception as exc:  # noqa: BLE001 - a broken install is still worth reporting
                versions[module] = f"broken ({type(exc).__name__})"
    from . import __version__

    versions["fastlstm"] = __version__
    return versions


def run_benchmarks(configs, runners, modes=MODES, dtype="float32", repeats=5, warmup=1, progress=None) -> Report:
    """Measure every (config, mode, runner): each runner's rounds back to back (module docstring)."""
    report = Report(machine_info(), library_versions(), threads.get_num_threads(), dtype, repeats,
                    sgemm_ceiling(dtype))
    if any(name in GPU_RUNNERS for name in runners):
        report.gpu_ceiling_gflops = gpu_gemm_ceiling(dtype)
    cases = [(config, mode) for config in configs for mode in modes if config.runs(mode)]
    for done, (config, mode) in enumerate(cases, 1):
        names = [name for name in runners if runs(name, config, mode, dtype)]
        if progress:
            progress(f"[{done}/{len(cases)}] {config.name} {mode}: {', '.join(names)}")
        times = {}
        for name in names:
            call = make_runner(name, config, mode, dtype)
            time.sleep(SETTLE_S)  # let the previous runner's spinning threads go idle
            for _ in range(max(warmup, GPU_WARMUP) if name in GPU_RUNNERS else warmup):
                call()  # first call: compiles kernels, allocates, warms caches
            times[name] = []
            for _ in range(repeats):
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
        for name in names:
            report.measurements.append(Measurement(
                config.name, mode, name, times[name], config.flops(mode),
                config.T, config.B, config.I, config.H, config.layers, config.bidirectional,
                config.min_bytes(mode, np.dtype(dtype).itemsize), config.stream,
            ))
    return report


def _speedup(report: Report, m: Measurement, rival: str) -> str:
    for other in report.measurements:
        if (other.config, other.mode, other.runner) == (m.config, m.mode, rival):
            return f"{other.median_s / m.median_s:.2f}x"
    return "-"


def format_table(report: Report) -> str:
    measured = {m.runner for m in report.measurements}
    rivals = ["numpy", "torch"] + [name for name in TORCH_CUDA_RUNNERS + (bench_onnx.RUNNER,) if name in measured]
    header = ("config", "mode", "backend", "ms", "us/step", "GFLOP/s", "of ceiling", "GB/s",
              *(f"vs {r}" for r in rivals))
    rows = [header]
    for m in report.measurements:
        ceiling = report.ceiling_for(m.runner)
        rows.append((
            m.config, m.mode, m.runner, f"{m.median_s * 1e3:.2f}", f"{m.median_s / m.T * 1e6:.1f}" if m.stream else "-",
            f"{m.gflops:.1f}",
            f"{m.gflops / ceiling:.0%}" if ceiling else "-", f"{m.gbytes_per_s:.1f}" if m.min_bytes else "-",
            *(_speedup(report, m, r) for r in rivals),
        ))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    title = (
        f"fastlstm bench: {report.dtype}, {report.threads} threads, median of {report.repeats}; "
        f"NumPy matmul ceiling measured now: {report.ceiling_gflops:.1f} GFLOP/s"
        + (f"; cuBLAS GEMM ceiling (CuPy, {report.dtype}): {report.gpu_ceiling_gflops:.0f} GFLOP/s "
           "('of ceiling': GPU rows against it, CPU rows against NumPy's)" if report.gpu_ceiling_gflops else "")
        + "; GB/s: the fewest bytes the config must move (Config.min_bytes) over the time"
        + "; us/step: a streaming config's time per call of one step"
    )
    return title + "\n" + "\n".join(lines)


def compare(old: Report, new: Report) -> str:
    """Old / new time per (config, mode, backend) present in both: above 1 means faster now."""
    old_times = {(m.config, m.mode, m.runner): m.median_s for m in old.measurements}
    rows = [("config", "mode", "backend", "old ms", "new ms", "speed-up")]
    for m in new.measurements:
        key = (m.config, m.mode, m.runner)
        if key in old_times:
            rows.append((*key, f"{old_times[key] * 1e3:.2f}", f"{m.median_s * 1e3:.2f}",
                         f"{old_times[key] / m.median_s:.2f}x"))
    if len(rows) == 1:
        return "no measurement appears in both files"
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)


def save_json(report: Report, path) -> None:
    save_json_data(report.to_json(), path)


def save_json_data(data: dict, path) -> None:
    """`data` as indented JSON at `path`, written atomically."""
    from .checkpoint import write_atomic

    text = json.dumps(data, indent=1)
    write_atomic(path, lambda handle: handle.write(text.encode("utf-8")))


def load_json(path) -> Report:
    with open(path, encoding="utf-8") as handle:
        try:
            return Report.from_json(json.load(handle))
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"{path}: not a fastlstm bench JSON file: {exc}") from exc


def plot(report: Report, path) -> None:
    """PNG bar chart: time per backend for each config and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((m.config, m.mode) for m in report.measurements))
    runners = list(dict.fromkeys(m.runner for m in report.measurements))
    times = {(m.config, m.mode, m.runner): m.median_s * 1e3 for m in report.measurements}
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(groups)), 4.5))
    width = 0.8 / max(1, len(runners))
    for k, runner in enumerate(runners):
        xs = [g + k * width for g in range(len(groups))]
        ax.bar(xs, [times.get((c, m, runner), 0) for c, m in groups], width, label=runner)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
    ax.set_xticklabels([f"{c}\n{m}" for c, m in groups], fontsize=8)
    ax.set_ylabel("ms (median)")
    ax.set_yscale("log")
    ax.set_title(f"fastlstm bench ({report.dtype}, {report.threads} threads)")
    ax.legend()
    fig.tight_layout()
    from .checkpoint import write_atomic

    write_atomic(path, lambda handle: fig.savefig(handle, format="png", dpi=110))
    plt.close(fig)
