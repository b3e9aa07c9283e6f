"""Sources -> SampleTable, image decoding, grouped stratified k-fold split.

A *Source* reads a dataset into a :class:`SampleTable` (one row per image: ``id``, ``path``,
``label``, ``group`` and, after :func:`split_folds`, ``fold``). Nothing downstream knows
which Source a table came from. Built-in sources (:func:`load_source` detects the kind):

``csv``
    A manifest with columns ``path[,label][,group][,id][,fold]`` (header names are
    case-insensitive; a UTF-8 BOM is fine). Relative paths are resolved against the CSV's
    folder. ``label`` holds class names (classes = the sorted distinct names) or integer
    indices (classes ``"0"..."C-1"``, C = largest index + 1; a ``class_name`` column, as
    ``ensembler data split`` writes, restores the names); with ``label_space=`` every label
    must be one of its classes. No ``label`` column = an unlabeled set to predict. No
    ``group`` = one group per image; no ``id`` = the path as written (relative to the CSV's
    folder). A ``fold`` column is kept (and checked), so a written split can be read back.
    Other columns are carried along as strings.
``folder``
    An image-folder tree ``root/<class>/**/<image>`` (extensions in
    :data:`IMAGE_EXTENSIONS`, case-insensitive; hidden files and folders skipped). Classes are
    the sorted class-folder names; id = ``<class>/<path inside the class folder>``; one group
    per image. A class folder with no image is an error (as torchvision's ImageFolder).
``mask``
    The mask-competition layout. *Train*: ``root/images/<id>_<gender>_<race>_<age>/`` with
    exactly the seven images ``mask1..mask5``, ``incorrect_mask``, ``normal`` (any image
    extension; ``root/train.csv`` is optional and not read: the folder names are the truth;
    ``spec`` may also be the ``images/`` folder itself).
    mask1-5 -> wear (0), incorrect_mask -> incorrect (1), normal -> not wear (2); male 0,
    female 1; age band from ``age_bands`` (default 30,60: <30, 30-59, >=60). Class =
    ``mask*6 + gender*3 + age``, in ``LabelSpace.mask(age_bands)`` (factored: per-factor
    models read ``label_space.factor_indices``). Group = the profile id; row id =
    ``<profile folder>/<stem>``. Hidden entries (``._*``, ``.DS_Store``) and non-image files
    are skipped, but a profile folder that lacks one of the seven images, holds an image with
    another name or two images of one stem, or a folder not named like a profile, is an
    **error** naming every offender (a silently dropped photo would shift the class balance
    and mislabel a person's group). The frame also carries ``profile`` (folder name),
    ``mask``, ``gender`` (factor indices, after label fixes) and ``age_years``.
    *Eval*: ``root/info.csv`` (``ImageID,ans``) + ``root/images/<ImageID>``: an unlabeled
    table in info.csv's row order, id = ImageID, ``source["info_csv"]`` = the CSV's path (a
    submission fills its ``ans``). ``spec`` may also be the info.csv itself.
``digits``
    scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download), written once
    as 32x32 RGB PNGs (nearest-neighbour 4x upscale, ink bright on black) into a cache
    folder; classes ``"0".."9"``, id ``digit_00042``, one group per image.

Every source lists rows in a fixed order (CSV / info.csv order; sorted paths otherwise) and
checks that every image file exists; pixels are read later, by :func:`decode_image`.

Image decoding (:func:`decode_image`) fails loudly: a missing, corrupt or truncated file, or
one over Pillow's decompression-bomb limit, raises :class:`ImageDecodeError` naming it.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from ._io import write_json_atomic, write_text_atomic
from .errors import DataError, ImageDecodeError
from .labels import DEFAULT_AGE_BANDS, LabelSpace, age_band, validate_age_bands

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
SOURCE_KINDS = ("csv", "folder", "mask", "digits")
CORE_COLUMNS = ("id", "path", "label", "group")

# Mask-competition file stems, in the order rows are listed per profile, and their mask class.
MASK_STEMS = ("mask1", "mask2", "mask3", "mask4", "mask5", "incorrect_mask", "normal")
MASK_OF_STEM = {"mask1": 0, "mask2": 0, "mask3": 0, "mask4": 0, "mask5": 0, "incorrect_mask": 1, "normal": 2}
GENDER_INDEX = {"male": 0, "female": 1}
PROFILE_RE = re.compile(r"^(?P<pid>[^_]+)_(?P<gender>male|female)_(?P<race>.+)_(?P<age>\d+)$", re.IGNORECASE)
LABEL_FIX_COLUMNS = ("id", "gender", "age", "mask_swap", "note")

DIGITS_VERSION = 1
DIGITS_SIZE = 32
_MAX_LISTED = 10  # offenders named in one error message


# ====================================================================== SampleTable
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

    def fingerprint(self) -> str:
        """sha256 over ids, paths, file sizes and modification times (in row order).

        Changes when a file is replaced, touched, added, removed or reordered; used to key
        cached logits. Raises :class:`DataError` naming a file that no longer exists.
        """
        h = hashlib.sha256()
        h.update(f"ensembler-table-v1\n{len(self)}\n".encode())
        for i, p in zip(self.frame["id"], self.frame["path"]):
            try:
                st = os.stat(p)
            except OSError as exc:
                raise DataError(f"cannot fingerprint {self.describe()}: file of id {i!r} is gone: {p} ({exc.strerror})") from None
            h.update(f"{i}\0{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
        return h.hexdigest()

    def to_csv_frame(self) -> pd.DataFrame:
        """The frame as ``data split`` writes it: id, path, label, group[, fold], class_name, rest."""
        frame = self.frame.copy()
        frame["class_name"] = self.class_names()
        first = [c for c in ("id", "path", "label", "group", "fold", "class_name") if c in frame.columns]
        return frame[first + [c for c in frame.columns if c not in first]]

    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_csv_frame` atomically (temp file + rename); readable by ``load_source``."""
        path = Path(path)
        write_text_atomic(path, self.to_csv_frame().to_csv(index=False))
        return path


# ====================================================================== decoding
def decode_image(path: str | os.PathLike):
    """Open an image fully and return it as an RGB ``PIL.Image``.

    - ``load()`` runs now, so a truncated or corrupt file fails here, never later in a batch;
      Pillow's ``LOAD_TRUNCATED_IMAGES`` is left False and ``MAX_IMAGE_PIXELS`` untouched: an
      image over the decompression-bomb limit (warning or error in Pillow) is refused.
      Every failure is an :class:`ImageDecodeError` naming the file.
    - EXIF orientation is applied (``ImageOps.exif_transpose``), so phone photos stand upright
      as they are displayed.
    - Modes become RGB: L/1/P/CMYK/YCbCr via ``convert`` (CMYK without colour management);
      16-bit and 32-bit integer / float greyscale are scaled to 8 bits (``I;16``: /257;
      ``I``/``F``: treated as 16-bit when any value exceeds 255); images with transparency
      (RGBA, LA, PA, P with a transparent colour) are composited over **white**.

    Examples
    --------
    >>> img = decode_image("data/train/images/000001_female_Asian_45/mask1.jpg")  # doctest: +SKIP
    >>> img.mode  # doctest: +SKIP
    'RGB'
    >>> decode_image("gone.jpg")  # doctest: +SKIP
    Traceback (most recent call last):
    ensembler.errors.ImageDecodeError: cannot decode image gone.jpg: file not found
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    p = Path(path)
    try:
        with Image.open(p) as src:
            _refuse_bomb(src, p)
            src.load()
            img = src
            if _exif_orientation(src) not in (1, None):
                img = ImageOps.exif_transpose(src)
            return _to_rgb(img)
    except ImageDecodeError:
        raise
    except FileNotFoundError:
        raise ImageDecodeError(p, "file not found") from None
    except IsADirectoryError:
        raise ImageDecodeError(p, "is a directory, not an image file") from None
    except PermissionError:
        raise ImageDecodeError(p, "permission denied") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(p, f"refused by Pillow's decompression-bomb guard ({exc})") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(p, "not a recognised image (corrupt, or not an image file)") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error) as exc:
        reason = str(exc) or type(exc).__name__
        if "truncated" in reason.lower():
            reason = f"truncated file ({reason})"
        raise ImageDecodeError(p, reason) from None


def _refuse_bomb(img, path: Path) -> None:
    """Pillow only *warns* between MAX_IMAGE_PIXELS and twice that; refuse those too."""
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None:
        w, h = img.size
        if w * h > limit:
            raise ImageDecodeError(
                path, f"{w}x{h} = {w * h} pixels exceeds Pillow's decompression-bomb limit of {limit} pixels"
            )


def _exif_orientation(img) -> int | None:
    try:
        return img.getexif().get(0x0112)
    except Exception:  # a broken EXIF block does not make the pixels unusable
        return None


def _to_rgb(img):
    from PIL import Image

    mode = img.mode
    if mode == "RGB":
        return img.copy()
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img).astype(np.float64)
        if mode.startswith("I;16") or (arr.size and arr.max() > 255):
            arr = arr / 257.0
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(arr[..., None], 3, axis=2), "RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode in ("P", "L") and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def verify_images(paths: Iterable[str], workers: int | None = None, progress=None) -> list[tuple[str, str]]:
    """Decode every file; return ``[(path, reason), ...]`` for the ones that fail (in order)."""
    paths = list(paths)
    workers = workers or min(8, os.cpu_count() or 1)

    def one(p):
        try:
            decode_image(p)
            return None
        except ImageDecodeError as exc:
            return (exc.path, exc.reason)

    failures = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        for res in pool.map(one, paths):
            if res is not None:
                failures.append(res)
            if progress is not None:
                progress()
    return failures


# ====================================================================== loading
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
        Naming the file, line, id, folder or class at fault (see the module docstring).

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
        if _is_mask_info_csv(p):
            return "mask"
        if p.suffix.lower() == ".csv":
            return "csv"
        raise DataError(f"--data {spec}: a file that is not a .csv (give a CSV manifest, a folder, or 'digits')")
    if p.is_dir():
        return "mask" if _mask_layout(p) is not None else "folder"
    raise DataError(
        f"--data {spec}: no such file or folder (give a CSV manifest, an image-folder tree, "
        "a mask-competition folder, or the word 'digits')"
    )


def _hidden(name: str) -> bool:
    return name.startswith(".") or name in ("Thumbs.db", "desktop.ini", "__MACOSX")


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _listing(items: Sequence[str], total: int | None = None) -> str:
    total = len(items) if total is None else total
    shown = "\n  ".join(str(i) for i in items[:_MAX_LISTED])
    more = f"\n  ... and {total - _MAX_LISTED} more" if total > _MAX_LISTED else ""
    return f"\n  {shown}{more}"


def _read_csv(path: Path, what: str = "CSV") -> pd.DataFrame:
    """All cells as stripped strings ("" for empty); DataError naming the file on any failure."""
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False, encoding="utf-8-sig",
                         skip_blank_lines=True)
    except FileNotFoundError:
        raise DataError(f"{what} {path} not found") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{what} {path} is empty (no header, no rows)") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot parse {what} {path}: {exc}") from None
    except OSError as exc:
        raise DataError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    df.columns = [str(c).strip() for c in df.columns]
    for c in df.columns:
        df[c] = df[c].astype(str).str.strip()
    return df


def _find_column(df: pd.DataFrame, name: str) -> str | None:
    """The column called ``name``, case-insensitively."""
    for c in df.columns:
        if c.lower() == name.lower():
            return c
    return None


def _line(i: int) -> int:
    """File line of data row ``i`` (header is line 1)."""
    return i + 2


def _check_unique(values: Sequence[str], where: str, what: str = "id") -> None:
    seen: dict[str, int] = {}
    for i, v in enumerate(values):
        if v in seen:
            raise DataError(f"{where}: duplicate {what} {v!r} on line {_line(seen[v])} and line {_line(i)}")
        seen[v] = i


def _check_files(paths: Sequence[str], given: Sequence[str], where: str) -> None:
    missing = [f"line {_line(i)}: {p}" + (f" (written {g!r})" if g != p else "")
               for i, (p, g) in enumerate(zip(paths, given)) if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{where}: {len(missing)} image file(s) not found:{_listing(missing)}")


_INT_RE = re.compile(r"^\d+(\.0*)?$")


def _parse_labels(values: Sequence[str], where: str, label_space: LabelSpace | None,
                  class_names: Sequence[str] | None = None) -> tuple[list[int], LabelSpace]:
    """Class indices of CSV label cells, and the LabelSpace they index."""
    empty = [i for i, v in enumerate(values) if v == ""]
    if empty:
        raise DataError(f"{where}: empty label on line {_line(empty[0])} ({len(empty)} row(s) without a label; "
                        "drop the label column for an unlabeled set)")
    if label_space is not None:
        out = []
        for i, v in enumerate(values):
            try:
                out.append(label_space.index(v))
            except DataError as exc:
                raise DataError(f"{where}, line {_line(i)}: {exc}") from None
        if class_names is not None:
            for i, (idx, name) in enumerate(zip(out, class_names)):
                if name and name != label_space.classes[idx]:
                    raise DataError(f"{where}, line {_line(i)}: label {idx} is class "
                                    f"{label_space.classes[idx]!r}, but class_name says {name!r}")
        return out, label_space
    if all(_INT_RE.match(v) for v in values):
        idx = [int(float(v)) for v in values]
        n = max(idx) + 1
        names = [str(c) for c in range(n)]
        if class_names is not None:
            seen: dict[int, tuple[str, int]] = {}
            for i, (k, name) in enumerate(zip(idx, class_names)):
                if k in seen and seen[k][0] != name:
                    raise DataError(f"{where}: label {k} is class_name {seen[k][0]!r} on line {_line(seen[k][1])} "
                                    f"but {name!r} on line {_line(i)}")
                seen.setdefault(k, (name, i))
            names = [seen[k][0] if k in seen and seen[k][0] else str(k) for k in range(n)]
            if len(set(names)) != n:
                names = [str(c) for c in range(n)]
        if n < 2:
            raise DataError(f"{where}: integer labels need at least 2 classes (largest label is {n - 1})")
        return idx, LabelSpace(tuple(names))
    classes = sorted(set(values))
    if len(classes) < 2:
        raise DataError(f"{where}: only one class ({classes[0]!r}); a classifier needs at least 2")
    pos = {c: k for k, c in enumerate(classes)}
    return [pos[v] for v in values], LabelSpace(tuple(classes))


def load_csv(csv: str | os.PathLike, *, label_space: LabelSpace | None = None) -> SampleTable:
    """A CSV manifest (``path[,label][,group][,id][,fold]``); see the module docstring."""
    csv = Path(os.path.abspath(csv))
    where = str(csv)
    df = _read_csv(csv, "CSV manifest")
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
        raise DataError(f"{where}: empty path on line {_line(blank[0])}")
    paths = [os.path.abspath(g if os.path.isabs(g) else os.path.join(base, g)) for g in given]
    if "id" in df.columns:
        ids = df["id"].tolist()
        blank = [i for i, v in enumerate(ids) if v == ""]
        if blank:
            raise DataError(f"{where}: empty id on line {_line(blank[0])}")
    else:
        ids = [_id_from_path(g, p, base) for g, p in zip(given, paths)]
    _check_unique(ids, where)
    _check_files(paths, given, where)

    frame = pd.DataFrame({"id": ids, "path": paths})
    if "label" in df.columns:
        names = df["class_name"].tolist() if "class_name" in df.columns else None
        labels, space = _parse_labels(df["label"].tolist(), where, label_space, names)
        frame["label"] = pd.array(labels, dtype="Int64")
    else:
        space = label_space  # None: an unlabeled set whose classes are the predicting model's
        frame["label"] = pd.array([pd.NA] * len(df), dtype="Int64")
    if "group" in df.columns:
        groups = df["group"].tolist()
        blank = [i for i, v in enumerate(groups) if v == ""]
        if blank:
            raise DataError(f"{where}: empty group on line {_line(blank[0])} (leave the column out for one group per image)")
        frame["group"] = groups
    else:
        frame["group"] = ids
    if "fold" in df.columns:
        bad = [i for i, v in enumerate(df["fold"]) if not v.isdigit()]
        if bad:
            raise DataError(f"{where}, line {_line(bad[0])}: fold {df['fold'].iloc[bad[0]]!r} is not a "
                            "non-negative integer")
        frame["fold"] = df["fold"].astype(np.int64).to_numpy()
    extra = [c for c in df.columns if c not in ("id", "path", "label", "group", "fold", "class_name")]
    for c in extra:
        frame[c] = df[c].to_numpy()
    table = SampleTable(frame, space, {"kind": "csv", "path": where})
    if "fold" in frame.columns:
        try:
            check_folds(table.frame)
        except DataError as exc:
            raise DataError(f"{where}: {exc}") from None
    return table


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
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
        found.extend(Path(dirpath) / f for f in filenames if not _hidden(f) and _is_image_name(f))
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def load_image_folder(root: str | os.PathLike, *, label_space: LabelSpace | None = None) -> SampleTable:
    """An image-folder tree ``root/<class>/**/<image>``; see the module docstring."""
    root = Path(os.path.abspath(root))
    if not root.is_dir():
        raise DataError(f"{root} is not a folder")
    class_dirs = sorted((d for d in root.iterdir() if d.is_dir() and not _hidden(d.name)), key=lambda d: d.name)
    if not class_dirs:
        loose = sum(1 for f in root.iterdir() if f.is_file() and _is_image_name(f.name))
        hint = f" ({loose} images lie directly in it; put each class in its own sub-folder)" if loose else ""
        raise DataError(f"image folder {root} has no class folders (expected {root}/<class>/<image>){hint}")
    per_class = {d.name: _walk_images(d) for d in class_dirs}
    empty = [str(d) for d in class_dirs if not per_class[d.name]]
    if empty:
        raise DataError(f"image folder {root}: class folder(s) without images "
                        f"({', '.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)}):{_listing(empty)}")
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
    frame = pd.DataFrame(rows, columns=["id", "path", "label"])
    frame["label"] = frame["label"].astype("Int64")
    frame["group"] = frame["id"]
    return SampleTable(frame, label_space, {"kind": "folder", "path": str(root)})


# ---------------------------------------------------------------------- mask competition
def _mask_layout(p: Path) -> str | None:
    """``"eval"``, ``"train"`` or None for a folder (``p`` may be the tree's ``images/`` itself)."""
    if p.name == "images" and not (p / "images").is_dir() and _mask_layout(p.parent) == "train":
        return "train"
    images = p / "images"
    if not images.is_dir():
        return None
    if (p / "info.csv").is_file():
        return "eval"
    with os.scandir(images) as it:
        for e in it:
            if not _hidden(e.name) and e.is_dir() and PROFILE_RE.match(e.name):
                return "train"
    return None


def _is_mask_info_csv(p: Path) -> bool:
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
        if not _is_mask_info_csv(root):
            raise DataError(f"{root}: not a mask eval info.csv (needs an ImageID column and an images/ folder beside it)")
        info, root = root, root.parent
        kind = "eval"
    else:
        kind = _mask_layout(root)
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
    df = _read_csv(info, "mask info.csv")
    col = _find_column(df, "ImageID")
    if col is None:
        raise DataError(f"{where}: no 'ImageID' column; columns found: {list(df.columns)}")
    if len(df) == 0:
        raise DataError(f"{where}: the CSV is empty (a header but no rows)")
    ids = df[col].tolist()
    blank = [i for i, v in enumerate(ids) if v == ""]
    if blank:
        raise DataError(f"{where}: empty ImageID on line {_line(blank[0])}")
    _check_unique(ids, where, "ImageID")
    paths = [str(root / "images" / i) for i in ids]
    _check_files(paths, paths, where)
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
    df = _read_csv(path, "label-fix CSV")
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
            raise DataError(f"{where}, line {_line(i)}: empty id")
        if pid in fixes:
            raise DataError(f"{where}: profile {pid!r} appears on line {lines[pid]} and line {_line(i)}")
        fix: dict[str, Any] = {}
        g = row.get("gender", "").lower()
        if g:
            if g not in GENDER_INDEX:
                raise DataError(f"{where}, line {_line(i)}: gender {row['gender']!r} is not male or female")
            fix["gender"] = GENDER_INDEX[g]
        a = row.get("age", "")
        if a:
            if not a.isdigit():
                raise DataError(f"{where}, line {_line(i)}: age {a!r} is not a whole number of years")
            fix["age"] = int(a)
        s = row.get("mask_swap", "").lower()
        if s in ("1", "true", "yes", "y"):
            fix["mask_swap"] = True
        elif s not in ("", "0", "false", "no", "n"):
            raise DataError(f"{where}, line {_line(i)}: mask_swap {row['mask_swap']!r} is not 1/0/true/false/yes/no")
        fixes[pid] = fix
        lines[pid] = _line(i)
    return fixes


def _load_mask_train(root: Path, space: LabelSpace, bands: tuple[int, int], label_fix) -> SampleTable:
    images = root / "images"
    fixes = read_label_fix(label_fix) if label_fix is not None else {}
    problems: list[str] = []
    rows = []
    with os.scandir(images) as it:
        entries = sorted((e for e in it if not _hidden(e.name)), key=lambda e: e.name)
    for e in entries:
        if not e.is_dir():
            if _is_image_name(e.name):
                problems.append(f"{e.path}: an image directly in images/ (expected images/<profile>/<stem>.<ext>)")
            continue
        m = PROFILE_RE.match(e.name)
        if not m:
            problems.append(f"{e.path}: folder name is not <id>_<gender>_<race>_<age>")
            continue
        files: dict[str, str] = {}
        with os.scandir(e.path) as fit:
            for f in sorted(fit, key=lambda f: f.name):
                if _hidden(f.name) or not _is_image_name(f.name) or f.is_dir():
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
                        f"(each profile needs exactly {', '.join(MASK_STEMS)}):{_listing(problems)}")
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
                          f"{unused[:_MAX_LISTED]}", stacklevel=3)
        source["label_fix"] = str(Path(label_fix).absolute())
        source["label_fix_profiles"] = len(set(fixes) & seen)
    return SampleTable(frame, space, source)


# ---------------------------------------------------------------------- digits
def default_cache_root() -> Path:
    """``$ENSEMBLER_CACHE``, else ``$XDG_CACHE_HOME/ensembler``, else ``~/.cache/ensembler``."""
    env = os.environ.get("ENSEMBLER_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "ensembler"


def _digits_manifest_ok(folder: Path) -> bool:
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("version") != DIGITS_VERSION or manifest.get("size") != DIGITS_SIZE:
        return False
    labels = folder / "labels.csv"
    if not labels.is_file():
        return False
    n = manifest.get("count", -1)
    return all((folder / f"digit_{i:05d}.png").is_file() for i in range(n))


def _write_digits(folder: Path) -> None:
    from PIL import Image
    from sklearn.datasets import load_digits

    bunch = load_digits()
    imgs = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # (N, 8, 8), 0..16 -> 0..255
    scale = DIGITS_SIZE // imgs.shape[1]
    big = imgs.repeat(scale, axis=1).repeat(scale, axis=2)
    rgb = np.repeat(big[..., None], 3, axis=3)
    lines = ["id,file,label"]
    for i, (arr, y) in enumerate(zip(rgb, bunch.target)):
        name = f"digit_{i:05d}"
        Image.fromarray(arr, "RGB").save(folder / f"{name}.png", format="PNG")
        lines.append(f"{name},{name}.png,{int(y)}")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    # The manifest is written last: a folder without it is not a finished cache.
    write_json_atomic(folder / "manifest.json", {
        "version": DIGITS_VERSION, "size": DIGITS_SIZE, "count": len(rgb),
        "source": "sklearn.datasets.load_digits", "upscale": f"nearest x{scale}",
    })


def digits_folder(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding scikit-learn's digits as 32x32 RGB PNGs, writing it on first use.

    ``cache_dir`` is that folder itself; default ``default_cache_root() / "digits"``. The PNGs,
    ``labels.csv`` and (last) ``manifest.json`` are written into a temp folder beside it that
    is renamed into place, so a crash never leaves a half-written cache and concurrent first
    calls are safe (the loser's copy is discarded). A folder that exists but holds no digits
    manifest and is not empty is never overwritten: that is an error.
    """
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root() / "digits"
    folder = Path(os.path.abspath(folder))
    if _digits_manifest_ok(folder):
        return folder
    if folder.exists():
        if not folder.is_dir():
            raise DataError(f"digits cache {folder} exists and is not a folder")
        ours = (folder / "manifest.json").is_file() or (folder / "labels.csv").is_file()
        if not ours and any(folder.iterdir()):
            raise DataError(f"digits cache {folder} exists, is not empty and is not a digits cache; "
                            "remove it or choose another cache folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        _write_digits(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:
            if _digits_manifest_ok(folder):  # another process finished first
                return folder
            # A stale cache (older version, or half-deleted by hand): move it aside, then swap in.
            trash = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(folder, trash)
            os.rename(tmp, folder)
            shutil.rmtree(trash, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_digits_table(*, cache_dir: str | os.PathLike | None = None,
                      label_space: LabelSpace | None = None) -> SampleTable:
    """The ``digits`` source: classes ``"0".."9"``, ids ``digit_00000``..., one group per image."""
    folder = digits_folder(cache_dir)
    space = LabelSpace(tuple(str(d) for d in range(10)))
    if label_space is not None and not label_space.same_classes(space):
        raise DataError(f"digits has classes 0..9, but the given label space has {list(label_space.classes)}")
    df = pd.read_csv(folder / "labels.csv", dtype={"id": str, "file": str, "label": np.int64})
    frame = pd.DataFrame({
        "id": df["id"], "path": [str(folder / f) for f in df["file"]],
        "label": df["label"].astype("Int64"), "group": df["id"],
    })
    return SampleTable(frame, space, {"kind": "digits", "path": str(folder)})


# ====================================================================== split
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
