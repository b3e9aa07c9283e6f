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
  column per class. ``label`` is the class index, except for classes named by integers (a
  CSV's integer label column, e.g. ``-1,0,1``): there it is the class's own integer, so a row
  labelled 0 in the training CSV is predicted as 0.
"""

from __future__ import annotations

import io
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ._io import (append_whole, atomic_write, json_text, refuse_existing, sha256_bytes, sha256_file, truncate_to,
                  write_bytes_atomic, write_error)
from .errors import DataError, EnsemblerError
from .names import LEADERBOARDS

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
        # Classes named by integers (a CSV's integer label column, e.g. -1,0,1) keep their meaning:
        # ``label`` holds the class's own integer, not its index; otherwise the class index.
        space = table.label_space
        values = [int(c) for c in classes] if space.integer_named else list(range(len(classes)))
        frame = pd.DataFrame({"id": ids, "label": np.asarray(values, dtype=np.int64)[pred],
                              "class_name": [classes[p] for p in pred]})
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
    """Write a submission atomically and append its ledger row: both stand or fall together.

    Parameters
    ----------
    table : SampleTable
        The predicted data, in the order of ``pred``.
    pred : ndarray of int, shape (N,)
        Predicted class indices.
    out : path
        The CSV to write. An existing file is not replaced unless ``overwrite=True`` (the one
        rule of :func:`ensembler._io.refuse_existing`: an earlier submission would be lost).
    inputs : dict
        What produced the prediction, recorded in the ledger: ``recipe_hash``, ``members``
        (list of ``{"name", "sha256"}``), ``tta``, ``vote``, ``data_fingerprint``, ...
    ledger : path, optional
        Default: ``ledger.jsonl`` in the folder of ``out``.

    Notes
    -----
    Under the ledger's lock: the CSV is written (temp file + rename), then the row is appended
    whole (:func:`ensembler._io.append_whole`). When the append fails (a full disk), the
    ledger is cut back to its old size and the CSV is put back as it was (removed, or its
    earlier bytes restored), and a :class:`~ensembler.errors.WriteError` names the ledger.
    A torn last line left by an older crash is moved to ``ledger.jsonl.torn`` with a warning;
    the whole rows are kept.

    Examples
    --------
    >>> res = write_submission(table, pred, "submissions/soft.csv",
    ...                        inputs={"vote": "soft", "tta": "hflip"})  # doctest: +SKIP
    >>> res.repeat_message()  # doctest: +SKIP
    """
    from filelock import FileLock

    out = Path(out)
    data = render_submission(table, pred, probs=probs, with_probs=with_probs)
    digest = sha256_bytes(data)
    refuse_existing(out, overwrite=overwrite)
    ledger_path = Path(ledger) if ledger is not None else out.parent / LEDGER_NAME
    inputs = dict(inputs or {})
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "output": str(out),
        "output_sha256": digest,
        "rows": int(len(pred)),
        **inputs,
        "inputs_key": inputs_key(inputs),
    }
    line = (json_text(record, indent=None, where=f"ledger row for {out}") + "\n").encode("utf-8")
    # Read the ledger before writing anything: a broken ledger fails with no submission written.
    earlier = read_ledger(ledger_path)
    _mkdir(ledger_path.parent)
    with FileLock(str(ledger_path) + ".lock"):
        old = out.read_bytes() if out.is_file() else None
        with atomic_write(out, "wb") as fh:
            fh.write(data)
        try:
            _append_locked(ledger_path, line)
        except BaseException:
            _restore(out, old)
            raise
    same_output = [r for r in earlier if r.get("output_sha256") == digest]
    same_inputs = [r for r in earlier if r.get("inputs_key") == record["inputs_key"] and inputs
                   and r.get("output_sha256") != digest]
    return SubmissionResult(out, digest, int(len(pred)), ledger_path, record, same_output, same_inputs)


def _mkdir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(folder, exc, "create the folder") from exc


def _restore(out: Path, old: bytes | None) -> None:
    """Put a submission back as it was before a failed write_submission."""
    if old is None:
        out.unlink(missing_ok=True)
    else:
        write_bytes_atomic(out, old)


def inputs_key(inputs: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of what produced a submission (time excluded)."""
    return sha256_bytes(json.dumps(inputs, sort_keys=True, default=str).encode())


def _torn_tail(raw: bytes) -> tuple[bytes, bytes]:
    """``(whole lines, torn tail)``: the tail is a last line without its newline that is not JSON."""
    if not raw or raw.endswith(b"\n"):
        return raw, b""
    cut = raw.rfind(b"\n") + 1
    tail = raw[cut:]
    try:
        json.loads(tail.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return raw[:cut], tail
    return raw, b""  # a whole row that only lacks its newline


def read_ledger(path: str | os.PathLike) -> list[dict]:
    """All rows of a ledger; a missing ledger is empty.

    A broken line names the file and line (:class:`EnsemblerError`), except a torn *last* line
    (no newline at its end: a write cut short by a crash or a full disk), which is reported
    with a ``UserWarning`` and left out; the next append moves it to ``<ledger>.torn``.
    """
    path = Path(path)
    if not path.exists():
        return []
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise EnsemblerError(f"cannot read ledger {path}: {exc.strerror or exc}") from None
    whole, tail = _torn_tail(raw)
    rows = []
    for n, line in enumerate(whole.decode("utf-8", "replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise EnsemblerError(f"{path}, line {n}: not valid JSON ({exc.msg})") from None
    if tail:
        torn_line = whole.count(b"\n") + 1
        warnings.warn(f"{path}, line {torn_line}: a torn last line ({len(tail)} bytes, from an "
                      f"interrupted write) is ignored; the {len(rows)} whole row(s) are kept", UserWarning,
                      stacklevel=2)
    return rows


def append_ledger(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line under a file lock, whole or not at all, fsynced."""
    from filelock import FileLock

    path = Path(path)
    _mkdir(path.parent)
    line = (json_text(record, indent=None, where=str(path)) + "\n").encode("utf-8")
    with FileLock(str(path) + ".lock"):
        _append_locked(path, line)


def _append_locked(path: Path, line: bytes) -> None:
    """Append ``line`` (lock held); first move a torn last line to ``<ledger>.torn``."""
    if path.is_file():
        raw = path.read_bytes()
        whole, tail = _torn_tail(raw)
        if tail:
            append_whole(path.with_name(path.name + ".torn"), tail + b"\n")
            truncate_to(path, len(whole))
            warnings.warn(f"{path}: moved a torn last line ({len(tail)} bytes, from an interrupted write) to "
                          f"{path.name}.torn; the whole rows are kept", UserWarning, stacklevel=3)
    append_whole(path, line)




def record_score(file: str | os.PathLike, score: float, *, board: str = "public",
                 ledger: str | os.PathLike | None = None) -> dict:
    """Append a leaderboard score of a submission file to the ledger (a ``kind: "score"`` row).

    Parameters
    ----------
    file : path
        The submission that was scored (it must exist: its sha256 is recorded).
    score : float
        The leaderboard's number, e.g. 0.8022.
    board : {"public", "private"}
    ledger : path, optional
        Default ``ledger.jsonl`` beside ``file``.

    The latest score of a file on a board wins (:func:`ledger_scores`); ``vote-files --top N``
    picks the N best-scored files.
    """
    import math

    path = Path(file)
    if board not in LEADERBOARDS:
        raise EnsemblerError(f"board must be one of {LEADERBOARDS}, got {board!r}")
    if not path.is_file():
        raise EnsemblerError(f"cannot score {path}: no such submission file")
    try:
        value = float(score)
    except (TypeError, ValueError):
        raise EnsemblerError(f"score {score!r} is not a number") from None
    if not math.isfinite(value):
        raise EnsemblerError(f"score {score!r} is not a finite number")
    ledger_path = Path(ledger) if ledger is not None else path.parent / LEDGER_NAME
    read_ledger(ledger_path)  # a broken ledger fails before anything is appended
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "kind": "score", "file": str(path),
              "file_resolved": str(path.resolve()), "file_sha256": sha256_file(path), board: value}
    append_ledger(ledger_path, record)
    return record


def ledger_scores(ledger: str | os.PathLike) -> dict[str, dict[str, float]]:
    """``{resolved file path: {"public": score, "private": score}}``, the latest per file and board."""
    out: dict[str, dict[str, float]] = {}
    for r in read_ledger(ledger):
        if r.get("kind") != "score":
            continue
        key = r.get("file_resolved") or str(Path(r.get("file", "")).resolve())
        for board in LEADERBOARDS:
            if r.get(board) is not None:
                out.setdefault(key, {})[board] = float(r[board])
    return out


def member_records(entries: Sequence) -> list[dict]:
    """Ledger form of registry entries: name, family, fold, sha256."""
    return [{"id": e.id, "family": e.family, "fold": e.fold, "sha256": e.sha256} for e in entries]
