"""Run by test_torch_distributed.py as a script: DistributedDataParallel over
fastlstm.torch.LSTM in WORLD gloo processes on the CPU, each on its share of one batch;
every rank writes its parameter gradients to OUT_DIR/rank<r>.npz.

    python tests/ddp_worker.py OUT_DIR
"""

from __future__ import annotations

import gc
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastlstm.torch as ft

WORLD = 2
BATCH, STEPS, INPUT, HIDDEN, CLASSES = 6, 7, 5, 8, 4


class Model(torch.nn.Module):
    """fastlstm LSTM (2 layers) -> Linear; the same initial weights in every process."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lstm = ft.LSTM(INPUT, HIDDEN, num_layers=2, batch_first=True, backend="numpy")
        self.head = torch.nn.Linear(HIDDEN, CLASSES)

    def forward(self, x):
        y, _ = self.lstm(x)
        return self.head(y)


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, STEPS, INPUT, generator=g), torch.randint(0, CLASSES, (BATCH, STEPS), generator=g)


def loss_of(model, x, target):
    """Mean cross-entropy: over equal shares, DDP's averaged gradient is the whole batch's."""
    logits = model(x)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, CLASSES), target.reshape(-1))


def worker(rank, out_dir):
    store = os.path.join(out_dir, "store")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        np.savez(os.path.join(out_dir, f"rank{rank}.npz"), **train_on_share(rank))
    finally:
        # The DDP model is gone with train_on_share's frame: the process group's threads stop
        # now, not while the interpreter shuts down (gloo can abort then: seen with nn.LSTM too).
        gc.collect()
        dist.destroy_process_group()


def train_on_share(rank) -> dict:
    model = torch.nn.parallel.DistributedDataParallel(Model())
    x, target = batch()
    share = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    loss_of(model, x[share], target[share]).backward()
    return {name: p.grad.numpy().copy() for name, p in model.module.named_parameters()}


if __name__ == "__main__":
    mp.spawn(worker, args=(sys.argv[1],), nprocs=WORLD)
