"""Atomic .npz files holding named arrays plus a JSON header.

Used for layer files (``LSTM.save``) and the training demo's checkpoints. A file
is written to a temporary name in the target folder, flushed to disk and renamed
over the target, so a crash never leaves a half-written file under the real name.
Reading checks the format tag and refuses truncated or foreign files with a
``CheckpointError`` (a ValueError) that says what is wrong.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

_HEADER_KEY = "__fastlstm_header__"


class CheckpointError(ValueError):
    """A file that is not a readable fastlstm checkpoint of the expected kind."""


def write_atomic(path, writer) -> None:
    """Call writer(file_object) on a temp file beside `path`, then rename it over `path`."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            writer(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise


def save_arrays(path, kind: str, header: dict, arrays: dict) -> None:
    """Write `arrays` (name -> NumPy array) and a JSON `header` tagged with `kind`."""
    if _HEADER_KEY in arrays:
        raise ValueError(f"arrays: the name {_HEADER_KEY!r} is reserved")
    meta = json.dumps({"format": kind, "version": 1, **header})
    payload = {_HEADER_KEY: np.frombuffer(meta.encode("utf-8"), dtype=np.uint8)}
    payload.update({name: np.asarray(a) for name, a in arrays.items()})
    write_atomic(path, lambda handle: np.savez(handle, **payload))


def load_arrays(path, kind: str) -> tuple[dict, dict]:
    """(header, arrays) from a file written by `save_arrays` with the same `kind`."""
    path = Path(path)
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise CheckpointError(f"{path}: a single .npy array, not a fastlstm {kind} file")
        with loaded as archive:
            if _HEADER_KEY not in archive.files:
                raise CheckpointError(f"{path}: not a fastlstm file (no header); expected a {kind} file")
            header = json.loads(archive[_HEADER_KEY].tobytes().decode("utf-8"))
            if not isinstance(header, dict) or header.get("format") != kind:
                found = header.get("format") if isinstance(header, dict) else None
                raise CheckpointError(f"{path}: expected a {kind} file, got format {found!r}")
            arrays = {name: archive[name] for name in archive.files if name != _HEADER_KEY}
    except (CheckpointError, FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable {kind} file (truncated or foreign?): {exc}") from exc
    return header, arrays
