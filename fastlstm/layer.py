"""The recurrent layers: parameters, gradients, modes, files, and the user-facing API.

``RecurrentLayer`` is written once for every cell; ``LSTM`` and ``GRU`` are small
subclasses that name their cell (``cells.py``) and the shape of their state ((h, c) or
h). Semantics are torch's (``nn.LSTM``: gates i, f, g, o; ``nn.GRU``: gates r, z, n; two
biases; ``state_dict`` names and shapes; (L*D, B, H) states). Stacking, directions,
dropout and states are ``fastlstm.stack``'s; this module owns the parameters and
gradients, validates what callers hand it, and keeps per-call records.

Records of training forwards (what a backward needs) belong to calls, not to the layer:
``vjp`` returns a pullback that owns its record, and ``__call__`` + ``backward`` keep the
calling thread's last training forward only. What threads may share is in
``RecurrentLayer``'s docstring.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import threading
import types
import warnings
from dataclasses import dataclass

import numpy as np

from . import _inputs, registry, stack
from ._arrays import check_real, resolve_dtype, to_numpy
from .cells import LSTM_CELL, GRUCell
from .checkpoint import MAX_FILE_MEMBERS, CheckpointError, load_arrays, save_arrays
from .stream import Stream


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected a positive integer, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value}")
    return int(value)


def _flag(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected True or False, got {type(value).__name__} {value!r}")
    return bool(value)


@dataclass
class _Call:
    """One training forward as its caller made it: the stack's record plus the caller's layout."""

    record: stack.StackRecord
    layout: _inputs.Layout
    input_like: object  # the caller's x, to hand results back in its framework


class Pullback:
    """The backward of one ``vjp`` call. ``pullback(dy, dstate=None)`` returns ``dx, dstate0``
    (``(dh0, dc0)`` for an LSTM, ``dh0`` for a GRU) and adds the parameter gradients into
    the layer's ``grads``.

    It owns its forward's record and can be called once; a call that fails on bad input
    changes nothing and may be repeated with good input.
    """

    def __init__(self, layer: "RecurrentLayer", call: _Call):
        self._layer = layer
        self._call = call
        self._lock = threading.Lock()  # one pull at a time: the second sees the record gone

    @property
    def used(self) -> bool:
        return self._call is None

    def __call__(self, dy=None, dstate=None):
        with self._lock:
            if self._call is None:
                raise RuntimeError(
                    "pullback: this forward was already differentiated; each pullback can be "
                    "called once (run vjp again for another backward)"
                )
            result = self._layer._pull_back(self._call, dy, dstate)
            self._call = None  # free the record: it holds every layer's activations
        return result


_INIT_BLOCK_ELEMENTS = 1 << 20
# Stream weights a layer keeps for new streams (per backend and batch size): each holds a
# snapshot of the parameters and the backend's prepared copy (about twice the parameters).
_STREAM_WEIGHTS_KEPT = 2


@dataclass
class _StreamWeights:
    snapshot: dict  # name -> copy of the parameter the runs were made from
    runs: list  # per layer: the cell's stream run (cells.py)


def _physical_memory(backend) -> int | None:
    """Bytes of memory of this machine for a host backend's arrays; None where unknown (or a device's)."""
    return _host_memory() if backend.xp is np else None


@functools.cache  # asked on every call; the machine's memory does not change under a process
def _host_memory() -> int | None:
    if not hasattr(os, "sysconf"):
        return None
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def _refuse_a_call_that_cannot_fit(layer, backend, layout, keep: bool) -> None:
    """A MemoryError naming the sizes, before allocating, where a call's arrays (gates, outputs
    and, in training, the states kept for backward: about T*B*H*(gates + 3) numbers per layer
    and direction) would not fit this machine's memory."""
    physical = _physical_memory(backend)
    if physical is None:
        return
    spec = layer._spec
    per_layer = layout.num_steps * layout.batch * spec.hidden_size * spec.num_directions * (
        spec.cell.gates + (3 if keep else 1))
    needed = per_layer * (spec.num_layers if keep else 1) * spec.dtype.itemsize
    if needed > physical:
        raise MemoryError(
            f"{type(layer).__name__}: a {'training' if keep else 'inference'} call on {layout.num_steps} steps x "
            f"{layout.batch} sequences needs about {needed / 2**30:.1f} GiB, more than this machine's "
            f"{physical / 2**30:.1f} GiB of memory; split the batch, or the sequence into chunks (carrying the "
            f"state from one to the next)"
        )


def _refuse_what_cannot_fit(layer, shapes: dict) -> None:
    """A MemoryError naming the sizes, before allocating, where a host layer's parameters and
    gradients alone would not fit this machine's memory."""
    physical = _physical_memory(layer._storage)
    if physical is None:
        return
    needed = 2 * sum(math.prod(shape) for shape in shapes.values()) * layer.dtype.itemsize
    if needed > physical:
        raise MemoryError(
            f"{type(layer).__name__}(input_size={layer.input_size}, hidden_size={layer.hidden_size}, "
            f"num_layers={layer.num_layers}): its parameters and gradients need {needed / 2**30:.1f} GiB, "
            f"more than this machine's {physical / 2**30:.1f} GiB of memory; use a smaller hidden_size or "
            f"num_layers" + (", or float32" if layer.dtype == np.float64 else "")
        )


def _validated_spec(cell, input_size, hidden_size, num_layers, bias, bidirectional, dtype) -> stack.StackSpec:
    """The stack's structure from a layer's arguments, each checked (nothing is allocated)."""
    return stack.StackSpec(
        _positive_int(input_size, "input_size"), _positive_int(hidden_size, "hidden_size"),
        _positive_int(num_layers, "num_layers"), 2 if _flag(bidirectional, "bidirectional") else 1,
        _flag(bias, "bias"), resolve_dtype(dtype), cell,
    )


class RecurrentLayer:
    """A multi-layer, optionally bidirectional recurrent layer with a PyTorch-compatible
    API, for the cell a subclass names (``LSTM``, ``GRU``).

    ``layer(x, state=None, lengths=None)`` returns ``y, state_n``; ``layer.backward(dy,
    dstate=None)`` returns ``dx, dstate0`` for the calling thread's last training forward
    and accumulates the parameter gradients into ``layer.grads`` until ``zero_grad()``.
    ``layer.vjp(x, ...)`` returns ``y, state_n, pullback``: a training forward whose record
    belongs to the call, for layers used several times before one backward. A state is
    ``(h, c)`` for an LSTM and ``h`` for a GRU, each (L*D, B, H).

    Threads: several threads may run forwards, ``vjp`` and pullbacks on one layer at the
    same time; each gets its own results, and ``grads`` ends as the exact sum of every
    pullback's gradients (they are added under a lock; the computing is not). Dropout
    masks are drawn under a lock too, in whatever order the threads arrive. Not safe to
    do while other threads run the layer: changing parameters in place (an optimizer
    step), ``zero_grad``, ``load_state_dict``, ``to``, ``train``/``eval``; a forward uses
    the parameters as they are when its backend reads them. On the ``numba`` backend each
    call asks for every core (``fastlstm.set_num_threads``), so its multi-core sections run
    one at a time across threads: two threads take about as long as their calls one after
    the other (small problems up to ~1.7x longer, for the hand-overs; README). The GRU on
    numba runs the array-level reference for now (NumPy's BLAS, outside that rule).
    """

    _FILE_KIND = ""  # the tag of this cell's layer files

    def __init__(self, cell, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, backend=None, dtype="float32", seed=None):
        self._spec = _validated_spec(cell, input_size, hidden_size, num_layers, bias, bidirectional, dtype)
        self.input_size, self.hidden_size, self.num_layers = (
            self._spec.input_size, self._spec.hidden_size, self._spec.num_layers)
        self.bias, self.bidirectional, self.dtype = self._spec.bias, self._spec.num_directions == 2, self._spec.dtype
        self.batch_first = _flag(batch_first, "batch_first")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float, np.floating, np.integer)):
            raise TypeError(f"dropout: expected a number in [0, 1], got {type(dropout).__name__}")
        if not 0.0 <= float(dropout) <= 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1], got {dropout}")
        self.dropout = float(dropout)
        if self.dropout > 0 and self.num_layers == 1:
            warnings.warn(
                "dropout applies between layers only; with num_layers=1 it has no effect", stacklevel=2
            )
        self._backend_choice = None if backend is None else registry._check_name(backend)
        self._storage = registry.backend_object(self._backend_choice)
        init_seed, dropout_seed = np.random.SeedSequence(seed).spawn(2)
        self._dropout_rng = np.random.default_rng(dropout_seed)
        self._params = self._initial_parameters(np.random.default_rng(init_seed))
        self._grads = {name: self._storage.xp.zeros_like(p) for name, p in self._params.items()}
        self._grads_lock = threading.Lock()
        self._dropout_lock = threading.Lock()
        self._last = threading.local()  # .call: this thread's last training forward, for backward()
        self._streams_lock = threading.Lock()
        self._stream_weights = {}  # (backend, batch) -> _StreamWeights, most recent last
        self.training = True

    # -- copies -------------------------------------------------------------------------
    def __getstate__(self) -> dict:
        """For copy.deepcopy and pickle: parameters, gradients and settings, as NumPy arrays;
        not the locks, not any thread's pending forward."""
        state = {k: v for k, v in self.__dict__.items()
                 if k not in ("_grads_lock", "_dropout_lock", "_last", "_streams_lock", "_stream_weights")}
        state["_storage"] = None  # a backend is chosen again where the copy is made
        state["_params"] = {n: np.array(self._storage.to_host(p)) for n, p in self._params.items()}
        state["_grads"] = {n: np.array(self._storage.to_host(g)) for n, g in self._grads.items()}
        return state

    def __setstate__(self, state: dict) -> None:
        storage = registry.backend_object(state["_backend_choice"])
        self.__dict__.update(state)
        self._storage = storage
        self._params = {n: storage.asarray(p) for n, p in self._params.items()}
        self._grads = {n: storage.asarray(g) for n, g in self._grads.items()}
        self._grads_lock, self._dropout_lock, self._last = threading.Lock(), threading.Lock(), threading.local()
        self._streams_lock, self._stream_weights = threading.Lock(), {}

    # -- structure ----------------------------------------------------------------------
    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def parameter_shapes(self) -> dict:
        """name -> shape, in torch's state_dict order."""
        return self._spec.parameter_shapes()

    def _initial_parameters(self, rng) -> dict:
        # torch's initialisation: every parameter ~ U(-1/sqrt(H), 1/sqrt(H)). Drawn a block of
        # rows at a time into the layer's dtype (the same numbers as one draw): no float64 copy
        # of a whole weight.
        shapes = self.parameter_shapes()
        _refuse_what_cannot_fit(self, shapes)
        bound = 1.0 / math.sqrt(self.hidden_size)
        params = {}
        for name, shape in shapes.items():
            values = np.empty(shape, dtype=self.dtype)
            rows = values.reshape(shape[0], -1)
            step = max(1, _INIT_BLOCK_ELEMENTS // max(1, rows.shape[1]))
            for r0 in range(0, rows.shape[0], step):
                block = rows[r0 : r0 + step]
                block[...] = rng.uniform(-bound, bound, size=block.shape)
            params[name] = self._storage.asarray(values)
        return params

    # -- backend ------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        """Name of the backend the next forward runs on."""
        return self._current_backend().name

    def _current_backend(self):
        return registry.backend_object(self._backend_choice)

    def to(self, backend: str | None) -> "RecurrentLayer":
        """Fix this layer to `backend` (None: follow the global choice); moves parameters.
        A backend that cannot be used raises and leaves the layer as it was."""
        choice = None if backend is None else registry._check_name(backend)
        target = registry.backend_object(choice)  # raises (naming why) before anything changes
        self._move_to(target)
        self._backend_choice = choice
        return self

    def _move_to(self, target) -> None:
        """Keep parameters and grads in the array module of `target` (copies only across devices)."""
        if target.xp is self._storage.xp:
            self._storage = target
            return
        params = {n: target.asarray(self._storage.to_host(p)) for n, p in self._params.items()}
        grads = {n: target.asarray(self._storage.to_host(g)) for n, g in self._grads.items()}
        self._params, self._grads, self._storage = params, grads, target

    # -- modes --------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "RecurrentLayer":
        self.training = _flag(mode, "mode")
        return self

    def eval(self) -> "RecurrentLayer":
        return self.train(False)

    # -- forward ------------------------------------------------------------------------
    def __call__(self, x, state=None, lengths=None):
        return self.forward(x, state, lengths)

    def forward(self, x, state=None, lengths=None):
        """Run the whole sequence. Returns ``y, state_n``.

        x: (T, B, input_size), (B, T, input_size) with batch_first, or unbatched
        (T, input_size). state: optional initial state ((h0, c0) or h0), each (L*D, B, H)
        ((L*D, H) unbatched); an LSTM's h0 or c0 may be None (zeros). lengths:
        optional (B,) ints in 1..T; outputs past a sequence's length are zero and
        h_n / c_n are taken at each sequence's own last step. In training mode the
        forward is kept for this thread's next ``backward``; eval keeps nothing.
        """
        y, final_state, call = self._forward(x, state, lengths, keep=self.training)
        self._last.call = call  # the record, not a Pullback: no cycle back to the layer
        return y, final_state

    def vjp(self, x, state=None, lengths=None):
        """A forward whose record belongs to this call: returns ``y, state_n, pullback``.

        ``pullback(dy, dstate=None)`` returns ``dx, dstate0`` and adds the parameter
        gradients into ``grads``, once. Any number of pullbacks may be alive and called in
        any order, from any thread. Dropout applies in training mode only, as in
        ``forward``; the record is kept in either mode. This thread's ``backward`` is not
        affected.
        """
        y, final_state, call = self._forward(x, state, lengths, keep=True)
        return y, final_state, Pullback(self, call)

    def _forward(self, x, state, lengths, keep: bool):
        backend = self._current_backend()
        # Validate and convert everything before changing anything.
        inputs, layout = _inputs.sequence_input(backend, x, self.input_size, self.batch_first, self.dtype)
        _refuse_a_call_that_cannot_fit(self, backend, layout, keep)
        states0 = self._states_in(backend, state, "state", layout)
        step_lengths = _inputs.sequence_lengths(backend, lengths, layout)
        self._move_to(backend)
        masks, undo = self._draw_dropout_masks(backend, layout)
        try:
            y, finals, record = stack.forward(
                self._spec, backend, self._params, inputs, states0, step_lengths, masks, keep
            )
        except BaseException:
            undo()
            raise
        call = None if record is None else _Call(record, layout, x)
        y = backend.to_user(layout.to_user(backend.xp, y), x)
        return y, self._states_out(backend, finals, layout, x), call

    def _states_in(self, backend, value, name: str, layout) -> tuple:
        """The caller's state (or its gradient) as internal arrays, one per state part."""
        return _inputs.state_parts(
            backend, value, name, self._spec.cell.state_parts, layout, self._spec.num_states, self.hidden_size,
            self.dtype,
        )

    def _states_out(self, backend, parts: tuple, layout, like):
        """Internal arrays, one per state part, as the caller's state: (h, c) or h."""
        user = tuple(backend.to_user(layout.state_to_user(part), like) for part in parts)
        return user if len(user) > 1 else user[0]

    def _draw_dropout_masks(self, backend, layout):
        """(masks for stack.forward, undo): inverted-dropout masks drawn on the host, so every
        backend sees the same ones; undo() puts the generator back if no other thread drew
        since (a failed call then leaves it as it was)."""
        if not (self.training and self.dropout > 0 and self.num_layers > 1):
            return None, lambda: None
        keep = 1.0 - self.dropout
        shapes = self._spec.dropout_mask_shapes(layout.num_steps, layout.batch)
        generator = self._dropout_rng.bit_generator
        with self._dropout_lock:
            before = generator.state
            masks = [None if shape is None else self._inverted_mask(shape, keep) for shape in shapes]
            after = generator.state
        masks = [None if mask is None else backend.asarray(mask) for mask in masks]

        def undo():
            with self._dropout_lock:
                if generator.state == after:
                    generator.state = before

        return masks, undo

    def _inverted_mask(self, shape, keep: float) -> np.ndarray:
        if keep == 0.0:
            return np.zeros(shape, dtype=self.dtype)
        kept = self._dropout_rng.random(shape) < keep
        return (kept / keep).astype(self.dtype)

    # -- streams --------------------------------------------------------------------------
    def stream(self, batch_size=1, state=None) -> Stream:
        """A ``Stream``: this layer run one step (or chunk) per call, the state carried between
        calls, for inference (see ``fastlstm.stream.Stream``). ``y_t = stream(x_t)``, x_t
        (B, I) -> (B, H). state: the initial state, shaped as ``layer(x)`` returns it (None:
        zeros). The stream uses a snapshot of the weights as they are now (``refresh()``
        takes a new one); streams of one layer share it while the weights stay the same."""
        if self.training:
            raise RuntimeError(
                f"stream: {type(self).__name__} is in training mode; a stream runs inference only (it keeps "
                "nothing for backward, and applies no dropout): call .eval() first, or train with whole "
                "sequences (vjp / backward)"
            )
        if self.bidirectional:
            raise ValueError(
                "stream: this layer is bidirectional; its reverse direction starts from the end of the "
                "sequence, so no output is known before the last step arrives. Call the layer on whole "
                "sequences, or stream a unidirectional layer"
            )
        return Stream(self, _positive_int(batch_size, "batch_size"), state)

    def _stream_runs(self, batch: int):
        """(backend, [each layer's stream run]) for `batch` sequences on the layer's backend now:
        those the last stream of this batch size and backend got, while the parameters still
        equal (element by element) the snapshot they were made from; else new ones on a new
        snapshot."""
        backend = self._current_backend()
        self._move_to(backend)
        key = (backend.name, batch)
        with self._streams_lock:
            kept = self._stream_weights.get(key)
        if kept is not None and all(bool(backend.xp.array_equal(kept.snapshot[name], value))
                                    for name, value in self._params.items()):
            return backend, kept.runs
        snapshot = {name: value.copy() for name, value in self._params.items()}
        spec = self._spec
        runs = [spec.cell.stream(backend, stack.roles(spec, snapshot, layer, 0), batch)
                for layer in range(spec.num_layers)]
        with self._streams_lock:
            self._stream_weights.pop(key, None)
            self._stream_weights[key] = _StreamWeights(snapshot, runs)
            while len(self._stream_weights) > _STREAM_WEIGHTS_KEPT:  # the least recently made go
                del self._stream_weights[next(iter(self._stream_weights))]
        return backend, runs

    # -- backward -----------------------------------------------------------------------
    def backward(self, dy, dstate=None):
        """Backpropagate through this thread's last training forward. Returns ``dx, dstate0``.

        dy: gradient of the loss w.r.t. y (same shape as y; None: zeros). dstate: optional
        gradient of the final state, shaped like it ((dh_n, dc_n), either may be None, or
        dh_n). Parameter
        gradients are added to ``self.grads``. Each forward can be differentiated once.
        """
        call = getattr(self._last, "call", None)
        if call is None:
            raise RuntimeError(
                "backward: no training forward to differentiate. Call the layer in training mode "
                "(lstm.train()) right before backward, in the same thread; eval forwards keep "
                "nothing, and each forward can be differentiated once (vjp gives a pullback "
                "per call)"
            )
        result = self._pull_back(call, dy, dstate)
        self._last.call = None  # once, as a pullback
        return result

    def _pull_back(self, call: _Call, dy, dstate):
        """Differentiate one recorded forward; gradients are added to ``grads`` last."""
        record, layout = call.record, call.layout
        backend = record.backend
        spec = self._spec
        d_out = _inputs.output_gradient(backend, dy, layout, spec.output_size, self.dtype)
        dstates_n = self._states_in(backend, dstate, "dstate", layout)
        d_in, dstates0, new_grads = stack.backward(record, d_out, dstates_n)
        # Only now, with every gradient computed, touch the layer.
        converted = {name: self._storage.asarray(grad) for name, grad in new_grads.items()}
        with self._grads_lock:
            for name, grad in converted.items():
                self._grads[name] += grad
        like = call.input_like
        dx = backend.to_user(layout.to_user(backend.xp, d_in), like)
        return dx, self._states_out(backend, dstates0, layout, like)

    # -- parameters -----------------------------------------------------------------------
    @property
    def params(self):
        """name -> parameter array (live: update in place to train), torch's names and order."""
        return types.MappingProxyType(self._params)

    @property
    def grads(self):
        """name -> accumulated gradient, same names and shapes as ``state_dict()``."""
        return types.MappingProxyType(self._grads)

    def zero_grad(self) -> None:
        for grad in self._grads.values():
            grad.fill(0)

    def state_dict(self) -> dict:
        """name -> NumPy copy of each parameter (torch's names, shapes and gate order)."""
        return {name: np.array(self._storage.to_host(p), copy=True) for name, p in self._params.items()}

    def load_state_dict(self, state_dict, strict: bool = True):
        """Load parameters from NumPy arrays, torch tensors, CuPy arrays or anything with
        ``__array__`` / DLPack. Returns ``(missing_keys, unexpected_keys)`` (both empty when
        strict). Nothing changes unless every entry is valid."""
        if not hasattr(state_dict, "keys") or not hasattr(state_dict, "__getitem__"):
            raise TypeError(f"state_dict: expected a mapping of name -> array, got {type(state_dict).__name__}")
        shapes = self.parameter_shapes()
        given = [str(k) for k in state_dict.keys()]
        missing = [name for name in shapes if name not in given]
        unexpected = [name for name in given if name not in shapes]
        if strict and (missing or unexpected):
            raise ValueError(
                f"state_dict: keys do not match this layer ({self!r}): "
                f"missing {missing or 'none'}; unexpected {unexpected or 'none'}"
            )
        converted = {}
        for name in shapes:
            if name not in given:
                continue
            value = to_numpy(state_dict[name], f"state_dict[{name!r}]")
            check_real(value, f"state_dict[{name!r}]")
            if tuple(value.shape) != shapes[name]:
                raise ValueError(f"state_dict[{name!r}]: expected shape {shapes[name]}, got {tuple(value.shape)}")
            converted[name] = self._storage.asarray(np.array(value, dtype=self.dtype, copy=True))
        # New arrays rather than in-place copies: a saved forward keeps the weights it used.
        self._params.update(converted)
        return missing, unexpected

    # -- files --------------------------------------------------------------------------
    def config(self) -> dict:
        """The constructor's arguments (what a file keeps besides the parameters)."""
        return {
            "input_size": self.input_size,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "bias": self.bias,
            "batch_first": self.batch_first,
            "dropout": self.dropout,
            "bidirectional": self.bidirectional,
            "dtype": self.dtype.name,
        }

    def save(self, path) -> None:
        """Write config and parameters to `path` (.npz), atomically."""
        save_arrays(path, self._FILE_KIND, {"config": self.config()}, self.state_dict())

    @classmethod
    def load(cls, path, backend=None) -> "RecurrentLayer":
        """A layer read from a file written by ``save`` (of this cell: another's is refused)."""
        header, arrays = load_arrays(path, cls._FILE_KIND, lambda header: cls._file_parameter_shapes(header, path))
        config = header["config"]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                layer = cls(**config, backend=backend)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: the layer configuration in the file is not valid: {exc}") from exc
        try:
            layer.load_state_dict(arrays)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: the parameters do not match the configuration: {exc}") from exc
        return layer

    @classmethod
    def _file_parameter_shapes(cls, header: dict, path) -> dict:
        """name -> shape of the parameters a file's configuration needs, worked out from the
        configuration alone (checked as the constructor checks it) before any array is read."""
        config = header.get("config")
        if not isinstance(config, dict):
            raise CheckpointError(f"{path}: the file has no layer configuration")
        signature = inspect.signature(cls)
        unknown = set(config) - (set(signature.parameters) - {"backend", "seed"})
        if unknown:  # a file says what a layer is, not where it runs or how it was seeded
            raise CheckpointError(f"{path}: the layer configuration in the file is not valid: unknown options "
                                  f"{sorted(unknown)}")
        try:
            bound = signature.bind(**config)  # the constructor's own defaults for what the file leaves out
            bound.apply_defaults()
            args = bound.arguments
            spec = _validated_spec(cls._cell_of(args), args["input_size"], args["hidden_size"], args["num_layers"],
                                   args["bias"], args["bidirectional"], args["dtype"])
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: the layer configuration in the file is not valid: {exc}") from exc
        arrays = spec.num_states * len(spec.names(0, 0))
        if arrays > MAX_FILE_MEMBERS:  # before listing them: num_layers=200000 would be a long list
            raise CheckpointError(f"{path}: the configuration needs {arrays} parameter arrays (a file holds at most "
                                  f"{MAX_FILE_MEMBERS})")
        return spec.parameter_shapes()

    @classmethod
    def _cell_of(cls, config: dict):
        """The cell a configuration (the constructor's arguments, defaults applied) describes
        (a subclass with options overrides this)."""
        return cls._CELL

    def _repr_options(self) -> tuple:
        """(name, value, default) of the options a repr shows when they differ."""
        return (
            ("num_layers", self.num_layers, 1),
            ("bias", self.bias, True),
            ("batch_first", self.batch_first, False),
            ("dropout", self.dropout, 0.0),
            ("bidirectional", self.bidirectional, False),
        )

    def __repr__(self) -> str:
        extras = "".join(f", {key}={value!r}" for key, value, default in self._repr_options() if value != default)
        fixed = f", backend={self._backend_choice!r}" if self._backend_choice else ""
        return (f"{type(self).__name__}({self.input_size}, {self.hidden_size}{extras}{fixed}, "
                f"dtype={self.dtype.name!r})")


class LSTM(RecurrentLayer):
    """A multi-layer, optionally bidirectional LSTM with ``torch.nn.LSTM``'s API and semantics.

    ``lstm(x, state=None, lengths=None)`` returns ``y, (h_n, c_n)``;
    ``lstm.backward(dy, dstate=None)`` returns ``dx, (dh0, dc0)``; the rest is
    ``RecurrentLayer``'s.
    """

    _FILE_KIND = "fastlstm-lstm"
    _CELL = LSTM_CELL

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, backend=None, dtype="float32", seed=None):
        super().__init__(LSTM_CELL, input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, backend, dtype, seed)


class GRU(RecurrentLayer):
    """A multi-layer, optionally bidirectional GRU with ``torch.nn.GRU``'s API and semantics.

    ``gru(x, state=None, lengths=None)`` returns ``y, h_n``; ``gru.backward(dy,
    dstate=None)`` returns ``dx, dh0``; the rest is ``RecurrentLayer``'s.

    reset_after: True (torch, cuDNN, Keras' default): ``n = tanh(W_in x + b_in + r *
    (W_hn h + b_hn))``. False (Cho et al. 2014, Keras' ``reset_after=False``): ``n =
    tanh(W_in x + b_in + W_hn (r * h) + b_hn)``, a second recurrent product per step.
    Either way ``h' = (1 - z) * n + z * h``. Weights written for the other convention of
    the update, ``h' = (1 - z) * h + z * n`` (the tutorial's source among others), map onto
    these by negating the update gate: use ``-W_iz``, ``-W_hz`` and ``-b_iz``, ``-b_hz``
    (sigma(-a) = 1 - sigma(a)); a single update bias b_z goes to ``bias_ih`` as ``-b_z``
    with 0 in ``bias_hh``.
    """

    _FILE_KIND = "fastlstm-gru"

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, backend=None, dtype="float32", seed=None, reset_after=True):
        super().__init__(GRUCell(_flag(reset_after, "reset_after")), input_size, hidden_size, num_layers, bias,
                         batch_first, dropout, bidirectional, backend, dtype, seed)
        self.reset_after = bool(reset_after)

    def config(self) -> dict:
        return {**super().config(), "reset_after": self.reset_after}

    @classmethod
    def _cell_of(cls, config: dict):
        return GRUCell(_flag(config["reset_after"], "reset_after"))

    def _repr_options(self) -> tuple:
        return super()._repr_options() + (("reset_after", self.reset_after, True),)


LAYERS = {"lstm": LSTM, "gru": GRU}  # the layer class of each cell (cells.BY_NAME's names)
