"""Atomic .npz files holding named arrays plus a JSON header.

Used for layer files (``LSTM.save``) and the training demo's checkpoints. A file
is written to a temporary name in the target folder, flushed to disk and renamed
over the target, so a crash never leaves a half-written file under the real name; a
symlink is written through (its target is replaced), and an existing file keeps its
permissions (a new one gets the umask's).

Reading assumes nothing of the file until checked, and every failure is a
``CheckpointError`` (a ValueError) that names the file and says what is wrong. Members
must be stored uncompressed, as ``np.savez`` writes them (a compressed member could
expand to any size), so the data a file makes us allocate is data the file holds. Each
member's .npy header is read and checked (a numeric dtype, a shape whose bytes are the
member's size; with ``expect``, the very names, shapes and dtypes the caller expects)
before any of its data is.
"""

from __future__ import annotations

import json
import os
import secrets
import zipfile
import zlib
from pathlib import Path

import numpy as np

_HEADER_KEY = "__fastlstm_header__"
_MAX_HEADER_BYTES = 1 << 20  # the JSON header: a layer's is a few hundred bytes
# How deep the header's arrays and objects may nest (a layer's: 2). Checked before parsing:
# json's parser recurses once a level, and a file of 100000 '[' would run it to Python's
# recursion limit, where even the garbage collector's callbacks fail.
_MAX_HEADER_NESTING = 32
MAX_FILE_MEMBERS = 100_000


class CheckpointError(ValueError):
    """A file that is not a readable fastlstm checkpoint of the expected kind."""


def write_atomic(path, writer) -> None:
    """Call writer(file_object) on a temp file beside `path` (beside a symlink's target),
    then rename it over `path`, keeping an existing file's permissions."""
    path = Path(os.path.realpath(path))  # through symlinks: replace the target, keep the link
    folder = path.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"{path}: no such directory {str(folder)!r}")
    try:
        mode = os.stat(path).st_mode & 0o7777  # an existing file keeps its permissions
    except FileNotFoundError:
        mode = None  # a new one gets 0o666 less the umask, as open() would give it
    # a short name of its own (a long target name plus a suffix could pass the name limit)
    tmp = folder / f".fastlstm-{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if mode is not None else 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            writer(handle)
            handle.flush()
            if mode is not None:
                os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
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


def load_arrays(path, kind: str, expect=None) -> tuple[dict, dict]:
    """(header, arrays) from a file written by `save_arrays` with the same `kind`.

    expect(header) -> {name: shape} (or None): the arrays the file must hold, checked
    against the members' headers before any data is read; it may raise CheckpointError.
    """
    path = Path(path)
    try:
        if path.is_file() and not zipfile.is_zipfile(path):
            with open(path, "rb") as handle:
                if handle.read(6) == b"\x93NUMPY":
                    raise CheckpointError(f"{path}: a single .npy array, not a fastlstm {kind} file")
        with zipfile.ZipFile(path) as archive:
            members = _members(archive, path)
            if _HEADER_KEY not in members:
                raise CheckpointError(f"{path}: not a fastlstm file (no header); expected a {kind} file")
            header_info = members.pop(_HEADER_KEY)
            if header_info.file_size > _MAX_HEADER_BYTES:
                raise CheckpointError(
                    f"{path}: a header of {header_info.file_size} bytes (at most {_MAX_HEADER_BYTES})")
            header = _parse_header(_read_member(archive, header_info, path, None).tobytes(), path, kind)
            expected = expect(header) if expect is not None else None
            if expected is not None and set(expected) != set(members):
                missing, unexpected = sorted(set(expected) - set(members)), sorted(set(members) - set(expected))
                raise CheckpointError(f"{path}: the parameters do not match the configuration: missing {missing}, "
                                      f"unexpected {unexpected}")
            arrays = {name: _read_member(archive, info, path, None if expected is None else expected[name])
                      for name, info in members.items()}
    except (CheckpointError, FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, KeyError, UnicodeDecodeError,
            RecursionError, MemoryError, zlib.error) as exc:
        raise CheckpointError(f"{path}: not a readable {kind} file (truncated or foreign?): "
                              f"{type(exc).__name__}: {exc}") from exc
    return header, arrays


def _members(archive: zipfile.ZipFile, path: Path) -> dict:
    """name -> ZipInfo of every .npy member, checked to be stored uncompressed."""
    infos = archive.infolist()
    if len(infos) > MAX_FILE_MEMBERS:
        raise CheckpointError(f"{path}: {len(infos)} members (at most {MAX_FILE_MEMBERS})")
    members = {}
    for info in infos:
        name = info.filename.removesuffix(".npy")
        if name == info.filename or name in members:
            raise CheckpointError(f"{path}: unexpected member {info.filename!r} (expected distinct NAME.npy arrays)")
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise CheckpointError(f"{path}: member {info.filename!r} is compressed; fastlstm files store arrays "
                                  "uncompressed (a compressed member could expand to any size)")
        members[name] = info
    return members


def _nesting_depth(raw: bytes) -> int:
    """How deep a JSON text's arrays and objects nest, brackets inside strings left out,
    without parsing it (vectorized: linear in the text, whatever it holds). Over the part of
    a text that json accepts, this is the depth its parser recurses to."""
    text = np.frombuffer(raw, np.uint8)
    if text.size == 0:
        return 0
    at = np.arange(text.size)
    backslash = text == ord("\\")
    # A quote opens or closes a string unless an odd run of backslashes comes just before it.
    last_other = np.maximum.accumulate(np.where(backslash, -1, at))  # last non-backslash up to here
    run_before = np.concatenate(([0], at[:-1] - last_other[:-1]))  # backslashes just before each byte
    quote = (text == ord('"')) & (run_before % 2 == 0)
    outside = np.cumsum(quote) % 2 == 0  # after an even number of quotes: not in a string
    opens = outside & ((text == ord("[")) | (text == ord("{")))
    closes = outside & ((text == ord("]")) | (text == ord("}")))
    return int(np.cumsum(opens.astype(np.int64) - closes).max())


def _parse_header(raw: bytes, path: Path, kind: str) -> dict:
    depth = _nesting_depth(raw)
    if depth > _MAX_HEADER_NESTING:
        raise CheckpointError(f"{path}: not a readable {kind} file: its header nests {depth} levels deep "
                              f"(at most {_MAX_HEADER_NESTING})")
    header = json.loads(raw.decode("utf-8"))
    if not isinstance(header, dict) or header.get("format") != kind:
        found = header.get("format") if isinstance(header, dict) else None
        raise CheckpointError(f"{path}: expected a {kind} file, got format {found!r}")
    return header


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path, shape) -> np.ndarray:
    """One member's array; its .npy header is checked (and against `shape`, if given) first."""
    what = f"{path}: array {info.filename.removesuffix('.npy')!r}"
    with archive.open(info) as stream:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            declared, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            declared, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise CheckpointError(f"{what}: .npy format version {version} (expected 1.0 or 2.0)")
        if dtype.hasobject or dtype.kind not in "biuf":
            raise CheckpointError(f"{what}: dtype {dtype} (expected numbers)")
        if shape is not None and (tuple(declared) != tuple(shape) or dtype.kind != "f"):
            raise CheckpointError(
                f"{path}: the parameters do not match the configuration: {info.filename[:-4]!r} is {dtype} of shape "
                f"{tuple(declared)}, expected floating point of shape {tuple(shape)}")
        count = int(np.prod(declared, dtype=object))
        nbytes = count * dtype.itemsize
        if stream.tell() + nbytes != info.file_size:
            raise CheckpointError(f"{what}: declares shape {tuple(declared)} ({nbytes} bytes of data) but the member "
                                  f"holds {info.file_size - stream.tell()}")
        flat = np.empty(count, dtype)
        buffer, done = flat.view(np.uint8), 0
        while done < nbytes:
            got = stream.readinto(buffer[done:])
            if not got:
                raise CheckpointError(f"{what}: ends after {done} of {nbytes} bytes")
            done += got
    return flat.reshape(declared, order="F" if fortran else "C")
