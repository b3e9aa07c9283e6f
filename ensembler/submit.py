"""Submission files and the ledger that remembers what each one was.

Teams lose track of what they submitted ("the same submission was sent twice because
nobody recorded what each file was"). Every written submission appends one JSON line to
``ledger.jsonl`` beside it: time, recipe hash, members with their weights' sha256, TTA plan,
vote rule, data fingerprint, output file and its sha256. Before appending, the ledger is
searched: an identical output file, or identical inputs, are reported.

Formats
-------
* Mask-competition eval data (a SampleTable whose ``source`` has ``info_csv``): that
  ``info.csv`` with ``ans`` filled with the class index, rows in the original order.
* Anything else: ``id,label,class_name`` and, with ``probs=True``, one ``prob_<class>``
  column per class.
"""

from __future__ import annotations

import io
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ._io import atomic_write, sha256_bytes, sha256_file
from .errors import DataError, EnsemblerError

LEDGER_NAME = "ledger.jsonl"


@dataclass
class SubmissionResult:
    """What :func:`write_submission` did."""

    path: Path
    sha256: str
    rows: int
    ledger: Path
    record: dict
    same_output: list[dict] = field(default_factory=list)  # earlier ledger rows with the same file sha256
    same_inputs: list[dict] = field(default_factory=list)  # earlier rows with the same recipe/members/TTA/data

    @property
    def is_repeat(self) -> bool:
        return bool(self.same_output or self.same_inputs)

    def repeat_message(self) -> str | None:
        """A one-line warning naming the earlier identical submission, or None."""
        if self.same_output:
            r = self.same_output[-1]
            return (f"identical submission already exists: {r['output']} written {r['time']} "
                    f"(sha256 {self.sha256[:12]})")
        if self.same_inputs:
            r = self.same_inputs[-1]
            return (f"same recipe, members, TTA and data as {r['output']} written {r['time']}; "
                    "the output differs only by non-determinism")
        return None


def render_submission(table, pred: np.ndarray, *, probs: np.ndarray | None = None,
                      with_probs: bool = False) -> bytes:
    """The CSV bytes for ``pred`` (class indices aligned with ``table.ids``)."""
    import pandas as pd

    pred = np.asarray(pred)
    ids = np.asarray(table.ids).astype(str)
    if pred.shape != (len(ids),):
        raise EnsemblerError(f"{len(pred)} predictions for {len(ids)} samples")
    classes = list(table.label_space.classes)
    if pred.size and (pred.min() < 0 or pred.max() >= len(classes)):
        raise EnsemblerError(f"predicted class index out of range 0..{len(classes) - 1}")
    info_csv = (table.source or {}).get("info_csv")
    if info_csv:
        info = pd.read_csv(info_csv, dtype=str, keep_default_na=False)
        if "ImageID" not in info.columns:
            raise DataError(f"{info_csv}: no ImageID column (columns: {list(info.columns)})")
        by_id = dict(zip(ids, pred.tolist()))
        missing = [i for i in info["ImageID"] if i not in by_id]
        if missing:
            raise DataError(f"{info_csv}: {len(missing)} ImageIDs have no prediction, e.g. {missing[:3]}")
        info["ans"] = [int(by_id[i]) for i in info["ImageID"]]
        frame = info
    else:
        frame = pd.DataFrame({"id": ids, "label": pred.astype(int), "class_name": [classes[p] for p in pred]})
        if with_probs:
            if probs is None or np.asarray(probs).shape != (len(ids), len(classes)):
                raise EnsemblerError("with_probs needs probs of shape (N, num_classes)")
            for j, c in enumerate(classes):
                frame[f"prob_{c}"] = np.asarray(probs)[:, j].astype(np.float64).round(6)
    buf = io.StringIO()
    frame.to_csv(buf, index=False, lineterminator="\n")
    return buf.getvalue().encode("utf-8")


def write_submission(table, pred: np.ndarray, out: str | os.PathLike, *, probs: np.ndarray | None = None,
                     with_probs: bool = False, inputs: dict[str, Any] | None = None,
                     overwrite: bool = False, ledger: str | os.PathLike | None = None) -> SubmissionResult:
    """Write a submission atomically and append a ledger row.

    Parameters
    ----------
    table : SampleTable
        The predicted data, in the order of ``pred``.
    pred : ndarray of int, shape (N,)
        Predicted class indices.
    out : path
        The CSV to write. An existing file with *different* content is not overwritten
        unless ``overwrite=True`` (an earlier submission would be lost).
    inputs : dict
        What produced the prediction, recorded in the ledger: ``recipe_hash``, ``members``
        (list of ``{"name", "sha256"}``), ``tta``, ``vote``, ``data_fingerprint``, ...
    ledger : path, optional
        Default: ``ledger.jsonl`` in the folder of ``out``.

    Examples
    --------
    >>> res = write_submission(table, pred, "submissions/soft.csv",
    ...                        inputs={"vote": "soft", "tta": "hflip"})  # doctest: +SKIP
    >>> res.repeat_message()  # doctest: +SKIP
    """
    out = Path(out)
    data = render_submission(table, pred, probs=probs, with_probs=with_probs)
    digest = sha256_bytes(data)
    if out.exists() and not overwrite and sha256_file(out) != digest:
        raise EnsemblerError(f"{out} exists with different content; choose another --out or pass --overwrite")
    ledger_path = Path(ledger) if ledger is not None else out.parent / LEDGER_NAME
    # Read the ledger before writing anything: a broken ledger fails with no submission written.
    earlier = read_ledger(ledger_path)
    with atomic_write(out, "wb") as fh:
        fh.write(data)
    inputs = dict(inputs or {})
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "output": str(out),
        "output_sha256": digest,
        "rows": int(len(pred)),
        **inputs,
        "inputs_key": inputs_key(inputs),
    }
    same_output = [r for r in earlier if r.get("output_sha256") == digest]
    same_inputs = [r for r in earlier if r.get("inputs_key") == record["inputs_key"] and inputs
                   and r.get("output_sha256") != digest]
    append_ledger(ledger_path, record)
    return SubmissionResult(out, digest, int(len(pred)), ledger_path, record, same_output, same_inputs)


def inputs_key(inputs: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of what produced a submission (time excluded)."""
    return sha256_bytes(json.dumps(inputs, sort_keys=True, default=str).encode())


def read_ledger(path: str | os.PathLike) -> list[dict]:
    """All rows of a ledger; a missing ledger is empty. A broken line names the file and line."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise EnsemblerError(f"{path}, line {n}: not valid JSON ({exc.msg})") from None
    return rows


def append_ledger(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line under a file lock, in a single write, fsynced."""
    from filelock import FileLock

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, sort_keys=False, default=str) + "\n").encode("utf-8")
    with FileLock(str(path) + ".lock"):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)


def member_records(entries: Sequence) -> list[dict]:
    """Ledger form of registry entries: name, family, fold, sha256."""
    return [{"id": e.id, "family": e.family, "fold": e.fold, "sha256": e.sha256} for e in entries]
