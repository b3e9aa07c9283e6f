"""Sources: read a dataset into a SampleTable (CSV manifest, image folder, mask, digits).

:func:`load_source` detects the kind (:func:`detect_source`) and dispatches to
:func:`load_csv`, :func:`load_image_folder`, :func:`~ensembler.data.load_mask` or
:func:`~ensembler.data.load_digits_table`; :func:`load_source_from_args` reads the CLI's
data flags. The rules of each kind are in the package docstring (:mod:`ensembler.data`).
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..errors import DataError
from ..labels import LabelSpace, validate_age_bands
from ..names import SOURCE_KINDS
from ._common import (
    IMAGE_EXTENSIONS,
    check_files,
    check_unique,
    csv_line,
    is_hidden,
    is_image_name,
    listing,
    read_csv_cells,
    same_files,
)
from .digits import load_digits_table
from .mask import is_mask_info_csv, load_mask, mask_layout
from .split import check_folds
from .table import SampleTable


def load_source(spec, *, source: str | None = None, age_bands: Sequence[int] | None = None,
                label_fix: str | os.PathLike | None = None, label_space: LabelSpace | None = None,
                cache_dir: str | os.PathLike | None = None) -> SampleTable:
    """Read a dataset into a :class:`SampleTable`.

    Parameters
    ----------
    spec : str or path
        A CSV manifest, an image-folder tree, a mask-competition folder (train or eval), or
        the word ``"digits"`` (the word wins over a folder of that name; write ``./digits``
        for the folder).
    source : {"csv", "folder", "mask", "digits"}, optional
        Force the kind instead of detecting it (.csv file -> csv; folder with the mask
        layout -> mask; other folder -> folder).
    age_bands : (int, int), optional
        Mask data only: age thresholds (default 30,60; taken from
        ``label_space.meta["age_bands"]`` when a mask ``label_space`` is passed).
    label_fix : path, optional
        Mask train data only: a correction CSV; see :func:`read_label_fix`.
    label_space : LabelSpace, optional
        The classes labels must belong to (e.g. a trained model's); unknown labels are an error.
    cache_dir : path, optional
        ``digits`` only: the folder its PNGs go to (see :func:`digits_folder`).

    Returns
    -------
    SampleTable

    Raises
    ------
    DataError
        Naming the file, line, id, folder or class at fault (see the package docstring (:mod:`ensembler.data`)).

    Examples
    --------
    >>> table = load_source("digits")  # doctest: +SKIP
    >>> len(table), table.label_space.num_classes, table.ids[0]  # doctest: +SKIP
    (1797, 10, 'digit_00000')
    >>> train = load_source("data/train", age_bands=(29, 58), label_fix="fix.csv")  # doctest: +SKIP
    >>> train.label_space.factor_sizes  # doctest: +SKIP
    (3, 2, 3)
    """
    spec_str = str(spec)
    kind = source or detect_source(spec_str)
    if kind not in SOURCE_KINDS:
        raise DataError(f"unknown source kind {kind!r}; choose one of {list(SOURCE_KINDS)}")
    if kind != "mask":
        for name, value in (("age_bands (--age-bands)", age_bands), ("label_fix (--label-fix)", label_fix)):
            if value is not None:
                raise DataError(f"{name} applies to mask data only, but {spec_str!r} is read as {kind} data")
    if kind == "digits":
        return load_digits_table(cache_dir=cache_dir, label_space=label_space)
    path = Path(spec_str)
    if not path.exists():
        raise DataError(f"--data {spec_str}: no such file or folder")
    if kind == "csv":
        if not path.is_file():
            raise DataError(f"{path} is a folder, not a CSV manifest")
        return load_csv(path, label_space=label_space)
    if kind == "folder":
        return load_image_folder(path, label_space=label_space)
    return load_mask(path, age_bands=age_bands, label_fix=label_fix, label_space=label_space)


def load_source_from_args(args) -> SampleTable:
    """:func:`load_source` from the flags of ``cli._common.add_data_args``
    (``--data --source --age-bands --label-fix``); ``digits`` goes to the default cache."""
    spec = getattr(args, "data", None)
    if spec is None:
        raise DataError("--data is required (a CSV, an image folder, a mask folder, or 'digits')")
    bands = getattr(args, "age_bands", None)
    if isinstance(bands, str):
        try:
            bands = [int(b) for b in bands.split(",") if b.strip()]
        except ValueError:
            raise DataError(f"--age-bands expects two integers like 29,58, got {bands!r}") from None
    if bands is not None:
        bands = validate_age_bands(bands)
    # Not args.cache_dir: commands use that flag for their own caches (``infer``'s logits).
    return load_source(spec, source=getattr(args, "source", None), age_bands=bands,
                       label_fix=getattr(args, "label_fix", None))


def detect_source(spec: str) -> str:
    """The source kind of ``spec``: ``digits``, ``csv``, ``mask`` or ``folder``."""
    if spec == "digits":
        return "digits"
    p = Path(spec)
    if p.is_file():
        if is_mask_info_csv(p):
            return "mask"
        if p.suffix.lower() == ".csv":
            return "csv"
        raise DataError(f"--data {spec}: a file that is not a .csv (give a CSV manifest, a folder, or 'digits')")
    if p.is_dir():
        return "mask" if mask_layout(p) is not None else "folder"
    raise DataError(
        f"--data {spec}: no such file or folder (give a CSV manifest, an image-folder tree, "
        "a mask-competition folder, or the word 'digits')"
    )


_INT_RE = re.compile(r"^-?\d+(\.0*)?$")

#: Most classes a dataset may have (ImageNet-21k has 21,843): a label column of free text or
#: ids would otherwise become a label space of millions of classes and a model head to match.
MAX_CLASSES = 100_000


def _check_class_count(n: int, where: str) -> None:
    if n > MAX_CLASSES:
        raise DataError(f"{where}: {n} distinct labels, more than the limit of {MAX_CLASSES} classes "
                        "(is the label column an id or a number per image?)")


def _indices_with_names(idx: list[int], class_names: Sequence[str], where: str) -> tuple[list[int], LabelSpace]:
    """Labels written by ``data split``: indices 0..C-1 with a ``class_name`` column naming them."""
    bad = [i for i, k in enumerate(idx) if not 0 <= k < MAX_CLASSES]
    if bad:
        raise DataError(f"{where}, line {csv_line(bad[0])}: label {idx[bad[0]]} with a class_name column must be a "
                        f"class index from 0 to {MAX_CLASSES - 1}")
    seen: dict[int, tuple[str, int]] = {}
    for i, (k, name) in enumerate(zip(idx, class_names)):
        if k in seen and seen[k][0] != name:
            raise DataError(f"{where}: label {k} is class_name {seen[k][0]!r} on line {csv_line(seen[k][1])} "
                            f"but {name!r} on line {csv_line(i)}")
        seen.setdefault(k, (name, i))
    n = max(idx) + 1
    names = [seen[k][0] if k in seen and seen[k][0] else str(k) for k in range(n)]
    if len(set(names)) != n:
        names = [str(c) for c in range(n)]
    if n < 2:
        raise DataError(f"{where}: integer labels need at least 2 classes (largest label is {n - 1})")
    return idx, LabelSpace(tuple(names))


def _parse_labels(values: Sequence[str], where: str, label_space: LabelSpace | None,
                  class_names: Sequence[str] | None = None) -> tuple[list[int], LabelSpace]:
    """Class indices of CSV label cells, and the LabelSpace they index."""
    empty = [i for i, v in enumerate(values) if v == ""]
    if empty:
        raise DataError(f"{where}: empty label on line {csv_line(empty[0])} ({len(empty)} row(s) without a label; "
                        "drop the label column for an unlabeled set)")
    if label_space is not None:
        out = []
        for i, v in enumerate(values):
            try:
                out.append(label_space.index(v))
            except DataError as exc:
                raise DataError(f"{where}, line {csv_line(i)}: {exc}") from None
        if class_names is not None:
            for i, (idx, name) in enumerate(zip(out, class_names)):
                if name and name != label_space.classes[idx]:
                    raise DataError(f"{where}, line {csv_line(i)}: label {idx} is class "
                                    f"{label_space.classes[idx]!r}, but class_name says {name!r}")
        return out, label_space
    if all(_INT_RE.match(v) for v in values):
        ints = [int(float(v)) for v in values]
        if class_names is not None:
            return _indices_with_names(ints, class_names, where)
        # An integer label column is a set of class names, never an index to allocate up to:
        # labels -1,0,1 are the classes "-1","0","1" and a stray 10000000 is one more class.
        # The submission writes each class's own integer back (``label``), so meanings are kept.
        distinct = sorted(set(ints))
        if len(distinct) < 2:
            raise DataError(f"{where}: only one class ({distinct[0]}); a classifier needs at least 2")
        _check_class_count(len(distinct), where)
        pos = {k: n for n, k in enumerate(distinct)}
        return [pos[k] for k in ints], LabelSpace(tuple(str(k) for k in distinct))
    classes = sorted(set(values))
    _check_class_count(len(classes), where)
    if len(classes) < 2:
        raise DataError(f"{where}: only one class ({classes[0]!r}); a classifier needs at least 2")
    pos = {c: k for k, c in enumerate(classes)}
    return [pos[v] for v in values], LabelSpace(tuple(classes))


def load_csv(csv: str | os.PathLike, *, label_space: LabelSpace | None = None) -> SampleTable:
    """A CSV manifest (``path[,label][,group][,id][,fold]``); see the package docstring (:mod:`ensembler.data`)."""
    csv = Path(os.path.abspath(csv))
    where = str(csv)
    df = read_csv_cells(csv, "CSV manifest")
    lower = [c.lower() for c in df.columns]
    if len(set(lower)) != len(lower):
        raise DataError(f"{where}: column names repeat (ignoring case): {list(df.columns)}")
    df.columns = lower
    if "path" not in df.columns:
        raise DataError(f"{where}: no 'path' column; columns found: {list(df.columns)} "
                        "(a manifest needs path[,label][,group][,id])")
    if len(df) == 0:
        raise DataError(f"{where}: the CSV is empty (a header but no rows)")
    base = csv.parent
    given = df["path"].tolist()
    blank = [i for i, g in enumerate(given) if g == ""]
    if blank:
        raise DataError(f"{where}: empty path on line {csv_line(blank[0])}")
    paths = [os.path.abspath(g if os.path.isabs(g) else os.path.join(base, g)) for g in given]
    if "id" in df.columns:
        ids = df["id"].tolist()
        blank = [i for i, v in enumerate(ids) if v == ""]
        if blank:
            raise DataError(f"{where}: empty id on line {csv_line(blank[0])}")
    else:
        ids = [_id_from_path(g, p, base) for g, p in zip(given, paths)]
    check_unique(ids, where)
    check_files(paths, given, where)

    frame = pd.DataFrame({"id": ids, "path": paths})
    if "label" in df.columns:
        names = df["class_name"].tolist() if "class_name" in df.columns else None
        if names is not None and all(lab == n for lab, n in zip(df["label"], names)):
            names = None  # labels that are their class names (integer-named classes as `data split` writes them)
        labels, space = _parse_labels(df["label"].tolist(), where, label_space, names)
        frame["label"] = pd.array(labels, dtype="Int64")
    else:
        space = label_space  # None: an unlabeled set whose classes are the predicting model's
        frame["label"] = pd.array([pd.NA] * len(df), dtype="Int64")
    if "group" in df.columns:
        groups = df["group"].tolist()
        blank = [i for i, v in enumerate(groups) if v == ""]
        if blank:
            raise DataError(f"{where}: empty group on line {csv_line(blank[0])} (leave the column out for one group per image)")
        frame["group"] = groups
    else:
        frame["group"] = ids
    if "fold" in df.columns:
        bad = [i for i, v in enumerate(df["fold"]) if not v.isdigit()]
        if bad:
            raise DataError(f"{where}, line {csv_line(bad[0])}: fold {df['fold'].iloc[bad[0]]!r} is not a "
                            "non-negative integer")
        frame["fold"] = df["fold"].astype(np.int64).to_numpy()
    extra = [c for c in df.columns if c not in ("id", "path", "label", "group", "fold", "class_name")]
    for c in extra:
        frame[c] = df[c].to_numpy()
    _check_same_images(frame, space, where)
    table = SampleTable(frame, space, {"kind": "csv", "path": where})
    if "fold" in frame.columns:
        try:
            check_folds(table.frame)
        except DataError as exc:
            raise DataError(f"{where}: {exc}") from None
    return table


def _check_same_images(frame: pd.DataFrame, space: LabelSpace | None, where: str) -> None:
    """One image, one row: the same file (by real path) on two labeled rows is an error when
    their labels or groups differ (a contradiction, or the image could sit in train and
    validation at once); otherwise, and for unlabeled sets (each id gets a prediction), a warning."""
    dups = same_files(frame["path"].tolist())
    if not dups:
        return
    labels, groups, ids = frame["label"], frame["group"].tolist(), frame["id"].tolist()

    def row(i):
        lab = "" if pd.isna(labels.iloc[i]) else f", label {space.classes[int(labels.iloc[i])]!r}"
        return f"line {csv_line(i)} (id {ids[i]!r}{lab}, group {groups[i]!r})"

    conflicts = []
    for i, j, real in dups:
        if labels.notna().iloc[i] and labels.iloc[i] != labels.iloc[j]:
            conflicts.append(f"{row(i)} and {row(j)} are the same image {real} with different labels")
        elif labels.notna().iloc[i] and groups[i] != groups[j]:
            conflicts.append(f"{row(i)} and {row(j)} are the same image {real} in different groups: it could "
                             "land in train and validation at once")
    if conflicts:
        raise DataError(f"{where}: {len(conflicts)} image(s) listed twice (compared by real path); keep one row "
                        f"per image, or give the copies one label and one group:{listing(conflicts)}")
    i, j, real = dups[0]
    warnings.warn(f"{where}: {len(dups)} image file(s) are listed on two rows, e.g. {row(i)} and {row(j)} are both "
                  f"{real}" + ("; each id gets its own prediction" if labels.isna().all() else
                               "; same label and group, so they stay in one fold, but the image counts twice"),
                  UserWarning, stacklevel=3)


def _id_from_path(given: str, absolute: str, base: Path) -> str:
    if not os.path.isabs(given):
        return Path(os.path.normpath(given)).as_posix()
    try:
        return Path(absolute).relative_to(base).as_posix()
    except ValueError:
        return Path(absolute).as_posix()


def _walk_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive, hidden entries skipped), sorted by relative path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
        found.extend(Path(dirpath) / f for f in filenames if not is_hidden(f) and is_image_name(f))
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def load_image_folder(root: str | os.PathLike, *, label_space: LabelSpace | None = None) -> SampleTable:
    """An image-folder tree ``root/<class>/**/<image>``; see the package docstring (:mod:`ensembler.data`)."""
    root = Path(os.path.abspath(root))
    if not root.is_dir():
        raise DataError(f"{root} is not a folder")
    class_dirs = sorted((d for d in root.iterdir() if d.is_dir() and not is_hidden(d.name)), key=lambda d: d.name)
    if not class_dirs:
        loose = sum(1 for f in root.iterdir() if f.is_file() and is_image_name(f.name))
        hint = f" ({loose} images lie directly in it; put each class in its own sub-folder)" if loose else ""
        raise DataError(f"image folder {root} has no class folders (expected {root}/<class>/<image>){hint}")
    per_class = {d.name: _walk_images(d) for d in class_dirs}
    empty = [str(d) for d in class_dirs if not per_class[d.name]]
    if empty:
        raise DataError(f"image folder {root}: class folder(s) without images "
                        f"({', '.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)}):{listing(empty)}")
    if label_space is None:
        if len(class_dirs) < 2:
            raise DataError(f"image folder {root} has one class folder ({class_dirs[0].name!r}); a classifier needs at least 2")
        label_space = LabelSpace(tuple(d.name for d in class_dirs))
    index = {}
    for d in class_dirs:
        if d.name not in label_space.classes:
            raise DataError(f"image folder {root}: unknown class folder {str(d)!r}; known classes: "
                            f"{list(label_space.classes)}")
        index[d.name] = label_space.classes.index(d.name)
    rows = [(f"{name}/{f.relative_to(root / name).as_posix()}", str(f), index[name])
            for name, files in per_class.items() for f in files]
    dups = same_files([r[1] for r in rows])
    if dups:
        # A symlinked class folder (``loopcls -> .``) or file reaches an image twice, under two labels.
        links = [f"{d.name} -> {os.readlink(d)}" for d in class_dirs if d.is_symlink()]
        pairs = [f"{rows[i][0]!r} and {rows[j][0]!r} are both {real}" for i, j, real in dups]
        raise DataError(f"image folder {root}: {len(dups)} image file(s) are reached twice (compared by real path)"
                        + (f"; symlinked class folder(s): {', '.join(links)}" if links else "")
                        + f"; remove the link or the copy:{listing(pairs)}")
    frame = pd.DataFrame(rows, columns=["id", "path", "label"])
    frame["label"] = frame["label"].astype("Int64")
    frame["group"] = frame["id"]
    return SampleTable(frame, label_space, {"kind": "folder", "path": str(root)})
