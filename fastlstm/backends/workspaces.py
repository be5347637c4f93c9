"""Memory a backend reuses from call to call: scratch buffers, and the buffers a training
forward saves for its backward.

A training step of a large layer needs tens of MiB of such buffers (train-m: the gates,
26 MiB, twice). Fresh from the allocator, a buffer that size is fresh pages (glibc maps
large blocks from the OS and unmaps them when freed), and each page costs a fault on its
first touch, inside the time loop. Kept here, the next step of the same shapes reuses
the same memory.

    workspaces.take(shape, dtype)        an uninitialized array: a kept buffer that fits, or new
    workspaces.give(*arrays)             arrays from take, for later takes
    workspaces.give_when_freed(owner, *arrays)
                                         give them once `owner` is garbage (a saved forward:
                                         its backward may run twice, or never)
    workspaces.clear()                   drop every kept buffer

Rules: only arrays from `take` are given, and a given array is no longer used by anyone
(everything that referenced it is gone or done). A buffer fits a request that needs at least
half its size, so changing sequence lengths still reuse memory. At most `max_bytes` are
kept, the least recently given dropped first. Requests under SMALL_BYTES are plain new
arrays, never kept: the allocator serves them from memory it already has, faster than a
lookup here. Thread-safe; `give` may run inside `take` on the same thread (a garbage
collection that frees a saved forward).
"""

from __future__ import annotations

import math
import threading
import weakref

import numpy as np

SMALL_BYTES = 64 * 1024


class Workspaces:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._free = []  # flat uint8 buffers, least recently given first
        self._lock = threading.RLock()

    @property
    def kept_bytes(self) -> int:
        with self._lock:
            return sum(buffer.nbytes for buffer in self._free)

    def take(self, shape, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        shape = tuple(shape)
        needed = math.prod(shape) * dtype.itemsize
        if needed < SMALL_BYTES:
            return np.empty(shape, dtype)
        with self._lock:
            fitting = [i for i, kept in enumerate(self._free) if needed <= kept.nbytes <= 2 * needed]
            buffer = self._free.pop(min(fitting, key=lambda i: self._free[i].nbytes)) if fitting else None
        if buffer is None:
            buffer = np.empty(needed, np.uint8)
        return buffer[:needed].view(dtype).reshape(shape)

    def give(self, *arrays: np.ndarray) -> None:
        with self._lock:
            for array in arrays:
                buffer = array if array.base is None else array.base  # NumPy points a view at the owner
                small = buffer.nbytes < SMALL_BYTES
                if small or buffer.nbytes > self.max_bytes or any(kept is buffer for kept in self._free):
                    continue
                self._free.append(buffer)
            while sum(buffer.nbytes for buffer in self._free) > self.max_bytes:
                del self._free[0]

    def give_when_freed(self, owner, *arrays: np.ndarray) -> None:
        weakref.finalize(owner, self.give, *arrays)

    def clear(self) -> None:
        with self._lock:
            self._free.clear()
