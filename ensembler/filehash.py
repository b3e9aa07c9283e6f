"""File hashes: the sha256 of a file's bytes, remembered by its stat so a warm run costs one stat.

:class:`FileHashes` answers "what is the sha256 of this file now?". The answer is read from
the bytes the first time and kept as a *stamp*: ``path -> (inode, size, mtime_ns, ctime_ns,
hashed_ns, sha256)``. While the file's stat still matches its stamp, the recorded sha256 is
returned without reading the file; any change (new content, a replaced file, a ``touch``, an
in-place edit that puts the old mtime back: the kernel still moves ``ctime``) reads it again.

Two users of one stamp file, one noun:

* the data fingerprint (:meth:`ensembler.data.SampleTable.fingerprint`) hashes every image's
  bytes, so images whose content changed with the same size and mtime are new data;
* the logit cache (:mod:`ensembler.infer.store`) checks a checkpoint's weights file against
  the registry's recorded sha256 before a cached result of it is trusted.

A stamp is trusted only when the file had last changed clearly before it was hashed
(``RACY_NS``): file timestamps tick coarsely (a few ms; 2 s on FAT), so a file written again
within the tick it was hashed in could otherwise keep a stat identical to its stamp (git's
"racily clean" entries). Such a file is hashed again on the next run.

The stamps live in one JSON file (``<cache>/file_hashes.json`` for the logit cache), written
atomically through :mod:`ensembler._io`, merged with what another process wrote meanwhile.
An unreadable stamp file is ignored (every file is hashed again); it is a cache of facts, and
whoever can write it can also write the logits cache it guards.

Examples
--------
>>> import tempfile, os
>>> folder = tempfile.mkdtemp()
>>> path = os.path.join(folder, "a.txt")
>>> _ = open(path, "w").write("hello")
>>> hashes = FileHashes(os.path.join(folder, "file_hashes.json"))
>>> hashes.sha256(path)[:12]
'2cf24dba5fb0'
>>> hashes.save()
>>> FileHashes(os.path.join(folder, "file_hashes.json")).sha256(path)[:12]
'2cf24dba5fb0'
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from ._io import write_json_atomic

__all__ = ["FileHashes", "STAMPS_NAME"]

STAMPS_NAME = "file_hashes.json"
_FORMAT = "ensembler-file-hashes"
_CHUNK = 1 << 20


def _hash_bytes(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class FileHashes:
    """sha256 of files, remembered by ``(path, inode, size, mtime_ns, ctime_ns)``.

    Parameters
    ----------
    path : path, optional
        The JSON stamp file; ``None`` keeps the stamps in memory only (every new object
        hashes every file once).

    Attributes
    ----------
    hashed : int
        Files whose bytes this object read (0 on a fully warm run).
    """

    RACY_NS = 2_000_000_000  # a stamp counts when the file last changed this long before hashing

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else None
        self._stamps: dict[str, list] = self._read(self.path) if self.path is not None else {}
        self._new: dict[str, list] = {}
        self.hashed = 0

    def __repr__(self) -> str:
        return f"FileHashes({str(self.path) if self.path else None!r}, {len(self._stamps)} stamps)"

    @staticmethod
    def _read(path: Path) -> dict[str, list]:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        stamps = doc.get("stamps") if isinstance(doc, dict) and doc.get("format") == _FORMAT else None
        if not isinstance(stamps, dict):
            return {}
        return {k: v for k, v in stamps.items()
                if isinstance(v, list) and len(v) == 6 and all(isinstance(x, int) for x in v[:5])
                and isinstance(v[5], str)}

    def sha256(self, path: str | os.PathLike) -> str:
        """The sha256 (hex) of ``path``'s bytes now: one ``stat`` while its stamp holds.

        Raises
        ------
        OSError
            ``path`` cannot be stat'ed or read (``FileNotFoundError`` when it is gone).
        """
        key = os.path.abspath(path)
        st = os.stat(key)
        now = _stat_key(st)
        stamp = self._stamps.get(key)
        if stamp is not None and stamp[:4] == now and max(now[2], now[3]) + self.RACY_NS <= stamp[4]:
            return stamp[5]
        hashed_ns = time.time_ns()
        digest = _hash_bytes(key)
        self.hashed += 1
        after = _stat_key(os.stat(key))
        if after == now:  # not changed while it was read: worth remembering
            self._stamps[key] = self._new[key] = [*now, hashed_ns, digest]
        return digest

    def watch(self, path: str | os.PathLike) -> tuple | None:
        """A token for :meth:`vouch`: ``path``'s stat now and the time (``None`` when it is gone)."""
        key = os.path.abspath(path)
        try:
            return key, _stat_key(os.stat(key)), time.time_ns()
        except OSError:
            return None

    def vouch(self, token: tuple | None, sha256: str) -> None:
        """Remember ``sha256`` for the file of ``token`` (:meth:`watch`) when someone else read and
        checked its bytes since (the registry verifies a weights file as it loads it), provided
        its stat has not moved since the token was taken."""
        if token is None:
            return
        key, before, watched_ns = token
        try:
            if _stat_key(os.stat(key)) != before:
                return
        except OSError:
            return
        self._stamps[key] = self._new[key] = [*before, watched_ns, sha256]

    def save(self) -> None:
        """Write the new stamps (merged into what the file holds now) atomically; no-op when none.

        Raises
        ------
        WriteError
            The stamp file cannot be written (named).
        """
        if self.path is None or not self._new:
            return
        stamps = {**self._read(self.path), **self._new}
        write_json_atomic(self.path, {"format": _FORMAT, "version": 1, "stamps": stamps}, indent=None)
        self._new = {}
