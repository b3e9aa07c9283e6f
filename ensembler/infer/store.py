"""LogitStore: cached per-checkpoint logits, so any re-vote or re-tune runs no forward pass.

Each cached result is one logits file of :mod:`ensembler.logits` in the cache folder:
``<key>.npz`` (``ids`` (str, N), ``logits`` (float32, N x C): joint logits of one checkpoint
over a SampleTable, in the table's row order) and its sidecar ``<key>.json`` holding the
metadata: producer (checkpoint id), weights sha256, TTA plan, merge rule, backend,
precision, data fingerprint, class names, created time. Both are written atomically, the
npz first and the sidecar last; a result counts only when both load and agree.

``<key>`` is ``<checkpoint id>-<hash>``, the hash being sha256 over weights sha256 x TTA
plan x merge x data fingerprint x backend x precision x preprocessing/head. Backend and
precision are part of the key because onnxruntime and fp16/bf16 give (slightly) different
numbers: a cached torch-fp32 result is never handed out as an ONNX one.

Where the cache lives: ``cache_dir`` when given, else ``$ENSEMBLER_CACHE/logits`` when that
variable is set, else ``<registry root>/../.ensembler_cache/logits`` (next to the
``checkpoints/`` folder, so the cache travels with the registry it belongs to).

When a cached result is trusted (docs/RELIABILITY.md, "Cache", lists the test of each):

* **its own checksum holds**: every entry records ``checksum``, the sha256 of its key, ids
  and logits bytes (:func:`logits_checksum`), verified on load. A file that cannot be read,
  whose checksum or ids do not match, or that has no checksum (an older ensembler wrote it)
  is a cache miss with a :class:`CacheWarning` naming the file; the caller recomputes it and
  the entry is rewritten;
* **the weights behind it are the registry's**: :func:`check_weights` compares the weights
  file's sha256 with the entry's before a hit is served (a deleted or altered file stops the
  run as a cold run would), at the cost of one ``stat`` while the file is unchanged;
* **the data is the same content**: the data fingerprint hashes every image's bytes.

Both hashes are remembered in ``<cache>/file_hashes.json`` (:attr:`LogitStore.hashes`, a
:class:`~ensembler.filehash.FileHashes`), so a warm run reads no image and no weights file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .._io import sha256_bytes
from ..errors import LogitError, WriteError
from ..filehash import STAMPS_NAME, FileHashes
from ..logits import Logits, read_logits, sidecar_path, write_logits

__all__ = ["CacheWarning", "LogitStore", "check_weights", "default_cache_dir", "logits_checksum"]

CACHE_VERSION = 2  # 2: content-based data fingerprint, entries carry a checksum


class CacheWarning(UserWarning):
    """A cached logits file was unreadable or stale and is being recomputed."""


def default_cache_dir(registry_root: str | os.PathLike | None = None) -> Path:
    """``$ENSEMBLER_CACHE/logits`` if set, else ``<registry_root>/../.ensembler_cache/logits``."""
    env = os.environ.get("ENSEMBLER_CACHE")
    if env:
        return Path(env).expanduser() / "logits"
    root = Path(registry_root) if registry_root is not None else Path("checkpoints")
    return root.resolve().parent / ".ensembler_cache" / "logits"


def logits_checksum(key: str, ids, logits) -> str:
    """sha256 over a cache entry's key, ids and float32 logits (shape and bytes, little-endian)."""
    ids = np.asarray(ids).astype(str)
    z = np.ascontiguousarray(logits, dtype="<f4")
    h = hashlib.sha256(f"ensembler-cache-entry\0{key}\0{z.shape}\0".encode())
    h.update("\0".join(ids.tolist()).encode("utf-8", "surrogateescape"))
    h.update(b"\0")
    h.update(z.tobytes())
    return h.hexdigest()


def check_weights(hashes: FileHashes, path: str | os.PathLike, entry) -> None:
    """Refuse to serve cached logits of ``entry`` unless its weights file at ``path`` is intact.

    The check a cold run makes when it loads the weights
    (:func:`ensembler.registry.weights.check_weights_file`, same messages), with the file's
    sha256 remembered by its stat in ``hashes``.

    Raises
    ------
    IntegrityError
        The weights file is missing or its sha256 differs (both named).
    """
    from ..registry.weights import check_weights_file

    check_weights_file(path, entry, sha256=hashes.sha256)

def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", str(name)).strip("._") or "member"


class LogitStore:
    """A folder of cached per-checkpoint logits (see the module docstring for the layout).

    Parameters
    ----------
    root : path
        The cache folder; created on the first write.

    Examples
    --------
    >>> import tempfile
    >>> store = LogitStore(tempfile.mkdtemp())
    >>> key = store.key(producer="a/fold0", sha256="00", tta="flip", merge="mean-logits",
    ...                 fingerprint="ff", backend="torch", precision="fp32")
    >>> _ = store.save(key, np.array(["x", "y"]), np.zeros((2, 3), np.float32), {"producer": "a/fold0"})
    >>> store.load(key, ids=["x", "y"])[0].shape
    (2, 3)
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._hashes: FileHashes | None = None

    @property
    def hashes(self) -> FileHashes:
        """The file hashes of this cache (``<root>/file_hashes.json``): images and weights files."""
        if self._hashes is None:
            self._hashes = FileHashes(self.root / STAMPS_NAME)
        return self._hashes

    def save_hashes(self) -> None:
        """Write the new file hashes; a cache folder that cannot be written only costs re-hashing
        next time (a :class:`CacheWarning`)."""
        try:
            self.hashes.save()
        except WriteError as exc:
            warnings.warn(f"file hashes not remembered ({exc}); the next run reads the files again",
                          CacheWarning, stacklevel=2)

    def __repr__(self) -> str:
        return f"LogitStore({str(self.root)!r})"

    @staticmethod
    def key(*, producer: str, sha256: str, tta: str, merge: str, fingerprint: str, backend: str,
            precision: str, extra: Mapping[str, Any] | None = None) -> str:
        """Cache key: ``<producer>-<sha256 of everything that changes the numbers>``."""
        payload = {
            "v": CACHE_VERSION, "sha256": sha256, "tta": str(tta), "merge": merge, "fingerprint": fingerprint,
            "backend": backend, "precision": precision, "extra": dict(extra or {}),
        }
        digest = sha256_bytes(json.dumps(payload, sort_keys=True, default=str).encode())[:24]
        return f"{_safe_name(producer)}-{digest}"

    def paths(self, key: str) -> tuple[Path, Path]:
        npz = self.root / f"{key}.npz"
        return npz, sidecar_path(npz)

    def exists(self, key: str) -> bool:
        return all(p.exists() for p in self.paths(key))

    def save(self, key: str, ids, logits, meta: Mapping[str, Any]) -> Path:
        """Write ``<key>.npz`` then ``<key>.json``, each atomically. Returns the npz path."""
        ids = np.asarray(ids).astype(str)
        logits = np.asarray(logits, dtype=np.float32)
        if logits.ndim != 2 or logits.shape[0] != len(ids):
            raise LogitError(f"cache {key}: logits of shape {logits.shape} do not match {len(ids)} ids")
        if not np.isfinite(logits).all():
            raise LogitError(f"cache {key}: refusing to cache non-finite logits from {meta.get('producer', key)}")
        full = {"key": key, "version": CACHE_VERSION, **dict(meta), "checksum": logits_checksum(key, ids, logits),
                "num_samples": int(len(ids)),
                "num_classes": int(logits.shape[1]),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        npz, _ = self.paths(key)
        return write_logits(npz, Logits(ids, logits, meta=full, name=str(meta.get("producer", key))))

    def load(self, key: str, ids=None) -> tuple[np.ndarray, dict] | None:
        """Cached ``(logits, meta)`` for ``key``, or None when absent, unreadable or stale.

        Unreadable files, files whose checksum does not hold and files whose ids differ from
        ``ids`` raise a :class:`CacheWarning` (warnings module) naming the file and return None,
        so the caller recomputes (and :meth:`save` rewrites the entry).
        """
        npz, js = self.paths(key)
        if not npz.exists() and not js.exists():
            return None
        try:
            if not js.exists():
                raise ValueError(f"its metadata {js.name} is missing")
            cached = read_logits(npz)
            if cached.meta.get("key") != key:
                raise ValueError(f"metadata names key {cached.meta.get('key')!r}")
        except (LogitError, ValueError) as exc:
            warnings.warn(f"ignoring unreadable cached logits {npz} ({type(exc).__name__}: {exc}); recomputing",
                          CacheWarning, stacklevel=2)
            return None
        recorded = cached.meta.get("checksum")
        if recorded != logits_checksum(key, cached.ids, cached.logits):
            why = ("it has no checksum (an older ensembler wrote it)" if recorded is None else
                   "its logits or ids do not match its checksum (the file was changed after it was written)")
            warnings.warn(f"ignoring cached logits {npz}: {why}; recomputing", CacheWarning, stacklevel=2)
            return None
        if ids is not None and not np.array_equal(cached.ids, np.asarray(ids).astype(str)):
            warnings.warn(f"ignoring cached logits {npz}: its ids do not match the data; recomputing",
                          CacheWarning, stacklevel=2)
            return None
        meta = {k: v for k, v in cached.meta.items() if k != "source"}
        return cached.logits, meta

    def entries(self) -> list[dict]:
        """Metadata of every readable cached result."""
        out = []
        for npz in sorted(self.root.glob("*.npz")):
            try:
                meta = read_logits(npz).meta
            except LogitError:
                continue
            if "key" in meta:
                out.append({k: v for k, v in meta.items() if k != "source"})
        return out
