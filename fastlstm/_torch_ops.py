"""The fastlstm LSTM as a registered torch op: ``torch.ops.fastlstm.lstm`` and its backward.

Both are ``torch.library.custom_op``s with fake (meta) implementations, so that
``torch.compile(fullgraph=True)`` traces them without a graph break, and the forward's
autograd formula is registered with ``register_autograd``. ``fastlstm.torch`` builds the
``nn.Module`` on top; this module only runs the op.

The op is functional: every parameter comes in as a tensor on each call (time-major input,
states, weights in ``nn.LSTM``'s order, optional lengths and dropout masks) and the stack
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
import itertools
import threading
import weakref

import numpy as np
import torch

from . import _inputs, registry, stack
from ._arrays import resolve_dtype

_NAMESPACE = "fastlstm"

FORWARD_SCHEMA = (
    "(Tensor input, Tensor hx, Tensor cx, Tensor[] weights, Tensor? lengths, Tensor[] dropout_masks, "
    "int num_layers, bool bidirectional, bool has_biases, bool keep, str backend) "
    "-> (Tensor, Tensor, Tensor, Tensor)"
)
BACKWARD_SCHEMA = (
    "(Tensor handle, Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, Tensor input, Tensor[] weights) "
    "-> (Tensor, Tensor, Tensor, Tensor[])"
)


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
        raise RuntimeError(f"fastlstm: cannot differentiate this LSTM call: {why}")
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
    return backend.xp.ascontiguousarray(backend.from_user(tensor.detach(), name))


def _to_torch(backend, array, like: torch.Tensor) -> torch.Tensor:
    return backend.to_user(array, like)


def _spec(input_size, weights, num_layers, bidirectional, has_biases, dtype) -> stack.StackSpec:
    hidden = weights[1].shape[1] if len(weights) > 1 and weights[1].dim() == 2 else 0
    spec = stack.StackSpec(
        int(input_size), int(hidden), int(num_layers), 2 if bidirectional else 1, bool(has_biases),
        resolve_dtype(str(dtype).replace("torch.", "")),
    )
    shapes = spec.parameter_shapes()
    if hidden < 1 or len(weights) != len(shapes):
        raise ValueError(
            f"weights: expected {len(shapes) if hidden else 'the'} tensors in torch.nn.LSTM's order "
            f"(weight_ih_l0, weight_hh_l0{', bias_ih_l0, bias_hh_l0' if has_biases else ''}, ...), "
            f"got {len(weights)}"
        )
    for (name, shape), weight in zip(shapes.items(), weights):
        if tuple(weight.shape) != shape:
            raise ValueError(f"weights[{name}]: expected shape {shape}, got {tuple(weight.shape)}")
    return spec


def _check_float_tensors(dtype, **tensors) -> None:
    for name, tensor in tensors.items():
        if tensor.dtype != dtype:
            raise ValueError(f"{name}: expected dtype {dtype} (the input's), got {tensor.dtype}")


# -- the forward op ----------------------------------------------------------------------
@torch.library.custom_op(f"{_NAMESPACE}::lstm", mutates_args=(), schema=FORWARD_SCHEMA)
def lstm(input, hx, cx, weights, lengths, dropout_masks, num_layers, bidirectional, has_biases, keep, backend):
    """Every layer and direction over a (T, B, I) time-major input. Returns
    ``output (T, B, D*H), h_n, c_n (L*D, B, H), record handle``."""
    if input.dim() != 3 or input.shape[0] < 1 or input.shape[1] < 1:
        raise ValueError(f"input: expected (T, B, input_size) with T, B >= 1, got shape {tuple(input.shape)}")
    num_steps, batch, input_size = input.shape
    spec = _spec(input_size, weights, num_layers, bidirectional, has_biases, input.dtype)
    _check_float_tensors(input.dtype, hx=hx, cx=cx, **{f"weights[{i}]": w for i, w in enumerate(weights)})
    state_shape = (spec.num_states, batch, spec.hidden_size)
    for name, state in (("hx", hx), ("cx", cx)):
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
        h0, c0 = _from_torch(chosen, hx, "hx"), _from_torch(chosen, cx, "cx")
        params = {name: _from_torch(chosen, w, name) for name, w in zip(spec.parameter_shapes(), weights)}
        masks = [None] + [_from_torch(chosen, m, "dropout_masks") for m in dropout_masks] if dropout_masks else None
        y, h_n, c_n, record = stack.forward(spec, chosen, params, x, h0, c0, step_lengths, masks, keep)
        outputs = tuple(_to_torch(chosen, a, input) for a in (y, h_n, c_n))
    return (*outputs, _handle_for(record, chosen))


@lstm.register_fake
def _lstm_fake(input, hx, cx, weights, lengths, dropout_masks, num_layers, bidirectional, has_biases, keep,
               backend):
    num_steps, batch, _ = input.shape
    hidden = weights[1].shape[1]
    directions = 2 if bidirectional else 1
    output = input.new_empty((num_steps, batch, directions * hidden))
    return output, hx.new_empty(hx.shape), cx.new_empty(cx.shape), torch.empty((), dtype=torch.int64, device="cpu")


# -- the backward op ---------------------------------------------------------------------
@torch.library.custom_op(f"{_NAMESPACE}::lstm_backward", mutates_args=(), schema=BACKWARD_SCHEMA)
def lstm_backward(handle, grad_output, grad_h_n, grad_c_n, input, weights):
    """Gradients of one recorded ``lstm`` call: ``d input, d hx, d cx, d weights`` (in the
    order of ``weights``). The record is read, not used up (retain_graph works)."""
    box = _box_for(handle)
    chosen = box.backend
    with _cuda_context(chosen, input.device):
        d_out = _from_torch(chosen, grad_output, "grad_output")
        dh_n, dc_n = _from_torch(chosen, grad_h_n, "grad_h_n"), _from_torch(chosen, grad_c_n, "grad_c_n")
        d_input, dh0, dc0, grads = stack.backward(box.record, d_out, dh_n, dc_n)
        seen = set()
        d_weights = []
        for name in box.record.spec.parameter_shapes():
            grad = grads[name]
            if id(grad) in seen:  # both biases share one array: outputs must not alias
                grad = grad.copy()
            seen.add(id(grad))
            d_weights.append(_to_torch(chosen, grad, weights[len(d_weights)]))
        outputs = tuple(_to_torch(chosen, a, input) for a in (d_input, dh0, dc0))
    return (*outputs, d_weights)


@lstm_backward.register_fake
def _lstm_backward_fake(handle, grad_output, grad_h_n, grad_c_n, input, weights):
    return (input.new_empty(input.shape), grad_h_n.new_empty(grad_h_n.shape), grad_c_n.new_empty(grad_c_n.shape),
            [w.new_empty(w.shape) for w in weights])


# -- autograd ----------------------------------------------------------------------------
def _setup_lstm(ctx, inputs, output):
    input, hx, cx, weights = inputs[:4]
    # The tensors the record was made from are saved as well, so that autograd's version
    # counters catch an in-place change between forward and backward, as for nn.LSTM.
    ctx.save_for_backward(output[3], input, hx, cx, *weights)
    ctx.num_masks = len(inputs[5])
    ctx.output_shape = output[0].shape


def _lstm_grad(ctx, grad_output, grad_h_n, grad_c_n, _grad_handle):
    handle, input, hx, cx, *weights = ctx.saved_tensors
    if grad_output is None:
        grad_output = input.new_zeros(ctx.output_shape)
    grad_h_n = torch.zeros_like(hx) if grad_h_n is None else grad_h_n
    grad_c_n = torch.zeros_like(cx) if grad_c_n is None else grad_c_n
    d_input, d_hx, d_cx, d_weights = lstm_backward(handle, grad_output, grad_h_n, grad_c_n, input, weights)
    return d_input, d_hx, d_cx, d_weights, None, [None] * ctx.num_masks, None, None, None, None, None


def _setup_backward(ctx, inputs, output):
    pass


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "fastlstm: double backward (a gradient of a gradient, e.g. torch.autograd.grad(..., "
        "create_graph=True) followed by another backward) through the LSTM is not supported"
    )


lstm.register_autograd(_lstm_grad, setup_context=_setup_lstm)
lstm_backward.register_autograd(_no_double_backward, setup_context=_setup_backward)
# Under autocast the op runs in float32 (float64 stays float64): the backends have no
# half-precision kernels.
for _device in ("cpu", "cuda"):
    lstm.register_autocast(_device, torch.float32)
