"""LogitStore: cached per-checkpoint logits, so any re-vote or re-tune runs no forward pass.

Each cached result is two files in the cache folder, written atomically (temp file, fsync,
rename; the ``.npz`` first, the ``.json`` last, and a result counts only when both load and
agree):

- ``<key>.npz`` with ``ids`` (str, N) and ``logits`` (float32, N x C): joint logits of one
  checkpoint over a SampleTable, in the table's row order;
- ``<key>.json`` with the metadata: producer (checkpoint id), weights sha256, TTA plan,
  merge rule, backend, precision, data fingerprint, class names, created time.

``<key>`` is ``<checkpoint id>-<hash>``, the hash being sha256 over weights sha256 x TTA
plan x merge x data fingerprint x backend x precision x preprocessing/head. Backend and
precision are part of the key because onnxruntime and fp16/bf16 give (slightly) different
numbers: a cached torch-fp32 result is never handed out as an ONNX one.

Where the cache lives: ``cache_dir`` when given, else ``$ENSEMBLER_CACHE/logits`` when that
variable is set, else ``<registry root>/../.ensembler_cache/logits`` (next to the
``checkpoints/`` folder, so the cache travels with the registry it belongs to).

A cache file that cannot be read, or whose ids do not match the table, is ignored with a
:class:`CacheWarning` and recomputed.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .._io import save_npz_atomic, sha256_bytes, write_json_atomic
from ..errors import LogitError
from ..labels import LabelSpace

__all__ = ["CacheWarning", "LogitStore", "MemberLogits", "default_cache_dir", "save_member_logits",
           "load_member_logits"]

CACHE_VERSION = 1


class CacheWarning(UserWarning):
    """A cached logits file was unreadable or stale and is being recomputed."""


@dataclass
class MemberLogits:
    """Logits of one ensemble member (a checkpoint, or a family = mean over its folds).

    Attributes
    ----------
    name : str
        Family name or checkpoint id.
    ids : np.ndarray
        Sample ids (str), in the SampleTable's row order.
    logits : np.ndarray
        float32 (N, C) joint logits (raw logits for flat heads, joint log-probs for factored).
    label_space : LabelSpace
    meta : dict
        ``checkpoints``, ``sha256``, ``tta``, ``merge``, ``backend``, ``precision``,
        ``fingerprint``, ``cached`` (True when no forward pass ran), ``cache_files``.
    """

    name: str
    ids: np.ndarray
    logits: np.ndarray
    label_space: LabelSpace
    meta: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return int(self.logits.shape[1])


def default_cache_dir(registry_root: str | os.PathLike | None = None) -> Path:
    """``$ENSEMBLER_CACHE/logits`` if set, else ``<registry_root>/../.ensembler_cache/logits``."""
    env = os.environ.get("ENSEMBLER_CACHE")
    if env:
        return Path(env).expanduser() / "logits"
    root = Path(registry_root) if registry_root is not None else Path("checkpoints")
    return root.resolve().parent / ".ensembler_cache" / "logits"


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
        return self.root / f"{key}.npz", self.root / f"{key}.json"

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
        npz, js = self.paths(key)
        save_npz_atomic(npz, ids=ids, logits=logits)
        full = {"key": key, "version": CACHE_VERSION, **dict(meta), "num_samples": int(len(ids)),
                "num_classes": int(logits.shape[1]),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        write_json_atomic(js, full)
        return npz

    def load(self, key: str, ids=None) -> tuple[np.ndarray, dict] | None:
        """Cached ``(logits, meta)`` for ``key``, or None when absent, unreadable or stale.

        Unreadable files and files whose ids differ from ``ids`` raise a :class:`CacheWarning`
        (warnings module) and return None, so the caller recomputes.
        """
        npz, js = self.paths(key)
        if not npz.exists() and not js.exists():
            return None
        try:
            meta = json.loads(js.read_text())
            if meta.get("key") != key:
                raise ValueError(f"metadata names key {meta.get('key')!r}")
            with np.load(npz, allow_pickle=False) as data:
                cached_ids = data["ids"].astype(str)
                logits = data["logits"].astype(np.float32, copy=False)
            if logits.ndim != 2 or logits.shape[0] != len(cached_ids):
                raise ValueError(f"logits of shape {logits.shape} for {len(cached_ids)} ids")
            if not np.isfinite(logits).all():
                raise ValueError("non-finite logits")
        except Exception as exc:  # noqa: BLE001 - any unreadable cache entry is recomputed
            warnings.warn(f"ignoring unreadable cached logits {npz} ({type(exc).__name__}: {exc}); recomputing",
                          CacheWarning, stacklevel=2)
            return None
        if ids is not None and not np.array_equal(cached_ids, np.asarray(ids).astype(str)):
            warnings.warn(f"ignoring cached logits {npz}: its ids do not match the data; recomputing",
                          CacheWarning, stacklevel=2)
            return None
        return logits, meta

    def entries(self) -> list[dict]:
        """Metadata of every readable cached result."""
        out = []
        for js in sorted(self.root.glob("*.json")):
            try:
                out.append(json.loads(js.read_text()))
            except (OSError, ValueError):
                continue
        return out


# ---------------------------------------------------------------------------- member logits files
def save_member_logits(path: str | os.PathLike, members: Mapping[str, MemberLogits]) -> Path:
    """Write member logits to one ``.npz`` (+ ``.json`` sidecar) for later voting.

    The npz holds ``ids`` (str, N; every member must share them), ``members`` (str, M) and one
    ``logits/<name>`` float32 (N, C_m) array per member. ``<path>.json`` holds each member's
    label space and metadata. Both are written atomically.
    """
    path = Path(path)
    if not members:
        raise LogitError("no member logits to write")
    names = list(members)
    ids = np.asarray(members[names[0]].ids).astype(str)
    arrays = {"ids": ids, "members": np.asarray(names).astype(str)}
    for name in names:
        m = members[name]
        if not np.array_equal(np.asarray(m.ids).astype(str), ids):
            raise LogitError(f"member {name!r} has ids that differ from member {names[0]!r}")
        arrays[f"logits/{name}"] = np.asarray(m.logits, dtype=np.float32)
    save_npz_atomic(path, **arrays)
    sidecar = {name: {"label_space": members[name].label_space.to_dict(), "meta": members[name].meta}
               for name in names}
    write_json_atomic(path.with_name(path.name + ".json"), {"members": sidecar})
    return path


def load_member_logits(path: str | os.PathLike) -> dict[str, MemberLogits]:
    """Read what :func:`save_member_logits` wrote."""
    path = Path(path)
    try:
        side = json.loads(path.with_name(path.name + ".json").read_text())["members"]
        with np.load(path, allow_pickle=False) as data:
            ids = data["ids"].astype(str)
            names = [str(n) for n in data["members"]]
            logits = {n: data[f"logits/{n}"].astype(np.float32) for n in names}
    except (OSError, KeyError, ValueError) as exc:
        raise LogitError(f"cannot read member logits {path}: {exc}") from None
    return {n: MemberLogits(n, ids, logits[n], LabelSpace.from_dict(side[n]["label_space"]), side[n]["meta"])
            for n in names}
