"""The layer stack, written once: layers, directions, dropout between layers, states and
gradients, on top of a backend's two sequence primitives (``backends/base.py``).

Everything here is a function of its arguments: parameters come in as a mapping, dropout
masks are drawn by the caller, and a training forward returns its record rather than
keeping it. ``fastlstm.LSTM`` (NumPy-level, owns its parameters and gradients) and
``fastlstm.torch`` (a torch op whose parameters are tensors) are both built on it.

Arrays are the backend's, in the internal layout: x (T, B, I), y (T, B, D*H), states
(L*D, B, H), lengths None or a validated (B,) int64 array (see ``_inputs``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

GATES = 4  # i, f, g, o: rows of W_ih, W_hh and the biases come in four blocks of H


@dataclass(frozen=True)
class StackSpec:
    """The structure of a stack: sizes, layers, directions, biases, dtype."""

    input_size: int
    hidden_size: int
    num_layers: int
    num_directions: int
    bias: bool
    dtype: np.dtype

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
        """Parameter names of one layer and direction, as in torch.nn.LSTM."""
        suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
        names = [f"weight_ih{suffix}", f"weight_hh{suffix}"]
        if self.bias:
            names += [f"bias_ih{suffix}", f"bias_hh{suffix}"]
        return tuple(names)

    def parameter_shapes(self) -> dict:
        """name -> shape, in torch.nn.LSTM's state_dict order."""
        shapes = {}
        rows = GATES * self.hidden_size
        for layer in range(self.num_layers):
            for direction in range(self.num_directions):
                names = self.names(layer, direction)
                shapes[names[0]] = (rows, self.layer_input_size(layer))
                shapes[names[1]] = (rows, self.hidden_size)
                for name in names[2:]:
                    shapes[name] = (rows,)
        return shapes

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


def _layer_weights(spec: StackSpec, xp, params, layer: int, direction: int):
    names = spec.names(layer, direction)
    w_ih, w_hh = params[names[0]], params[names[1]]
    if spec.bias:
        bias = params[names[2]] + params[names[3]]
    else:
        bias = xp.zeros(GATES * spec.hidden_size, dtype=spec.dtype)
    return w_ih, w_hh, bias


def forward(spec: StackSpec, backend, params, x, h0, c0, lengths, masks, keep: bool):
    """Run every layer and direction. Returns ``y, h_n, c_n, record`` (record None unless
    `keep`). h0 / c0 None mean zeros; masks is None or one entry per layer (None: no mask)."""
    xp = backend.xp
    num_steps, batch = x.shape[:2]
    h0 = _zeros_state(spec, xp, batch) if h0 is None else h0
    c0 = _zeros_state(spec, xp, batch) if c0 is None else c0
    masks = [None] * spec.num_layers if masks is None else list(masks)
    h_n, c_n = xp.empty_like(h0), xp.empty_like(c0)
    saved = []
    layer_input = x
    for layer in range(spec.num_layers):
        if masks[layer] is not None:
            layer_input = layer_input * masks[layer]
        outputs, layer_saved = [], []
        for direction in range(spec.num_directions):
            k = layer * spec.num_directions + direction
            y, h_n[k], c_n[k], kept = backend.forward_sequence(
                layer_input, *_layer_weights(spec, xp, params, layer, direction), h0[k], c0[k],
                lengths, direction == 1, keep,
            )
            outputs.append(y)
            layer_saved.append(kept)
        layer_input = outputs[0] if len(outputs) == 1 else xp.concatenate(outputs, axis=2)
        saved.append(layer_saved)
    record = StackRecord(spec, backend, saved, masks, num_steps, batch) if keep else None
    return layer_input, h_n, c_n, record


def backward(record: StackRecord, d_out, dh_n, dc_n):
    """Differentiate one forward. Returns ``dx, dh0, dc0, grads`` (grads: parameter name ->
    gradient; both biases of a layer share one array, as they enter the gates as one sum).
    None for d_out, dh_n or dc_n means zeros. Reads the record, never changes it."""
    spec, backend = record.spec, record.backend
    xp = backend.xp
    hidden = spec.hidden_size
    if d_out is None:
        d_out = xp.zeros((record.num_steps, record.batch, spec.output_size), dtype=spec.dtype)
    dh_n = _zeros_state(spec, xp, record.batch) if dh_n is None else dh_n
    dc_n = _zeros_state(spec, xp, record.batch) if dc_n is None else dc_n
    grads = {}
    dh0, dc0 = xp.empty_like(dh_n), xp.empty_like(dc_n)
    for layer in reversed(range(spec.num_layers)):
        d_input = None
        for direction in range(spec.num_directions):
            k = layer * spec.num_directions + direction
            dy_part = xp.ascontiguousarray(d_out[:, :, direction * hidden : (direction + 1) * hidden])
            dx, dh0[k], dc0[k], dw_ih, dw_hh, dbias = backend.backward_sequence(
                record.saved[layer][direction], dy_part, dh_n[k], dc_n[k]
            )
            d_input = dx if d_input is None else d_input + dx
            names = spec.names(layer, direction)
            grads[names[0]], grads[names[1]] = dw_ih, dw_hh
            if spec.bias:
                grads[names[2]] = grads[names[3]] = dbias
        if record.masks[layer] is not None:
            d_input = d_input * record.masks[layer]
        d_out = d_input
    return d_out, dh0, dc0, grads
