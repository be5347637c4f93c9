"""The layer stack, written once for every cell: layers, directions, dropout between layers,
states and gradients, on top of a cell's per-direction run (``cells.py``) and through it a
backend's sequence primitives (``backends/base.py``).

Everything here is a function of its arguments: parameters come in as a mapping, dropout
masks are drawn by the caller, and a training forward returns its record rather than
keeping it. ``fastlstm.LSTM`` / ``fastlstm.GRU`` (NumPy-level, own their parameters and
gradients) and ``fastlstm.torch`` (torch ops whose parameters are tensors) are built on it.

Arrays are the backend's, in the internal layout: x (T, B, I), y (T, B, D*H), states a
tuple with one (L*D, B, H) array per state part of the cell ((h, c) or (h,)), lengths None
or a validated (B,) int64 array (see ``_inputs``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .backends.base import active_steps
from .cells import LSTM_CELL


@dataclass(frozen=True)
class StackSpec:
    """The structure of a stack: sizes, layers, directions, biases, dtype and cell."""

    input_size: int
    hidden_size: int
    num_layers: int
    num_directions: int
    bias: bool
    dtype: np.dtype
    cell: object = LSTM_CELL

    @property
    def num_states(self) -> int:
        """Entries of h0 / h_n: one per layer and direction."""
        return self.num_layers * self.num_directions

    @property
    def output_size(self) -> int:
        return self.hidden_size * self.num_directions

    def layer_input_size(self, layer: int) -> int:
        return self.input_size if layer == 0 else self.output_size

    def names(self, layer: int, direction: int) -> tuple:
        """Parameter names of one layer and direction, as in torch.nn.LSTM / GRU."""
        suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
        names = [f"weight_ih{suffix}", f"weight_hh{suffix}"]
        if self.bias:
            names += [f"bias_ih{suffix}", f"bias_hh{suffix}"]
        return tuple(names)

    def parameter_shapes(self) -> dict:
        """name -> shape, in torch.nn.LSTM's / GRU's state_dict order."""
        shapes = {}
        rows = self.cell.gates * self.hidden_size
        for layer in range(self.num_layers):
            for direction in range(self.num_directions):
                names = self.names(layer, direction)
                shapes[names[0]] = (rows, self.layer_input_size(layer))
                shapes[names[1]] = (rows, self.hidden_size)
                for name in names[2:]:
                    shapes[name] = (rows,)
        return shapes

    @functools.cached_property
    def _roles_and_names(self) -> dict:
        """(layer, direction) -> ((role, name), ...), worked out once per spec (every call reads it)."""
        return {(layer, direction): tuple((_role(name), name) for name in self.names(layer, direction))
                for layer in range(self.num_layers) for direction in range(self.num_directions)}

    @functools.cached_property
    def parameter_names(self) -> tuple:
        """The names of ``parameter_shapes()``, in order (worked out once per spec)."""
        return tuple(self.parameter_shapes())

    def dropout_mask_shapes(self, num_steps: int, batch: int) -> list:
        """Shape of the mask on each layer's input; layer 0 gets none (None)."""
        return [None] + [(num_steps, batch, self.output_size)] * (self.num_layers - 1)


@dataclass
class StackRecord:
    """What one training forward leaves for its backward (owned by whoever holds it)."""

    spec: StackSpec
    backend: object
    saved: list  # saved[layer][direction], opaque: the backend's
    masks: list  # mask applied to each layer's input, or None
    num_steps: int
    batch: int


def _zeros_state(spec: StackSpec, xp, batch: int):
    return xp.zeros((spec.num_states, batch, spec.hidden_size), dtype=spec.dtype)


def _role(name: str) -> str:
    """A parameter's role in its layer: weight_ih_l1_reverse -> weight_ih."""
    return name.split("_l")[0]


def roles(spec: StackSpec, params, layer: int, direction: int) -> dict:
    """role (weight_ih, weight_hh, bias_ih, bias_hh) -> array, for one layer and direction."""
    return {role: params[name] for role, name in spec._roles_and_names[layer, direction]}


def forward(spec: StackSpec, backend, params, x, states0, lengths, masks, keep: bool):
    """Run every layer and direction. Returns ``y, states_n, record`` (record None unless
    `keep`). states0: one array or None (zeros) per state part of the cell; masks: None or
    one entry per layer (None: no mask). What x holds past a sequence's length is never
    read; with `keep`, the record holds its own copies of x, states0 and the parameters."""
    xp = backend.xp
    num_steps, batch = x.shape[:2]
    if lengths is not None:
        # Padding (the steps past a sequence's length) reaches no result: zeroed once here, so
        # that no backend multiplies a zero gradient by what the caller left there (0 * NaN).
        x = xp.where(active_steps(xp, lengths, num_steps), x, x.dtype.type(0))
    elif keep:
        x = x.copy()
    if keep:
        # The record owns what its backward reads: a caller may change x, the state or the
        # weights in place (the next batch, an optimizer step) before calling backward.
        states0 = tuple(None if s is None else s.copy() for s in states0)
        params = {name: params[name].copy() for name in spec.parameter_names}
    states0 = tuple(_zeros_state(spec, xp, batch) if s is None else s for s in states0)
    masks = [None] * spec.num_layers if masks is None else list(masks)
    finals = tuple(xp.empty_like(s) for s in states0)
    saved = []
    layer_input = x
    for layer in range(spec.num_layers):
        if masks[layer] is not None:
            layer_input = layer_input * masks[layer]
        outputs, layer_saved = [], []
        for direction in range(spec.num_directions):
            k = layer * spec.num_directions + direction
            y, states_n, kept = spec.cell.forward(
                backend, layer_input, roles(spec, params, layer, direction), tuple(s[k] for s in states0),
                lengths, direction == 1, keep,
            )
            for final, value in zip(finals, states_n):
                final[k] = value
            outputs.append(y)
            layer_saved.append(kept)
        layer_input = outputs[0] if len(outputs) == 1 else xp.concatenate(outputs, axis=2)
        saved.append(layer_saved)
    record = StackRecord(spec, backend, saved, masks, num_steps, batch) if keep else None
    return layer_input, finals, record


def backward(record: StackRecord, d_out, dstates_n):
    """Differentiate one forward. Returns ``dx, dstates0, grads`` (grads: parameter name ->
    gradient; an LSTM's two biases share one array, as they enter the gates as one sum).
    None for d_out or for a part of dstates_n means zeros. Reads the record, never changes it."""
    spec, backend = record.spec, record.backend
    xp = backend.xp
    hidden = spec.hidden_size
    if d_out is None:
        d_out = xp.zeros((record.num_steps, record.batch, spec.output_size), dtype=spec.dtype)
    dstates_n = tuple(_zeros_state(spec, xp, record.batch) if d is None else d for d in dstates_n)
    grads = {}
    dstates0 = tuple(xp.empty_like(d) for d in dstates_n)
    for layer in reversed(range(spec.num_layers)):
        d_input = None
        for direction in range(spec.num_directions):
            k = layer * spec.num_directions + direction
            dy_part = xp.ascontiguousarray(d_out[:, :, direction * hidden : (direction + 1) * hidden])
            dx, dstates_k, role_grads = spec.cell.backward(
                backend, record.saved[layer][direction], dy_part, tuple(d[k] for d in dstates_n)
            )
            for d0, value in zip(dstates0, dstates_k):
                d0[k] = value
            d_input = dx if d_input is None else d_input + dx
            for role, name in spec._roles_and_names[layer, direction]:
                grads[name] = role_grads[role]
        if record.masks[layer] is not None:
            d_input = d_input * record.masks[layer]
        d_out = d_input
    return d_out, dstates0, grads
