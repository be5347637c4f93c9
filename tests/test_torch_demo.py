"""The PyTorch demo (fastlstm/demo/torch_train.py): one process, and two under torchrun as
the README says to run it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed: pip install torch==2.13.0")


def run(args, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=180, cwd=tmp_path)


def test_one_process_learns_and_saves(tmp_path):
    result = run(["-m", "fastlstm.demo.torch_train", "--steps", "60", "--eval-every", "20", "--hidden", "32",
                  "--sample-length", "20", "--save", "model.pt"], tmp_path)
    assert result.returncode == 0, result.stderr
    losses = [float(line.split("validation ")[1].split()[0]) for line in result.stderr.splitlines() if "validation" in line]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert "sample:" in result.stdout
    state = torch.load(tmp_path / "model.pt")
    assert "lstm.weight_hh_l0" in state and state["lstm.weight_hh_l0"].shape == (128, 32)


def test_two_processes_under_torchrun(tmp_path):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    result = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                  "-m", "fastlstm.demo.torch_train", "--steps", "4", "--eval-every", "2", "--hidden", "16",
                  "--sample-length", "0"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "2 process(es) on cpu" in result.stderr and "step 4:" in result.stderr


def test_bad_arguments_are_usage_errors(tmp_path):
    result = run(["-m", "fastlstm.demo.torch_train", "--steps", "0"], tmp_path)
    assert result.returncode == 2 and "--steps: expected a positive integer" in result.stderr
