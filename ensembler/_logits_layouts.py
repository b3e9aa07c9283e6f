"""How the arrays of a logits file split into members, for each layout :mod:`ensembler.logits` reads.

- format 2 with its sidecar: the sidecar's ``members`` give each member's columns of
  ``logits``, its label space and meta;
- format 2 without its sidecar: the npz's own ``members``/``columns``;
- files written by ensembler 0.1.0, or made by hand: one member ``logits`` (its label space
  from the npz's ``label_space`` string or the old sidecar's ``label_space``/``classes``,
  the old sidecar's keys as meta, ``best_epoch`` of a fold's ``val_logits.npz``), or the
  ``infer --out`` layout (``members`` + ``logits/<name>``, sidecar ``<file>.npz.json``).

:func:`refuse_non_npz` names a file that is no npz archive at all (a text or CSV file, a bare
``.npy``, random bytes) and says what layout is expected, before numpy's "pickled data".

Each member comes back as ``(name, logits array, label space dict or None, meta)``; the
checks of the arrays themselves are :func:`ensembler.logits.read_logits_set`'s.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .errors import LogitError

Member = tuple[str, np.ndarray, Any, dict]


def members_from_sidecar(path: Path, arrays, doc: dict, side: Path) -> list[Member]:
    """Members of a format-2 file, as its sidecar ``doc`` splits the npz's ``logits`` columns."""
    if "logits" not in arrays:
        raise LogitError(f"logits file {path} lacks array(s) ['logits'] (it has {sorted(arrays)})")
    z = arrays["logits"]
    specs = doc.get("members")
    if not isinstance(specs, list) or not specs:
        raise LogitError(f"sidecar {side} of logits file {path} lists no members")
    width = z.shape[1] if z.ndim == 2 else None
    out, start = [], 0
    for spec in specs:
        try:
            lo, hi = (int(c) for c in spec["columns"])
            name = str(spec["name"])
        except (KeyError, TypeError, ValueError):
            raise LogitError(f"sidecar {side} of logits file {path}: bad member entry {spec!r}") from None
        if lo != start or hi <= lo or (width is not None and hi > width):
            raise LogitError(f"sidecar {side} of logits file {path}: member {name!r} columns "
                             f"{[lo, hi]} do not fit logits of shape {z.shape}")
        start = hi
        out.append((name or path.stem, z[:, lo:hi] if z.ndim == 2 else z, spec.get("label_space"),
                    dict(spec.get("meta") or {})))
    if width is not None and start != width:
        raise LogitError(f"sidecar {side} of logits file {path}: members cover {start} of "
                         f"{width} columns")
    if doc.get("rows") is not None and z.ndim >= 1 and int(doc["rows"]) != z.shape[0]:
        raise LogitError(f"logits file {path} has {z.shape[0]} rows, its sidecar says {doc['rows']}")
    return out


def members_from_npz(path: Path, arrays, side: Path) -> tuple[list[Member], dict]:
    """Members of a file without a format-2 sidecar (hand-made, written by 0.1.0, or a
    format-2 npz whose sidecar is gone: its arrays still say how the columns split)."""
    if "format_version" in arrays and "columns" in arrays:
        return _npz_split(path, arrays), {}
    if "logits" not in arrays and "members" in arrays:  # 0.1.0 `infer --out`
        side = path.with_name(path.name + ".json")  # 0.1.0: <file>.npz.json
        try:
            info = json.loads(side.read_text(encoding="utf-8"))["members"]
        except FileNotFoundError:
            info = {}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LogitError(f"sidecar {side} of logits file {path} is not readable ({exc})") from None
        out = []
        for name in (str(n) for n in arrays["members"]):
            key = f"logits/{name}"
            if key not in arrays:
                raise LogitError(f"logits file {path} lists member {name!r} but has no array {key!r}")
            spec = info.get(name) or {}
            out.append((name, arrays[key], spec.get("label_space"), dict(spec.get("meta") or {})))
        return out, {}
    if "logits" not in arrays:
        raise LogitError(f"logits file {path} lacks array(s) ['logits'] (it has {sorted(arrays)})")
    meta: dict = {}
    space = None
    if side.is_file():  # 0.1.0 oof.json / cache <key>.json / OOF-TTA report: read for what it says, if it can be
        try:
            doc = json.loads(side.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            doc = None
        if isinstance(doc, dict):
            meta = {k: v for k, v in doc.items() if k != "label_space"}
            space = doc.get("label_space")
    if "label_space" in arrays:  # 0.1.0 OOF-TTA file: the label space inside the npz
        try:
            space = json.loads(str(arrays["label_space"]))
        except json.JSONDecodeError as exc:
            raise LogitError(f"logits file {path}: 'label_space' is not valid JSON ({exc})") from None
    for key, value in arrays.items():  # 0.1.0 val_logits.npz: best_epoch
        if value.ndim == 0 and key not in ("label_space", "format_version") and value.dtype.kind in "iuf":
            meta.setdefault(key, value.item())
    if space is None and isinstance(meta.get("classes"), list):  # 0.1.0 cache sidecar
        space = {"classes": meta["classes"]}
        if len(space["classes"]) != (arrays["logits"].shape[1] if arrays["logits"].ndim == 2 else -1):
            space = None  # e.g. per-view (N, V*C) cache files: the classes are of each view
    return [(path.stem, arrays["logits"], space, {})], meta


def _npz_split(path: Path, arrays) -> list[Member]:
    z, cols = arrays.get("logits"), arrays["columns"]
    names = [str(n) for n in arrays.get("members", ())]
    if z is None or z.ndim != 2 or cols.ndim != 1 or len(cols) != len(names) + 1 or cols[0] != 0 \
            or cols[-1] != z.shape[1] or np.any(np.diff(cols) <= 0):
        raise LogitError(f"logits file {path}: 'members'/'columns' do not split 'logits' into members")
    return [(name, z[:, cols[i]:cols[i + 1]], None, {}) for i, name in enumerate(names)]


def _npy_header(fh) -> str:
    """`` (float64 (3, 2))`` from a .npy header, or "" when it cannot be read."""
    try:
        fh.seek(0)
        version = np.lib.format.read_magic(fh)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(fh)
    except (ValueError, OSError, EOFError):
        return ""
    return f" ({dtype} {shape})"


_LAYOUT = ("an .npz archive holding 'ids' (N,) and 'logits' (N, C) arrays, with 'labels' (N,) to score and "
           "'folds' (N,) for OOF logits (`ensembler infer --out FILE.npz`, an OOF file, or "
           "np.savez(FILE, ids=..., logits=..., labels=...))")


def refuse_non_npz(path: Path) -> None:
    """LogitError naming ``path`` unless it starts like a zip archive (an npz); a missing file or a
    folder is left to the reader, which names it."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(64)
            array = _npy_header(fh) if head[:6] == b"\x93NUMPY" else None
    except OSError:
        return
    if head[:6] == b"\x93NUMPY":
        raise LogitError(f"logits file {path} is a bare .npy array{array}, not a logits file: expected {_LAYOUT}")
    if head[:2] == b"PK":
        return
    text = bool(head) and all(32 <= b < 127 or b in (9, 10, 13) for b in head)
    first = head.split(b"\n")[0]
    if path.suffix.lower() == ".csv" or (text and b"," in first):
        raise LogitError(f"logits file {path} is not a readable .npz file: it is a text/CSV file. Submission "
                         "CSVs are combined with `ensembler vote-files`; `evaluate --logits` takes logits as an .npz "
                         "(`ensembler infer --out FILE.npz`, an OOF file)")
    kind = ("it is empty" if not head else f"it is a text file (it starts {first[:24].decode('ascii')!r})" if text
            else f"it starts with the bytes {head[:8]!r}")
    raise LogitError(f"logits file {path} is not a readable .npz file: {kind}, not an npz archive; expected {_LAYOUT}")
