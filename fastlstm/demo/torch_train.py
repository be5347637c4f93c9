"""The character-level language model of ``fastlstm train``, written in PyTorch with
``fastlstm.torch.LSTM`` and trained with DistributedDataParallel when launched by torchrun.

    python -m fastlstm.demo.torch_train --steps 300                      # one process
    torchrun --nproc_per_node 2 -m fastlstm.demo.torch_train --steps 300  # two processes
    torchrun --nnodes 2 --node_rank R --master_addr HOST --nproc_per_node 4 -m fastlstm.demo.torch_train

Processes on the CPU talk through gloo, on GPUs through nccl (one GPU per process, by
LOCAL_RANK). Every process draws its own random windows of the training text (seeded by
its rank); gradients are averaged by DDP, so a step with N processes trains on N batches.
Rank 0 reports loss, validation loss and tokens/s, writes the final weights atomically
(``--save``) and prints a sample. Nothing here is specific to fastlstm but the one import:
the model is an ordinary ``nn.Module``.
"""

from __future__ import annotations

import argparse
import gc
import io
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .. import threads
from ..checkpoint import write_atomic
from ..torch import LSTM
from .train import CORPUS, Corpus


class CharModel(nn.Module):
    """Embedding -> fastlstm LSTM -> dropout -> Linear, batch-first."""

    def __init__(self, vocab_size, embed=32, hidden=128, layers=1, dropout=0.0, backend=None):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed)
        self.lstm = LSTM(embed, hidden, num_layers=layers, dropout=dropout if layers > 1 else 0.0,
                         batch_first=True, backend=backend)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, ids, state=None):
        y, state = self.lstm(self.embedding(ids), state)
        return self.head(self.dropout(y)), state


def _args(argv=None):
    p = argparse.ArgumentParser(prog="python -m fastlstm.demo.torch_train", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    p.add_argument("--minutes", type=float, default=None, help="stop after this much wall-clock time as well")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--embed", type=int, default=32)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=32, help="sequences per process and step")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--backend", choices=["numpy", "numba", "cupy"], help="default: by device (numba / cupy)")
    p.add_argument("--threads", type=int, help="CPU threads per process (default: cores / local processes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text", help="train on this UTF-8 file instead of the bundled text")
    p.add_argument("--save", metavar="PATH", help="rank 0 writes the trained state_dict here (torch.save, atomically)")
    p.add_argument("--sample-length", type=int, default=200)
    args = p.parse_args(argv)
    for name in ("steps", "hidden", "embed", "layers", "seq_len", "batch", "eval_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(args, name)}")
    if not 0.0 <= args.dropout < 1.0:
        p.error(f"--dropout: expected a probability in [0, 1), got {args.dropout}")
    return args


def _setup_distributed():
    """(rank, world, device): from torchrun's environment, or a single process without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return int(os.environ.get("RANK", "0")), world, device


def _batch(corpus, rng, seq_len, batch, device):
    inputs, targets = corpus.batch(rng, seq_len, batch)  # (T, B) each
    return (torch.from_numpy(np.ascontiguousarray(inputs.T)).to(device),
            torch.from_numpy(np.ascontiguousarray(targets.T)).to(device))


@torch.no_grad()
def evaluate(model, windows) -> float:
    model.eval()
    try:
        logits, _ = model(windows[0])
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[1].reshape(-1)).item()
    finally:
        model.train()


@torch.no_grad()
def sample(model, corpus, length, device, seed) -> str:
    model.eval()
    g = torch.Generator().manual_seed(seed)
    prompt = torch.from_numpy(corpus.val[:32][None, :].astype(np.int64)).to(device)
    logits, state = model(prompt)
    out = []
    for _ in range(length):
        probs = torch.softmax(logits[0, -1].float().cpu(), dim=-1)
        nxt = int(torch.multinomial(probs, 1, generator=g))
        out.append(nxt)
        logits, state = model(torch.tensor([[nxt]], device=device), state)
    return corpus.decode(corpus.val[:32]) + corpus.decode(out)


def main(argv=None) -> int:
    args = _args(argv)
    rank, world, device = _setup_distributed()
    try:
        train(args, rank, world, device)
    finally:
        if world > 1:
            # The DDP model is gone with train()'s frame: the process group's threads can
            # stop now, not while the interpreter shuts down (gloo then aborts at exit).
            gc.collect()
            dist.destroy_process_group()
    return 0


def train(args, rank, world, device) -> None:
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if device.type == "cpu":  # the processes of one machine share its cores
        cores = threads.available_cores()
        share = min(args.threads or max(1, cores // local), cores)
        torch.set_num_threads(share)
        threads.set_num_threads(share)
    text = open(args.text, encoding="utf-8").read() if args.text else CORPUS.read_text(encoding="utf-8")
    corpus = Corpus(text)
    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP also broadcasts them)
    model = CharModel(len(corpus.vocab), args.embed, args.hidden, args.layers, args.dropout,
                      args.backend).to(device)
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    bare = model.module if world > 1 else model
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    rng = np.random.default_rng([args.seed, rank])
    val = tuple(torch.from_numpy(np.ascontiguousarray(a.T)).to(device) for a in corpus.validation_windows(args.seq_len))
    if rank == 0:
        print(f"fastlstm torch_train: {world} process(es) on {device.type}, LSTM {args.embed}->{args.hidden} "
              f"x{args.layers}, batch {args.batch} x {world}, unigram baseline "
              f"{corpus.unigram_loss(val[1].cpu().numpy().T):.3f} nats/char", file=sys.stderr, flush=True)
    start = time.perf_counter()
    step = 0
    while step < args.steps and (args.minutes is None or time.perf_counter() - start < 60 * args.minutes):
        inputs, targets = _batch(corpus, rng, args.seq_len, args.batch, device)
        logits, _ = model(inputs)
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        step += 1
        if rank == 0 and (step % args.eval_every == 0 or step == args.steps):
            elapsed = time.perf_counter() - start
            tokens = step * args.batch * args.seq_len * world
            print(f"step {step}: loss {loss.item():.3f}, validation {evaluate(bare, val):.3f} nats/char, "
                  f"{tokens / elapsed:,.0f} tokens/s", file=sys.stderr, flush=True)
    if rank == 0:
        if args.save:
            buffer = io.BytesIO()
            torch.save(bare.state_dict(), buffer)
            write_atomic(args.save, lambda handle: handle.write(buffer.getvalue()))
        if args.sample_length > 0:
            print("sample:\n" + sample(bare, corpus, args.sample_length, device, args.seed))


if __name__ == "__main__":
    sys.exit(main())
