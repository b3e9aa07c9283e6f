"""The SampleTable: one row per image, its LabelSpace and where it came from.

A :class:`SampleTable` wraps a pandas DataFrame (``id``, ``path``, ``label``, ``group`` and,
after :func:`~ensembler.data.split_folds`, ``fold``) with row queries, per-fold views, a
content fingerprint that keys cached logits, and a CSV round trip (:meth:`SampleTable.to_csv`
writes what :func:`~ensembler.data.load_source` reads back).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .._io import write_text_atomic
from ..errors import DataError
from ..filehash import FileHashes
from ..labels import LabelSpace

CORE_COLUMNS = ("id", "path", "label", "group")


def _check_utf8(frame: pd.DataFrame) -> None:
    """A file name that is not valid UTF-8 (read from disk as surrogate escapes) cannot go into a
    logits file, a ledger or a submission: refused now, naming the file, not after every image ran."""
    for col in ("path", "id"):
        for i, v in enumerate(frame[col]):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                shown = v.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
                raise DataError(f"{col} of row {i} is not valid UTF-8: {shown!r}; rename the file "
                                "(e.g. convmv -f latin1 -t utf8) so ids, logits and submissions can hold it") from None


@dataclass
class SampleTable:
    """One row per image, plus the LabelSpace and a description of where it came from.

    ``frame`` columns: ``id`` (str, unique), ``path`` (str, absolute), ``label`` (Int64,
    ``<NA>`` when unlabeled), ``group`` (str), ``fold`` (int64, after :func:`split_folds`);
    sources may add more (the mask source adds ``profile``, ``mask``, ``gender``,
    ``age_years``). ``source`` is ``{"kind": ..., "path": ..., ...}``.

    ``label_space`` is None only for an unlabeled CSV manifest loaded without
    ``label_space=``: nothing in the data names its classes (the predicting model's do).

    Examples
    --------
    >>> table = load_source("digits")  # doctest: +SKIP
    >>> table.labeled, table.labels[:3]  # doctest: +SKIP
    (True, array([0, 1, 2]))
    >>> zeros = table.subset(table.labels == 0)  # doctest: +SKIP
    >>> key = table.fingerprint()  # doctest: +SKIP
    """

    frame: pd.DataFrame
    label_space: LabelSpace | None
    source: dict = field(default_factory=dict)

    def __post_init__(self):
        frame = self.frame
        missing = [c for c in CORE_COLUMNS if c not in frame.columns]
        if missing:
            raise DataError(f"a SampleTable needs columns {list(CORE_COLUMNS)}; missing {missing}")
        frame = frame.reset_index(drop=True).copy()
        for col in ("id", "path", "group"):
            frame[col] = frame[col].astype(str)
        frame["label"] = frame["label"].astype("Int64")
        if "fold" in frame.columns:
            if frame["fold"].isna().any():
                raise DataError(f"rows without a fold, e.g. id {frame.loc[frame['fold'].isna(), 'id'].iloc[0]!r}")
            frame["fold"] = frame["fold"].astype(np.int64)
        _check_utf8(frame)
        dup = frame["id"].duplicated(keep=False)
        if dup.any():
            first = frame.loc[dup, "id"].iloc[0]
            rows = np.flatnonzero(frame["id"].to_numpy() == first).tolist()
            raise DataError(f"duplicate id {first!r} (rows {rows})")
        labels = frame["label"].dropna()
        if self.label_space is None:
            if len(labels):
                raise DataError("a labeled SampleTable needs a label_space")
            self.frame, self.source = frame, dict(self.source)
            return
        bad = labels[(labels < 0) | (labels >= self.label_space.num_classes)]
        if len(bad):
            raise DataError(
                f"label {int(bad.iloc[0])} of id {frame.loc[bad.index[0], 'id']!r} is outside "
                f"0..{self.label_space.num_classes - 1}"
            )
        self.frame = frame
        self.source = dict(self.source)

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return len(self.frame)

    @property
    def labeled(self) -> bool:
        """True when every row has a label (and there is at least one row)."""
        return len(self.frame) > 0 and bool(self.frame["label"].notna().all())

    @property
    def ids(self) -> np.ndarray:
        return self.frame["id"].to_numpy(dtype=str)

    @property
    def paths(self) -> np.ndarray:
        return self.frame["path"].to_numpy(dtype=str)

    @property
    def groups(self) -> np.ndarray:
        return self.frame["group"].to_numpy(dtype=str)

    @property
    def labels(self) -> np.ndarray:
        """int64 class indices; :class:`DataError` when any row is unlabeled."""
        if not self.labeled:
            n = int(self.frame["label"].isna().sum())
            raise DataError(f"{self.describe()} is unlabeled ({n} of {len(self)} rows have no label)")
        return self.frame["label"].to_numpy(dtype=np.int64)

    @property
    def folds(self) -> np.ndarray:
        if "fold" not in self.frame.columns:
            raise DataError(f"{self.describe()} has no folds yet: call split_folds(table, k, seed)")
        return self.frame["fold"].to_numpy(dtype=np.int64)

    @property
    def has_folds(self) -> bool:
        return "fold" in self.frame.columns

    @property
    def num_folds(self) -> int:
        return int(self.folds.max()) + 1 if len(self) else 0

    def class_names(self) -> np.ndarray:
        """Per-row class name ("" where unlabeled)."""
        if self.label_space is None:
            return np.full(len(self), "", dtype=object)
        names = np.asarray(self.label_space.classes, dtype=object)
        lab = self.frame["label"]
        out = np.full(len(lab), "", dtype=object)
        known = lab.notna().to_numpy()
        out[known] = names[lab[known].to_numpy(dtype=np.int64)]
        return out

    def class_counts(self) -> np.ndarray:
        """Images per class (length C); DataError when unlabeled."""
        return np.bincount(self.labels, minlength=self.label_space.num_classes)

    def describe(self) -> str:
        kind = self.source.get("kind", "?")
        where = self.source.get("path")
        return f"{kind} data {where}" if where else f"{kind} data"

    # ------------------------------------------------------------------ derived tables
    def subset(self, mask_or_index) -> "SampleTable":
        """Rows selected by a boolean mask (length N) or integer positions, order kept."""
        sel = np.asarray(mask_or_index.to_numpy() if isinstance(mask_or_index, pd.Series) else mask_or_index)
        if sel.dtype == bool:
            if sel.shape != (len(self),):
                raise DataError(f"boolean mask of shape {sel.shape} for a table of {len(self)} rows")
            frame = self.frame.loc[sel]
        else:
            frame = self.frame.iloc[sel.astype(np.int64).ravel()]
        return SampleTable(frame, self.label_space, self.source)

    def fold_split(self, fold: int) -> tuple["SampleTable", "SampleTable"]:
        """``(train, valid)`` for one fold: valid = rows with ``fold == fold``."""
        folds = self.folds
        if fold not in set(folds.tolist()):
            raise DataError(f"fold {fold} not in this table's folds {sorted(set(folds.tolist()))}")
        return self.subset(folds != fold), self.subset(folds == fold)

    def fingerprint(self, hashes: FileHashes | None = None) -> str:
        """sha256 over ids, paths and each image's content hash (in row order).

        Content-based: an image whose bytes changed is new data even with the same size and
        modification time, and a ``touch`` alone changes nothing. Changes when a file's bytes
        change, or a row is added, removed or reordered; used to key cached logits.

        Parameters
        ----------
        hashes : FileHashes, optional
            Where each file's sha256 is remembered by its stat (the logit cache passes its
            own), so a warm run costs one ``stat`` per file; default: read every file.

        Raises
        ------
        DataError
            Naming a file that no longer exists or cannot be read.
        """
        hashes = hashes if hashes is not None else FileHashes()
        h = hashlib.sha256()
        h.update(f"ensembler-table-v2\n{len(self)}\n".encode())
        for i, p in zip(self.frame["id"], self.frame["path"]):
            try:
                digest = hashes.sha256(p)
            except FileNotFoundError as exc:
                raise DataError(f"cannot fingerprint {self.describe()}: file of id {i!r} is gone: {p} ({exc.strerror})") from None
            except OSError as exc:
                raise DataError(f"cannot fingerprint {self.describe()}: file of id {i!r} cannot be read: {p} "
                                f"({exc.strerror or exc})") from None
            h.update(f"{i}\0{p}\0{digest}\n".encode("utf-8", "surrogateescape"))
        return h.hexdigest()

    def to_csv_frame(self) -> pd.DataFrame:
        """The frame as ``data split`` writes it: id, path, label, group[, fold], class_name, rest."""
        frame = self.frame.copy()
        frame["class_name"] = self.class_names()
        if self.label_space is not None and self.label_space.integer_named:
            # Integer class names are written as themselves (a row labelled -1 stays -1).
            frame["label"] = pd.array([pd.NA if n == "" else int(n) for n in frame["class_name"]], dtype="Int64")
        first = [c for c in ("id", "path", "label", "group", "fold", "class_name") if c in frame.columns]
        return frame[first + [c for c in frame.columns if c not in first]]

    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_csv_frame` atomically (temp file + rename); readable by ``load_source``."""
        path = Path(path)
        write_text_atomic(path, self.to_csv_frame().to_csv(index=False))
        return path
