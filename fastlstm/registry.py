"""The backend registry: which backends exist, which can run here, which one is in use.

Rules of this layer:

- ``import fastlstm`` imports no backend framework. A backend's framework (Numba,
  CuPy) is imported only when that backend's status is asked for: by
  ``available_backends()``, by an explicit request, or by ``auto``.
- Detection never raises. A missing package, a broken install, a CUDA library that
  will not load or a machine without a driver all make that backend unavailable,
  with the reason in ``BackendStatus.reason``.
- ``auto`` picks cupy > numba > numpy among the available ones and logs (logger
  ``fastlstm``) why it skipped the others.
- Asking explicitly for an unavailable backend raises ``BackendUnavailableError``
  naming what is missing and how to install it; an unknown name is a ``ValueError``.

The choice in effect is, first found: the ``use_backend`` context manager, then
``set_backend``, then the ``FASTLSTM_BACKEND`` environment variable, then ``auto``.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import logging
import os
import warnings
from dataclasses import dataclass

logger = logging.getLogger("fastlstm")

BACKEND_NAMES = ("numpy", "numba", "cupy")
AUTO_ORDER = ("cupy", "numba", "numpy")
CHOICES = BACKEND_NAMES + ("auto",)
ENV_VAR = "FASTLSTM_BACKEND"

_MODULES = {
    "numpy": "fastlstm.backends.numpy_backend",
    "numba": "fastlstm.backends.numba_backend",
    "cupy": "fastlstm.backends.cupy_backend",
}
_INSTALL_HINTS = {
    "numpy": "pip install numpy",
    "numba": "pip install 'fastlstm[numba]' (installs numba and scipy)",
    "cupy": (
        "pip install 'fastlstm[cuda12]' or 'fastlstm[cuda13]' (CuPy for your CUDA), "
        "on a machine with an NVIDIA GPU and a working driver"
    ),
}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run on this machine."""


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str  # what runs when available, why not otherwise
    install_hint: str

    def __bool__(self) -> bool:
        return self.available


_probed: dict[str, tuple[BackendStatus, object]] = {}
_default_choice: str | None = None
_context_choice: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "fastlstm_backend", default=None
)
_auto_explained = False


def _check_name(name, *, allow_auto: bool = True, argument: str = "backend") -> str:
    valid = CHOICES if allow_auto else BACKEND_NAMES
    if not isinstance(name, str) or name.lower() not in valid:
        raise ValueError(f"{argument}: unknown backend {name!r}; expected one of {', '.join(valid)}")
    return name.lower()


def _probe(name: str) -> tuple[BackendStatus, object]:
    """Import and check backend `name` once per process; never raises."""
    if name not in _probed:
        hint = _INSTALL_HINTS[name]
        try:
            module = importlib.import_module(_MODULES[name])
            backend = module.create_backend()
            status = BackendStatus(name, True, backend.describe(), hint)
        except Exception as exc:  # noqa: BLE001 - any failure means "unavailable"
            backend = None
            reason = f"{type(exc).__name__}: {exc}".strip()
            status = BackendStatus(name, False, reason, hint)
        _probed[name] = (status, backend)
    return _probed[name]


def refresh() -> None:
    """Forget what detection found (after installing a package, or in tests)."""
    global _auto_explained
    _probed.clear()
    _auto_explained = False


def available_backends() -> dict[str, BackendStatus]:
    """Status of every backend: ``status.available`` and ``status.reason``."""
    return {name: _probe(name)[0] for name in BACKEND_NAMES}


def _resolve_auto():
    global _auto_explained
    skipped = []
    for name in AUTO_ORDER:
        status, backend = _probe(name)
        if status.available:
            if skipped and not _auto_explained:
                for line in skipped:
                    logger.info("fastlstm auto backend: %s", line)
                logger.info("fastlstm auto backend: using %s", name)
            _auto_explained = True
            return backend
        skipped.append(f"skipped {name}: {status.reason}")
        if name == "numba" and not status.reason.startswith("ModuleNotFoundError") and not _auto_explained:
            # installed, meant to be used, and broken here: more than an INFO line's worth
            warnings.warn(f"fastlstm: the numba backend is installed but cannot be used ({status.reason}); "
                          "'auto' falls back to the slower backends", RuntimeWarning, stacklevel=3)
    raise BackendUnavailableError("no backend is available: " + "; ".join(skipped))


def empty_cache() -> None:
    """Free the memory that the backends used so far keep between calls for speed: the numba
    backend's workspaces (scratch and saved-for-backward buffers, up to 512 MiB) and its packed
    inference weights (up to 256 MiB). The next calls allocate and pack again. Streams keep
    their packed weights; CuPy's memory pool is CuPy's (``free_all_blocks``)."""
    for _, backend in list(_probed.values()):
        if backend is not None:
            backend.empty_cache()


def backend_for_device(device_type: str):
    """What 'auto' means for arrays that live on `device_type` ('cpu' or 'cuda'): numba >
    numpy on the CPU, cupy on a GPU. Raises BackendUnavailableError naming what is missing."""
    order = ("cupy",) if device_type == "cuda" else ("numba", "numpy")
    reasons = []
    for name in order:
        status, backend = _probe(name)
        if status.available:
            return backend
        reasons.append(f"{name}: {status.reason}")
    hint = f" To install: {_INSTALL_HINTS['cupy']}" if device_type == "cuda" else ""
    raise BackendUnavailableError(
        f"no backend can run arrays on {device_type!r} ({'; '.join(reasons)}).{hint}"
    )


def backend_object(name: str | None = None):
    """The backend object for `name` (None: the choice in effect); raises if unusable."""
    name = current_choice() if name is None else _check_name(name)
    if name == "auto":
        return _resolve_auto()
    status, backend = _probe(name)
    if not status.available:
        raise BackendUnavailableError(
            f"backend {name!r} is not available: {status.reason}. To install: {status.install_hint}"
        )
    return backend


def current_choice() -> str:
    """The backend name in effect, possibly 'auto' (not resolved)."""
    choice = _context_choice.get() or _default_choice
    if choice is not None:
        return choice
    from_env = os.environ.get(ENV_VAR)
    if from_env:
        return _check_name(from_env.strip(), argument=ENV_VAR)
    return "auto"


def get_backend() -> str:
    """Name of the backend that a layer created now without ``backend=`` would run on."""
    return backend_object().name


def set_backend(name: str | None) -> None:
    """Set the process-wide backend ('auto', 'numpy', 'numba', 'cupy'; None: back to the default)."""
    global _default_choice
    if name is not None:
        name = _check_name(name)
        backend_object(name)  # fail now, not at the first forward
    _default_choice = name


@contextlib.contextmanager
def use_backend(name: str):
    """Run the block with backend `name` for layers that did not fix one themselves."""
    name = _check_name(name)
    backend = backend_object(name)
    token = _context_choice.set(name)
    try:
        yield backend.name
    finally:
        _context_choice.reset(token)
