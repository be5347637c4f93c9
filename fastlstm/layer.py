"""The LSTM layer: shapes, parameters, state, stacking, directions, dropout.

Semantics are those of ``torch.nn.LSTM`` (gate order i, f, g, o; two biases;
``state_dict`` names and shapes; (L*D, B, H) states). The layer is written once for
every backend: it talks to a backend only through ``forward_sequence`` and
``backward_sequence`` for one layer and one direction (see ``backends/base.py``).
"""

from __future__ import annotations

import math
import types
import warnings
from dataclasses import dataclass

import numpy as np

from . import _inputs, registry
from ._arrays import check_real, resolve_dtype, to_numpy
from .checkpoint import load_arrays, save_arrays

_FILE_KIND = "fastlstm-lstm"


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
class _ForwardRecord:
    """What one training forward leaves for backward."""

    backend: object
    layout: _inputs.Layout
    saved: list  # saved[layer][direction], opaque to the layer
    dropout_masks: list  # mask applied to each layer's input (None: no dropout)
    input_like: object  # the caller's x, to hand results back in its framework


class LSTM:
    """A multi-layer, optionally bidirectional LSTM with a PyTorch-compatible API.

    ``lstm(x, state=None, lengths=None)`` returns ``y, (h_n, c_n)``;
    ``lstm.backward(dy, dstate=None)`` returns ``dx, (dh0, dc0)`` and accumulates the
    parameter gradients into ``lstm.grads`` until ``zero_grad()``.
    """

    def __init__(
        self,
        input_size,
        hidden_size,
        num_layers=1,
        bias=True,
        batch_first=False,
        dropout=0.0,
        bidirectional=False,
        backend=None,
        dtype="float32",
        seed=None,
    ):
        self.input_size = _positive_int(input_size, "input_size")
        self.hidden_size = _positive_int(hidden_size, "hidden_size")
        self.num_layers = _positive_int(num_layers, "num_layers")
        self.bias = _flag(bias, "bias")
        self.batch_first = _flag(batch_first, "batch_first")
        self.bidirectional = _flag(bidirectional, "bidirectional")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float, np.floating, np.integer)):
            raise TypeError(f"dropout: expected a number in [0, 1], got {type(dropout).__name__}")
        if not 0.0 <= float(dropout) <= 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1], got {dropout}")
        self.dropout = float(dropout)
        if self.dropout > 0 and self.num_layers == 1:
            warnings.warn(
                "dropout applies between layers only; with num_layers=1 it has no effect", stacklevel=2
            )
        self.dtype = resolve_dtype(dtype)
        self._backend_choice = None if backend is None else registry._check_name(backend)
        self._storage = registry.backend_object(self._backend_choice)
        init_seed, dropout_seed = np.random.SeedSequence(seed).spawn(2)
        self._dropout_rng = np.random.default_rng(dropout_seed)
        self._params = self._initial_parameters(np.random.default_rng(init_seed))
        self._grads = {name: self._storage.xp.zeros_like(p) for name, p in self._params.items()}
        self._record = None
        self.training = True

    # -- structure ----------------------------------------------------------------------
    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def _layer_input_size(self, layer: int) -> int:
        return self.input_size if layer == 0 else self.hidden_size * self.num_directions

    def _names(self, layer: int, direction: int) -> tuple:
        suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
        names = [f"weight_ih{suffix}", f"weight_hh{suffix}"]
        if self.bias:
            names += [f"bias_ih{suffix}", f"bias_hh{suffix}"]
        return tuple(names)

    def parameter_shapes(self) -> dict:
        """name -> shape, in torch.nn.LSTM's state_dict order."""
        shapes = {}
        four_h = 4 * self.hidden_size
        for layer in range(self.num_layers):
            for direction in range(self.num_directions):
                names = self._names(layer, direction)
                shapes[names[0]] = (four_h, self._layer_input_size(layer))
                shapes[names[1]] = (four_h, self.hidden_size)
                for name in names[2:]:
                    shapes[name] = (four_h,)
        return shapes

    def _initial_parameters(self, rng) -> dict:
        # torch.nn.LSTM's initialisation: every parameter ~ U(-1/sqrt(H), 1/sqrt(H)).
        bound = 1.0 / math.sqrt(self.hidden_size)
        return {
            name: self._storage.asarray(rng.uniform(-bound, bound, size=shape).astype(self.dtype))
            for name, shape in self.parameter_shapes().items()
        }

    # -- backend ------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        """Name of the backend the next forward runs on."""
        return self._current_backend().name

    def _current_backend(self):
        return registry.backend_object(self._backend_choice)

    def to(self, backend: str | None) -> "LSTM":
        """Fix this layer to `backend` (None: follow the global choice); moves parameters."""
        self._backend_choice = None if backend is None else registry._check_name(backend)
        self._move_to(self._current_backend())
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
    def train(self, mode: bool = True) -> "LSTM":
        self.training = _flag(mode, "mode")
        return self

    def eval(self) -> "LSTM":
        return self.train(False)

    # -- forward ------------------------------------------------------------------------
    def __call__(self, x, state=None, lengths=None):
        return self.forward(x, state, lengths)

    def forward(self, x, state=None, lengths=None):
        """Run the whole sequence. Returns ``y, (h_n, c_n)``.

        x: (T, B, input_size), (B, T, input_size) with batch_first, or unbatched
        (T, input_size). state: optional (h0, c0), each (L*D, B, H). lengths:
        optional (B,) ints in 1..T; outputs past a sequence's length are zero and
        h_n / c_n are taken at each sequence's own last step.
        """
        backend = self._current_backend()
        # Validate and convert everything before changing anything.
        inputs, layout = _inputs.sequence_input(backend, x, self.input_size, self.batch_first, self.dtype)
        num_states = self.num_layers * self.num_directions
        h0, c0 = _inputs.state_pair(backend, state, "state", layout, num_states, self.hidden_size, self.dtype)
        step_lengths = _inputs.sequence_lengths(backend, lengths, layout)
        self._move_to(backend)
        rng_state = self._dropout_rng.bit_generator.state
        try:
            y, h_n, c_n, saved, masks = self._run_layers(backend, inputs, layout, h0, c0, step_lengths)
        except BaseException:
            self._dropout_rng.bit_generator.state = rng_state
            raise
        # The latest forward is the one backward differentiates; eval keeps nothing.
        self._record = _ForwardRecord(backend, layout, saved, masks, x) if self.training else None
        xp = backend.xp
        outputs = (layout.to_user(xp, y), layout.state_to_user(h_n), layout.state_to_user(c_n))
        y, h_n, c_n = (backend.to_user(a, x) for a in outputs)
        return y, (h_n, c_n)

    def _zeros_state(self, xp, batch):
        return xp.zeros((self.num_layers * self.num_directions, batch, self.hidden_size), dtype=self.dtype)

    def _layer_weights(self, layer: int, direction: int):
        names = self._names(layer, direction)
        w_ih, w_hh = self._params[names[0]], self._params[names[1]]
        if self.bias:
            bias = self._params[names[2]] + self._params[names[3]]
        else:
            bias = self._storage.xp.zeros(4 * self.hidden_size, dtype=self.dtype)
        return w_ih, w_hh, bias

    def _dropout_mask(self, backend, shape):
        """Inverted-dropout mask drawn on the host, so every backend sees the same one."""
        keep = 1.0 - self.dropout
        if keep == 0.0:
            return backend.asarray(np.zeros(shape, dtype=self.dtype))
        kept = self._dropout_rng.random(shape) < keep
        return backend.asarray((kept / keep).astype(self.dtype))

    def _run_layers(self, backend, inputs, layout, h0, c0, lengths):
        xp = backend.xp
        training = self.training
        h0 = self._zeros_state(xp, layout.batch) if h0 is None else h0
        c0 = self._zeros_state(xp, layout.batch) if c0 is None else c0
        h_n, c_n = xp.empty_like(h0), xp.empty_like(c0)
        saved, masks = [], []
        layer_input = inputs
        for layer in range(self.num_layers):
            mask = None
            if training and layer > 0 and self.dropout > 0:
                mask = self._dropout_mask(backend, layer_input.shape)
                layer_input = layer_input * mask
            outputs, layer_saved = [], []
            for direction in range(self.num_directions):
                k = layer * self.num_directions + direction
                y, h_n[k], c_n[k], kept = backend.forward_sequence(
                    layer_input, *self._layer_weights(layer, direction), h0[k], c0[k],
                    lengths, direction == 1, training,
                )
                outputs.append(y)
                layer_saved.append(kept)
            layer_input = outputs[0] if len(outputs) == 1 else xp.concatenate(outputs, axis=2)
            saved.append(layer_saved)
            masks.append(mask)
        return layer_input, h_n, c_n, saved, masks

    # -- backward -----------------------------------------------------------------------
    def backward(self, dy, dstate=None):
        """Backpropagate through the last training forward. Returns ``dx, (dh0, dc0)``.

        dy: gradient of the loss w.r.t. y (same shape as y; None: zeros). dstate:
        optional (dh_n, dc_n), each shaped like h_n (either may be None). Parameter
        gradients are added to ``self.grads``. Each forward can be differentiated once.
        """
        record = self._record
        if record is None:
            raise RuntimeError(
                "backward: no training forward to differentiate. Call the layer in training mode "
                "(lstm.train()) right before backward; eval forwards keep nothing, and each "
                "forward can be differentiated once"
            )
        backend, layout = record.backend, record.layout
        xp = backend.xp
        num_states = self.num_layers * self.num_directions
        hidden = self.hidden_size
        d_out = _inputs.output_gradient(backend, dy, layout, hidden * self.num_directions, self.dtype)
        dh_n, dc_n = _inputs.state_pair(backend, dstate, "dstate", layout, num_states, hidden, self.dtype)
        d_out = xp.zeros((layout.num_steps, layout.batch, hidden * self.num_directions), self.dtype) if d_out is None else d_out
        dh_n = self._zeros_state(xp, layout.batch) if dh_n is None else dh_n
        dc_n = self._zeros_state(xp, layout.batch) if dc_n is None else dc_n

        new_grads = {}
        dh0, dc0 = xp.empty_like(dh_n), xp.empty_like(dc_n)
        for layer in reversed(range(self.num_layers)):
            d_input = None
            for direction in range(self.num_directions):
                k = layer * self.num_directions + direction
                dy_part = xp.ascontiguousarray(d_out[:, :, direction * hidden : (direction + 1) * hidden])
                dx, dh0[k], dc0[k], dw_ih, dw_hh, dbias = backend.backward_sequence(
                    record.saved[layer][direction], dy_part, dh_n[k], dc_n[k]
                )
                d_input = dx if d_input is None else d_input + dx
                names = self._names(layer, direction)
                new_grads[names[0]], new_grads[names[1]] = dw_ih, dw_hh
                if self.bias:  # b_ih and b_hh enter the gates as one sum
                    new_grads[names[2]] = new_grads[names[3]] = dbias
            if record.dropout_masks[layer] is not None:
                d_input = d_input * record.dropout_masks[layer]
            d_out = d_input
        # Only now, with every gradient computed, touch the layer.
        for name, grad in new_grads.items():
            self._grads[name] += self._storage.asarray(grad)
        self._record = None
        like = record.input_like
        dx = backend.to_user(layout.to_user(xp, d_out), like)
        dh0 = backend.to_user(layout.state_to_user(dh0), like)
        dc0 = backend.to_user(layout.state_to_user(dc0), like)
        return dx, (dh0, dc0)

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
        """name -> NumPy copy of each parameter (torch.nn.LSTM's names, shapes, gate order)."""
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
        save_arrays(path, _FILE_KIND, {"config": self.config()}, self.state_dict())

    @classmethod
    def load(cls, path, backend=None) -> "LSTM":
        """A layer read from a file written by ``save``."""
        header, arrays = load_arrays(path, _FILE_KIND)
        config = header.get("config")
        if not isinstance(config, dict):
            raise ValueError(f"{path}: the file has no layer configuration")
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

    def __repr__(self) -> str:
        extras = "".join(
            f", {key}={value!r}"
            for key, value, default in (
                ("num_layers", self.num_layers, 1),
                ("bias", self.bias, True),
                ("batch_first", self.batch_first, False),
                ("dropout", self.dropout, 0.0),
                ("bidirectional", self.bidirectional, False),
            )
            if value != default
        )
        fixed = f", backend={self._backend_choice!r}" if self._backend_choice else ""
        return f"LSTM({self.input_size}, {self.hidden_size}{extras}{fixed}, dtype={self.dtype.name!r})"
