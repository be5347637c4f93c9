"""How many CPU threads the compiled backends use.

Default: every core this process may run on. ``set_num_threads(n)`` changes it for
the Numba backend's own threads and for the BLAS it calls (through threadpoolctl),
so the two never run more threads than asked for. Importing this module imports
neither Numba nor threadpoolctl.
"""

from __future__ import annotations

import os

_requested: int | None = None


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def set_num_threads(n) -> None:
    """Use `n` threads (1..number of cores); None goes back to all cores."""
    global _requested
    if n is None:
        _requested = None
        return
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n: expected a positive integer, got {type(n).__name__} {n!r}")
    cores = available_cores()
    if not 1 <= n <= cores:
        raise ValueError(f"n: expected a thread count in 1..{cores} (cores available), got {n}")
    _requested = n


def get_num_threads() -> int:
    return _requested if _requested is not None else available_cores()
