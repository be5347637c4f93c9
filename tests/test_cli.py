"""The ``fastlstm`` command end to end, in subprocesses."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fastlstm

REPO = Path(__file__).resolve().parent.parent
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def fastlstm_cmd(*args, env_extra=None, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("FASTLSTM_BACKEND", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "fastlstm", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, check=False)


def test_info_reports_every_backend_and_exits_zero():
    out = fastlstm_cmd("info")
    assert out.returncode == 0, out.stderr
    for word in ("versions:", "numpy", "numba", "cupy", "threads:", "gpu:", "default backend:"):
        assert word in out.stdout
    broken = fastlstm_cmd("info", env_extra={"FASTLSTM_BACKEND": "bogus"})
    assert broken.returncode == 0 and "invalid" in broken.stdout


@pytest.mark.skipif(not fastlstm.available_backends()["numba"].available, reason="numba backend unavailable")
def test_info_says_whether_numbas_cache_is_warm(tmp_path):
    from fastlstm.backends import numba_backend

    cold = fastlstm_cmd("info", env_extra={"NUMBA_CACHE_DIR": str(tmp_path)})
    assert cold.returncode == 0, cold.stderr
    functions = len(numba_backend._cached_functions())
    assert f"numba cache: cold: 0 of {functions} compiled functions of the kernels are there for this CPU" in cold.stdout, (
        cold.stdout)
    warm_up = "import numpy as np, fastlstm; fastlstm.LSTM(3, 4, backend='numba').eval()(np.ones((2, 1, 3), np.float32))"
    subprocess.run([sys.executable, "-c", warm_up], check=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    warm = fastlstm_cmd("info")
    assert "numba cache: " in warm.stdout and "cold: 0 of" not in warm.stdout


def test_bench_quick_with_json(tmp_path):
    path = tmp_path / "run.json"
    out = fastlstm_cmd("bench", "--quick", "--configs", "small,stream-1", "--backends", "numpy", "--json", str(path))
    assert out.returncode == 0, out.stderr
    assert "[1/4] small/4 forward" in out.stderr  # progress
    assert "GFLOP/s" in out.stdout and "of ceiling" in out.stdout and "vs numpy" in out.stdout
    data = json.loads(path.read_text())
    assert data["ceiling_gflops"] > 0 and data["machine"]["cores"] >= 1 and "numpy" in data["versions"]
    assert {(m["config"], m["mode"], m["runner"]) for m in data["measurements"]} == {
        (c, m, "numpy") for c in ("small/4", "stream-1/4") for m in ("forward", "forward+backward")
    }
    assert all(len(m["times_s"]) == 2 and m["median_s"] > 0 and m["gflops"] > 0 for m in data["measurements"])
    compared = fastlstm_cmd("bench", "--compare", str(path), str(path))
    assert compared.returncode == 0 and "1.00x" in compared.stdout


def test_bench_custom_config_all_backends():
    out = fastlstm_cmd("bench", "--T", "5", "--B", "3", "--I", "4", "--H", "8", "--layers", "2",
                       "--bidirectional", "--repeats", "1", "--threads", "1")
    assert out.returncode == 0, out.stderr
    assert "custom" in out.stdout and "numpy" in out.stdout


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib not installed")
def test_bench_plot(tmp_path):
    path = tmp_path / "bench.png"
    out = fastlstm_cmd("bench", "--quick", "--configs", "stream-1", "--backends", "numpy", "--plot", str(path))
    assert out.returncode == 0, out.stderr
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_plot_without_matplotlib_says_so(tmp_path):
    # sitecustomize runs first in the child: matplotlib then looks uninstalled
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['matplotlib'] = None\n")
    out = fastlstm_cmd("bench", "--quick", "--plot", str(tmp_path / "x.png"),
                       env_extra={"PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"})
    assert out.returncode == 1
    assert "--plot needs matplotlib" in out.stderr
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("args, fragment", [
    (["bench", "--repeats", "0"], "--repeats: expected a positive integer, got 0"),
    (["bench", "--configs", "huge"], "--configs: unknown huge"),
    (["bench", "--backends", "tensorflow"], "--backends: unknown 'tensorflow'"),
    (["bench", "--T", "5"], "needs all of --T --B --I --H"),
    (["bench", "--modes", "sideways"], "--modes: unknown 'sideways'"),
    (["bench", "--dtype", "int8"], "invalid choice"),
    (["train", "--steps", "-1"], "--steps"),
    (["launch"], "invalid choice"),
    ([], "required"),
])
def test_bad_arguments_are_usage_errors(args, fragment):
    out = fastlstm_cmd(*args)
    assert out.returncode == 2
    assert fragment in out.stderr and "usage:" in out.stderr


@pytest.mark.skipif(fastlstm.available_backends()["cupy"].available, reason="cupy is usable here")
def test_unavailable_backend_is_a_clear_message():
    out = fastlstm_cmd("bench", "--backends", "cupy", "--quick")
    assert out.returncode == 1
    assert "backend 'cupy' is not available" in out.stderr and "pip install" in out.stderr
    train = fastlstm_cmd("train", "--backend", "cupy", "--steps", "1")
    assert train.returncode == 1 and "backend 'cupy' is not available" in train.stderr


def test_compare_refuses_a_foreign_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"hello": 1}')
    out = fastlstm_cmd("bench", "--compare", str(bad), str(bad))
    assert out.returncode == 1 and "not a fastlstm bench JSON file" in out.stderr


TRAIN_ARGS = ["--hidden", "32", "--embed", "8", "--seq-len", "16", "--batch", "4", "--eval-every", "3",
              "--sample-length", "20", "--quiet", "--backend", "numpy"]


def checkpoint_params(path):
    with np.load(path) as data:
        return {k: data[k] for k in data.files if k.startswith(("param/", "adam_"))}


def test_train_resume_is_identical_to_an_uninterrupted_run(tmp_path):
    whole = tmp_path / "whole.npz"
    out = fastlstm_cmd("train", *TRAIN_ARGS, "--steps", "8", "--checkpoint", str(whole))
    assert out.returncode == 0, out.stderr
    assert "validation loss" in out.stdout and "sample:" in out.stdout
    split = tmp_path / "split.npz"
    first = fastlstm_cmd("train", *TRAIN_ARGS, "--steps", "5", "--checkpoint", str(split))
    assert first.returncode == 0, first.stderr
    second = fastlstm_cmd("train", *TRAIN_ARGS, "--steps", "8", "--checkpoint", str(split), "--resume")
    assert second.returncode == 0, second.stderr
    assert "resuming at step 5" in second.stderr
    a, b = checkpoint_params(whole), checkpoint_params(split)
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_train_refuses_a_truncated_checkpoint(tmp_path):
    path = tmp_path / "ck.npz"
    assert fastlstm_cmd("train", *TRAIN_ARGS, "--steps", "2", "--checkpoint", str(path)).returncode == 0
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    out = fastlstm_cmd("train", *TRAIN_ARGS, "--steps", "4", "--checkpoint", str(path), "--resume")
    assert out.returncode == 1
    assert "not a readable fastlstm-charlm file" in out.stderr
    missing = fastlstm_cmd("train", *TRAIN_ARGS, "--steps", "4", "--checkpoint", str(tmp_path / "none.npz"), "--resume")
    assert missing.returncode == 1 and "no checkpoint at" in missing.stderr


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib not installed")
def test_train_plot(tmp_path):
    png = tmp_path / "loss.png"
    out = fastlstm_cmd("train", *TRAIN_ARGS, "--steps", "6", "--checkpoint", str(tmp_path / "c.npz"), "--plot", str(png))
    assert out.returncode == 0, out.stderr
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_bench_table_puts_gpu_rows_against_the_gpu_ceiling_and_cudnn():
    """No GPU needed: a report as a GPU run would make it (cupy beside both cuDNN runners)."""
    from fastlstm import bench

    report = bench.Report({}, {}, 1, "float32", 3, ceiling_gflops=100.0, gpu_ceiling_gflops=50_000.0)
    for runner, seconds in (("cupy", 0.002), ("torch-cuda", 0.004), ("torch-cuda-tf32", 0.001), ("numpy", 1.0)):
        report.measurements.append(bench.Measurement("wide-512", "forward", runner, [seconds] * 3, 1e9,
                                                     100, 64, 512, 512, 1, False))
    lines = bench.format_table(report).splitlines()
    assert lines[1].endswith("vs torch-cuda  vs torch-cuda-tf32") and "cuBLAS GEMM ceiling" in lines[0]
    cupy = next(line.split() for line in lines if line.startswith("wide-512") and " cupy " in line)
    assert cupy[6] == "1%"  # 500 GFLOP/s of the GPU's 50,000, not of the CPU's 100
    assert cupy[-2:] == ["2.00x", "0.50x"]  # cuDNN fp32 took twice as long, TF32 half
    numpy_row = next(line.split() for line in lines if line.startswith("wide-512") and " numpy " in line)
    assert numpy_row[6] == "1%"  # 1 GFLOP/s of the CPU's 100
    again = bench.Report.from_json(report.to_json())
    assert again.gpu_ceiling_gflops == 50_000.0 and len(again.measurements) == 4


def test_gpu_runners_warm_up_past_the_graph_capture(monkeypatch):
    """The cupy backend captures its per-step loops on the second call of a shape: GPU
    runners get at least two warm-up calls, so measured calls replay; CPU runners one."""
    from fastlstm import bench

    calls = {}

    def counting_runner(name, config, mode, dtype="float32"):
        calls[name] = 0
        return lambda: calls.__setitem__(name, calls[name] + 1)

    monkeypatch.setattr(bench, "make_runner", counting_runner)
    monkeypatch.setattr(bench, "gpu_gemm_ceiling", lambda dtype: 1.0)
    monkeypatch.setattr(bench, "SETTLE_S", 0.0)
    bench.run_benchmarks([bench.CONFIGS["small"]], ["numpy", "cupy", "torch-cuda"], modes=("forward",), repeats=3)
    assert calls == {"numpy": 1 + 3, "cupy": bench.GPU_WARMUP + 3, "torch-cuda": bench.GPU_WARMUP + 3}
    assert bench.GPU_WARMUP >= 2


@pytest.mark.parametrize("layers, bidirectional", [(1, False), (2, True), (3, False)])
def test_min_bytes_counts_every_input_parameter_and_output_once(layers, bidirectional):
    """Config.min_bytes against the sizes of what a real forward takes and returns."""
    from fastlstm import bench

    config = bench.Config("t", 3, 2, 5, 4, layers, bidirectional)
    lstm = fastlstm.LSTM(5, 4, num_layers=layers, bidirectional=bidirectional, backend="numpy", dtype="float64")
    x = np.ones((3, 2, 5))
    y, (h_n, c_n) = lstm(x)
    dx, (dh0, dc0) = lstm.backward(np.ones_like(y))
    params = sum(p.size for p in lstm.params.values())
    forward = x.size + params + y.size + h_n.size + c_n.size
    backward = y.size + dx.size + params + dh0.size + dc0.size  # dy, dx, the gradients, dh0, dc0
    assert config.min_bytes("forward", 8) == forward * 8
    assert config.min_bytes("forward+backward", 4) == (forward + backward) * 4
    # the GPU issue's largest config: ~35 MB forward (bench/results/2026-11-27-gpu-h200.md)
    assert bench.EXTRA_CONFIGS["wide-512"].min_bytes("forward", 4) == 34_881_536


def test_bench_json_from_before_min_bytes_still_loads():
    from fastlstm import bench

    report = bench.Report({}, {}, 1, "float32", 3, ceiling_gflops=100.0)
    report.measurements.append(bench.Measurement("small", "forward", "numpy", [0.5] * 3, 1e9, 200, 16, 32, 64, 1,
                                                 False, min_bytes=2e9))
    data = report.to_json()
    assert data["measurements"][0]["gbytes_per_s"] == 4.0
    assert "GB/s" in bench.format_table(report) and " 4.0 " in bench.format_table(report)
    for raw in data["measurements"]:
        del raw["min_bytes"], raw["gbytes_per_s"]  # as written before the floor was recorded
    old = bench.Report.from_json(data)
    assert old.measurements[0].min_bytes == 0.0 and bench.format_table(old).splitlines()[3].split()[7] == "-"


def test_bench_torch_times_a_training_step(tmp_path):
    pytest.importorskip("torch", reason="PyTorch is not installed")
    path = tmp_path / "step.json"
    out = fastlstm_cmd("bench", "--torch", "--T", "4", "--B", "2", "--I", "3", "--H", "8", "--layers", "2",
                       "--repeats", "2", "--threads", "1", "--device", "cpu", "--json", str(path))
    assert out.returncode == 0, out.stderr
    for word in ("nn.LSTM step", "fastlstm step", "fastlstm.torch lstm", "fastlstm bare", "head step",
                 "vs torch.nn step", "adapter overhead", "step - parts"):
        assert word in out.stdout
    data = json.loads(path.read_text())
    runners = {m["runner"] for m in data["measurements"]}
    assert runners == {"nn.LSTM step", "fastlstm step", "fastlstm.torch lstm", "fastlstm bare", "head step"}
    gru = fastlstm_cmd("bench", "--torch", "--cell", "gru", "--T", "4", "--B", "2", "--I", "3", "--H", "8",
                       "--repeats", "2", "--threads", "1", "--device", "cpu")
    assert gru.returncode == 0, gru.stderr
    assert "nn.GRU step" in gru.stdout and "fastlstm.torch gru" in gru.stdout and "LSTM step" not in gru.stdout
    assert all(m["config"] == "custom (cpu)" and len(m["times_s"]) == 2 for m in data["measurements"])
    bad = fastlstm_cmd("bench", "--torch", "--backends", "numpy")
    assert bad.returncode == 2 and "--backends does not apply" in bad.stderr
    bad = fastlstm_cmd("bench", "--device", "cpu", "--quick")
    assert bad.returncode == 2 and "--device applies with --torch only" in bad.stderr


def test_a_reader_that_stops_early_is_no_error():
    """`fastlstm info | head -1`: the rest of the output has nowhere to go; exit quietly."""
    process = subprocess.Popen([sys.executable, "-m", "fastlstm", "info"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    process.stdout.readline()
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait(timeout=300) == 0 and "Broken pipe" not in stderr and "Error" not in stderr, stderr


def test_resume_refuses_another_architecture_and_takes_training_settings(tmp_path):
    path = tmp_path / "ck.npz"
    assert fastlstm_cmd("train", *TRAIN_ARGS, "--steps", "3", "--checkpoint", str(path)).returncode == 0
    best = tmp_path / "ck-best.npz"
    assert best.is_file()  # the best so far beside the latest
    args = [a for a in TRAIN_ARGS]
    args[args.index("--hidden") + 1] = "64"
    out = fastlstm_cmd("train", *args, "--steps", "4", "--checkpoint", str(path), "--resume")
    assert out.returncode == 1 and "--hidden 64 (the checkpoint has 32)" in out.stderr, out.stderr
    out = fastlstm_cmd("train", *TRAIN_ARGS, "--lr", "0.01", "--steps", "4", "--checkpoint", str(path), "--resume")
    assert out.returncode == 0, out.stderr
    assert "with --lr 0.01 (was 0.003) from the command line" in out.stderr and "best" in out.stdout


def test_train_help_shows_the_default_checkpoint():
    out = fastlstm_cmd("train", "--help")
    assert "fastlstm-charlm.npz" in out.stdout and "-best.npz" in out.stdout


def test_streaming_configs_run_one_call_per_step_forward_only():
    from fastlstm import bench

    config = bench.Config("step-t", 4, 2, 3, 5, stream=True)
    runners = [name for name in bench.available_runners() if name in ("numpy", "numba", "torch", "onnxruntime")]
    report = bench.run_benchmarks([config, config.with_cell("gru")], runners, repeats=1)
    assert {(m.config, m.mode) for m in report.measurements} == {("step-t", "forward"), ("step-t gru", "forward")}
    assert {m.runner for m in report.measurements} == set(runners) and all(m.stream for m in report.measurements)
    table = bench.Report({}, {}, 1, "float32", 3, ceiling_gflops=100.0)
    table.measurements.append(bench.Measurement("step-t", "forward", "numpy", [0.004] * 3, 1e6, 4, 2, 3, 5, 1, False,
                                                stream=True))
    row = next(line.split() for line in bench.format_table(table).splitlines() if line.startswith("step-t "))
    assert row[3:5] == ["4.00", "1000.0"]  # ms a call of T=4 steps, us a step
    assert not bench.runs("onnxruntime", bench.CONFIGS["small"], "forward+backward")
    assert not bench.runs("onnxruntime", bench.CONFIGS["small"], "forward", "float64")  # ORT: no double LSTM
    assert not bench.runs("numpy", config, "forward+backward") and bench.runs("numpy", config, "forward")
