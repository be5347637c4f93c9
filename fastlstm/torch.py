"""fastlstm for PyTorch: ``fastlstm.torch.LSTM``, a drop-in for ``torch.nn.LSTM``.

    from fastlstm.torch import LSTM          # instead of torch.nn.LSTM
    lstm = LSTM(128, 256, num_layers=2, batch_first=True)
    output, (h_n, c_n) = lstm(x)             # x: Tensor or PackedSequence, as nn.LSTM

Parameters are ``nn.Parameter``s with ``nn.LSTM``'s names, shapes, order and
initialisation, so ``state_dict``s load both ways and optimizers, DDP, ``torch.compile`` and
``torch.func.functional_call`` see an ordinary module. The work runs in one registered op
(``torch.ops.fastlstm.lstm``, ``fastlstm._torch_ops``): CPU tensors on the numba backend
(numpy without Numba), CUDA tensors on cupy, unless ``backend=`` (or fastlstm's
``use_backend`` / ``set_backend``) says otherwise.

What differs from ``nn.LSTM``: ``proj_size > 0`` is refused; parameters must be float32 or
float64 (under ``torch.autocast`` the LSTM runs in float32, or float64 for a float64 model,
and returns that dtype); dropout masks come from torch's RNG but are drawn over the padded
(T, B) grid, so with a PackedSequence they differ from nn.LSTM's; double backward is not
supported.

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
from .stack import StackSpec

__all__ = ["LSTM"]

_NUMPY_DTYPES = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)}
_SUPPORTED_DTYPES = tuple(_NUMPY_DTYPES)


def _check_dtype(dtype, what: str) -> None:
    if dtype not in _SUPPORTED_DTYPES:
        raise TypeError(
            f"{what}: fastlstm runs in torch.float32 or torch.float64, got {dtype}. For mixed "
            "precision keep the module in float32 and use torch.autocast (the LSTM then runs in "
            "float32)"
        )


def _autocast_on(device_type: str) -> bool:
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


class LSTM(nn.Module):
    """``torch.nn.LSTM``'s interface and semantics, run by fastlstm's kernels.

    Arguments as ``nn.LSTM`` (``proj_size`` only 0), plus ``backend``: None follows
    fastlstm's choice in effect (by the tensors' device under 'auto'), or one of 'numpy',
    'numba', 'cupy' ('numpy'/'numba' with CUDA tensors, or 'cupy' with CPU tensors, work
    through copies to the other device and back).
    """

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, proj_size=0, device=None, dtype=None, backend=None):
        super().__init__()
        # nn.LSTM's checks, exception types and messages.
        if not isinstance(dropout, numbers.Number) or isinstance(dropout, bool) or not 0 <= dropout <= 1:
            raise ValueError(
                "dropout should be a number in range [0, 1] representing the probability of an element being zeroed"
            )
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                "dropout option adds dropout after all but last recurrent layer, so non-zero dropout expects "
                f"num_layers greater than 1, but got dropout={dropout} and num_layers={num_layers}",
                stacklevel=2,
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
                f"proj_size={proj_size}: fastlstm.torch.LSTM has no projections (LSTMP). Use "
                "torch.nn.LSTM(..., proj_size=...) for that, or follow this LSTM with an "
                "nn.Linear(hidden_size, proj_size) on its output (not the same model: the projection "
                "would not feed back into the recurrence)"
            )
        factory = {"device": device, "dtype": dtype if dtype is not None else torch.get_default_dtype()}
        _check_dtype(factory["dtype"], "dtype")
        self.backend = None if backend is None else registry._check_name(backend)
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.bidirectional = bias, batch_first, bidirectional
        self.dropout = float(dropout)
        self.proj_size = 0
        self.mode = "LSTM"
        directions = 2 if bidirectional else 1
        # The parameters, registered in nn.LSTM's order (the order reset_parameters draws in).
        spec = StackSpec(input_size, hidden_size, num_layers, directions, bias, _NUMPY_DTYPES[factory["dtype"]])
        self._flat_weights_names = list(spec.parameter_shapes())
        self._all_weights = [
            list(spec.names(layer, direction)) for layer in range(num_layers) for direction in range(directions)
        ]
        for name, shape in spec.parameter_shapes().items():
            self.register_parameter(name, nn.Parameter(torch.empty(shape, **factory)))
        self.reset_parameters()

    # -- nn.LSTM's surface ------------------------------------------------------------
    def reset_parameters(self) -> None:
        """nn.LSTM's initialisation: every parameter ~ U(-1/sqrt(H), 1/sqrt(H))."""
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
        for name, default in (("num_layers", 1), ("bias", True), ("batch_first", False), ("dropout", 0.0),
                              ("bidirectional", False)):
            if getattr(self, name) != default:
                s += f", {name}={getattr(self, name)}"
        if self.backend is not None:
            s += f", backend={self.backend!r}"
        return s

    @classmethod
    def from_torch(cls, module: nn.LSTM, backend=None) -> "LSTM":
        """A fastlstm copy of a ``torch.nn.LSTM``: same configuration, device, dtype, mode
        and weights (copied, not shared)."""
        if not isinstance(module, nn.LSTM):
            raise TypeError(f"module: expected a torch.nn.LSTM, got {type(module).__name__}")
        if module.proj_size:
            raise ValueError(f"module: proj_size={module.proj_size} (LSTMP) is not supported by fastlstm.torch.LSTM")
        weight = module.weight_ih_l0
        copy = cls(module.input_size, module.hidden_size, num_layers=module.num_layers, bias=module.bias,
                   batch_first=module.batch_first, dropout=module.dropout, bidirectional=module.bidirectional,
                   device=weight.device, dtype=weight.dtype, backend=backend)
        copy.load_state_dict(module.state_dict())
        return copy.train(module.training)

    # -- forward ----------------------------------------------------------------------
    def forward(self, input, hx=None):
        """``(output, (h_n, c_n))`` exactly as ``nn.LSTM.forward``: input (T, B, I), (B, T, I)
        with batch_first, unbatched (T, I), or a PackedSequence (then output is one too)."""
        weights = self._flat_weights
        directions = 2 if self.bidirectional else 1
        num_states = self.num_layers * directions
        if isinstance(input, PackedSequence):
            return self._forward_packed(input, hx, weights, num_states)
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"input: expected a Tensor or a PackedSequence, got {type(input).__name__}")
        if input.dim() not in (2, 3):
            raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
        batched = input.dim() == 3
        batch_dim = 0 if self.batch_first else 1
        if not batched:
            input = input.unsqueeze(batch_dim)
        if hx is not None:
            hx = self._check_hx_pair(hx)
            want = 3 if batched else 2
            if hx[0].dim() != want or hx[1].dim() != want:
                raise RuntimeError(
                    f"For {'batched 3-D' if batched else 'unbatched 2-D'} input, hx and cx should also be "
                    f"{want}-D but got ({hx[0].dim()}-D, {hx[1].dim()}-D) tensors"
                )
            if not batched:
                hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        self._check_input(input, weights, expected_dim=3)
        x = input.transpose(0, 1) if self.batch_first else input
        num_steps, batch = x.shape[0], x.shape[1]
        hx = self._initial_state(hx, x, num_states, batch)
        if num_steps == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        if batch == 0:  # nothing to run: zeros shaped as nn.LSTM's, still in the graph
            connected = x.sum() * 0 + sum(w.sum() for w in weights) * 0
            output = x.new_zeros((num_steps, 0, directions * self.hidden_size)) + connected
            h_n, c_n = hx[0] * 0 + connected, hx[1] * 0 + connected
        else:
            output, h_n, c_n = self._run(x, hx, weights, None)
        if self.batch_first:
            output = output.transpose(0, 1)
        if not batched:
            output = output.squeeze(batch_dim)
            h_n, c_n = h_n.squeeze(1), c_n.squeeze(1)
        return output, (h_n, c_n)

    def _forward_packed(self, packed: PackedSequence, hx, weights, num_states):
        data, batch_sizes, sorted_indices, unsorted_indices = packed
        self._check_input(data, weights, expected_dim=2)
        # Padded in the packed (sorted) batch order: no sorting of the data either way.
        padded, lengths = torch._VF._pad_packed_sequence(data, batch_sizes, False, 0.0, batch_sizes.size(0))
        batch = padded.shape[1]
        if hx is not None:
            hx = self._check_hx_pair(hx)
        hx = self._initial_state(hx, padded, num_states, batch)
        if sorted_indices is not None:
            hx = (hx[0].index_select(1, sorted_indices), hx[1].index_select(1, sorted_indices))
        output, h_n, c_n = self._run(padded, hx, weights, lengths)
        out_data, _ = torch._VF._pack_padded_sequence(output, lengths, False)
        if unsorted_indices is not None:
            h_n, c_n = h_n.index_select(1, unsorted_indices), c_n.index_select(1, unsorted_indices)
        return PackedSequence(out_data, batch_sizes, sorted_indices, unsorted_indices), (h_n, c_n)

    def _run(self, x, hx, weights, lengths):
        """The op on time-major x (T, B, I) with B, T >= 1."""
        x, hx = self._autocast_inputs(x, hx, weights[0].dtype)
        masks = self._dropout_masks(x)
        keep = torch.is_grad_enabled() and (
            x.requires_grad or hx[0].requires_grad or hx[1].requires_grad or any(w.requires_grad for w in weights)
        )
        h0, c0 = hx
        if c0 is h0:  # one tensor passed for both: distinct inputs, as torch.compile wants them
            c0 = c0.clone()
        return ops.LSTMFunction.apply(
            x, h0, c0, lengths, self.num_layers, self.bidirectional, self.bias, keep, self.backend or "",
            len(masks), *weights, *masks,
        )

    def _dropout_masks(self, x) -> list:
        """Inverted-dropout masks on every layer's input but the first, from torch's RNG
        (drawn as torch's CPU LSTM draws its own: bernoulli_ on a tensor like the layer output)."""
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
    def _autocast_inputs(x, hx, dtype):
        """Under autocast, inputs in the parameters' dtype (the op runs in float32/float64)."""
        if _autocast_on(x.device.type):
            x, hx = x.to(dtype), (hx[0].to(dtype), hx[1].to(dtype))
        return x, hx

    # -- checks, as nn.LSTM's (exception types and messages) --------------------------
    @staticmethod
    def _check_hx_pair(hx):
        if not isinstance(hx, (tuple, list)) or len(hx) != 2 or not all(isinstance(h, torch.Tensor) for h in hx):
            raise TypeError(f"hx: expected a tuple (h_0, c_0) of two tensors, got {type(hx).__name__}")
        return tuple(hx)

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
                f"input is on {input.device} but the LSTM's parameters are on {weights[0].device}; "
                f"move one of them (input.to({str(weights[0].device)!r}) or model.to({str(input.device)!r}))"
            )

    def _initial_state(self, hx, x, num_states, batch):
        """hx checked against (L*D, B, H), or zeros like nn.LSTM's when None."""
        expected = (num_states, batch, self.hidden_size)
        if hx is None:
            zeros = torch.zeros(expected, dtype=x.dtype, device=x.device)
            return zeros, zeros.clone()
        for index, part in enumerate(hx):
            if tuple(part.shape) != expected:
                raise RuntimeError(f"Expected hidden[{index}] size {expected}, got {list(part.shape)}")
            if part.device != x.device:
                raise RuntimeError(f"hx[{index}] is on {part.device}, but the input is on {x.device}")
            if part.dtype != x.dtype and not _autocast_on(x.device.type):
                raise RuntimeError(f"hx[{index}]: expected dtype {x.dtype} (the input's), got {part.dtype}")
        return hx
