"""Logits, the pipeline's currency: one value, one file layout, one reader, one writer (numpy only).

A :class:`Logits` is N rows of *joint logits* keyed by sample id: raw logits for flat heads,
joint log-probabilities for factored heads (a softmax of either gives the probabilities),
factor logits for ``--target`` models. It carries the LabelSpace it is over, optionally each
row's label and out-of-fold fold, and a ``meta`` dict saying where it came from (producer,
TTA plan, the sha256 of the weights, ...). Every step that writes logits (a fold's validation
logits, a family's OOF logits, the engine's cache, ``ensembler infer --out``, the OOF-TTA
file of ``tta-report``) writes them with :func:`write_logits`; every step that reads them
(``tune-weights``, ``evaluate``, ``predict``, ``tta-report``) reads them with
:func:`read_logits` or :func:`read_logits_set`.

File layout (format version 2)
------------------------------
``<name>.npz`` (``np.savez``, no pickle)::

    ids             (N,) str
    logits          (N, K) float32   the members' columns side by side; one member: K = C
    labels          (N,) int64       optional
    folds           (N,) int64       optional
    format_version  () int64         2
    members         (M,) str         only when the file holds M > 1 members
    columns         (M + 1,) int64   only then: member m is logits[:, columns[m]:columns[m + 1]]

``<name>.json`` (the sidecar: same folder, same stem, :func:`sidecar_path`)::

    {"format": "ensembler-logits", "version": 2, "rows": N, "created": "...",
     "npz_sha256": "...",
     "members": [{"name": ..., "columns": [start, stop], "label_space": {...} | null,
                  "meta": {...}}, ...]}

The npz is written first and the sidecar last, each atomically (temp file, fsync, rename),
so a crash leaves the old pair or a new npz the reader refuses (its sha256 is not the one
the sidecar recorded). Without a sidecar the npz still loads (no label space, empty meta):
a hand-made ``np.savez(ids=..., logits=...)`` file is a valid logits file.

Files written by ensembler 0.1.0 load too: a fold's ``val_logits.npz`` (``best_epoch``
inside), ``oof.npz`` with its label space in ``oof.json``, the OOF-TTA file with its label
space inside the npz, the engine cache's ``<key>.npz`` + ``<key>.json``, and the
``infer --out`` file (``members`` + ``logits/<name>`` arrays, sidecar ``<file>.npz.json``).
Their sidecar's keys become ``meta``.

Examples
--------
>>> import tempfile, os
>>> from ensembler.labels import LabelSpace
>>> z = Logits(["a", "b"], [[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]], label_space=LabelSpace(("x", "y", "z")),
...            labels=[0, 2], meta={"producer": "demo"}, name="m")
>>> path = write_logits(os.path.join(tempfile.mkdtemp(), "m.npz"), z)
>>> back = read_logits(path)
>>> back.ids.tolist(), back.logits.dtype.name, back.label_space.classes, back.meta["producer"]
(['a', 'b'], 'float32', ('x', 'y', 'z'), 'demo')
>>> sidecar_path(path).name
'm.json'
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import zipfile
from dataclasses import KW_ONLY, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ._io import write_bytes_atomic, write_json_atomic
from .errors import LogitError
from ._logits_layouts import members_from_npz, members_from_sidecar, refuse_non_npz
from .labels import LabelSpace

__all__ = ["FORMAT", "FORMAT_VERSION", "Logits", "few", "read_logits", "read_logits_set", "sidecar_path",
           "write_logits"]

FORMAT = "ensembler-logits"
FORMAT_VERSION = 2
_ROW_ARRAYS = ("labels", "folds")


def few(items: Iterable, k: int = 5) -> str:
    """``'a', 'b', 'c' (+4 more)``: a few offending ids (or rows) for an error message."""
    items = [str(i) for i in items]
    more = f" (+{len(items) - k} more)" if len(items) > k else ""
    return ", ".join(repr(i) for i in items[:k]) + more


# ============================================================================ the value
@dataclass(frozen=True, eq=False)
class Logits:
    """N rows of joint logits keyed by id, with their label space, labels, folds and provenance.

    Parameters
    ----------
    ids : array-like (N,)
        Sample ids (stored as str), unique.
    logits : array-like (N, C)
        Joint logits; stored as float32.
    label_space : LabelSpace, optional
        The classes of the C columns; ``None`` when unknown (a hand-made file): then only the
        class count is checked downstream.
    labels, folds : array-like (N,) of int, optional
        Each row's class index and out-of-fold fold (OOF logits carry both).
    meta : dict, optional
        Where the logits came from; JSON-serialisable. Keys read by :attr:`kind`,
        :attr:`sha256`, :attr:`parts` and :attr:`source`; producers add their own
        (``producer``, ``tta``, ``fingerprint``, ``complete``, ...).
    name : str
        Member name (family, checkpoint id, file stem, or ``a+b+c`` for a composition).

    Raises
    ------
    LogitError
        Shapes that do not fit together (the message names the member).

    Examples
    --------
    >>> z = Logits(["a", "b", "c"], np.eye(3), labels=[0, 1, 2], name="demo")
    >>> len(z), z.num_classes, z.logits.dtype.name
    (3, 3, 'float32')
    >>> z.subset([2, 0]).ids.tolist()
    ['c', 'a']
    """

    ids: np.ndarray
    logits: np.ndarray
    _: KW_ONLY
    label_space: LabelSpace | None = None
    labels: np.ndarray | None = None
    folds: np.ndarray | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)
    name: str = ""

    def __post_init__(self):
        ids = np.asarray(self.ids)
        ids = ids.astype(str) if ids.dtype.kind != "U" else ids
        z = np.asarray(self.logits)
        if z.dtype != np.float32:
            z = z.astype(np.float32)
        who = f"logits of {self.name!r}" if self.name else "logits"
        if z.ndim != 2:
            raise LogitError(f"{who} must be a 2-D (N, C) array, got shape {z.shape}")
        if ids.shape != (z.shape[0],):
            raise LogitError(f"{who}: {ids.shape} ids for {z.shape[0]} rows of logits")
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "logits", z)
        for key in _ROW_ARRAYS:
            a = getattr(self, key)
            if a is None:
                continue
            a = np.asarray(a)
            if a.shape != (z.shape[0],) or not (np.issubdtype(a.dtype, np.integer) or a.size == 0):
                raise LogitError(f"{who}: '{key}' must be {z.shape[0]} integers, got {a.dtype} {a.shape}")
            object.__setattr__(self, key, a.astype(np.int64, copy=False))
        if self.label_space is not None and self.label_space.num_classes != z.shape[1]:
            raise LogitError(f"{who} have {z.shape[1]} classes but the label space has "
                             f"{self.label_space.num_classes} ({list(self.label_space.classes)[:6]}...)")
        object.__setattr__(self, "meta", dict(self.meta or {}))
        object.__setattr__(self, "name", str(self.name))

    # ------------------------------------------------------------------ shape
    @property
    def num_classes(self) -> int:
        return int(self.logits.shape[1])

    def __len__(self) -> int:
        return int(self.logits.shape[0])

    def __repr__(self) -> str:
        extra = "".join(f", {k}" for k in _ROW_ARRAYS if getattr(self, k) is not None)
        return f"Logits({self.name!r}, {len(self)} x {self.num_classes}{extra})"

    # ------------------------------------------------------------------ provenance (meta)
    @property
    def source(self) -> str:
        """The file these logits were read from (``""`` for logits made in memory)."""
        return str(self.meta.get("source", ""))

    @property
    def kind(self) -> str:
        """What the member is: ``family``, ``checkpoint``, ``composed`` or ``file`` (the default)."""
        return str(self.meta.get("kind", "file"))

    @property
    def sha256(self) -> tuple[str, ...]:
        """sha256 of each weights file behind the logits (checkpoint order), when known."""
        value = self.meta.get("sha256", ())
        if isinstance(value, Mapping):
            value = value.values()
        elif isinstance(value, str):
            value = (value,)
        return tuple(str(v) for v in value)

    @property
    def parts(self) -> tuple[str, ...]:
        """A composed member's per-factor members, in the joint space's factor order."""
        return tuple(str(p) for p in self.meta.get("parts", ()))

    # ------------------------------------------------------------------ rows
    def replace(self, **changes) -> "Logits":
        """A copy with some fields changed (``meta`` changes are merged when ``meta_update`` is given)."""
        update = changes.pop("meta_update", None)
        if update:
            changes["meta"] = {**dict(changes.get("meta", self.meta)), **update}
        return dataclasses.replace(self, **changes)

    def subset(self, index) -> "Logits":
        """Rows ``index`` (a boolean mask or positions): ids, logits, labels and folds together."""
        pick = (lambda a: None if a is None else a[index])
        return dataclasses.replace(self, ids=self.ids[index], logits=self.logits[index], labels=pick(self.labels),
                                   folds=pick(self.folds))

    def positions(self, ids) -> tuple[np.ndarray, list[str]]:
        """Row of each id of ``ids`` in these logits, and the ids that are absent.

        Returns ``(positions, missing)``; ``positions`` is only meaningful when ``missing`` is empty.
        """
        where = {i: n for n, i in enumerate(self.ids.tolist())}
        want = np.asarray(ids).astype(str).tolist()
        missing = [i for i in want if i not in where]
        pos = np.fromiter((where.get(i, -1) for i in want), dtype=np.int64, count=len(want))
        return pos, missing


# ============================================================================ paths
def sidecar_path(path: str | os.PathLike) -> Path:
    """The JSON sidecar of a logits file: same folder, same stem (``oof.npz`` -> ``oof.json``)."""
    return Path(path).with_suffix(".json")


# ============================================================================ writing
def write_logits(path: str | os.PathLike, logits: "Logits | Sequence[Logits] | Mapping[str, Logits]") -> Path:
    """Write one or several :class:`Logits` over the same rows to ``path`` (+ its sidecar), atomically.

    Parameters
    ----------
    path : path
        The ``.npz`` to write; the sidecar is :func:`sidecar_path` of it.
    logits : Logits, list of Logits, or dict name -> Logits
        Several members must share their ids (same order) and their labels/folds where they
        have them; a dict renames each member to its key.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    LogitError
        No members, two members with one name, ids that differ between members, non-finite
        logits (nothing is written then).
    """
    path = Path(path)
    members = _as_member_list(logits)
    ref = members[0]
    for m in members[1:]:
        if not np.array_equal(m.ids, ref.ids):
            raise LogitError(f"logits file {path}: member {m.name!r} has ids that differ from member {ref.name!r}")
    arrays: dict[str, np.ndarray] = {"ids": ref.ids, "format_version": np.int64(FORMAT_VERSION)}
    for key in _ROW_ARRAYS:
        have = [m for m in members if getattr(m, key) is not None]
        if have:
            first = getattr(have[0], key)
            for m in have[1:]:
                if not np.array_equal(getattr(m, key), first):
                    raise LogitError(f"logits file {path}: members {have[0].name!r} and {m.name!r} disagree on "
                                     f"'{key}'")
            arrays[key] = first
    for m in members:
        bad = ~np.isfinite(m.logits).all(axis=1)
        if bad.any():
            raise LogitError(f"refusing to write {path}: member {m.name!r} has {int(bad.sum())} row(s) of NaN or "
                             f"inf logits, e.g. ids {few(m.ids[bad])}")
    columns = np.cumsum([0] + [m.num_classes for m in members]).astype(np.int64)
    arrays["logits"] = (members[0].logits if len(members) == 1
                        else np.concatenate([m.logits for m in members], axis=1))
    if len(members) > 1:
        arrays["members"] = np.asarray([m.name for m in members]).astype(str)
        arrays["columns"] = columns
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    data = buf.getvalue()
    write_bytes_atomic(path, data)
    write_json_atomic(sidecar_path(path), {
        "format": FORMAT, "version": FORMAT_VERSION, "rows": len(ref),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "npz": path.name, "npz_sha256": hashlib.sha256(data).hexdigest(),
        "members": [{"name": m.name, "columns": [int(columns[i]), int(columns[i + 1])],
                     "label_space": m.label_space.to_dict() if m.label_space is not None else None,
                     "meta": {k: v for k, v in m.meta.items() if k != "source"}}
                    for i, m in enumerate(members)],
    })
    return path


def _as_member_list(logits) -> list[Logits]:
    if isinstance(logits, Logits):
        members = [logits]
    elif isinstance(logits, Mapping):
        members = [m.replace(name=str(k)) if m.name != k else m for k, m in logits.items()]
    else:
        members = list(logits)
    if not members:
        raise LogitError("no logits to write")
    if not all(isinstance(m, Logits) for m in members):
        raise LogitError(f"write_logits takes Logits values, got {sorted({type(m).__name__ for m in members})}")
    names = [m.name for m in members]
    if len(members) > 1:
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup or "" in names:
            raise LogitError(f"members of one logits file need distinct names, got {names}")
    return members


# ============================================================================ reading
def read_logits(path: str | os.PathLike, *, member: str | None = None,
                require: Sequence[str] = ()) -> Logits:
    """Read one :class:`Logits` from a logits file (any layout this or an earlier version wrote).

    Parameters
    ----------
    path : path
        The ``.npz``.
    member : str, optional
        Which member of a file holding several (``ensembler infer --out``); required then.
    require : sequence of {"labels", "folds"}
        Row arrays that must be present (OOF logits need both).

    Returns
    -------
    Logits
        ``meta["source"]`` is ``path``; a member without a stored name is named by the file stem.

    Raises
    ------
    LogitError
        Naming ``path`` and what is wrong: missing, a folder, not an npz, a bare ``.npy``, a
        missing array, bad shapes, NaN/inf rows (a few ids named), duplicate ids, labels
        outside the class range, a class count that disagrees with the label space, a sidecar
        that does not belong to the npz, an unknown member.
    """
    members = read_logits_set(path, require=require)
    if member is not None:
        if member not in members:
            raise LogitError(f"logits file {path} has no member {member!r}; it holds {list(members)}")
        return members[member]
    if len(members) > 1:
        raise LogitError(f"logits file {path} holds {len(members)} members {list(members)}: name one")
    return next(iter(members.values()))


def read_logits_set(path: str | os.PathLike, *, require: Sequence[str] = ()) -> dict[str, Logits]:
    """Every member of a logits file, by name, in stored order (see :func:`read_logits`)."""
    path = Path(path)
    unknown = sorted(set(require) - set(_ROW_ARRAYS))
    if unknown:
        raise LogitError(f"require= takes 'labels'/'folds', got {unknown}")
    arrays = _load_npz(path)
    sidecar = _read_sidecar(path, arrays)
    if sidecar is not None:
        specs, file_meta = members_from_sidecar(path, arrays, sidecar, sidecar_path(path)), {}
    else:
        specs, file_meta = members_from_npz(path, arrays, sidecar_path(path))
    missing = [k for k in ("ids", *require) if k not in arrays]
    if missing:
        raise LogitError(f"logits file {path} lacks array(s) {missing} (it has {sorted(arrays)})")
    ids = _check_ids(path, arrays["ids"])
    n = len(ids)
    specs = [(name, _check_logits(path, name if len(specs) > 1 else None, z, n, ids), space, meta)
             for name, z, space, meta in specs]
    rows = {key: _check_row_array(path, key, arrays[key], n) for key in _ROW_ARRAYS if key in arrays}
    out: dict[str, Logits] = {}
    for name, z, space, meta in specs:
        space = _check_space(path, space, z.shape[1])
        labels = rows.get("labels")
        if labels is not None and n and (labels.min() < 0 or labels.max() >= z.shape[1]):
            out_of_range = (labels < 0) | (labels >= z.shape[1])
            raise LogitError(f"logits file {path}: labels outside 0..{z.shape[1] - 1} (wrong class count?) at ids "
                             f"{few(ids[out_of_range])}")
        meta = {**file_meta, **meta, "source": str(path)}
        out[name] = Logits(ids, z, label_space=space, labels=labels, folds=rows.get("folds"), meta=meta,
                           name=name)
    return out


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    refuse_non_npz(path)  # a text file, a bare .npy, random bytes: named, with the layout expected
    try:
        npz = np.load(path, allow_pickle=False)
        if not hasattr(npz, "files"):
            raise LogitError(f"logits file {path} is a bare .npy array, not an .npz with 'ids' and 'logits'")
        with npz:
            return {k: _npz_array(path, npz, k) for k in npz.files}
    except FileNotFoundError:
        raise LogitError(f"logits file {path} does not exist") from None
    except IsADirectoryError:
        raise LogitError(f"logits file {path} is a folder, not an .npz file") from None
    except LogitError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as exc:
        raise LogitError(f"logits file {path} is not a readable .npz file ({type(exc).__name__}: {exc})") from None


def _npz_array(path: Path, npz, key: str) -> np.ndarray:
    """One array of an npz; an object (pickled) array is refused naming it, never unpickled."""
    try:
        return npz[key]
    except ValueError as exc:
        if "allow_pickle" not in str(exc):
            raise
        raise LogitError(f"logits file {path}: array {key!r} is an object array (loading it needs pickle, which "
                         f"could run code); refused. Save ids as strings (np.asarray(ids, dtype=str)) and logits, "
                         f"labels, folds as numbers") from None


def _read_sidecar(path: Path, arrays: Mapping[str, np.ndarray]) -> dict | None:
    """The format-2 sidecar, checked against the npz; ``None`` for a file without one."""
    side = sidecar_path(path)
    version = arrays.get("format_version")
    if not side.is_file():
        return None
    try:
        doc = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        if version is None:
            return None  # a 0.1.0 sidecar we only read for its label space: not required
        raise LogitError(f"sidecar {side} of logits file {path} is not readable JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        if version is not None:
            raise LogitError(f"sidecar {side} of logits file {path} is not an {FORMAT} sidecar")
        return None  # 0.1.0: oof.json, the cache's <key>.json, the OOF-TTA report
    if not isinstance(doc.get("version"), int) or doc["version"] > FORMAT_VERSION:
        raise LogitError(f"logits file {path}: its sidecar {side} has format version {doc.get('version')!r}; this "
                         f"ensembler reads version {FORMAT_VERSION} (upgrade ensembler)")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if doc.get("npz_sha256") not in (None, digest):
        raise LogitError(f"logits file {path} does not match its sidecar {side} (sha256 {digest[:12]} != recorded "
                         f"{str(doc['npz_sha256'])[:12]}): one of them was changed or a write was interrupted; "
                         f"rewrite the file")
    return doc


# ============================================================================ checks
def _check_ids(path: Path, ids: np.ndarray) -> np.ndarray:
    if ids.ndim != 1:
        raise LogitError(f"logits file {path}: 'ids' must be 1-D, got shape {ids.shape}")
    ids = ids.astype(str)
    uniq, counts = np.unique(ids, return_counts=True)
    if len(uniq) != len(ids):
        raise LogitError(f"logits file {path}: duplicate ids {few(uniq[counts > 1])}")
    return ids


def _check_row_array(path: Path, key: str, a: np.ndarray, n: int) -> np.ndarray:
    if a.shape != (n,) or not (np.issubdtype(a.dtype, np.integer) or (a.size == 0 and a.ndim == 1)):
        raise LogitError(f"logits file {path}: '{key}' must be an int array of {n} rows, got {a.dtype} {a.shape}")
    return a.astype(np.int64)


def _check_logits(path: Path, member: str | None, z: np.ndarray, n: int, ids: np.ndarray) -> np.ndarray:
    where = f"logits file {path}" + (f", member {member!r}" if member else "")
    if z.ndim != 2 or z.shape[1] < 2 or not np.issubdtype(z.dtype, np.floating):
        raise LogitError(f"{where}: 'logits' must be a float (N, C>=2) array, got {z.dtype} {z.shape}")
    if z.shape[0] != n:
        raise LogitError(f"{where}: 'ids' has shape {(n,)} but 'logits' has {z.shape[0]} rows")
    bad = ~np.isfinite(z).all(axis=1)
    if bad.any():
        raise LogitError(f"{where}: {int(bad.sum())} row(s) of logits are NaN or inf, e.g. ids {few(ids[bad])}")
    return z


def _check_space(path: Path, space, num_classes: int) -> LabelSpace | None:
    if space is None or isinstance(space, LabelSpace):
        out = space
    else:
        try:
            out = LabelSpace.from_dict(space)
        except (KeyError, TypeError, ValueError) as exc:
            raise LogitError(f"logits file {path}: bad label space ({exc})") from None
    if out is not None and out.num_classes != num_classes:
        raise LogitError(f"logits file {path}: logits have {num_classes} classes but the label space has "
                         f"{out.num_classes} ({list(out.classes)[:6]}...)")
    return out
