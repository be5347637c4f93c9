"""Replaying a time loop as one CUDA graph.

The per-step time loop launches a cuBLAS GEMM and a pointwise kernel per step from
Python: 20-33 us of host time each on the H200 VM measured, 2 x 100 steps per layer,
while the GPU needs a fraction of that (bench/results/2026-11-27-gpu-h200.md). Captured
once into a graph, the whole loop is one launch.

A graph bakes in the device addresses it was captured with, and a caller's arrays are
new every call, so a loop runs on buffers kept here per set of shapes (`buffers`): the
caller copies its inputs in and its outputs out (cupy_backend.CudaSequenceBackend._run_loop),
and a graph is keyed by the loop's flags and those shapes. The first time a key is seen
the loop runs as it is (a shape seen once never pays for a capture); the second time it
is captured and the graph launched; later times the graph is launched. At most
`capacity` graphs and sets of buffers are kept, the least recently used dropped. If a
capture fails (a driver or library that cannot capture), graphs are switched off with
the reason and loops run as they are.

cuBLAS gets a workspace of its own for these loops (`workspace_bytes`, one per device and
stream, shared by that stream's sets of buffers: work on one stream runs in order), as
PyTorch gives its handles one: left to its default pool, cuBLAS allocates a new workspace
for every capture (pytorch/pytorch#83461). With one workspace for every run of a loop,
eager, captured or replayed, cuBLAS sees the same conditions each time (its choice of
algorithm, and so the rounding, may depend on the workspace it has).
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass, field


@dataclass
class StagedBuffers:
    """Device arrays a loop of one set of shapes runs on, and the graphs captured on them
    (by the loop's flags): a graph lives and dies with the buffers whose addresses it holds."""

    arrays: dict
    workspace: object = None  # device bytes for cuBLAS in this set's loops, or None: its default
    graphs: dict = field(default_factory=dict)
    seen: set = field(default_factory=set)  # flags run once, not captured yet


class GraphCache:
    """buffers(xp, shapes) -> StagedBuffers; run(staged, flags, issue): issue() queues the
    loop's launches (on staged.arrays) on the current stream."""

    def __init__(self, cuda, capacity: int = 8, disabled_reason: str = "", workspace_bytes: int = 0):
        self._cuda = cuda  # cupy.cuda: Stream (begin_capture / end_capture -> Graph), current stream
        self.capacity = capacity
        self.workspace_bytes = workspace_bytes
        self.disabled_reason = disabled_reason  # "" while graphs are used
        self.counts = Counter()  # eager, captured, replayed
        self._staged = OrderedDict()  # (shapes, device, stream) -> StagedBuffers, least recently used first
        # Held from copying a call's inputs in to queuing its outputs' copies out: two host
        # threads on one stream must not interleave those on the same buffers.
        self.lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return not self.disabled_reason

    def buffers(self, xp, shapes) -> StagedBuffers:
        """The buffers for `shapes`, a tuple of (name, shape, dtype string): the same arrays
        every call with these shapes on this device and stream (work on one stream runs in
        order, so a call never overwrites buffers an earlier one still uses)."""
        stream = (self._cuda.Device().id, self._cuda.get_current_stream().ptr)
        key = (shapes, *stream)
        staged = self._staged.get(key)
        if staged is None:
            arrays = {name: xp.empty(shape, dtype=dtype) for name, shape, dtype in shapes}
            staged = StagedBuffers(arrays, self._workspace(xp, stream))
            self._staged[key] = staged
            while len(self._staged) > self.capacity:
                self._staged.popitem(last=False)
        else:
            self._staged.move_to_end(key)
        return staged

    def _workspace(self, xp, stream):
        """The workspace of the sets of buffers on `stream` (device, stream), new if none is
        kept: it goes when the last set using it does."""
        if not self.workspace_bytes:
            return None
        for key, staged in self._staged.items():
            if key[1:] == stream:
                return staged.workspace
        return xp.empty(self.workspace_bytes, dtype="u1")

    def run(self, staged: StagedBuffers, flags, issue) -> None:
        graph = staged.graphs.get(flags) if self.enabled else None
        if graph is not None:
            graph.launch()
            self.counts["replayed"] += 1
            return
        if self.enabled and flags in staged.seen:
            graph = self._capture(issue)
            if graph is not None:
                staged.graphs[flags] = graph
                graph.launch()
                self.counts["captured"] += 1
                return
        staged.seen.add(flags)
        issue()
        self.counts["eager"] += 1

    def _capture(self, issue):
        """The graph of issue()'s launches, or None (graphs switched off) if capturing fails.
        Nothing runs while capturing, so issue() can be run for real afterwards; an error
        of issue() itself comes back then."""
        stream = self._cuda.Stream(non_blocking=True)  # capture needs a stream other than the legacy one
        try:
            with stream:
                stream.begin_capture()
                try:
                    issue()
                finally:
                    graph = stream.end_capture()
            return graph
        except Exception as error:  # noqa: BLE001 - any failure: no graphs from now on, the loop runs as it is
            self.disabled_reason = f"capture failed: {type(error).__name__}: {error}"
            for staged in self._staged.values():
                staged.graphs.clear()
            return None
