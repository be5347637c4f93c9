"""``fastlstm bench --torch``: a whole PyTorch training step with ``fastlstm.torch.LSTM``
(or ``GRU``, with ``--cell gru``) against the same step with ``torch.nn.LSTM`` (``GRU``),
and what the adapter costs over the bare call.

A step is LSTM -> Linear -> cross-entropy -> backward -> Adam, on DESIGN.md's
configurations (batch-first off, targets drawn once). Runners:

- ``nn.LSTM step`` (``nn.GRU step``) and ``fastlstm step``: the whole step, CPU tensors (and,
  where torch sees a GPU, CUDA tensors: cuDNN in IEEE float32, and with torch's default TF32
  setting);
- ``fastlstm.torch lstm`` (``gru``) and ``fastlstm bare``: only the layer's forward + backward, once
  through the torch module (the adapter) and once on the NumPy-level layer with the same
  backend and weights. Their ratio is the adapter's overhead;
- ``head step``: the rest of the step alone (Linear, loss, backward, Adam on a fixed LSTM
  output). ``fastlstm step`` minus ``fastlstm.torch lstm`` minus ``head step`` is what the
  two running in one step cost beyond their parts: where fastlstm's threads and torch's
  intra-op threads fought over the cores (both spin while they wait), it would show there.

Rounds alternate between the runners, so that a change in the host's load hits every
runner alike: each round runs every runner, in a rotated order, as a block of consecutive
steps (as a training loop runs them) after a short pause, so that thread pools the previous
runner left spinning go idle, and one unmeasured step, which wakes the sleeping ones. A
round's time is the block's mean step; the medians over rounds are reported.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field

import numpy as np

from . import threads
from .bench import CONFIGS, Config, library_versions, machine_info

SETTLE_S = 0.05  # libgomp threads spin for well under this after a parallel region
BLOCK_S = 0.1  # a block of consecutive steps lasts at least this long (and has 3 steps at least)
HEAD_CLASSES = 64  # the Linear head's outputs (a character vocabulary's size)
LR = 1e-3


@dataclass
class StepReport:
    machine: dict
    versions: dict
    threads: int
    repeats: int
    times: dict = field(default_factory=dict)  # (config, runner) -> [seconds per round]

    def median(self, config: str, runner: str) -> float | None:
        values = self.times.get((config, runner))
        return statistics.median(values) if values else None

    def ratio(self, config: str, numerator: str, denominator: str) -> float | None:
        """Median over rounds of the two runners' time ratio within each round (rounds are
        minutes apart at most, so a drift in the host's speed cancels out)."""
        a, b = self.times.get((config, numerator)), self.times.get((config, denominator))
        if not a or not b:
            return None
        return statistics.median(x / y for x, y in zip(a, b))

    @classmethod
    def from_json(cls, data: dict) -> "StepReport":
        report = cls(data["machine"], data["versions"], data["threads"], data["repeats"])
        for m in data["measurements"]:
            report.times[(m["config"], m["runner"])] = list(m["times_s"])
        return report

    def to_json(self) -> dict:
        return {
            "machine": self.machine, "versions": self.versions, "threads": self.threads, "repeats": self.repeats,
            "measurements": [
                {"config": c, "runner": r, "times_s": t, "median_s": statistics.median(t)}
                for (c, r), t in self.times.items()
            ],
        }


def _devices() -> list[str]:
    import torch

    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _sync(device: str):
    import torch

    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def _training_step(config: Config, device: str, kind: str, allow_tf32: bool = False):
    """A no-argument callable: one training step of LSTM + Linear + cross-entropy + Adam."""
    import torch

    from . import torch as adapter

    torch.manual_seed(0)
    name = config.cell.upper()  # LSTM / GRU: the class in torch.nn and in fastlstm.torch
    reference = getattr(torch.nn, name)(config.I, config.H, num_layers=config.layers,
                                        bidirectional=config.bidirectional)
    lstm = reference if kind == "torch" else getattr(adapter, name).from_torch(reference)
    head = torch.nn.Linear(config.H * config.directions, HEAD_CLASSES)
    lstm, head = lstm.to(device), head.to(device)
    optimizer = torch.optim.Adam(list(lstm.parameters()) + list(head.parameters()), lr=LR)
    g = torch.Generator().manual_seed(1)
    x = torch.randn((config.T, config.B, config.I), generator=g).to(device)
    target = torch.randint(0, HEAD_CLASSES, (config.T * config.B,), generator=g).to(device)
    sync = _sync(device)

    def step():
        previous = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = allow_tf32
        try:
            y, _ = lstm(x)
            loss = torch.nn.functional.cross_entropy(head(y).reshape(-1, HEAD_CLASSES), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sync()
        finally:
            torch.backends.cudnn.allow_tf32 = previous
    return step


def _head_step(config: Config, device: str):
    """The step without the LSTM: Linear + cross-entropy + backward + Adam on a fixed output."""
    import torch

    torch.manual_seed(0)
    head = torch.nn.Linear(config.H * config.directions, HEAD_CLASSES).to(device)
    optimizer = torch.optim.Adam(head.parameters(), lr=LR)
    g = torch.Generator().manual_seed(1)
    y = torch.randn((config.T, config.B, config.H * config.directions), generator=g).to(device).requires_grad_(True)
    target = torch.randint(0, HEAD_CLASSES, (config.T * config.B,), generator=g).to(device)
    sync = _sync(device)

    def step():
        loss = torch.nn.functional.cross_entropy(head(y).reshape(-1, HEAD_CLASSES), target)
        optimizer.zero_grad(set_to_none=True)
        y.grad = None
        loss.backward()
        optimizer.step()
        sync()
    return step


def _adapter_pair(config: Config, device: str):
    """(through the module, bare): the LSTM's forward + backward only, same backend and weights."""
    import torch

    from . import torch as adapter
    from .layer import LAYERS

    module = getattr(adapter, config.cell.upper())(config.I, config.H, num_layers=config.layers,
                                                   bidirectional=config.bidirectional).to(device)
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((config.T, config.B, config.I)).astype(np.float32)
    dy_np = rng.standard_normal((config.T, config.B, config.H * config.directions)).astype(np.float32)
    x, dy = torch.from_numpy(x_np).to(device), torch.from_numpy(dy_np).to(device)
    backend = module_backend(device)
    core = LAYERS[config.cell](config.I, config.H, num_layers=config.layers, bidirectional=config.bidirectional,
                               backend=backend)
    core.load_state_dict(module.state_dict())
    storage = core._current_backend()
    x_dev, dy_dev = storage.from_user(x_np, "x"), storage.from_user(dy_np, "dy")
    sync = _sync(device)

    def through_module():
        module.zero_grad(set_to_none=True)
        y, _ = module(x)
        y.backward(dy)
        sync()

    def bare():
        core(x_dev)
        core.backward(dy_dev)
        if device == "cuda":
            storage.xp.cuda.Device().synchronize()
    return through_module, bare


def module_backend(device: str) -> str:
    """The backend fastlstm.torch picks for tensors on `device` under 'auto'."""
    import torch

    from . import _torch_ops

    return _torch_ops.resolve_backend("", torch.device(device)).name


def runner_names(cell: str) -> dict:
    """role -> runner name for `cell`: torch's step, the module's forward + backward (the
    LSTM's names are "nn.LSTM step" and "fastlstm.torch lstm"; the GRU's say GRU, gru)."""
    return {"torch": f"nn.{cell.upper()} step", "layer": f"fastlstm.torch {cell}"}


def runners(config: Config, device: str) -> dict:
    names = runner_names(config.cell)
    torch_steps = {names["torch"]: _training_step(config, device, "torch")}
    if device == "cuda":
        torch_steps = {
            f"{names['torch']} (cuDNN fp32)": _training_step(config, device, "torch"),
            f"{names['torch']} (cuDNN TF32)": _training_step(config, device, "torch", allow_tf32=True),
        }
    return {
        **torch_steps,
        "fastlstm step": _training_step(config, device, "fastlstm"),
        **dict(zip((names["layer"], "fastlstm bare"), _adapter_pair(config, device))),
        "head step": _head_step(config, device),
    }


def run(configs=None, repeats: int = 7, warmup: int = 2, progress=None, devices=None) -> StepReport:
    """Time every runner on every config and device ('cpu', 'cuda'; default: those torch has)."""
    configs = list(CONFIGS.values()) if configs is None else configs
    report = StepReport(machine_info(), library_versions(), threads.get_num_threads(), repeats)
    for device in devices or _devices():
        for config in configs:
            label = f"{config.name} ({device})"
            if progress:
                progress(f"{label}: warming up")
            calls = runners(config, device)
            steps = {}
            for name, call in calls.items():
                for _ in range(warmup):
                    start = time.perf_counter()
                    call()
                    elapsed = time.perf_counter() - start
                steps[name] = max(3, math.ceil(BLOCK_S / max(elapsed, 1e-6)))
            names = list(calls)
            for round_index in range(repeats):
                shift = round_index % len(names)
                for name in names[shift:] + names[:shift]:
                    time.sleep(SETTLE_S)
                    calls[name]()
                    start = time.perf_counter()
                    for _ in range(steps[name]):
                        calls[name]()
                    report.times.setdefault((label, name), []).append((time.perf_counter() - start) / steps[name])
    return report


def format_table(report: StepReport) -> str:
    configs = list(dict.fromkeys(c for c, _ in report.times))
    rows = [("config", "runner", "ms", "vs torch.nn step", "adapter overhead", "step - parts")]
    for config in configs:
        names = [runner for c, runner in report.times if c == config]
        # torch's step (IEEE float32 on a GPU) and the module's forward + backward, of either cell
        torch_runner = next(r for r in names if r.startswith("nn.") and (r.endswith(" step") or "fp32" in r))
        layer_runner = next(r for r in names if r.startswith("fastlstm.torch "))
        speedup = report.ratio(config, torch_runner, "fastlstm step")
        overhead = report.ratio(config, layer_runner, "fastlstm bare")
        lstm, head = report.median(config, layer_runner), report.median(config, "head step")
        for runner in names:
            c = config
            t = report.median(c, runner)
            versus = f"{speedup:.2f}x" if runner == "fastlstm step" and speedup else ""
            extra = f"{overhead - 1:+.1%}" if runner == layer_runner and overhead else ""
            parts = f"{(t - lstm - head) * 1e3:+.2f} ms" if runner == "fastlstm step" and lstm and head else ""
            rows.append((c, runner, f"{t * 1e3:.2f}", versus, extra, parts))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    title = (f"fastlstm bench --torch: a training step (LSTM or GRU + Linear({HEAD_CLASSES}) + cross-entropy + Adam), "
             f"float32, {report.threads} threads, median of {report.repeats} alternated rounds (blocks of "
             "consecutive steps); ratios are medians of the ratios within rounds; "
             "'vs torch.nn step' above 1: fastlstm faster than torch.nn.LSTM / GRU")
    return title + "\n" + "\n".join(lines)
