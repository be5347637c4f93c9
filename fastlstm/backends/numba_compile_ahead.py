"""A cold first training step compiled on two cores: the weight and input gradients' kernel
in a helper process while this process compiles the forward's and the backward loop's.

On an empty Numba cache the first training step of a cell compiles its forward kernel, its
backward loop and its gradients kernel, one after the other on one core (Numba compiles on
one thread, under one lock): ~7, ~4 and ~5 s for the LSTM on the 2-core CI machine. Where
none of the three is compiled, in this process or in Numba's cache, a second core is there,
the cache can be written and the plan runs the gradients kernel (more than one block), the
first training forward starts a helper process (``python -m
fastlstm.backends.numba_compile_ahead DESCRIPTION``) that compiles the gradients kernel
into the cache meanwhile; the first backward runs its loop (compiling it here), then waits
for the helper and loads the gradients kernel from the cache. (PyTorch's inductor compiles
in worker processes for the same reason.) The two processes slow each other (two vCPUs
here: ~1.3-1.5x each), so the gain is less than the helper's share.

The helper compiles what the real backward will, with the same argument types, because it
runs the same code: the backend's forward of a two-step sequence with this call's batch,
sizes, dtype, GRU variant and threads, then its backward, with the forward kernel and the
backward loop replaced by stubs (they compile here), so that only the gradients kernel
compiles there. If it compiled other types after all, or failed, or
takes longer than _WAIT_S, the gradients kernel compiles here as it would have: results
never depend on the helper.

FASTLSTM_COMPILE_AHEAD=0 turns it off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numba
import numpy as np

from .. import threads
from ..kernels import numba_gru as gru_kernels
from ..kernels import numba_lstm as kernels

# What a first backward waits for a helper at most (its compile takes ~5-10 s here).
_WAIT_S = 300.0
# The kernels a training step of each cell calls, in order; the helper compiles the last.
KERNELS = {
    "lstm": (kernels.forward, kernels.backward_loop, kernels.gradients),
    "gru": (gru_kernels.forward, gru_kernels.backward_loop, gru_kernels.gradients),
}


def cached_here(function) -> bool:
    """Whether Numba's cache holds code of `function` (a cached dispatcher) for this CPU, any
    signature. Reads the cache index through Numba's internals (as fastlstm info does)."""
    host = function.targetctx.codegen().magic_tuple()
    return any(key[1] == host for key in function._cache._cache_file._load_index())


def _cache_writable(function) -> bool:
    cache = function._cache
    return isinstance(cache, numba.core.caching.FunctionCache) and os.access(cache._cache_path, os.W_OK)


def _why_off() -> str | None:
    """Why no helper can start in this process, or None."""
    if os.environ.get("FASTLSTM_COMPILE_AHEAD", "1") == "0":
        return "FASTLSTM_COMPILE_AHEAD=0"
    if threads.available_cores() < 2:
        return "one core"
    if not sys.executable:
        return "no Python interpreter to start (sys.executable is empty)"
    return None


def describe() -> str:
    """What `fastlstm info` says of it."""
    why = _why_off()
    if why is not None:
        return f"off ({why})"
    return ("on: a cold first training step compiles its gradients kernel in a helper process "
            "(FASTLSTM_COMPILE_AHEAD=0 turns it off)")


def _worth_a_helper(cell: str) -> bool:
    """Whether a helper would save time: switched on, a second core, none of the cell's
    training kernels compiled here or in the cache (where the forward's is, the rest compiles
    no faster with a helper than here), and a cache it can write."""
    if _why_off() is not None:
        return False
    try:
        return all(_cache_writable(f) and not f.overloads and not cached_here(f) for f in KERNELS[cell])
    except Exception:  # noqa: BLE001 - Numba's internals differ: no helper, nothing lost
        return False


def _numba_settings() -> dict:
    """This process's Numba settings that decide where the cache is and what CPU the code is
    for, as environment variables: set in the process (numba.config), not only in its
    environment, they would otherwise differ in the helper, whose work would then be lost."""
    config = numba.config
    settings = {"NUMBA_CACHE_DIR": config.CACHE_DIR or None,  # "": unset
                "NUMBA_CPU_NAME": config.CPU_NAME, "NUMBA_CPU_FEATURES": config.CPU_FEATURES}
    return {name: value for name, value in settings.items() if value is not None}


class CompileAhead:
    """The helpers one backend started: at most one per cell in a process's life."""

    def __init__(self):
        self._helpers = {}  # cell -> its helper (Popen) while not waited for; None once settled
        self._lock = threading.Lock()

    def start(self, cell: str, description: dict) -> None:
        """At a cell's training forward on a plan of more than one block: start its helper,
        the first time, if one is worth it. description: the call (see _compile_gradients)."""
        with self._lock:
            if cell in self._helpers:
                return
            self._helpers[cell] = None
            if not _worth_a_helper(cell):
                return
            package_parent = str(Path(__file__).resolve().parents[2])  # this fastlstm, whatever is installed
            env = dict(os.environ, FASTLSTM_COMPILE_AHEAD="0",  # a helper starts none of its own
                       PYTHONPATH=os.pathsep.join(filter(None, (package_parent, os.environ.get("PYTHONPATH")))),
                       **_numba_settings())
            try:
                self._helpers[cell] = subprocess.Popen(
                    [sys.executable, "-m", __name__, json.dumps({"cell": cell, **description})], env=env,
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            except OSError:  # no interpreter to start: compile here
                pass

    def wait(self, cell: str) -> None:
        """Before a cell's gradients kernel: the helper's work done (or given up on), so that
        the kernel loads from the cache where it compiled it."""
        with self._lock:
            helper = self._helpers.get(cell)
            if helper is None:
                return
            try:
                helper.wait(timeout=_WAIT_S)
            except subprocess.TimeoutExpired:
                helper.kill()
                helper.wait()
            self._helpers[cell] = None

    def started(self) -> list:
        """The cells whose helper this backend started and has not waited for yet."""
        with self._lock:
            return [cell for cell, helper in self._helpers.items() if helper is not None]


def _compile_gradients(description: dict) -> None:
    """In the helper: the backend's forward and backward of one cell on zeros, every kernel
    but the gradients' stubbed (what they compute does not matter, only what compiles).

    description: cell ("lstm" or "gru"), dtype, batch, input_size, hidden, threads, and for
    the GRU reset_after."""
    from .numba_backend import NumbaBackend

    cell = description.get("cell")
    if cell not in KERNELS:
        raise ValueError(f"cell: expected one of {sorted(KERNELS)}, got {cell!r}")
    dtype = np.dtype(description["dtype"])
    batch, input_size, hidden = (int(description[key]) for key in ("batch", "input_size", "hidden"))
    threads.set_num_threads(int(description["threads"]))
    h0 = np.zeros((batch, hidden), dtype)
    x = np.zeros((2, batch, input_size), dtype)
    backend = NumbaBackend()
    if cell == "lstm":
        kernels.forward = kernels.backward_loop = lambda *args: (h0.copy(), h0.copy())
        gates = 4 * hidden
        y, _, _, saved = backend.forward_sequence(x, np.zeros((gates, input_size), dtype),
                                                  np.zeros((gates, hidden), dtype), np.zeros(gates, dtype), h0, h0,
                                                  None, False, True)
        backend.backward_sequence(saved, np.zeros_like(y), h0, h0)
    else:
        gru_kernels.forward = gru_kernels.backward_loop = lambda *args: h0.copy()
        gates = 3 * hidden
        y, _, saved = backend.gru_forward_sequence(x, np.zeros((gates, input_size), dtype),
                                                   np.zeros((gates, hidden), dtype), np.zeros(gates, dtype),
                                                   np.zeros(gates, dtype), h0, None, False, True,
                                                   bool(description["reset_after"]))
        backend.gru_backward_sequence(saved, np.zeros_like(y), h0)


if __name__ == "__main__":
    _compile_gradients(json.loads(sys.argv[1]))
