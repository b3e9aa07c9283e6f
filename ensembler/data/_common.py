"""Helpers the Sources share: file-name rules, strict CSV reading, error messages.

Private to :mod:`ensembler.data`: hidden-entry and image-extension rules, a CSV reader that
names the file on any failure, 1-based line numbers for data rows, and lists of offenders
capped at ``_MAX_LISTED`` per message.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import pandas as pd

from ..errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
_MAX_LISTED = 10  # offenders named in one error message


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
