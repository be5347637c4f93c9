"""Array plumbing shared by the layer and the backends: dtypes and host conversion.

Inputs arrive as NumPy arrays, CuPy arrays, torch tensors (CPU or CUDA), or plain
sequences. This module turns them into something a backend can use without
importing any framework itself: frameworks are recognised by duck typing.
"""

from __future__ import annotations

import importlib.util

import numpy as np

SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
# Kinds that convert to float without losing meaning: bool, signed, unsigned, float.
_REAL_KINDS = "biuf"


def resolve_dtype(dtype) -> np.dtype:
    """The layer dtype for `dtype` ("float32", np.float64, ...), or a clear error."""
    if dtype is None:  # as in torch: no dtype means the default, float32
        return SUPPORTED_DTYPES[0]
    try:
        resolved = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"dtype: expected 'float32' or 'float64', got {dtype!r}") from exc
    if resolved not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype: expected 'float32' or 'float64', got {resolved.name!r}")
    return resolved


def is_cupy_array(value) -> bool:
    return type(value).__module__.split(".")[0] == "cupy"


def is_torch_tensor(value) -> bool:
    return type(value).__module__.split(".")[0] == "torch"


def host_result(array: np.ndarray, like):
    """A host result for a caller whose input was `like`: a torch tensor on `like`'s device
    for a torch caller (sharing `array`'s memory when that device is the CPU), else `array`."""
    if not is_torch_tensor(like):
        return array
    import torch  # already imported: `like` is one of its tensors

    return torch.from_numpy(array).to(like.device)


def refuse_autograd_tensor(value, name: str) -> None:
    """Raise TypeError for a torch tensor that autograd is tracking: the NumPy-level layer is
    not part of torch's graph, and reading the tensor would silently cut the gradient off."""
    if not is_torch_tensor(value) or not getattr(value, "requires_grad", False):
        return
    import torch  # already imported: `value` is one of its tensors

    if torch.is_grad_enabled():
        raise TypeError(
            f"{name}: this torch tensor requires grad, but fastlstm.LSTM works outside torch's "
            "autograd, so no gradient would reach it. To train through autograd use "
            "fastlstm.torch.LSTM (a torch.nn.Module, drop-in for torch.nn.LSTM); to run without "
            f"gradients pass {name}.detach() or call under torch.no_grad()"
        )


def to_numpy(value, name: str) -> np.ndarray:
    """A NumPy view or copy of `value` (NumPy, CuPy, torch, DLPack, sequences)."""
    if isinstance(value, np.ndarray):
        return value
    if is_cupy_array(value):
        return value.get()
    if is_torch_tensor(value):
        # detach: tensors that require grad refuse __array__ and DLPack.
        return value.detach().cpu().numpy()
    if hasattr(value, "__dlpack__") and not hasattr(value, "__array__"):
        try:
            return np.from_dlpack(value)
        except (BufferError, RuntimeError, TypeError, ValueError) as exc:
            raise TypeError(f"{name}: could not read this DLPack array on the host: {exc}") from exc
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"{name}: expected an array (NumPy, CuPy, torch or a nested sequence), "
            f"got {type(value).__name__}"
        ) from exc


def check_real(array, name: str) -> None:
    """Raise TypeError unless `array` holds real numbers (complex, object, strings refused)."""
    kind = np.dtype(array.dtype).kind
    if kind not in _REAL_KINDS:
        raise TypeError(
            f"{name}: expected real numbers (convertible to float), got dtype {np.dtype(array.dtype).name}"
        )


def check_floating(array, name: str) -> None:
    """Raise TypeError unless `array` holds floating-point numbers: integers and booleans
    given as a sequence or a state are a mistake more often than not (a token index, a
    mask), and would otherwise run silently as the layer's dtype. Floating point of another
    precision is converted to the layer's dtype."""
    check_real(array, name)
    dtype = np.dtype(array.dtype)
    if dtype.kind != "f":
        raise TypeError(
            f"{name}: expected floating-point numbers, got dtype {dtype.name}; convert explicitly "
            f"(e.g. .astype(np.float32)) if these values are meant as inputs"
        )


def check_shape(array, expected: tuple, name: str) -> None:
    if tuple(array.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {tuple(expected)}, got {tuple(array.shape)}")


def like(reference, host_array):
    """`host_array` on the device of `reference` (a CuPy array there, else unchanged)."""
    if is_cupy_array(reference):
        import cupy

        return cupy.asarray(host_array)
    return host_array


def module_available(name: str) -> bool:
    """Whether `name` can be imported, without importing it (False if marked missing)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # sys.modules[name] is None, or a broken parent
        return False
