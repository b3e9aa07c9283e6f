"""Crash-safe file writes and hashing, and the rules every written file follows.

Every file ensembler writes that a later step reads (registry, weights, logits, recipes,
submissions) goes through :func:`atomic_write` or :func:`atomic_path` (logits through
:func:`ensembler.logits.write_logits`, which writes its npz with :func:`write_bytes_atomic`):
a temp file in the same folder, fsync, ``os.replace``. A crash leaves the old file or the
new one, never half of one. The rules (``docs/RELIABILITY.md`` lists the test of each):

* **Whole or nothing.** A failed write (full disk, read-only folder, no permission, a writer
  that raises) removes its temp file, leaves the old file byte-identical, and raises
  :class:`~ensembler.errors.WriteError` naming the file and the reason, never a raw
  ``OSError`` or a writer's ``RuntimeError``. Appends (the submission ledger) go through
  :func:`append_whole`: the whole line or nothing, the file truncated back on a short write.
* **Normal permissions.** Every file gets ``0666`` minus the umask (:func:`file_mode`), as a
  plain ``open()`` would give it, also when the writer (safetensors, ``torch.save``) creates
  its file ``0600``: teammates sharing a registry can read it.
* **Strict JSON.** :func:`write_json_atomic` refuses NaN and infinity (``json`` would write
  ``NaN``, which no strict JSON reader accepts), naming the file and the key.
* **No silent replacement.** A file the user named (``--out``, ``--plot``) that exists is
  replaced only with ``--overwrite``: :func:`refuse_existing`, called before any work.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from .errors import EnsemblerError, WriteError

_REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EFBIG: "file too large",
    errno.EDQUOT: "disk quota exceeded",
    errno.EIO: "input/output error",
    errno.ENOTDIR: "a parent is not a folder",
    errno.EISDIR: "it is a folder",
    errno.ENAMETOOLONG: "file name too long",
}
# How writers implemented outside Python (safetensors) report an OS error in their message.
_OS_ERROR_TEXT = re.compile(r"os error (\d+)|No space left|Read-only file system|Permission denied|StorageFull",
                            re.IGNORECASE)


def write_error(path: str | os.PathLike, exc: BaseException, what: str = "write") -> WriteError:
    """A :class:`WriteError` for ``exc`` raised while writing ``path``: names the file and the reason."""
    code = getattr(exc, "errno", None)
    if code is None:
        m = _OS_ERROR_TEXT.search(str(exc))
        if m and m.group(1):
            code = int(m.group(1))
        elif m:
            text = m.group(0).lower()
            code = errno.ENOSPC if ("space" in text or "storagefull" in text) else (
                errno.EROFS if "read-only" in text else errno.EACCES)
    reason = _REASONS.get(code) or getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    err = WriteError(f"cannot {what} {path}: {reason}")
    err.path, err.errno = str(path), code
    return err


def _is_write_failure(exc: BaseException, folder: Path) -> bool:
    if isinstance(exc, EnsemblerError) or not isinstance(exc, Exception):
        return False
    return isinstance(exc, OSError) or bool(_OS_ERROR_TEXT.search(str(exc))) or _disk_full(folder)


def _disk_full(folder: Path) -> bool:
    """True when ``folder``'s file system has (almost) no space left: writers such as
    ``torch.save`` report a full disk only as "file write failed"."""
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):
        return False
    return st.f_bavail * st.f_frsize < (64 << 10)


def _temp_next_to(path: Path) -> tuple[int, str]:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise write_error(path, exc) from exc


def _finish(tmp: str, path: Path) -> None:
    # The writer may have re-created the file (safetensors: mode 0600): set the mode last.
    os.chmod(tmp, file_mode())
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temp file next to ``path``; on success fsync it and rename it over ``path``.

    On an exception the temp file is removed and ``path`` is untouched; an ``OSError`` of the
    write itself (full disk, read-only folder) becomes a :class:`WriteError` naming ``path``.
    """
    path = Path(path)
    fd, tmp = _temp_next_to(path)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        _finish(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise write_error(path, exc) from exc
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to ``path`` for writers that need a filename (safetensors, onnx).

    The caller writes the whole file to the yielded path; it is fsynced and renamed over
    ``path`` on success and removed on failure. A failure that is an OS error (also one a
    writer reports in its own exception type, as safetensors' ``"No space left on device"``)
    becomes a :class:`WriteError` naming ``path``.
    """
    path = Path(path)
    fd, tmp = _temp_next_to(path)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        _finish(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if _is_write_failure(exc, path.parent):
            if getattr(exc, "errno", None) is None and _disk_full(path.parent):
                exc = OSError(errno.ENOSPC, str(exc))
            raise write_error(path, exc) from exc
        raise
    _fsync_dir(path.parent)


def file_mode() -> int:
    """``0666`` minus the process umask: the mode every file ensembler writes gets."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not supported on every platform/filesystem.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def append_whole(path: str | os.PathLike, data: bytes) -> int:
    """Append ``data`` to ``path`` completely or not at all; returns the file's size before.

    ``os.write`` may write only part of the bytes (a full disk) or fail midway: then the file
    is truncated back to its old size and a :class:`WriteError` naming it is raised, so a
    reader never finds half a line. The file is fsynced; a new file gets :func:`file_mode`.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as exc:
        raise write_error(path, exc, "append to") from exc
    try:
        start = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                if n <= 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                view = view[n:]
            os.fsync(fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
                os.fsync(fd)
            raise write_error(path, exc, "append to") from exc
        return start
    finally:
        os.close(fd)


def truncate_to(path: str | os.PathLike, size: int) -> None:
    """Cut ``path`` back to ``size`` bytes (undo an append) and fsync it."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def refuse_existing(paths: str | os.PathLike | Sequence[str | os.PathLike], *, overwrite: bool,
                    flag: str = "--out") -> None:
    """The one rule for files a user names: an existing file is replaced only with ``--overwrite``.

    Call it before any work, so a refused run costs nothing. Raises :class:`EnsemblerError`
    naming the file and both flags; a folder in the way is refused even with ``overwrite``;
    a folder that cannot be written (read-only, no permission) is a :class:`WriteError` now,
    not after the work. Creates nothing.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    for p in paths:
        p = Path(p)
        if p.is_dir():
            raise EnsemblerError(f"{flag} {p} is a folder; give a file name")
        if p.exists() and not overwrite:
            raise EnsemblerError(f"{flag} {p} exists; pass --overwrite to replace it, or choose another {flag}")
        check_writable(p, flag)


def check_writable(path: str | os.PathLike, flag: str | None = None) -> None:
    """:class:`WriteError` unless ``path`` could be created: its nearest existing folder must be
    a writable folder (``os.access``, which also sees a read-only file system). Creates nothing."""
    path = Path(os.path.abspath(path))
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    named = f"{flag} {path}" if flag else str(path)
    if not folder.is_dir():
        raise WriteError(f"cannot write {named}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        try:
            read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
        except (OSError, AttributeError):
            read_only = False
        why = "is on a read-only file system" if read_only else "is not writable (permission denied)"
        raise WriteError(f"cannot write {named}: the folder {folder} {why}")


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_write(path, "wb") as fh:
        fh.write(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    """``obj`` as strict JSON (no NaN/Infinity: :class:`EnsemblerError` naming the file and key)."""
    write_text_atomic(path, json_text(obj, indent=indent, where=str(path)) + "\n")


def json_text(obj: Any, *, indent: int | None = 2, where: str = "JSON", sort_keys: bool = False) -> str:
    """Strict JSON text of ``obj`` (numpy scalars/arrays and paths converted).

    Raises :class:`EnsemblerError` naming ``where`` and the key path of the first NaN or
    infinite number: Python's ``json`` would write ``NaN``, which strict readers refuse.
    """
    try:
        return json.dumps(obj, indent=indent, sort_keys=sort_keys, default=_json_default, allow_nan=False)
    except ValueError as exc:
        if "Out of range float" not in str(exc):
            raise
        key = _first_non_finite(obj)
        raise EnsemblerError(f"{where}: refusing to write a non-finite number ({key}); JSON has no NaN or "
                             "infinity, and such a value means a result went wrong") from None


def _first_non_finite(obj: Any, key: str = "") -> str:
    if isinstance(obj, np.ndarray):
        obj = obj.tolist()
    if isinstance(obj, dict):
        for k, v in obj.items():
            found = _first_non_finite(v, f"{key}.{k}" if key else str(k))
            if found:
                return found
        return ""
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            found = _first_non_finite(v, f"{key}[{i}]")
            if found:
                return found
        return ""
    if isinstance(obj, (float, np.floating)) and not math.isfinite(float(obj)):
        return f"{key or 'value'} = {float(obj)}"
    return ""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
