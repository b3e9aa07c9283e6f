"""Identical images under different names: copies that can leak between folds.

Competition data often holds the same photo twice under two file names (a re-upload, a
copy in another folder). Rows that name the *same file* (by real path) are handled when a
table is read (:mod:`ensembler.data.sources`). Copies with *identical bytes* at different
paths are found here, by each file's sha256 (:class:`ensembler.filehash.FileHashes`, so a
stamp file makes a second look cost one ``stat`` per image):

- copies in **different groups** can sit in train and validation at once: the model is
  scored on an image it trained on, and the OOF score is flattered;
- copies with **different labels** contradict each other.

:func:`identical_images` lists them; :func:`warn_identical_images` turns them into one
``UserWarning`` (``train-folds``, ``data split``) and returns its lines (``data inspect
--verify`` prints every one). They are warnings, not errors: a blank frame repeated across
people is harmless and the user decides; the message says how to fix it (give the copies
one group, or drop all but one).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pandas as pd

from ..errors import DataError
from ..filehash import FileHashes
from ._common import listing

__all__ = ["IdenticalPair", "identical_images", "warn_identical_images"]


@dataclass(frozen=True)
class IdenticalPair:
    """Rows ``first`` < ``second`` whose files differ by path but hold the same bytes."""

    first: int
    second: int
    sha256: str
    other_group: bool
    other_label: bool


def identical_images(table, hashes: FileHashes | None = None) -> list[IdenticalPair]:
    """Every row whose image has the same bytes as an earlier row's file at another path.

    Parameters
    ----------
    table : SampleTable
    hashes : FileHashes, optional
        Where the files' sha256 are remembered (default: in memory; every file is read).

    Returns
    -------
    list of IdenticalPair
        Each later copy paired with the first row of its content, in row order.

    Raises
    ------
    DataError
        Naming a file that cannot be read.
    """
    hashes = hashes if hashes is not None else FileHashes()
    frame = table.frame
    labels, groups = frame["label"], frame["group"].tolist()
    first: dict[str, int] = {}
    pairs = []
    for i, p in enumerate(frame["path"].tolist()):
        try:
            digest = hashes.sha256(p)
        except OSError as exc:
            raise DataError(f"{table.describe()}: the image of id {frame['id'].iloc[i]!r} cannot be read: {p} "
                            f"({exc.strerror or exc})") from None
        j = first.setdefault(digest, i)
        if j != i and frame["path"].iloc[j] != p:
            labeled = labels.notna().iloc[i] and labels.notna().iloc[j]
            pairs.append(IdenticalPair(j, i, digest, groups[i] != groups[j],
                                       bool(labeled and labels.iloc[i] != labels.iloc[j])))
    return pairs


def _row(table, i: int) -> str:
    frame, space = table.frame, table.label_space
    label = frame["label"].iloc[i]
    lab = "" if space is None or pd.isna(label) else f", label {space.classes[int(label)]!r}"
    return f"id {frame['id'].iloc[i]!r} ({frame['path'].iloc[i]}{lab}, group {frame['group'].iloc[i]!r})"


def warn_identical_images(table, hashes: FileHashes | None = None, *, stacklevel: int = 2) -> list[str]:
    """Warn once when copies of an image sit in different groups or carry different labels.

    Returns one line per such pair (empty when there is none; copies in one group with one
    label are harmless and not reported).

    Examples
    --------
    >>> import os, tempfile
    >>> import pandas as pd
    >>> from PIL import Image
    >>> from ensembler.data import SampleTable
    >>> from ensembler.labels import LabelSpace
    >>> d = tempfile.mkdtemp()
    >>> for name in ("a.png", "b.png"):
    ...     Image.new("RGB", (4, 4)).save(os.path.join(d, name))
    >>> frame = pd.DataFrame({"id": ["a", "b"], "path": [os.path.join(d, n) for n in ("a.png", "b.png")],
    ...                       "label": pd.array([0, 0], dtype="Int64"), "group": ["p1", "p2"]})
    >>> table = SampleTable(frame, LabelSpace(("x", "y")), {"kind": "csv", "path": d})
    >>> import warnings
    >>> with warnings.catch_warnings(record=True):
    ...     lines = warn_identical_images(table)
    >>> len(lines), "in different groups" in lines[0]
    (1, True)
    """
    lines = []
    for pair in identical_images(table, hashes):
        why = [w for w, on in (("in different groups", pair.other_group), ("with different labels", pair.other_label))
               if on]
        if why:
            lines.append(f"{_row(table, pair.first)} and {_row(table, pair.second)} are the same image "
                         f"(sha256 {pair.sha256[:12]}) {' and '.join(why)}")
    if lines:
        warnings.warn(
            f"{table.describe()}: {len(lines)} image(s) have a byte-identical copy in another group or with another "
            "label; a copy in another group can sit in train and validation at once (a leak that flatters the OOF "
            "score): give the copies one group and one label, or keep one of them:" + listing(lines),
            UserWarning, stacklevel=stacklevel + 1)
    return lines
