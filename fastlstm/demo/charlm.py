"""A character-level language model built on fastlstm: embedding -> LSTM (or GRU) -> softmax.

Everything here is plain NumPy on the host except the recurrent layer, which runs on whatever
backend the layer uses. Every piece has its backward, and the whole model is
gradient-checked in the tests (tests/test_demo.py).
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np

from .._arrays import like, module_available, to_numpy
from ..layer import LAYERS


@functools.lru_cache(maxsize=1)
def _blas_controller():
    """One threadpoolctl controller for the process: building one scans every loaded
    library (~1 ms), too slow to repeat twice per training step."""
    if not module_available("threadpoolctl"):
        return None
    import threadpoolctl

    return threadpoolctl.ThreadpoolController()


def _single_threaded_blas():
    """The head's small GEMMs on one BLAS thread: a multi-threaded BLAS call leaves its
    worker threads spinning for a while, and they would slow down the compiled LSTM
    kernels that run next on the same cores."""
    controller = _blas_controller()
    if controller is None:
        return contextlib.nullcontext()
    return controller.limit(limits=1, user_api="blas")


class CharLM:
    """Parameters: ``embedding`` (V, E), the recurrent layer's (``rnn``: an LSTM or, with
    ``cell="gru"``, a GRU), ``out_weight`` (V, H), ``out_bias`` (V).

    ``dropout`` applies to the layer's output before the softmax layer (and between its
    layers), in training only; its masks come from ``self.rng``.
    """

    def __init__(self, vocab_size, embed_size=32, hidden_size=256, num_layers=1, dropout=0.0,
                 backend=None, dtype="float32", seed=0, cell="lstm"):
        rng = np.random.default_rng(seed)
        self.vocab_size, self.embed_size, self.hidden_size = vocab_size, embed_size, hidden_size
        self.dtype = np.dtype(dtype)
        self.dropout = float(dropout)
        if cell not in LAYERS:
            raise ValueError(f"cell: expected one of {', '.join(LAYERS)}, got {cell!r}")
        self.rnn = LAYERS[cell](embed_size, hidden_size, num_layers=num_layers, dropout=dropout if num_layers > 1 else 0.0,
                         backend=backend, dtype=dtype, seed=int(rng.integers(2**31)))
        bound = 1.0 / np.sqrt(hidden_size)
        self.head = {
            "embedding": rng.standard_normal((vocab_size, embed_size)).astype(dtype),
            "out_weight": rng.uniform(-bound, bound, (vocab_size, hidden_size)).astype(dtype),
            "out_bias": np.zeros(vocab_size, dtype),
        }
        self.head_grads = {k: np.zeros_like(v) for k, v in self.head.items()}
        self.rng = np.random.default_rng(rng.integers(2**63))
        self._cache = None

    # -- parameters ---------------------------------------------------------------------
    def parameters(self) -> dict:
        """name -> live array (the recurrent layer's as torch names them, plus the head's)."""
        return {**self.rnn.params, **self.head}

    def gradients(self) -> dict:
        return {**self.rnn.grads, **self.head_grads}

    def zero_grad(self) -> None:
        self.rnn.zero_grad()
        for g in self.head_grads.values():
            g.fill(0)

    def state_arrays(self) -> dict:
        """Every parameter as a NumPy copy (for checkpoints)."""
        return {**self.rnn.state_dict(), **{k: v.copy() for k, v in self.head.items()}}

    def load_state_arrays(self, arrays: dict) -> None:
        names = self.rnn.parameter_shapes()
        self.rnn.load_state_dict({k: arrays[k] for k in names})
        for name, value in self.head.items():
            if arrays[name].shape != value.shape:
                raise ValueError(f"{name}: expected shape {value.shape}, got {arrays[name].shape}")
            value[...] = arrays[name]

    # -- forward / backward -------------------------------------------------------------------
    def loss(self, inputs, targets, state=None):
        """Mean cross entropy (nats per character) of predicting targets (T, B) from inputs (T, B)."""
        x = self.head["embedding"][inputs]  # (T, B, E)
        y, new_state = self.rnn(x, state)
        y = to_numpy(y, "y")
        mask = None
        if self.rnn.training and self.dropout > 0:
            keep = 1.0 - self.dropout
            mask = ((self.rng.random(y.shape) < keep) / keep).astype(self.dtype)
            y = y * mask
        with _single_threaded_blas():
            logits = y @ self.head["out_weight"].T + self.head["out_bias"]  # (T, B, V)
        logits -= logits.max(axis=-1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=-1, keepdims=True)
        picked = np.take_along_axis(probs, targets[..., None], axis=-1)[..., 0]
        loss = float(-np.mean(np.log(np.maximum(picked, np.finfo(self.dtype).tiny))))
        self._cache = (inputs, targets, y, probs, mask)
        return loss, new_state

    def backward(self) -> None:
        """Accumulate the gradients of the last ``loss`` into ``gradients()``."""
        inputs, targets, y, probs, mask = self._cache
        self._cache = None
        d_logits = probs.copy()  # d(mean CE)/d logits = (softmax - onehot) / count
        flat_logits = d_logits.reshape(-1, self.vocab_size)
        flat_logits[np.arange(targets.size), targets.ravel()] -= 1
        flat_logits /= targets.size
        with _single_threaded_blas():
            self.head_grads["out_weight"] += flat_logits.T @ y.reshape(-1, self.hidden_size)
            self.head_grads["out_bias"] += flat_logits.sum(axis=0)
            dy = d_logits @ self.head["out_weight"]
        if mask is not None:
            dy *= mask
        dx, _ = self.rnn.backward(dy)
        np.add.at(self.head_grads["embedding"], inputs, to_numpy(dx, "dx"))

    # -- generation -----------------------------------------------------------------------
    def sample(self, start_ids, length, rng, temperature=0.8):
        """Characters (ids) drawn one at a time after feeding `start_ids`."""
        was_training = self.rnn.training
        self.rnn.eval()
        try:
            x = self.head["embedding"][np.asarray(start_ids)[:, None]]
            y, state = self.rnn(x)
            out = []
            last = np.asarray(y)[-1, 0]
            for _ in range(length):
                logits = (last @ self.head["out_weight"].T + self.head["out_bias"]).astype(np.float64) / temperature
                p = np.exp(logits - logits.max())
                nxt = int(rng.choice(self.vocab_size, p=p / p.sum()))
                out.append(nxt)
                y, state = self.rnn(self.head["embedding"][[[nxt]]], state)
                last = np.asarray(y)[-1, 0]
            return out
        finally:
            self.rnn.train(was_training)


class Adam:
    """Adam (Kingma & Ba) over a dict of live arrays, with global gradient-norm clipping."""

    def __init__(self, params: dict, lr=3e-3, betas=(0.9, 0.999), eps=1e-8, clip_norm=1.0):
        self.lr, self.betas, self.eps, self.clip_norm = lr, betas, eps, clip_norm
        self.step_count = 0
        self.m = {k: np.zeros(np.shape(v), dtype=np.float64) for k, v in params.items()}
        self.v = {k: np.zeros(np.shape(v), dtype=np.float64) for k, v in params.items()}

    def step(self, params: dict, grads: dict) -> float:
        """Clip the global gradient norm to clip_norm, then update params in place. Returns the norm."""
        host = {k: to_numpy(g, k).astype(np.float64) for k, g in grads.items()}
        norm = float(np.sqrt(sum(float(np.sum(g * g)) for g in host.values())))
        scale = min(1.0, self.clip_norm / (norm + 1e-12)) if self.clip_norm else 1.0
        self.step_count += 1
        b1, b2 = self.betas
        correction1 = 1 - b1**self.step_count
        correction2 = 1 - b2**self.step_count
        for name, p in params.items():
            g = host[name] * scale
            self.m[name] = b1 * self.m[name] + (1 - b1) * g
            self.v[name] = b2 * self.v[name] + (1 - b2) * g * g
            update = self.lr * (self.m[name] / correction1) / (np.sqrt(self.v[name] / correction2) + self.eps)
            p -= like(p, update.astype(p.dtype))
        return norm

    def state_arrays(self) -> dict:
        arrays = {f"adam_m/{k}": v for k, v in self.m.items()}
        arrays.update({f"adam_v/{k}": v for k, v in self.v.items()})
        return arrays

    def load_state_arrays(self, arrays: dict, step_count: int) -> None:
        for k in self.m:
            self.m[k] = np.array(arrays[f"adam_m/{k}"], dtype=np.float64)
            self.v[k] = np.array(arrays[f"adam_v/{k}"], dtype=np.float64)
        self.step_count = step_count
