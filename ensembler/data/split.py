"""Grouped, stratified k-fold: :func:`split_folds`, :func:`check_folds`, :func:`fold_class_counts`.

Images of one group never straddle train and validation; every row lands in exactly one
fold; the same table and seed give the same folds.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from ..errors import DataError
from .table import SampleTable


def split_folds(table: SampleTable, k: int = 5, seed: int = 0) -> SampleTable:
    """Grouped, stratified k-fold: a copy of ``table`` with an int ``fold`` column (0..k-1).

    scikit-learn's ``StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)`` on
    the labels and groups; the same table and seed give the same folds. The result is checked
    (:func:`check_folds`): every row in exactly one fold, no group in two folds, no empty fold.

    Raises :class:`DataError` for an unlabeled table, ``k < 2``, fewer groups than ``k`` or
    every class smaller than ``k`` (scikit-learn cannot stratify that). Warns once
    (``UserWarning`` naming each class) when classes span fewer than ``k`` groups: some
    validation folds will then hold none of them.

    Examples
    --------
    >>> table = split_folds(load_source("digits"), k=5, seed=0)  # doctest: +SKIP
    >>> np.bincount(table.folds)  # doctest: +SKIP
    array([359, 360, 360, 359, 359])
    >>> train, valid = table.fold_split(0)  # doctest: +SKIP
    """
    from sklearn.model_selection import StratifiedGroupKFold

    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2:
        raise DataError(f"k must be an integer >= 2 for k-fold splitting, got {k!r}")
    k = int(k)
    if not table.labeled:
        raise DataError(f"cannot split {table.describe()}: it is unlabeled, and stratified folds need labels")
    y = table.labels
    groups = table.groups
    n_groups = len(np.unique(groups))
    if n_groups < k:
        raise DataError(f"cannot make {k} folds from {n_groups} group(s) ({len(table)} images) in "
                        f"{table.describe()}: every fold needs its own groups; use k <= {n_groups}")
    per_class = pd.DataFrame({"y": y, "g": groups}).groupby("y")["g"].agg(["size", "nunique"])
    if per_class["size"].max() < k:
        raise DataError(f"cannot stratify {table.describe()} into {k} folds: every class has fewer than {k} "
                        f"images (the largest has {int(per_class['size'].max())}); use a smaller k")
    small = [f"{table.label_space.classes[int(c)]!r} ({int(r['size'])} images, {int(r['nunique'])} groups)"
             for c, r in per_class.iterrows() if r["nunique"] < k]
    if small:
        warnings.warn(
            f"{len(small)} class(es) span fewer than k={k} groups, so some validation folds will hold "
            f"none of them: {', '.join(small)}", UserWarning, stacklevel=2,
        )
    folds = np.full(len(table), -1, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=int(seed))
    with warnings.catch_warnings():
        # Reported above per class, by name; sklearn's version names neither class nor groups.
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        for f, (_, val) in enumerate(splitter.split(np.zeros(len(table)), y, groups)):
            if (folds[val] != -1).any():
                raise DataError(f"split bug: rows assigned to two folds (fold {f})")
            folds[val] = f
    frame = table.frame.copy()
    frame["fold"] = folds
    if (folds < 0).any():
        raise DataError(f"split bug: id {frame.loc[folds < 0, 'id'].iloc[0]!r} is in no fold")
    check_folds(frame, k)
    source = dict(table.source, folds={"k": k, "seed": int(seed), "method": "StratifiedGroupKFold"})
    return SampleTable(frame, table.label_space, source)


def check_folds(frame, k: int | None = None) -> None:
    """Raise :class:`DataError` unless folds are sound.

    Checks: a ``fold`` column of non-negative integers on every row, unique ids (each
    sample in exactly one fold), no group in two folds (the message names the group and its
    folds), and with ``k``: folds in ``0..k-1``, each of them non-empty. Accepts a DataFrame
    or a :class:`SampleTable`.
    """
    if isinstance(frame, SampleTable):
        frame = frame.frame
    if "fold" not in frame.columns:
        raise DataError("no 'fold' column: split the table first (split_folds)")
    fold = frame["fold"]
    if fold.isna().any():
        raise DataError(f"id {frame.loc[fold.isna(), 'id'].iloc[0]!r} has no fold")
    values = fold.to_numpy()
    if not np.issubdtype(values.dtype, np.integer):
        if not np.all(np.mod(values.astype(np.float64), 1) == 0):
            raise DataError(f"fold values must be integers, got dtype {values.dtype}")
    values = values.astype(np.int64)
    if (values < 0).any():
        raise DataError(f"id {frame['id'].iloc[int(np.argmax(values < 0))]!r} has negative fold {values.min()}")
    dup = frame["id"].duplicated()
    if dup.any():
        raise DataError(f"id {frame.loc[dup, 'id'].iloc[0]!r} appears in more than one row")
    if k is not None:
        out = values >= k
        if out.any():
            raise DataError(f"id {frame['id'].iloc[int(np.argmax(out))]!r} has fold {values[out][0]}, outside 0..{k - 1}")
        empty = sorted(set(range(k)) - set(values.tolist()))
        if empty:
            raise DataError(f"fold(s) {empty} of {k} hold no rows")
    per_group = pd.DataFrame({"g": frame["group"].to_numpy(), "f": values}).groupby("g")["f"].unique()
    split = per_group[per_group.map(len) > 1]
    if len(split):
        g = split.index[0]
        raise DataError(f"group {g!r} is in folds {sorted(int(x) for x in split.iloc[0])} "
                        f"({len(split)} group(s) straddle folds): its images would leak between train and validation")


def fold_class_counts(table: SampleTable) -> np.ndarray:
    """``(C, k)`` images per class per fold."""
    k = table.num_folds
    counts = np.zeros((table.label_space.num_classes, k), dtype=np.int64)
    np.add.at(counts, (table.labels, table.folds), 1)
    return counts
