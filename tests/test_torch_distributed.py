"""DistributedDataParallel over fastlstm.torch.LSTM: 2 gloo processes on the CPU, each on
half the batch, end with the gradients one process computes on the whole batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed: pip install torch==2.13.0")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import ddp_worker  # noqa: E402  (needs torch)


def test_ddp_two_gloo_processes_average_to_the_whole_batch(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    result = subprocess.run(
        [sys.executable, str(Path(ddp_worker.__file__)), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    model = ddp_worker.Model()
    ddp_worker.loss_of(model, *ddp_worker.batch()).backward()
    expected = {name: p.grad.numpy() for name, p in model.named_parameters()}
    assert any(name.startswith("lstm.weight_hh") for name in expected)
    for rank in range(ddp_worker.WORLD):
        got = np.load(tmp_path / f"rank{rank}.npz")
        assert set(got.files) == set(expected)
        for name in expected:
            np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-7, err_msg=f"rank {rank}: {name}")
