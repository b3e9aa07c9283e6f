"""The mask-competition Source: train and eval layouts, and the label-fix CSV.

*Train*: ``root/images/<id>_<gender>_<race>_<age>/`` with exactly the seven images
``mask1..mask5``, ``incorrect_mask``, ``normal``; class = ``mask*6 + gender*3 + age`` in
``LabelSpace.mask(age_bands)``, group = the profile id, corrected per profile by
:func:`read_label_fix`. *Eval*: ``root/info.csv`` + ``root/images/<ImageID>``, unlabeled, in
info.csv's row order. The full rules are in the package docstring (:mod:`ensembler.data`).
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from ..errors import DataError
from ..labels import DEFAULT_AGE_BANDS, LabelSpace, age_band, validate_age_bands
from ._common import (
    MAX_LISTED,
    check_files,
    check_unique,
    csv_line,
    find_column,
    is_hidden,
    is_image_name,
    listing,
    read_csv_cells,
)
from .table import SampleTable

# Mask-competition file stems, in the order rows are listed per profile, and their mask class.
MASK_STEMS = ("mask1", "mask2", "mask3", "mask4", "mask5", "incorrect_mask", "normal")
MASK_OF_STEM = {"mask1": 0, "mask2": 0, "mask3": 0, "mask4": 0, "mask5": 0, "incorrect_mask": 1, "normal": 2}
GENDER_INDEX = {"male": 0, "female": 1}
PROFILE_RE = re.compile(r"^(?P<pid>[^_]+)_(?P<gender>male|female)_(?P<race>.+)_(?P<age>\d+)$", re.IGNORECASE)
LABEL_FIX_COLUMNS = ("id", "gender", "age", "mask_swap", "note")


def mask_layout(p: Path) -> str | None:
    """``"eval"``, ``"train"`` or None for a folder (``p`` may be the tree's ``images/`` itself)."""
    if p.name == "images" and not (p / "images").is_dir() and mask_layout(p.parent) == "train":
        return "train"
    images = p / "images"
    if not images.is_dir():
        return None
    if (p / "info.csv").is_file():
        return "eval"
    with os.scandir(images) as it:
        for e in it:
            if not is_hidden(e.name) and e.is_dir() and PROFILE_RE.match(e.name):
                return "train"
    return None


def is_mask_info_csv(p: Path) -> bool:
    if p.suffix.lower() != ".csv" or not (p.parent / "images").is_dir():
        return False
    try:
        with open(p, encoding="utf-8-sig") as fh:
            header = [c.strip().lower() for c in fh.readline().split(",")]
    except (OSError, UnicodeDecodeError):
        return False
    return "imageid" in header and "path" not in header


def _resolve_mask_bands(age_bands, label_space) -> tuple[int, int]:
    if age_bands is None and label_space is not None:
        age_bands = label_space.meta.get("age_bands")
    return validate_age_bands(age_bands if age_bands is not None else DEFAULT_AGE_BANDS)


def load_mask(root: str | os.PathLike, *, age_bands: Sequence[int] | None = None,
              label_fix: str | os.PathLike | None = None, label_space: LabelSpace | None = None) -> SampleTable:
    """The mask-competition layout (train or eval folder; or the eval ``info.csv``)."""
    root = Path(os.path.abspath(root))
    bands = _resolve_mask_bands(age_bands, label_space)
    space = LabelSpace.mask(bands)
    if label_space is not None and not label_space.same_classes(space):
        raise DataError(f"mask data {root} has the 18 mask classes, but the given label space has "
                        f"{label_space.num_classes}: {list(label_space.classes)[:5]}...")
    if root.is_file():
        if not is_mask_info_csv(root):
            raise DataError(f"{root}: not a mask eval info.csv (needs an ImageID column and an images/ folder beside it)")
        info, root = root, root.parent
        kind = "eval"
    else:
        kind = mask_layout(root)
        if kind == "train" and not (root / "images").is_dir():  # given the images/ folder itself
            root = root.parent
        info = root / "info.csv"
    if kind is None:
        raise DataError(
            f"{root} is not a mask-competition folder: expected images/<id>_<gender>_<race>_<age>/"
            "{mask1..mask5,incorrect_mask,normal}.<ext> (train) or info.csv + images/ (eval)"
        )
    if kind == "eval":
        if label_fix is not None:
            warnings.warn(f"label_fix {label_fix} ignored: {root} is an unlabeled eval folder", stacklevel=2)
        return _load_mask_eval(root, info, space)
    return _load_mask_train(root, space, bands, label_fix)


def _load_mask_eval(root: Path, info: Path, space: LabelSpace) -> SampleTable:
    where = str(info)
    df = read_csv_cells(info, "mask info.csv")
    col = find_column(df, "ImageID")
    if col is None:
        raise DataError(f"{where}: no 'ImageID' column; columns found: {list(df.columns)}")
    if len(df) == 0:
        raise DataError(f"{where}: the CSV is empty (a header but no rows)")
    ids = df[col].tolist()
    blank = [i for i, v in enumerate(ids) if v == ""]
    if blank:
        raise DataError(f"{where}: empty ImageID on line {csv_line(blank[0])}")
    check_unique(ids, where, "ImageID")
    paths = [str(root / "images" / i) for i in ids]
    check_files(paths, paths, where)
    frame = pd.DataFrame({"id": ids, "path": paths, "label": pd.array([pd.NA] * len(ids), dtype="Int64"),
                          "group": ids})
    return SampleTable(frame, space, {"kind": "mask", "layout": "eval", "path": str(root), "info_csv": where,
                                      "age_bands": list(space.meta["age_bands"])})


def read_label_fix(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Read a mask label-correction CSV into ``{profile id: {"gender": 0|1, "age": int, "mask_swap": bool}}``.

    Format (header required; one row per profile; empty cell = no change)::

        id,gender,age,mask_swap,note
        000020,female,,,gender was swapped
        004432,,,1,normal and incorrect_mask photos swapped
        006359,,61,,

    - ``id``: the profile id (the ``<id>`` of ``<id>_<gender>_<race>_<age>``; the whole folder
      name is accepted too).
    - ``gender``: the corrected gender, ``male`` or ``female``.
    - ``age``: the corrected age in years (the band is recomputed with the age thresholds).
    - ``mask_swap``: ``1``/``true``/``yes`` swaps the labels of that profile's ``normal`` and
      ``incorrect_mask`` photos; ``0``/``false``/``no``/empty leaves them.
    - ``note``: free text, ignored.

    Any other column, an unknown gender, a bad age or a repeated id is a :class:`DataError`
    naming the line.
    """
    path = Path(path)
    where = str(path)
    df = read_csv_cells(path, "label-fix CSV")
    df.columns = [c.lower() for c in df.columns]
    if "id" not in df.columns:
        raise DataError(f"{where}: no 'id' column; columns found: {list(df.columns)} "
                        f"(expected {list(LABEL_FIX_COLUMNS)})")
    unknown = [c for c in df.columns if c not in LABEL_FIX_COLUMNS]
    if unknown:
        raise DataError(f"{where}: unknown column(s) {unknown}; a label-fix CSV has {list(LABEL_FIX_COLUMNS)}")
    fixes: dict[str, dict[str, Any]] = {}
    lines: dict[str, int] = {}
    for i, row in enumerate(df.to_dict("records")):
        pid = row["id"]
        m = PROFILE_RE.match(pid)
        if m:
            pid = m.group("pid")
        if pid == "":
            raise DataError(f"{where}, line {csv_line(i)}: empty id")
        if pid in fixes:
            raise DataError(f"{where}: profile {pid!r} appears on line {lines[pid]} and line {csv_line(i)}")
        fix: dict[str, Any] = {}
        g = row.get("gender", "").lower()
        if g:
            if g not in GENDER_INDEX:
                raise DataError(f"{where}, line {csv_line(i)}: gender {row['gender']!r} is not male or female")
            fix["gender"] = GENDER_INDEX[g]
        a = row.get("age", "")
        if a:
            if not a.isdigit():
                raise DataError(f"{where}, line {csv_line(i)}: age {a!r} is not a whole number of years")
            fix["age"] = int(a)
        s = row.get("mask_swap", "").lower()
        if s in ("1", "true", "yes", "y"):
            fix["mask_swap"] = True
        elif s not in ("", "0", "false", "no", "n"):
            raise DataError(f"{where}, line {csv_line(i)}: mask_swap {row['mask_swap']!r} is not 1/0/true/false/yes/no")
        fixes[pid] = fix
        lines[pid] = csv_line(i)
    return fixes


def _load_mask_train(root: Path, space: LabelSpace, bands: tuple[int, int], label_fix) -> SampleTable:
    images = root / "images"
    fixes = read_label_fix(label_fix) if label_fix is not None else {}
    problems: list[str] = []
    rows = []
    with os.scandir(images) as it:
        entries = sorted((e for e in it if not is_hidden(e.name)), key=lambda e: e.name)
    for e in entries:
        if not e.is_dir():
            if is_image_name(e.name):
                problems.append(f"{e.path}: an image directly in images/ (expected images/<profile>/<stem>.<ext>)")
            continue
        m = PROFILE_RE.match(e.name)
        if not m:
            problems.append(f"{e.path}: folder name is not <id>_<gender>_<race>_<age>")
            continue
        files: dict[str, str] = {}
        with os.scandir(e.path) as fit:
            for f in sorted(fit, key=lambda f: f.name):
                if is_hidden(f.name) or not is_image_name(f.name) or f.is_dir():
                    continue
                stem = os.path.splitext(f.name)[0].lower()
                if stem not in MASK_OF_STEM:
                    problems.append(f"{f.path}: unexpected image name {f.name!r} "
                                    "(expected mask1..mask5, incorrect_mask, normal)")
                elif stem in files:
                    problems.append(f"{e.path}: two images for {stem}: {os.path.basename(files[stem])}, {f.name}")
                else:
                    files[stem] = f.path
        missing = [s for s in MASK_STEMS if s not in files]
        if missing:
            problems.append(f"{e.path}: missing {', '.join(missing)}")
            continue
        pid = m.group("pid")
        gender = GENDER_INDEX[m.group("gender").lower()]
        age = int(m.group("age"))
        fix = fixes.get(pid, {})
        gender = fix.get("gender", gender)
        age = fix.get("age", age)
        a = age_band(age, bands)
        for stem in MASK_STEMS:
            mask = MASK_OF_STEM[stem]
            if fix.get("mask_swap") and mask in (1, 2):
                mask = 3 - mask
            rows.append((f"{e.name}/{stem}", os.path.abspath(files[stem]), space.joint_index((mask, gender, a)),
                         pid, e.name, mask, gender, age))
    if problems:
        raise DataError(f"mask folder {images}: {len(problems)} problem(s) "
                        f"(each profile needs exactly {', '.join(MASK_STEMS)}):{listing(problems)}")
    if not rows:
        raise DataError(f"mask folder {images} holds no profile folders")
    frame = pd.DataFrame(rows, columns=["id", "path", "label", "group", "profile", "mask", "gender", "age_years"])
    frame["label"] = frame["label"].astype("Int64")
    source = {"kind": "mask", "layout": "train", "path": str(root), "age_bands": list(bands)}
    if (root / "train.csv").is_file():
        source["train_csv"] = str(root / "train.csv")
    if label_fix is not None:
        seen = set(frame["group"])
        unused = sorted(set(fixes) - seen)
        if unused:
            warnings.warn(f"label-fix {label_fix}: {len(unused)} profile id(s) not in {images}: "
                          f"{unused[:MAX_LISTED]}", stacklevel=3)
        source["label_fix"] = str(Path(label_fix).absolute())
        source["label_fix_profiles"] = len(set(fixes) & seen)
    return SampleTable(frame, space, source)
