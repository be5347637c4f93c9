"""fastlstm for PyTorch: ``fastlstm.torch.LSTM`` and ``GRU``, drop-ins for ``torch.nn.LSTM``
and ``torch.nn.GRU``.

    from fastlstm.torch import LSTM, GRU     # instead of torch.nn.LSTM / GRU
    lstm = LSTM(128, 256, num_layers=2, batch_first=True)
    output, (h_n, c_n) = lstm(x)             # x: Tensor or PackedSequence, as nn.LSTM
    output, h_n = GRU(128, 256)(x)           # as nn.GRU

Parameters are ``nn.Parameter``s with torch's names, shapes, order and initialisation, so
``state_dict``s load both ways and optimizers, DDP, ``torch.compile`` and
``torch.func.functional_call`` see an ordinary module. The work runs in registered ops
(``torch.ops.fastlstm.lstm`` / ``gru``, ``fastlstm._torch_ops``): CPU tensors on the numba
backend (numpy without Numba), CUDA tensors on cupy, unless ``backend=`` (or fastlstm's
``use_backend`` / ``set_backend``) says otherwise.

What differs from torch's modules: ``proj_size > 0`` is refused; parameters must be
float32 or float64 (under ``torch.autocast`` the layer runs in float32, or float64 for a
float64 model, and returns that dtype); dropout masks come from torch's RNG but are drawn
over the padded (T, B) grid, so with a PackedSequence they differ from torch's; double
backward is not supported; the GRU also takes ``reset_after=False`` (Cho et al.'s cell,
which torch does not have).

Importing this module imports torch; ``import fastlstm`` alone does not.
"""

from __future__ import annotations

import math
import numbers
import warnings

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from . import registry
from . import _torch_ops as ops
from .cells import LSTM_CELL, GRUCell
from .stack import StackSpec

__all__ = ["GRU", "LSTM"]

_NUMPY_DTYPES = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)}
_SUPPORTED_DTYPES = tuple(_NUMPY_DTYPES)


def _check_dtype(dtype, what: str) -> None:
    if dtype not in _SUPPORTED_DTYPES:
        raise TypeError(
            f"{what}: fastlstm runs in torch.float32 or torch.float64, got {dtype}. For mixed "
            "precision keep the module in float32 and use torch.autocast (the layer then runs in "
            "float32)"
        )


def _autocast_on(device_type: str) -> bool:
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


class _RecurrentModule(nn.Module):
    """What ``LSTM`` and ``GRU`` share: arguments, parameters, input and state checks as
    torch's (exception types and messages), PackedSequence, unbatched and empty input,
    dropout masks, autocast, and the call into the cell's op. A subclass names its cell
    and how its state looks to the caller ((h, c) or h)."""

    _cell = None  # cells.LSTM_CELL / GRUCell
    _torch_module = None  # nn.LSTM / nn.GRU

    def __init__(self, cell, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, proj_size=0, device=None, dtype=None, backend=None):
        super().__init__()
        mode = cell.name.upper()
        # torch's checks, exception types and messages.
        if not isinstance(dropout, numbers.Number) or isinstance(dropout, bool) or not 0 <= dropout <= 1:
            raise ValueError(
                "dropout should be a number in range [0, 1] representing the probability of an element being zeroed"
            )
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                "dropout option adds dropout after all but last recurrent layer, so non-zero dropout expects "
                f"num_layers greater than 1, but got dropout={dropout} and num_layers={num_layers}",
                stacklevel=3,
            )
        for name, value in (("bias", bias), ("batch_first", batch_first), ("bidirectional", bidirectional)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} should be of type bool, got: {type(value).__name__}")
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers),
                            ("proj_size", proj_size)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} should be of type int, got: {type(value).__name__}")
        if input_size <= 0:
            raise ValueError("input_size must be greater than zero")
        if hidden_size <= 0:
            raise ValueError("hidden_size must be greater than zero")
        if num_layers <= 0:
            raise ValueError("num_layers must be greater than zero")
        if proj_size < 0:
            raise ValueError("proj_size should be a positive integer or zero to disable projections")
        if proj_size > 0:
            raise ValueError(
                f"proj_size={proj_size}: fastlstm.torch.{mode} has no projections (LSTMP). Use "
                "torch.nn.LSTM(..., proj_size=...) for that, or follow this layer with an "
                "nn.Linear(hidden_size, proj_size) on its output (not the same model: the projection "
                "would not feed back into the recurrence)"
            )
        factory = {"device": device, "dtype": dtype if dtype is not None else torch.get_default_dtype()}
        _check_dtype(factory["dtype"], "dtype")
        self.backend = None if backend is None else registry._check_name(backend)
        self._cell = cell
        self.mode = mode
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.bidirectional = bias, batch_first, bidirectional
        self.dropout = float(dropout)
        self.proj_size = 0
        directions = 2 if bidirectional else 1
        # The parameters, registered in torch's order (the order reset_parameters draws in).
        spec = StackSpec(input_size, hidden_size, num_layers, directions, bias, _NUMPY_DTYPES[factory["dtype"]], cell)
        self._flat_weights_names = list(spec.parameter_names)
        self._all_weights = [
            list(spec.names(layer, direction)) for layer in range(num_layers) for direction in range(directions)
        ]
        for name, shape in spec.parameter_shapes().items():
            self.register_parameter(name, nn.Parameter(torch.empty(shape, **factory)))
        self.reset_parameters()

    # -- torch's surface --------------------------------------------------------------
    def reset_parameters(self) -> None:
        """torch's initialisation: every parameter ~ U(-1/sqrt(H), 1/sqrt(H))."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    @property
    def all_weights(self) -> list:
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    @property
    def _flat_weights(self) -> list:
        return [getattr(self, name) for name in self._flat_weights_names]

    def flatten_parameters(self) -> None:
        """A no-op: there is no flat cuDNN weight buffer to compact."""

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        for name, default in self._repr_defaults():
            if getattr(self, name) != default:
                s += f", {name}={getattr(self, name)}"
        if self.backend is not None:
            s += f", backend={self.backend!r}"
        return s

    def _repr_defaults(self) -> tuple:
        return (("num_layers", 1), ("bias", True), ("batch_first", False), ("dropout", 0.0), ("bidirectional", False))

    @classmethod
    def _check_torch_module(cls, module) -> None:
        if not isinstance(module, cls._torch_module):
            raise TypeError(f"module: expected a torch.nn.{cls._torch_module.__name__}, got {type(module).__name__}")
        if getattr(module, "proj_size", 0):
            raise ValueError(f"module: proj_size={module.proj_size} (LSTMP) is not supported by fastlstm.torch")

    @classmethod
    def _copy(cls, module, backend, **extra):
        weight = module.weight_ih_l0
        copy = cls(module.input_size, module.hidden_size, num_layers=module.num_layers, bias=module.bias,
                   batch_first=module.batch_first, dropout=module.dropout, bidirectional=module.bidirectional,
                   device=weight.device, dtype=weight.dtype, backend=backend, **extra)
        copy.load_state_dict(module.state_dict())
        return copy.train(module.training)

    # -- forward ----------------------------------------------------------------------
    def forward(self, input, hx=None):
        """``(output, state_n)`` exactly as torch's ``forward``: input (T, B, I), (B, T, I) with
        batch_first, unbatched (T, I), or a PackedSequence (then output is one too)."""
        weights = self._flat_weights
        if isinstance(input, PackedSequence):
            return self._forward_packed(input, hx, weights)
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"input: expected a Tensor or a PackedSequence, got {type(input).__name__}")
        if input.dim() not in (2, 3):
            raise ValueError(f"{self.mode}: Expected input to be 2D or 3D, got {input.dim()}D instead")
        batched = input.dim() == 3
        batch_dim = 0 if self.batch_first else 1
        if not batched:
            input = input.unsqueeze(batch_dim)
        states = None if hx is None else self._states_in(hx, batched)
        self._check_input(input, weights, expected_dim=3)
        x = input.transpose(0, 1) if self.batch_first else input
        num_steps, batch = x.shape[0], x.shape[1]
        states = self._initial_states(states, x, batch)
        if num_steps == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        if batch == 0:  # nothing to run: zeros shaped as torch's, still in the graph
            connected = x.sum() * 0 + sum(w.sum() for w in weights) * 0
            directions = 2 if self.bidirectional else 1
            output = x.new_zeros((num_steps, 0, directions * self.hidden_size)) + connected
            finals = tuple(s * 0 + connected for s in states)
        else:
            output, *finals = self._run(x, states, weights, None)
        if self.batch_first:
            output = output.transpose(0, 1)
        if not batched:
            output = output.squeeze(batch_dim)
            finals = tuple(s.squeeze(1) for s in finals)
        return output, self._states_out(tuple(finals))

    def _forward_packed(self, packed: PackedSequence, hx, weights):
        data, batch_sizes, sorted_indices, unsorted_indices = packed
        self._check_input(data, weights, expected_dim=2)
        # Padded in the packed (sorted) batch order: no sorting of the data either way.
        padded, lengths = torch._VF._pad_packed_sequence(data, batch_sizes, False, 0.0, batch_sizes.size(0))
        states = None if hx is None else self._states_in(hx, batched=True, check_dims=False)
        states = self._initial_states(states, padded, padded.shape[1])
        if sorted_indices is not None:
            states = tuple(s.index_select(1, sorted_indices) for s in states)
        output, *finals = self._run(padded, states, weights, lengths)
        out_data, _ = torch._VF._pack_padded_sequence(output, lengths, False)
        if unsorted_indices is not None:
            finals = [s.index_select(1, unsorted_indices) for s in finals]
        return PackedSequence(out_data, batch_sizes, sorted_indices, unsorted_indices), self._states_out(tuple(finals))

    def _run(self, x, states, weights, lengths):
        """The cell's op on time-major x (T, B, I) with B, T >= 1: ``output, *states_n``."""
        x, states = self._autocast_inputs(x, states, weights[0].dtype)
        masks = self._dropout_masks(x)
        keep = torch.is_grad_enabled() and (
            x.requires_grad or any(s.requires_grad for s in states) or any(w.requires_grad for w in weights)
        )
        if len(states) == 2 and states[1] is states[0]:  # one tensor passed for both: distinct
            states = (states[0], states[1].clone())  # inputs, as torch.compile wants them
        return ops.RecurrentFunction.apply(
            self._cell.name, x, lengths, self.num_layers, self.bidirectional, self.bias, keep, self.backend or "",
            getattr(self._cell, "reset_after", False), len(masks), *states, *weights, *masks,
        )

    def _dropout_masks(self, x) -> list:
        """Inverted-dropout masks on every layer's input but the first, from torch's RNG
        (drawn as torch's CPU RNNs draw their own: bernoulli_ on a tensor like the layer output)."""
        if not (self.training and self.dropout > 0 and self.num_layers > 1):
            return []
        directions = 2 if self.bidirectional else 1
        shape = (x.shape[0], x.shape[1], directions * self.hidden_size)
        keep = 1.0 - self.dropout
        masks = []
        for _ in range(self.num_layers - 1):
            mask = x.new_empty(shape)
            masks.append(mask.zero_() if keep == 0 else mask.bernoulli_(keep).div_(keep))
        return masks

    @staticmethod
    def _autocast_inputs(x, states, dtype):
        """Under autocast, inputs in the parameters' dtype (the op runs in float32/float64)."""
        if _autocast_on(x.device.type):
            x, states = x.to(dtype), tuple(s.to(dtype) for s in states)
        return x, states

    # -- checks, as torch's (exception types and messages) ----------------------------
    def _check_input(self, input, weights, expected_dim: int) -> None:
        _check_dtype(weights[0].dtype, "parameters")
        if input.dtype != weights[0].dtype and not _autocast_on(input.device.type):
            raise ValueError(
                f"RNN input dtype ({input.dtype}) does not match weight dtype ({weights[0].dtype}). "
                f"Convert input: input.to({weights[0].dtype}), or convert model: model.to({input.dtype})"
            )
        if input.dim() != expected_dim:
            raise RuntimeError(f"input must have {expected_dim} dimensions, got {input.dim()}")
        if input.size(-1) != self.input_size:
            raise RuntimeError(
                f"input.size(-1) must be equal to input_size. Expected {self.input_size}, got {input.size(-1)}"
            )
        if input.device != weights[0].device:
            raise RuntimeError(
                f"input is on {input.device} but the {self.mode}'s parameters are on {weights[0].device}; "
                f"move one of them (input.to({str(weights[0].device)!r}) or model.to({str(input.device)!r}))"
            )

    def _initial_states(self, states, x, batch) -> tuple:
        """The states checked against (L*D, B, H), or zeros like torch's when None."""
        expected = ((2 if self.bidirectional else 1) * self.num_layers, batch, self.hidden_size)
        if states is None:
            zeros = torch.zeros(expected, dtype=x.dtype, device=x.device)
            return (zeros,) + tuple(zeros.clone() for _ in self._cell.state_parts[1:])
        for index, part in enumerate(states):
            if tuple(part.shape) != expected:
                raise RuntimeError(self._size_message(index, expected, list(part.shape)))
            if part.device != x.device:
                raise RuntimeError(f"hx[{index}] is on {part.device}, but the input is on {x.device}")
            if part.dtype != x.dtype and not _autocast_on(x.device.type):
                raise RuntimeError(f"hx[{index}]: expected dtype {x.dtype} (the input's), got {part.dtype}")
        return states


class LSTM(_RecurrentModule):
    """``torch.nn.LSTM``'s interface and semantics, run by fastlstm's kernels.

    Arguments as ``nn.LSTM`` (``proj_size`` only 0), plus ``backend``: None follows
    fastlstm's choice in effect (by the tensors' device under 'auto'), or one of 'numpy',
    'numba', 'cupy' ('numpy'/'numba' with CUDA tensors, or 'cupy' with CPU tensors, work
    through copies to the other device and back).
    """

    _torch_module = nn.LSTM

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, proj_size=0, device=None, dtype=None, backend=None):
        super().__init__(LSTM_CELL, input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         proj_size, device, dtype, backend)

    @classmethod
    def from_torch(cls, module: nn.LSTM, backend=None) -> "LSTM":
        """A fastlstm copy of a ``torch.nn.LSTM``: same configuration, device, dtype, mode
        and weights (copied, not shared)."""
        cls._check_torch_module(module)
        return cls._copy(module, backend)

    @staticmethod
    def _states_in(hx, batched: bool, check_dims: bool = True) -> tuple:
        if not isinstance(hx, (tuple, list)) or len(hx) != 2 or not all(isinstance(h, torch.Tensor) for h in hx):
            raise TypeError(f"hx: expected a tuple (h_0, c_0) of two tensors, got {type(hx).__name__}")
        if not check_dims:
            return tuple(hx)
        want = 3 if batched else 2
        if hx[0].dim() != want or hx[1].dim() != want:
            raise RuntimeError(
                f"For {'batched 3-D' if batched else 'unbatched 2-D'} input, hx and cx should also be "
                f"{want}-D but got ({hx[0].dim()}-D, {hx[1].dim()}-D) tensors"
            )
        return tuple(hx) if batched else (hx[0].unsqueeze(1), hx[1].unsqueeze(1))

    @staticmethod
    def _states_out(states: tuple):
        return states[0], states[1]

    @staticmethod
    def _size_message(index, expected, got) -> str:
        return f"Expected hidden[{index}] size {expected}, got {got}"


class GRU(_RecurrentModule):
    """``torch.nn.GRU``'s interface and semantics, run by fastlstm's kernels.

    Arguments as ``nn.GRU``, plus ``backend`` (as ``LSTM``'s) and ``reset_after``: True is
    torch's cell; False is Cho et al.'s, ``n = tanh(W_in x + b_in + W_hn (r * h) + b_hn)``,
    which torch does not have (``fastlstm.GRU``'s docstring).
    """

    _torch_module = nn.GRU

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, device=None, dtype=None, backend=None, reset_after=True):
        if not isinstance(reset_after, bool):
            raise TypeError(f"reset_after should be of type bool, got: {type(reset_after).__name__}")
        super().__init__(GRUCell(reset_after), input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, 0, device, dtype, backend)
        self.reset_after = reset_after

    def _repr_defaults(self) -> tuple:
        return super()._repr_defaults() + (("reset_after", True),)

    @classmethod
    def from_torch(cls, module: nn.GRU, backend=None) -> "GRU":
        """A fastlstm copy of a ``torch.nn.GRU``: same configuration, device, dtype, mode and
        weights (copied, not shared)."""
        cls._check_torch_module(module)
        return cls._copy(module, backend)

    @staticmethod
    def _states_in(hx, batched: bool, check_dims: bool = True) -> tuple:
        if not isinstance(hx, torch.Tensor):
            raise TypeError(f"hx: expected a tensor h_0 (a GRU has no cell state), got {type(hx).__name__}")
        if not check_dims:
            return (hx,)
        if batched and hx.dim() != 3:
            raise RuntimeError(f"For batched 3-D input, hx should also be 3-D but got {hx.dim()}-D tensor")
        if not batched and hx.dim() != 2:
            raise RuntimeError(f"For unbatched 2-D input, hx should also be 2-D but got {hx.dim()}-D tensor")
        return (hx,) if batched else (hx.unsqueeze(1),)

    @staticmethod
    def _states_out(states: tuple):
        return states[0]

    @staticmethod
    def _size_message(index, expected, got) -> str:
        return f"Expected hidden size {expected}, got {got}"
