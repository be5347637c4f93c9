"""``fastlstm train``: a character-level language model trained on a bundled text.

The text (``corpus.txt``, written for this project and dedicated to the public
domain) is split 90/10 into training and validation characters. Each step draws
random windows, runs embedding -> LSTM (or GRU) -> softmax, and updates with Adam after
clipping the global gradient norm. Progress (loss, validation loss against the
unigram baseline, tokens/s) goes to stderr; checkpoints are written atomically and
hold everything a resumed run needs to continue exactly as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from .._arrays import module_available
from ..checkpoint import load_arrays, save_arrays, write_atomic
from ..layer import LAYERS
from .charlm import Adam, CharLM

CORPUS = Path(__file__).resolve().parent / "corpus.txt"
CHECKPOINT_KIND = "fastlstm-charlm"


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


ARCHITECTURE = ("cell", "embed", "hidden", "layers")
TRAINING_SETTINGS = ("dropout", "seq_len", "batch", "lr", "clip")
DEFAULTS = {"cell": "lstm", "hidden": 128, "embed": 32, "layers": 1, "dropout": 0.5, "seq_len": 64, "batch": 32,
            "lr": 3e-3, "clip": 1.0}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=["auto", "numpy", "numba", "cupy"], help="default: the choice in effect (auto)")
    p.add_argument("--minutes", type=_positive_float, default=2.0, help="wall-clock budget for this run (default 2)")
    p.add_argument("--steps", type=_positive_int, help="stop once this many steps (in total, across resumes) are done")
    # The model's architecture (a resumed run must match it) and its training settings (a
    # resumed run takes those given on the command line): None = not given.
    p.add_argument("--cell", choices=list(LAYERS), help="the recurrent cell (default lstm)")
    p.add_argument("--hidden", type=_positive_int, help=f"hidden units (default {DEFAULTS['hidden']})")
    p.add_argument("--embed", type=_positive_int, help=f"embedding size (default {DEFAULTS['embed']})")
    p.add_argument("--layers", type=_positive_int, help=f"recurrent layers (default {DEFAULTS['layers']})")
    p.add_argument("--dropout", type=float,
                   help=f"dropout on the recurrent output (and between layers) (default {DEFAULTS['dropout']})")
    p.add_argument("--seq-len", type=_positive_int, help=f"characters a sequence (default {DEFAULTS['seq_len']})")
    p.add_argument("--batch", type=_positive_int, help=f"sequences a step (default {DEFAULTS['batch']})")
    p.add_argument("--lr", type=_positive_float, help=f"Adam's learning rate (default {DEFAULTS['lr']})")
    p.add_argument("--clip", type=_positive_float, help=f"global gradient-norm clip (default {DEFAULTS['clip']})")
    p.add_argument("--eval-every", type=_positive_int, default=100, help="steps between validation + checkpoint")
    p.add_argument("--checkpoint", default="fastlstm-charlm.npz",
                   help="the latest state, written atomically at every evaluation; the best one so far goes "
                        "beside it as NAME-best.npz (default %(default)s)")
    p.add_argument("--resume", action="store_true",
                   help="continue from --checkpoint: its architecture (--cell, --hidden, --embed, --layers) must "
                        "match any given; training settings given here (--dropout, --seq-len, --batch, --lr, "
                        "--clip) replace the checkpoint's")
    p.add_argument("--plot", metavar="PATH", help="write the loss curve as PNG (needs matplotlib)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-length", type=int, default=300, help="characters to generate at the end (0: none)")
    p.add_argument("--text", help="train on this UTF-8 file instead of the bundled text")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(func=run)


class Corpus:
    def __init__(self, text: str):
        if len(text) < 1000:
            raise ValueError(f"the text has {len(text)} characters; need at least 1000")
        self.vocab = sorted(set(text))
        index = {ch: i for i, ch in enumerate(self.vocab)}
        ids = np.fromiter((index[ch] for ch in text), dtype=np.int64, count=len(text))
        split = int(0.9 * len(ids))
        self.train, self.val = ids[:split], ids[split:]

    def batch(self, rng, seq_len, batch):
        """(inputs, targets), each (seq_len, batch), from random windows of the training part."""
        starts = rng.integers(0, len(self.train) - seq_len - 1, size=batch)
        window = self.train[starts[:, None] + np.arange(seq_len + 1)].T
        return window[:-1], window[1:]

    def validation_windows(self, seq_len, limit=64):
        count = min(limit, (len(self.val) - 1) // seq_len)
        if count < 1:
            raise ValueError("the validation part is shorter than one window: use a longer text or a shorter --seq-len")
        window = np.stack([self.val[k * seq_len : k * seq_len + seq_len + 1] for k in range(count)], axis=1)
        return window[:-1], window[1:]

    def unigram_loss(self, targets) -> float:
        """Cross entropy (nats/char) on `targets` of character frequencies of the training part."""
        counts = np.bincount(self.train, minlength=len(self.vocab)) + 1.0
        logp = np.log(counts / counts.sum())
        return float(-np.mean(logp[targets]))

    def decode(self, ids) -> str:
        return "".join(self.vocab[i] for i in ids)


def evaluate(model: CharLM, windows) -> float:
    model.rnn.eval()
    try:
        loss, _ = model.loss(*windows)
    finally:
        model.rnn.train()
        model._cache = None
    return loss


def _given(args) -> dict:
    """The architecture and training settings given on the command line."""
    given = {name: getattr(args, name) for name in ARCHITECTURE + TRAINING_SETTINGS if getattr(args, name) is not None}
    if "dropout" in given and not 0.0 <= given["dropout"] < 1.0:
        raise ValueError(f"--dropout: expected a probability in [0, 1), got {given['dropout']}")
    return given


def _config(given: dict, vocab, seed) -> dict:
    return {"vocab": "".join(vocab), **DEFAULTS, **given, "seed": seed}


def _resumed_config(saved: dict, given: dict, path) -> tuple[dict, list]:
    """The checkpoint's configuration with the training settings given on the command line
    (and those that changed, described); an architecture option that differs from the
    checkpoint's is refused."""
    def differing(names, saved_as):
        return [f"--{name.replace('_', '-')} {given[name]} ({saved_as} {saved.get(name, DEFAULTS[name])})"
                for name in names if name in given and given[name] != saved.get(name, DEFAULTS[name])]

    conflicts = differing(ARCHITECTURE, "the checkpoint has")
    if conflicts:
        raise ValueError(f"--resume: {path} holds another architecture: {', '.join(conflicts)}; leave these out "
                         f"to resume it, or train a new model with another --checkpoint")
    changed = differing(TRAINING_SETTINGS, "was")
    overrides = {name: given[name] for name in TRAINING_SETTINGS if name in given}
    return {**saved, **overrides}, changed


def best_checkpoint_path(path) -> Path:
    """Where the best checkpoint so far goes: NAME-best.npz beside NAME.npz."""
    path = Path(path)
    return path.with_name(f"{path.stem}-best{path.suffix or '.npz'}")


def save_checkpoint(path, config, model, optimizer, rng, step, elapsed, history) -> None:
    header = {"config": config, "step": step, "elapsed_s": elapsed, "history": history,
              "rng": rng.bit_generator.state, "dropout_rng": model.rnn._dropout_rng.bit_generator.state,
              "head_rng": model.rng.bit_generator.state}
    arrays = {f"param/{k}": v for k, v in model.state_arrays().items()}
    arrays.update(optimizer.state_arrays())
    save_arrays(path, CHECKPOINT_KIND, header, arrays)


def load_checkpoint(path, model, optimizer, rng):
    header, arrays = load_arrays(path, CHECKPOINT_KIND)
    try:
        model.load_state_arrays({k[len("param/"):]: v for k, v in arrays.items() if k.startswith("param/")})
        optimizer.load_state_arrays(arrays, int(header["step"]))
        rng.bit_generator.state = header["rng"]
        model.rnn._dropout_rng.bit_generator.state = header["dropout_rng"]
        model.rng.bit_generator.state = header["head_rng"]
        return int(header["step"]), float(header["elapsed_s"]), list(header["history"])
    except (KeyError, ValueError, TypeError) as exc:
        raise ValueError(f"{path}: checkpoint does not fit this model: {exc}") from exc


def read_checkpoint_config(path) -> dict:
    header, _ = load_arrays(path, CHECKPOINT_KIND)
    if not isinstance(header.get("config"), dict):
        raise ValueError(f"{path}: the checkpoint has no configuration")
    return header["config"]


class Progress:
    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.last = 0.0

    def update(self, text: str, force=False):
        now = time.monotonic()
        if self.quiet or (not force and now - self.last < 0.5):
            return
        self.last = now
        print("\r" + text.ljust(100), end="", file=sys.stderr, flush=True)

    def done(self):
        if not self.quiet:
            print(file=sys.stderr, flush=True)


def run(args, parser) -> int:
    if args.plot:
        if not module_available("matplotlib"):
            raise ValueError("--plot needs matplotlib: pip install 'fastlstm[plot]' (or pip install matplotlib)")
    text = Path(args.text).read_text(encoding="utf-8") if args.text else CORPUS.read_text(encoding="utf-8")
    corpus = Corpus(text)
    given = _given(args)
    config = _config(given, corpus.vocab, args.seed)
    from_command_line = []
    if args.resume:
        if not Path(args.checkpoint).exists():
            raise ValueError(f"--resume: no checkpoint at {args.checkpoint}")
        saved = read_checkpoint_config(args.checkpoint)
        if saved.get("vocab") != config["vocab"]:
            raise ValueError(f"{args.checkpoint}: trained on another text (its characters differ)")
        config, from_command_line = _resumed_config(saved, given, args.checkpoint)
    model = CharLM(len(corpus.vocab), config["embed"], config["hidden"], config["layers"],
                   dropout=config["dropout"], backend=args.backend, seed=config["seed"],
                   cell=config.get("cell", "lstm"))  # checkpoints from before GRUs hold an LSTM
    optimizer = Adam(model.parameters(), lr=config["lr"], clip_norm=config["clip"])
    rng = np.random.default_rng(config["seed"])
    step, elapsed, history = 0, 0.0, []
    if args.resume:
        step, elapsed, history = load_checkpoint(args.checkpoint, model, optimizer, rng)
    val_windows = corpus.validation_windows(config["seq_len"])
    baseline = corpus.unigram_loss(val_windows[1])
    print(f"fastlstm train: {len(corpus.train):,} training / {len(corpus.val):,} validation characters, "
          f"vocabulary {len(corpus.vocab)}; {config.get('cell', 'lstm').upper()} {config['embed']}->{config['hidden']} "
          f"x{config['layers']} "
          f"on {model.rnn.backend}; unigram baseline {baseline:.3f} nats/char"
          + (f"; resuming at step {step}" if step else "")
          + (f" with {', '.join(from_command_line)} from the command line" if from_command_line else ""),
          file=sys.stderr, flush=True)
    progress = Progress(args.quiet)
    budget = args.minutes * 60.0
    start = time.perf_counter()
    tokens = 0
    val_loss = history[-1][2] if history else None  # shown as "-" until the first evaluation
    loss = float("nan")
    best_path = best_checkpoint_path(args.checkpoint)
    best_so_far = min((h[2] for h in history), default=float("inf"))

    def checkpoint(now):
        nonlocal best_so_far
        save_checkpoint(args.checkpoint, config, model, optimizer, rng, step, elapsed + now, history)
        if history[-1][2] < best_so_far:  # NaN never is
            best_so_far = history[-1][2]
            save_checkpoint(best_path, config, model, optimizer, rng, step, elapsed + now, history)

    while (args.steps is None or step < args.steps) and time.perf_counter() - start < budget:
        inputs, targets = corpus.batch(rng, config["seq_len"], config["batch"])
        model.zero_grad()
        loss, _ = model.loss(inputs, targets)
        model.backward()
        optimizer.step(model.parameters(), model.gradients())
        step += 1
        tokens += inputs.size
        now = time.perf_counter() - start
        if step % args.eval_every == 0:
            val_loss = evaluate(model, val_windows)
            history.append([step, loss, val_loss])
            checkpoint(now)
        shown = "-" if val_loss is None else f"{val_loss:.3f}"
        progress.update(f"step {step} | loss {loss:.3f} | val {shown} (unigram {baseline:.3f}) | "
                        f"{tokens / max(now, 1e-9):,.0f} tok/s | {now:.0f}s")
    run_time = time.perf_counter() - start
    if not history or history[-1][0] != step:
        val_loss = evaluate(model, val_windows)
        history.append([step, loss, val_loss])
        checkpoint(run_time)
    progress.done()
    best = min(history, key=lambda h: h[2])
    print(f"step {step}: validation loss {val_loss:.3f} nats/char (best {best[2]:.3f} at step {best[0]}; "
          f"unigram baseline {baseline:.3f}), "
          f"{tokens / max(run_time, 1e-9):,.0f} tokens/s, {run_time:.1f}s this run, "
          f"{elapsed + run_time:.1f}s in total; latest checkpoint {args.checkpoint}, best {best_path}")
    if args.sample_length > 0:
        prompt = corpus.val[:32]
        generated = model.sample(prompt, args.sample_length, np.random.default_rng(args.seed))
        print("sample:\n" + corpus.decode(prompt) + corpus.decode(generated))
    if args.plot:
        plot_history(history, baseline, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def plot_history(history, baseline, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h[0] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, [h[1] for h in history], label="training loss (batch)")
    ax.plot(steps, [h[2] for h in history], marker="o", label="validation loss")
    ax.axhline(baseline, color="grey", linestyle="--", label="unigram baseline")
    ax.set_xlabel("step")
    ax.set_ylabel("nats per character")
    ax.legend()
    fig.tight_layout()
    write_atomic(path, lambda handle: fig.savefig(handle, format="png", dpi=110))
    plt.close(fig)

