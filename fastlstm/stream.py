"""Streams: a layer run one step (or a short chunk of steps) per call, the state carried
from call to call (speech, online prediction, generation, a game loop).

``RecurrentLayer.stream()`` makes one. A stream runs each layer through its cell's stream
primitive (``cells.py``, ``backends/base.py``): the weights prepared once for the stream's
batch size (on numba: packed for the kernels), so a call pays for its steps and little else.

What a stream holds: a snapshot of the layer's weights, taken when it is made (and again
on ``refresh()``), shared with the layer's other streams while the weights stay the same;
the state, one array per state part and layer; the backend chosen when it was made.
"""

from __future__ import annotations

import threading

from . import _inputs
from ._arrays import check_floating, refuse_autograd_tensor


class Stream:
    """A unidirectional layer in inference, one call per step or chunk, the state carried.

    ``y_t = stream(x_t)``: x_t (B, I) -> y_t (B, H), one step; a chunk (T, B, I) ((B, T, I)
    for a batch_first layer) -> (T, B, H) (or (B, T, H)), its steps in order. Each call
    advances the state; the results equal one ``layer(x)`` call over the whole sequence.
    ``stream.state``: the state now, as ``layer(x)`` returns it ((h, c) for an LSTM, h for a
    GRU; each (num_layers, B, H)); ``stream.reset(state=None)`` starts again from `state`
    (zeros for None).

    Weights: the stream uses a snapshot taken when it was made. Later changes to the
    layer's parameters (an optimizer step, ``load_state_dict``) reach it only through
    ``stream.refresh()``, which takes a new snapshot and keeps the state.

    Threads: one call at a time on a stream (a second, concurrent call raises
    RuntimeError); separate streams, of one layer or several, may run on separate threads.
    A call that fails (bad input) changes nothing.
    """

    def __init__(self, layer, batch_size: int, state=None):
        self._layer = layer
        self.batch_size = batch_size
        self._busy = threading.Lock()
        self._backend, self._runs = layer._stream_runs(batch_size)
        self._states = self._initial_states(state)

    # -- weights ------------------------------------------------------------------------

    def refresh(self) -> "Stream":
        """Use the layer's parameters (and backend) as they are now; the state is kept."""
        self._acquire("refresh")
        try:
            backend, runs = self._layer._stream_runs(self.batch_size)
            states = self._states
            if backend is not self._backend:  # the layer moved: the state follows it
                states = [tuple(backend.asarray(self._backend.to_host(part)) for part in parts) for parts in states]
            self._backend, self._runs, self._states = backend, runs, states
        finally:
            self._busy.release()
        return self

    # -- state --------------------------------------------------------------------------
    def _layout(self) -> _inputs.Layout:
        return _inputs.Layout(1, self.batch_size, False, False)

    def _initial_states(self, state) -> list:
        """[per layer: (h, c) or (h,)], each (B, H), the stream's own copies of a user's state."""
        layer, backend = self._layer, self._backend
        spec = layer._spec
        parts = _inputs.state_parts(backend, state, "state", spec.cell.state_parts, self._layout(),
                                    spec.num_layers, spec.hidden_size, spec.dtype)
        shape = (self.batch_size, spec.hidden_size)
        return [
            tuple(backend.xp.zeros(shape, spec.dtype) if part is None else part[k].copy() for part in parts)
            for k in range(spec.num_layers)
        ]

    @property
    def state(self):
        """The state after the last call: (h, c) or h, each (num_layers, B, H) (copies)."""
        xp = self._backend.xp
        parts = tuple(xp.stack([layer_states[p] for layer_states in self._states])
                      for p in range(len(self._states[0])))
        return parts if len(parts) > 1 else parts[0]

    def reset(self, state=None) -> "Stream":
        """Start again from `state` (shaped as ``stream.state``; None: zeros)."""
        self._acquire("reset")
        try:
            self._states = self._initial_states(state)
        finally:
            self._busy.release()
        return self

    # -- calls --------------------------------------------------------------------------
    def __call__(self, x):
        self._acquire("a call")
        try:
            inputs, single_step = self._input(x)
            states = self._states
            new_states = []
            for k, run in enumerate(self._runs):
                inputs, states_k = run(inputs, states[k])
                new_states.append(states_k)
            self._states = new_states  # only once every layer has run
        finally:
            self._busy.release()
        if single_step:
            y = inputs[0]
        else:
            y = self._backend.xp.ascontiguousarray(inputs.transpose(1, 0, 2)) if self._layer.batch_first else inputs
        return self._backend.to_user(y, x)

    def _input(self, value):
        """(x as (T, B, I) contiguous in the layer's dtype, whether it was one step (B, I))."""
        layer, backend = self._layer, self._backend
        batch, features = self.batch_size, layer.input_size
        if type(value) is backend.xp.ndarray and value.shape == (batch, features) and value.dtype == layer.dtype \
                and value.flags.c_contiguous and value.flags.writeable:
            return value[None], True  # the usual step, ready as it is (a few microseconds count here)
        refuse_autograd_tensor(value, "x")
        x = backend.from_user(value, "x")
        check_floating(x, "x")
        single_step = x.ndim == 2 and x.shape == (batch, features)
        if single_step:
            x = x[None]
        elif x.ndim == 3 and x.shape[2] == features and x.shape[0 if layer.batch_first else 1] == batch and \
                x.shape[1 if layer.batch_first else 0] >= 1:
            if layer.batch_first:
                x = x.transpose(1, 0, 2)
        else:
            chunk = "(B, T, input_size)" if layer.batch_first else "(T, B, input_size)"
            raise ValueError(
                f"x: expected one step (B, input_size) = ({batch}, {features}) or a chunk {chunk} with "
                f"B = {batch} (the stream's batch_size), got shape {tuple(x.shape)}"
            )
        return _inputs.kernel_ready(backend.xp, x.astype(layer.dtype, copy=False)), single_step

    def _acquire(self, what: str) -> None:
        """Take the stream's lock without waiting: a stream is one thread's at a time."""
        if not self._busy.acquire(blocking=False):
            raise RuntimeError(
                f"stream: {what} while another call on this stream is running; a stream carries one state "
                "and serves one thread at a time (make one stream per thread)"
            )

    def __repr__(self) -> str:
        return f"<Stream of {self._layer!r}, batch_size={self.batch_size}, backend={self._backend.name!r}>"
