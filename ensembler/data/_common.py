"""Helpers the Sources share: file-name rules, strict CSV reading, error messages.

Private to :mod:`ensembler.data`: hidden-entry and image-extension rules, a CSV reader that
names the file on any failure, 1-based line numbers for data rows, and lists of offenders
capped at ``MAX_LISTED`` per message.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import pandas as pd

from ..errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
MAX_LISTED = 10  # offenders named in one error message


def is_hidden(name: str) -> bool:
    """A hidden or OS-litter entry (``.x``, ``Thumbs.db``, ``__MACOSX``), skipped by every Source.

    >>> is_hidden("._mask1.jpg"), is_hidden("Thumbs.db"), is_hidden("mask1.jpg")
    (True, True, False)
    """
    return name.startswith(".") or name in ("Thumbs.db", "desktop.ini", "__MACOSX")


def is_image_name(name: str) -> bool:
    """The name ends in one of :data:`IMAGE_EXTENSIONS` (any case).

    >>> is_image_name("a.JPG"), is_image_name("a.txt")
    (True, False)
    """
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def listing(items: Sequence[str], total: int | None = None) -> str:
    """Offenders one per indented line, at most :data:`MAX_LISTED`, then "... and N more".

    >>> print(listing(["a", "b"]))
    <BLANKLINE>
      a
      b
    """
    total = len(items) if total is None else total
    shown = "\n  ".join(str(i) for i in items[:MAX_LISTED])
    more = f"\n  ... and {total - MAX_LISTED} more" if total > MAX_LISTED else ""
    return f"\n  {shown}{more}"


def read_csv_cells(path: Path, what: str = "CSV") -> pd.DataFrame:
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


def find_column(df: pd.DataFrame, name: str) -> str | None:
    """The column called ``name``, case-insensitively."""
    for c in df.columns:
        if c.lower() == name.lower():
            return c
    return None


def csv_line(i: int) -> int:
    """File line of data row ``i`` (header is line 1).

    >>> csv_line(0)
    2
    """
    return i + 2


def check_unique(values: Sequence[str], where: str, what: str = "id") -> None:
    """DataError naming both file lines of the first value that appears twice.

    >>> check_unique(["a", "b", "a"], "x.csv")
    Traceback (most recent call last):
    ...
    ensembler.errors.DataError: x.csv: duplicate id 'a' on line 2 and line 4
    """
    seen: dict[str, int] = {}
    for i, v in enumerate(values):
        if v in seen:
            raise DataError(f"{where}: duplicate {what} {v!r} on line {csv_line(seen[v])} and line {csv_line(i)}")
        seen[v] = i


def check_files(paths: Sequence[str], given: Sequence[str], where: str) -> None:
    """DataError listing every row whose image file does not exist (``given``: as written)."""
    missing = [f"line {csv_line(i)}: {p}" + (f" (written {g!r})" if g != p else "")
               for i, (p, g) in enumerate(zip(paths, given)) if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{where}: {len(missing)} image file(s) not found:{listing(missing)}")


def same_files(paths: Sequence[str]) -> list[tuple[int, int, str]]:
    """``(first row, later row, real path)`` for every row whose file another row already names
    (through a symlink, ``..``, or a second spelling of the path)."""
    first: dict[str, int] = {}
    dups = []
    for i, p in enumerate(paths):
        real = os.path.realpath(p)
        if real in first:
            dups.append((first[real], i, real))
        else:
            first[real] = i
    return dups
