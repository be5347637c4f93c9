"""fastlstm: fast LSTMs (and GRUs) on whatever hardware you have.

One model definition, three backends: ``numpy`` (the reference), ``numba`` (CPU,
compiled kernels) and ``cupy`` (NVIDIA GPU). Importing this package imports no
backend framework; see ``fastlstm.registry`` for how a backend is chosen.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from .checkpoint import CheckpointError
from .layer import GRU, LSTM
from .registry import (
    BackendStatus,
    BackendUnavailableError,
    available_backends,
    empty_cache,
    get_backend,
    set_backend,
    use_backend,
)
from .threads import get_num_threads, set_num_threads

__version__ = "0.1.0"

__all__ = [
    "GRU",
    "LSTM",
    "BackendStatus",
    "BackendUnavailableError",
    "CheckpointError",
    "available_backends",
    "empty_cache",
    "get_backend",
    "get_num_threads",
    "set_backend",
    "set_num_threads",
    "use_backend",
]


def _register_source_kernels() -> None:
    """Make ``fastlstm.kernels`` importable from a source checkout.

    An install maps the repository's top-level ``kernels/`` to ``fastlstm.kernels``
    (pyproject.toml); run from a checkout (PYTHONPATH=repo), the folder sits beside
    this package instead. Nothing is imported from it here.
    """
    if importlib.util.find_spec(__name__ + ".kernels") is not None:
        return
    folder = Path(__file__).resolve().parent.parent / "kernels"
    if (folder / "__init__.py").is_file():
        spec = importlib.util.spec_from_file_location(
            __name__ + ".kernels", folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        globals()["kernels"] = module


_register_source_kernels()
