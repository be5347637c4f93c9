"""fastlstm's layers as registered torch ops: ``torch.ops.fastlstm.lstm`` and its backward.

The GRU has its pair too (``fastlstm.gru``, ``fastlstm.gru_backward``); both pairs run the
one stack (``fastlstm.stack``) with their cell. All are ``torch.library.custom_op``s with
fake (meta) implementations, so that ``torch.compile(fullgraph=True)`` traces them without
a graph break. Autograd comes two ways, with one formula (``_gradients``):
``RecurrentFunction``, an ``autograd.Function`` around a cell's two ops, is what
``fastlstm.torch``'s modules call (dynamo traces it into the ops), and the same formula is
registered on the forward ops themselves (``register_autograd``) for callers of
``torch.ops.fastlstm.lstm`` / ``gru``. Why two: torch's generic custom-op autograd wrapper
flattens every argument with pytree on each call, which measured ~200 us more per
training step than the Function (stream-1, 2-core Zen 4), a tenth of a small model's step.
``fastlstm.torch`` builds the ``nn.Module``s on top; this module only runs the ops.

The ops are functional: every parameter comes in as a tensor on each call (time-major input,
states, weights in torch's order, optional lengths and dropout masks) and the stack
(``fastlstm.stack``) runs on views of them. What a backward needs (the backend's saved
activations, in the backend's own layout) cannot travel through a traced graph as Python
objects, so the forward returns a fourth output, a 0-d int64 CPU tensor, the *record
handle*: its memory owns the record (a NumPy array that ``torch.from_numpy`` keeps alive
holds it), and a weak table maps its value back to the record. The record lives exactly as
long as autograd keeps the handle (saved for backward) and goes with the graph; a second
backward with ``retain_graph=True`` finds it again, as a saved tensor would be.

Backends: an explicit ``backend`` runs that backend; "" follows fastlstm's choice in effect
(``use_backend``, ``set_backend``, ``FASTLSTM_BACKEND``) where "auto" means, by the input's
device, numba > numpy for CPU tensors and cupy for CUDA tensors. CPU tensors reach the host
backends as NumPy views; CUDA tensors reach cupy through DLPack, on torch's current stream,
with CuPy's allocations served by torch's caching allocator (``_cuda_context``).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import threading
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from . import _inputs, registry, stack
from ._arrays import resolve_dtype
from .cells import LSTM_CELL, GRUCell

_NAMESPACE = "fastlstm"

_COMMON = ("Tensor[] weights, Tensor? lengths, Tensor[] dropout_masks, int num_layers, bool bidirectional, "
           "bool has_biases, bool keep, str backend")
SCHEMAS = {
    "lstm": f"(Tensor input, Tensor hx, Tensor cx, {_COMMON}) -> (Tensor, Tensor, Tensor, Tensor)",
    "lstm_backward": ("(Tensor handle, Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, Tensor input, "
                      "Tensor[] weights) -> (Tensor, Tensor, Tensor, Tensor[])"),
    "gru": f"(Tensor input, Tensor hx, {_COMMON}, bool reset_after) -> (Tensor, Tensor, Tensor)",
    "gru_backward": ("(Tensor handle, Tensor grad_output, Tensor grad_h_n, Tensor input, Tensor[] weights) "
                     "-> (Tensor, Tensor, Tensor[])"),
}


# -- records behind handles -------------------------------------------------------------
class _RecordBox:
    """Holds one forward's record; kept alive only by its handle tensor's memory."""

    __slots__ = ("record", "backend", "__weakref__")

    def __init__(self, record, backend):
        self.record = record
        self.backend = backend


class _HandleArray(np.ndarray):
    """The handle's memory: a 0-d int64 array that also holds the record's box."""


_boxes: "weakref.WeakValueDictionary[int, _RecordBox]" = weakref.WeakValueDictionary()
_boxes_lock = threading.Lock()
_keys = itertools.count(1)
NO_RECORD = 0


def _handle_for(record, backend) -> torch.Tensor:
    if record is None:
        return torch.zeros((), dtype=torch.int64)
    box = _RecordBox(record, backend)
    key = next(_keys)
    array = np.array(key, dtype=np.int64).view(_HandleArray)
    array.box = box
    with _boxes_lock:
        _boxes[key] = box
    return torch.from_numpy(array)  # the tensor's storage keeps `array`, and so `box`, alive


def _box_for(handle: torch.Tensor) -> _RecordBox:
    key = int(handle)
    with _boxes_lock:
        box = _boxes.get(key)
    if box is None:
        why = (
            "the forward ran without keeping a record (no input required grad, or grad mode was off)"
            if key == NO_RECORD
            else "its record is gone (the autograd graph that held it was freed)"
        )
        raise RuntimeError(f"fastlstm: cannot differentiate this call: {why}")
    return box


def live_records() -> int:
    """How many forward records are alive (for tests and leak checks)."""
    with _boxes_lock:
        return len(_boxes)


# -- backends and data movement ----------------------------------------------------------
def resolve_backend(requested: str, device: torch.device):
    """The backend object for tensors on `device` ("" follows fastlstm's choice in effect)."""
    choice = registry._check_name(requested) if requested else registry.current_choice()
    if choice != "auto":
        return registry.backend_object(choice)
    return registry.backend_for_device("cuda" if device.type == "cuda" else "cpu")


@contextlib.contextmanager
def _cuda_context(backend, device: torch.device):
    """For cupy with CUDA tensors: the tensors' device, torch's current stream (no syncs
    between the two libraries), and torch's caching allocator for everything CuPy allocates
    (one memory pool, which torch's own tools see)."""
    if device.type != "cuda" or backend.name != "cupy":
        yield
        return
    cupy = backend.xp
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = torch.cuda.current_stream(index)
    with cupy.cuda.Device(index), cupy.cuda.ExternalStream(stream.cuda_stream, index), \
            cupy.cuda.using_allocator(_torch_allocator(cupy).malloc):
        yield


_allocators: dict = {}


def _torch_allocator(cupy):
    """A CuPy allocator that takes memory from torch's caching allocator on the current
    stream and gives it back there when CuPy frees it."""
    allocator = _allocators.get(id(cupy))
    if allocator is None:
        def malloc(size, device_id):
            if size == 0:
                return 0
            return torch.cuda.caching_allocator_alloc(size, device_id, torch.cuda.current_stream(device_id))

        def free(pointer, device_id):
            if pointer:
                torch.cuda.caching_allocator_delete(pointer)

        allocator = _allocators[id(cupy)] = cupy.cuda.PythonFunctionAllocator(malloc, free)
    return allocator


def _from_torch(backend, tensor: torch.Tensor, name: str):
    """A contiguous backend array on `tensor`'s memory (a copy only when it is strided or
    lives on the other side of the bus)."""
    if backend.xp is np and tensor.device.type == "cpu":  # the common case, without detours
        return np.ascontiguousarray(tensor.detach().numpy())
    return backend.xp.ascontiguousarray(backend.from_user(tensor.detach(), name))


def _to_torch(backend, array, like: torch.Tensor) -> torch.Tensor:
    """`array` as a tensor on `like`'s device (no copy where the memory is already there)."""
    if backend.xp is np and like.device.type == "cpu":
        return torch.from_numpy(array)
    return backend.to_user(array, like)


@functools.lru_cache(maxsize=64)
def _cached_spec(cell, input_size, hidden, num_layers, bidirectional, has_biases, dtype_name):
    spec = stack.StackSpec(input_size, hidden, num_layers, 2 if bidirectional else 1, has_biases,
                           resolve_dtype(dtype_name), cell)
    return spec, tuple(spec.parameter_shapes().items())


def _spec(cell, input_size, weights, num_layers, bidirectional, has_biases, dtype) -> stack.StackSpec:
    hidden = weights[1].shape[1] if len(weights) > 1 and weights[1].dim() == 2 else 0
    spec, shapes = _cached_spec(cell, int(input_size), int(hidden), int(num_layers), bool(bidirectional),
                                bool(has_biases), str(dtype).replace("torch.", ""))
    if hidden < 1 or len(weights) != len(shapes):
        raise ValueError(
            f"weights: expected {len(shapes) if hidden else 'the'} tensors in torch.nn.{cell.name.upper()}'s "
            f"order (weight_ih_l0, weight_hh_l0{', bias_ih_l0, bias_hh_l0' if has_biases else ''}, ...), "
            f"got {len(weights)}"
        )
    for (name, shape), weight in zip(shapes, weights):
        if tuple(weight.shape) != shape:
            raise ValueError(f"weights[{name}]: expected shape {shape}, got {tuple(weight.shape)}")
    return spec


def _check_float_tensors(dtype, **tensors) -> None:
    for name, tensor in tensors.items():
        if tensor.dtype != dtype:
            raise ValueError(f"{name}: expected dtype {dtype} (the input's), got {tensor.dtype}")


# -- the ops -----------------------------------------------------------------------------
def _stack_forward(cell, input, states, weights, lengths, dropout_masks, num_layers, bidirectional, has_biases,
                   keep, backend):
    """Every layer and direction of `cell` over a (T, B, I) time-major input. Returns
    ``[output (T, B, D*H), *states_n (L*D, B, H)], record handle``."""
    if input.dim() != 3 or input.shape[0] < 1 or input.shape[1] < 1:
        raise ValueError(f"input: expected (T, B, input_size) with T, B >= 1, got shape {tuple(input.shape)}")
    num_steps, batch, input_size = input.shape
    spec = _spec(cell, input_size, weights, num_layers, bidirectional, has_biases, input.dtype)
    labels = [f"{part}x" for part in cell.state_parts]  # hx, cx: torch's names
    _check_float_tensors(input.dtype, **dict(zip(labels, states)), **{f"weights[{i}]": w for i, w in enumerate(weights)})
    state_shape = (spec.num_states, batch, spec.hidden_size)
    for name, state in zip(labels, states):
        if tuple(state.shape) != state_shape:
            raise ValueError(f"{name}: expected shape {state_shape}, got {tuple(state.shape)}")
    mask_shapes = [s for s in spec.dropout_mask_shapes(num_steps, batch) if s is not None]
    if dropout_masks and [tuple(m.shape) for m in dropout_masks] != mask_shapes:
        raise ValueError(
            f"dropout_masks: expected none or {len(mask_shapes)} masks of shape "
            f"{mask_shapes[0] if mask_shapes else ()}, got shapes {[tuple(m.shape) for m in dropout_masks]}"
        )
    chosen = resolve_backend(backend, input.device)
    layout = _inputs.Layout(num_steps, batch, False, False)
    with _cuda_context(chosen, input.device):
        step_lengths = None if lengths is None else _inputs.sequence_lengths(chosen, lengths.detach().cpu(), layout)
        x = _from_torch(chosen, input, "input")
        states0 = tuple(_from_torch(chosen, state, name) for name, state in zip(labels, states))
        params = {name: _from_torch(chosen, w, name) for name, w in zip(spec.parameter_names, weights)}
        masks = [None] + [_from_torch(chosen, m, "dropout_masks") for m in dropout_masks] if dropout_masks else None
        y, finals, record = stack.forward(spec, chosen, params, x, states0, step_lengths, masks, keep)
        outputs = [_to_torch(chosen, a, input) for a in (y, *finals)]
    return outputs, _handle_for(record, chosen)


def _stack_backward(handle, grad_output, grad_states, input, weights):
    """Gradients of one recorded call: ``[d input, *d states], [d weights]`` (in the order of
    ``weights``). The record is read, not used up (retain_graph works)."""
    box = _box_for(handle)
    chosen, cell = box.backend, box.record.spec.cell
    if len(cell.state_parts) != len(grad_states):
        raise ValueError(f"handle: the record belongs to a fastlstm::{cell.name} call, not to this op's cell")
    with _cuda_context(chosen, input.device):
        d_out = _from_torch(chosen, grad_output, "grad_output")
        dstates_n = tuple(_from_torch(chosen, g, "grad_state") for g in grad_states)
        d_input, dstates0, grads = stack.backward(box.record, d_out, dstates_n)
        seen = set()
        d_weights = []
        for name, like in zip(box.record.spec.parameter_names, weights):
            grad = grads[name]
            if id(grad) in seen:  # an LSTM's biases share one array: outputs must not alias
                grad = grad.copy()
            seen.add(id(grad))
            d_weights.append(_to_torch(chosen, grad, like))
        outputs = [_to_torch(chosen, a, input) for a in (d_input, *dstates0)]
    return outputs, d_weights


def _lstm_impl(input, hx, cx, weights, lengths, dropout_masks, num_layers, bidirectional, has_biases, keep,
               backend):
    """``output, h_n, c_n, record handle``."""
    outputs, handle = _stack_forward(LSTM_CELL, input, (hx, cx), weights, lengths, dropout_masks, num_layers,
                                     bidirectional, has_biases, keep, backend)
    return (*outputs, handle)


def _lstm_backward_impl(handle, grad_output, grad_h_n, grad_c_n, input, weights):
    """``d input, d hx, d cx, [d weights]``."""
    outputs, d_weights = _stack_backward(handle, grad_output, (grad_h_n, grad_c_n), input, weights)
    return (*outputs, d_weights)


def _gru_impl(input, hx, weights, lengths, dropout_masks, num_layers, bidirectional, has_biases, keep, backend,
              reset_after):
    """``output, h_n, record handle``."""
    outputs, handle = _stack_forward(GRUCell(reset_after), input, (hx,), weights, lengths, dropout_masks, num_layers,
                                     bidirectional, has_biases, keep, backend)
    return (*outputs, handle)


def _gru_backward_impl(handle, grad_output, grad_h_n, input, weights):
    """``d input, d hx, [d weights]``."""
    outputs, d_weights = _stack_backward(handle, grad_output, (grad_h_n,), input, weights)
    return (*outputs, d_weights)


def _define(name, impl):
    return torch.library.custom_op(f"{_NAMESPACE}::{name}", mutates_args=(), schema=SCHEMAS[name])(impl)


lstm = _define("lstm", _lstm_impl)
lstm_backward = _define("lstm_backward", _lstm_backward_impl)
gru = _define("gru", _gru_impl)
gru_backward = _define("gru_backward", _gru_backward_impl)


def _handle_fake():
    return torch.empty((), dtype=torch.int64, device="cpu")


def _output_fake(input, weights, bidirectional):
    return input.new_empty((input.shape[0], input.shape[1], (2 if bidirectional else 1) * weights[1].shape[1]))


@lstm.register_fake
def _lstm_fake(input, hx, cx, weights, lengths, dropout_masks, num_layers, bidirectional, has_biases, keep,
               backend):
    return _output_fake(input, weights, bidirectional), hx.new_empty(hx.shape), cx.new_empty(cx.shape), _handle_fake()


@lstm_backward.register_fake
def _lstm_backward_fake(handle, grad_output, grad_h_n, grad_c_n, input, weights):
    return (input.new_empty(input.shape), grad_h_n.new_empty(grad_h_n.shape), grad_c_n.new_empty(grad_c_n.shape),
            [w.new_empty(w.shape) for w in weights])


@gru.register_fake
def _gru_fake(input, hx, weights, lengths, dropout_masks, num_layers, bidirectional, has_biases, keep, backend,
              reset_after):
    return _output_fake(input, weights, bidirectional), hx.new_empty(hx.shape), _handle_fake()


@gru_backward.register_fake
def _gru_backward_fake(handle, grad_output, grad_h_n, input, weights):
    return input.new_empty(input.shape), grad_h_n.new_empty(grad_h_n.shape), [w.new_empty(w.shape) for w in weights]


# -- autograd ----------------------------------------------------------------------------
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _dispatch_stack_depth() -> int:
    depth = getattr(torch._C, "_len_torch_dispatch_stack", None)  # private: unknown means "not empty"
    return depth() if depth is not None else 1


def _direct(*tensors) -> bool:
    """Whether an eager call may run the implementation itself rather than through the
    dispatcher (~60 us less a call, measured): only when nothing needs to see the op --
    no tracing (dynamo, export), no dispatch mode (fake tensors, flop counters), plain
    tensors on a real device (no subclasses, no meta tensors)."""
    if torch.compiler.is_compiling() or _dispatch_stack_depth() > 0:
        return False
    return all(type(t) in _PLAIN and t.device.type in ("cpu", "cuda") for t in tensors)


@dataclass(frozen=True)
class _Ops:
    """A cell's pair of ops and their implementations (the direct path)."""

    forward: object
    backward: object
    forward_impl: object
    backward_impl: object
    num_states: int  # hx, cx / hx
    num_options: int  # the non-tensor arguments after the dropout masks


OPS = {
    "lstm": _Ops(lstm, lstm_backward, _lstm_impl, _lstm_backward_impl, 2, 5),
    "gru": _Ops(gru, gru_backward, _gru_impl, _gru_backward_impl, 1, 6),
}


def _gradients(ops: _Ops, handle, output_shape, input, states, weights, grad_output, grad_states):
    """The one backward formula: ``d input, [d states], [d weights]`` through the cell's
    backward op. Outputs autograd left without a gradient (None) count as zeros."""
    if grad_output is None:
        grad_output = input.new_zeros(output_shape)
    grad_states = [torch.zeros_like(s) if g is None else g for s, g in zip(states, grad_states)]
    direct = not torch.is_grad_enabled() and _direct(grad_output, *grad_states, input, *weights)
    run = ops.backward_impl if direct else ops.backward  # with grad on: double backward's error
    results = run(handle, grad_output, *grad_states, input, weights)
    return results[0], list(results[1:-1]), results[-1]


class RecurrentFunction(torch.autograd.Function):
    """A cell's op with its gradient, as fastlstm.torch's modules call it (module docstring:
    why a Function). ``apply(cell, input, lengths, num_layers, bidirectional, has_biases, keep,
    backend, extra, num_masks, *states_weights_masks)`` returns ``output, *states_n``;
    ``cell`` is "lstm" or "gru" and ``extra`` the GRU's reset_after (ignored for the LSTM)."""

    @staticmethod
    def forward(ctx, cell, input, lengths, num_layers, bidirectional, has_biases, keep, backend, extra, num_masks,
                *tensors):
        ops = OPS[cell]
        states = list(tensors[: ops.num_states])
        weights = list(tensors[ops.num_states : len(tensors) - num_masks])
        masks = list(tensors[len(tensors) - num_masks :])
        run = ops.forward_impl if _direct(input, *tensors) else ops.forward
        args = (input, *states, weights, lengths, masks, num_layers, bidirectional, has_biases, keep, backend)
        results = run(*args, extra) if cell == "gru" else run(*args)
        handle = results[-1]
        # The tensors the record was made from are saved as well, so that autograd's version
        # counters catch an in-place change between forward and backward, as for nn.LSTM.
        ctx.save_for_backward(handle, input, *states, *weights)
        ctx.cell, ctx.num_states, ctx.num_masks = cell, ops.num_states, num_masks
        ctx.output_shape = results[0].shape
        return tuple(results[:-1])

    @staticmethod
    def backward(ctx, grad_output, *grad_states):
        handle, input, *rest = ctx.saved_tensors
        states, weights = rest[: ctx.num_states], rest[ctx.num_states :]
        d_input, d_states, d_weights = _gradients(
            OPS[ctx.cell], handle, ctx.output_shape, input, states, weights, grad_output, grad_states
        )
        return (None, d_input) + (None,) * 8 + tuple(d_states) + tuple(d_weights) + (None,) * ctx.num_masks


def _register_autograd(cell: str, num_states: int) -> None:
    """The same formula on the op itself, for callers of torch.ops.fastlstm.<cell>."""
    ops = OPS[cell]

    def setup(ctx, inputs, output):
        input, states, weights = inputs[0], inputs[1 : 1 + num_states], inputs[1 + num_states]
        ctx.save_for_backward(output[-1], input, *states, *weights)
        ctx.num_masks = len(inputs[3 + num_states])
        ctx.output_shape = output[0].shape

    def backward(ctx, grad_output, *grads):
        handle, input, *rest = ctx.saved_tensors
        states, weights = rest[:num_states], rest[num_states:]
        d_input, d_states, d_weights = _gradients(ops, handle, ctx.output_shape, input, states, weights,
                                                  grad_output, grads[:num_states])
        return (d_input, *d_states, d_weights, None, [None] * ctx.num_masks, *(None,) * ops.num_options)

    ops.forward.register_autograd(backward, setup_context=setup)
    ops.backward.register_autograd(_no_double_backward, setup_context=_setup_backward)


def _setup_backward(ctx, inputs, output):
    pass


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "fastlstm: double backward (a gradient of a gradient, e.g. torch.autograd.grad(..., "
        "create_graph=True) followed by another backward) through the LSTM or GRU is not supported"
    )


for _cell, _ops in OPS.items():
    _register_autograd(_cell, _ops.num_states)
    # Under autocast the op runs in float32 (float64 stays float64): the backends have no
    # half-precision kernels.
    for _device in ("cpu", "cuda"):
        _ops.forward.register_autocast(_device, torch.float32)
