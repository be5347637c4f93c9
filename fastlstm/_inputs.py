"""Validation and conversion of what callers hand the layer.

Every function here either returns arrays ready for a backend or raises a
ValueError/TypeError naming the argument, what was expected and what came. None of
them changes the layer, so a call that fails here leaves weights, grads and the
saved forward untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._arrays import check_floating, refuse_autograd_tensor, to_numpy


@dataclass(frozen=True)
class Layout:
    """Shapes of one forward call, in the layer's internal (T, B, ...) order."""

    num_steps: int
    batch: int
    batch_first: bool
    unbatched: bool

    def user_sequence_shape(self, features: int) -> tuple:
        """Shape of x / y as the caller sees them."""
        if self.unbatched:
            return (self.num_steps, features)
        if self.batch_first:
            return (self.batch, self.num_steps, features)
        return (self.num_steps, self.batch, features)

    def user_state_shape(self, num_states: int, hidden: int) -> tuple:
        if self.unbatched:
            return (num_states, hidden)
        return (num_states, self.batch, hidden)

    def to_internal(self, xp, sequence):
        """(T, B, F) contiguous from the caller's layout."""
        if self.unbatched:
            return sequence[:, None, :]
        if self.batch_first:
            return xp.ascontiguousarray(sequence.transpose(1, 0, 2))
        return sequence

    def to_user(self, xp, sequence):
        if self.unbatched:
            return sequence[:, 0, :]
        if self.batch_first:
            return xp.ascontiguousarray(sequence.transpose(1, 0, 2))
        return sequence

    def state_to_internal(self, state):
        return state[:, None, :] if self.unbatched else state

    def state_to_user(self, state):
        return state[:, 0, :] if self.unbatched else state


def kernel_ready(xp, array):
    """`array` C-contiguous and writable: compiled kernels are typed by both, and a read-only
    input (np.frombuffer, a read-only memory map) would otherwise compile every kernel again."""
    array = xp.ascontiguousarray(array)
    return array if getattr(array.flags, "writeable", True) else array.copy()


def sequence_input(backend, value, input_size: int, batch_first: bool, dtype):
    """x -> (internal (T, B, I) array in `dtype`, Layout)."""
    refuse_autograd_tensor(value, "x")
    x = backend.from_user(value, "x")
    check_floating(x, "x")
    order = "(B, T, input_size)" if batch_first else "(T, B, input_size)"
    if x.ndim not in (2, 3):
        raise ValueError(
            f"x: expected a 3-D array {order} or a 2-D unbatched (T, input_size) array, "
            f"got {x.ndim}-D with shape {tuple(x.shape)}"
        )
    if x.shape[-1] != input_size:
        raise ValueError(f"x: expected input_size={input_size} in the last axis, got shape {tuple(x.shape)}")
    unbatched = x.ndim == 2
    if unbatched:
        num_steps, batch = x.shape[0], 1
    elif batch_first:
        batch, num_steps = x.shape[:2]
    else:
        num_steps, batch = x.shape[:2]
    if num_steps < 1 or batch < 1:
        raise ValueError(f"x: expected at least one time step and one sequence, got shape {tuple(x.shape)}")
    layout = Layout(num_steps, batch, batch_first and not unbatched, unbatched)
    internal = layout.to_internal(backend.xp, x.astype(dtype, copy=False))
    return kernel_ready(backend.xp, internal), layout


def state_pair(backend, value, name: str, layout: Layout, num_states: int, hidden: int, dtype):
    """(h, c) pair -> two internal (L*D, B, H) arrays, or (None, None) for None.

    Either element of the pair may be None (zeros), which lets `dstate` carry a
    gradient for h_n only, say.
    """
    if value is None:
        return None, None
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name}: expected a pair (h, c) of arrays, got {type(value).__name__}")
    expected = layout.user_state_shape(num_states, hidden)
    return tuple(
        None if part is None else _state_array(backend, part, f"{name}[{label}]", expected, layout, dtype)
        for part, label in zip(value, ("h", "c"))
    )


def _state_array(backend, value, name: str, expected: tuple, layout: Layout, dtype):
    """One state array (h or c) -> internal (L*D, B, H) array in `dtype`, checked."""
    refuse_autograd_tensor(value, name)
    array = backend.from_user(value, name)
    check_floating(array, name)
    if tuple(array.shape) != expected:
        raise ValueError(f"{name}: expected shape {expected}, got {tuple(array.shape)}")
    return kernel_ready(backend.xp, layout.state_to_internal(array.astype(dtype, copy=False)))


def state_parts(backend, value, name: str, parts: tuple, layout: Layout, num_states: int, hidden: int, dtype):
    """A cell's state as a tuple of internal (L*D, B, H) arrays, one per part, or Nones.

    parts ("h", "c"): `value` is a pair (h, c), either element possibly None (state_pair).
    parts ("h",): `value` is one array h (a GRU has no cell state).
    """
    if len(parts) == 2:
        return state_pair(backend, value, name, layout, num_states, hidden, dtype)
    if value is None:
        return (None,)
    expected = layout.user_state_shape(num_states, hidden)
    if isinstance(value, (tuple, list)):
        raise TypeError(
            f"{name}: expected one array h of shape {expected} "
            f"(this cell has no cell state), got a {type(value).__name__} of {len(value)}"
        )
    return (_state_array(backend, value, name, expected, layout, dtype),)


def sequence_lengths(backend, value, layout: Layout):
    """lengths -> (B,) int64 backend array with values in 1..T, or None."""
    if value is None:
        return None
    if layout.unbatched:
        raise ValueError("lengths: not supported with unbatched (2-D) x; add a batch axis of size 1")
    lengths = to_numpy(value, "lengths")
    if lengths.dtype.kind not in "iu":
        raise TypeError(f"lengths: expected integers, got dtype {lengths.dtype.name}")
    if lengths.shape != (layout.batch,):
        raise ValueError(f"lengths: expected shape ({layout.batch},) (one per sequence), got {lengths.shape}")
    low, high = int(lengths.min()), int(lengths.max())
    if low < 1 or high > layout.num_steps:
        raise ValueError(
            f"lengths: expected values in 1..{layout.num_steps} (T), got values from {low} to {high}"
        )
    if low == layout.num_steps:
        return None  # every sequence runs to the end: same as no lengths, and faster
    return backend.asarray(lengths.astype(np.int64))


def output_gradient(backend, value, layout: Layout, features: int, dtype):
    """dy -> internal (T, B, features) array, or None for None."""
    if value is None:
        return None
    refuse_autograd_tensor(value, "dy")
    dy = backend.from_user(value, "dy")
    check_floating(dy, "dy")
    expected = layout.user_sequence_shape(features)
    if tuple(dy.shape) != expected:
        raise ValueError(f"dy: expected the shape of the forward's output {expected}, got {tuple(dy.shape)}")
    return kernel_ready(backend.xp, layout.to_internal(backend.xp, dy.astype(dtype, copy=False)))
