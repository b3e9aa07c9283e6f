"""Voting over earlier submission files: when only the CSVs are left.

A team that kept its submissions but not the models behind them ("hard voting over the top 8
models was done by hand from CSVs") combines them with :func:`vote_files`, what
``ensembler vote-files`` runs.

Layouts
-------
* mask-competition eval: ``ImageID,ans`` (``ans`` the class index 0-17);
* ``id,label[,class_name][,prob_<class>...]`` (what ``ensembler predict`` writes; the
  ``prob_`` columns with ``predict --probs``).

All files must have one layout and exactly the same ids (the error names the first differing
id and its file); the output keeps the first file's row order (and, for the mask layout, its
other columns).

Rules
-----
``hard``
    Each file votes for its label with its weight (default 1); the most votes wins. This is
    :func:`ensembler.ensemble.vote` with rule ``"hard"`` on the files' one-hot labels, row by
    row. **Tie rule** (``tie_break``): ``"smallest"`` (default) gives the tied class with the
    smallest index, as scikit-learn's ``VotingClassifier``; ``"first"`` gives the tied class
    voted by the earliest file, i.e. the best-ranked submission when the files come in
    leaderboard order (``top=N`` orders them so). The fraction of tied rows is reported.
``soft``
    The (weighted) mean of the files' ``prob_<class>`` columns; only files written with
    ``predict --probs`` have them. Ties (rare) follow the same ``tie_break``.

Every written file appends a ledger row (``kind: "vote-files"``) listing every input file
with its sha256 (and its leaderboard score when the ledger has one).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ._io import refuse_existing, sha256_file
from .errors import DataError, EnsemblerError, ParameterError
from .labels import LabelSpace

__all__ = ["SubmissionFile", "VoteFilesResult", "TIE_BREAKS", "read_submission_file", "top_scored_files",
           "vote_files"]

from .names import FILE_VOTES, TIE_BREAKS


@dataclass(frozen=True)
class SubmissionFile:
    """One submission CSV, read and checked."""

    path: Path
    layout: str                 # "mask" (ImageID,ans) or "id" (id,label[,class_name])
    ids: np.ndarray             # (N,) str, in the file's order
    labels: np.ndarray          # (N,) int64
    class_names: dict           # label -> class_name seen in the file (id layout)
    probs: np.ndarray | None    # (N, C) from prob_<class> columns, or None
    prob_classes: tuple         # the <class> of each prob column
    sha256: str
    frame: object = None        # the pandas frame (the mask layout's columns are kept)


@dataclass
class VoteFilesResult:
    """What :func:`vote_files` produced."""

    ids: np.ndarray
    pred: np.ndarray
    label_space: LabelSpace
    vote: str
    tie_break: str
    tie_rate: float
    files: list[SubmissionFile]
    weights: list[float] | None
    agreement: float = 1.0                        # share of rows where every file gave the same label
    changed: float = 0.0                          # share of rows where the vote differs from the first file
    scores: dict = field(default_factory=dict)   # file -> leaderboard score used by top=N
    submission: object = None                     # SubmissionResult when out was given


def read_submission_file(path) -> SubmissionFile:
    """Read one submission CSV in either layout (see the module docstring).

    Raises
    ------
    DataError
        Naming the file (and line): not a CSV, neither layout, a blank or repeated id, a label
        that is not a whole number >= 0, probabilities that are not finite numbers.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise DataError(f"submission file {path} does not exist" if not path.exists() else
                        f"submission file {path} is a folder, not a CSV")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"submission file {path} is not a readable CSV ({exc})") from None
    cols = list(df.columns)
    if "ImageID" in cols and "ans" in cols:
        layout, id_col, label_col = "mask", "ImageID", "ans"
    elif "id" in cols and "label" in cols:
        layout, id_col, label_col = "id", "id", "label"
    else:
        raise DataError(f"submission file {path}: neither layout (ImageID,ans or id,label[,class_name]); "
                        f"columns are {cols}")
    if not len(df):
        raise DataError(f"submission file {path} has no rows")
    ids = df[id_col].astype(str).to_numpy()
    blank = np.flatnonzero(ids == "")
    if len(blank):
        raise DataError(f"submission file {path}, line {blank[0] + 2}: empty {id_col}")
    uniq, first, counts = np.unique(ids, return_index=True, return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1][0]
        raise DataError(f"submission file {path}: {id_col} {dup!r} appears {counts[counts > 1][0]} times")
    raw = df[label_col].astype(str).str.strip()
    ok = raw.str.fullmatch(r"\d+")
    if not ok.all():
        bad = int(np.flatnonzero(~ok.to_numpy())[0])
        raise DataError(f"submission file {path}, line {bad + 2}: {label_col} {raw.iloc[bad]!r} is not a class index")
    labels = raw.astype(np.int64).to_numpy()
    names: dict = {}
    if layout == "id" and "class_name" in cols:
        for lab, name in zip(labels.tolist(), df["class_name"].astype(str)):
            if names.setdefault(lab, name) != name:
                raise DataError(f"submission file {path}: label {lab} is called both {names[lab]!r} and {name!r}")
    prob_cols = [c for c in cols if c.startswith("prob_")]
    probs = None
    if prob_cols:
        try:
            probs = df[prob_cols].astype(np.float64).to_numpy()
        except ValueError as exc:
            raise DataError(f"submission file {path}: prob_ columns are not numbers ({exc})") from None
        if not np.all(np.isfinite(probs)) or (probs < 0).any():
            row = int(np.flatnonzero(~np.all(np.isfinite(probs) & (probs >= 0), axis=1))[0])
            raise DataError(f"submission file {path}, line {row + 2}: prob_ values must be finite and >= 0")
    return SubmissionFile(path, layout, ids, labels, names, probs, tuple(c[5:] for c in prob_cols),
                          sha256_file(path), df)


def _check_same_ids(files: Sequence[SubmissionFile]) -> list[np.ndarray]:
    """Row positions in each file of the first file's ids; DataError naming the first differing id."""
    ref = files[0]
    out = [np.arange(len(ref.ids))]
    ref_set = set(ref.ids.tolist())
    for f in files[1:]:
        if f.layout != ref.layout:
            raise DataError(f"submission files {ref.path} ({ref.layout} layout) and {f.path} ({f.layout} layout) "
                            "differ in layout")
        pos = {i: n for n, i in enumerate(f.ids.tolist())}
        missing = next((i for i in ref.ids.tolist() if i not in pos), None)
        if missing is not None:
            raise DataError(f"ids differ: {missing!r} (row {int(np.flatnonzero(ref.ids == missing)[0]) + 1} of "
                            f"{ref.path}) is missing from {f.path}")
        extra = next((i for i in f.ids.tolist() if i not in ref_set), None)
        if extra is not None:
            raise DataError(f"ids differ: {extra!r} (row {pos[extra] + 1} of {f.path}) is not in {ref.path}")
        out.append(np.fromiter((pos[i] for i in ref.ids.tolist()), dtype=np.int64, count=len(ref.ids)))
    return out


def _label_space(files: Sequence[SubmissionFile]) -> LabelSpace:
    ref = files[0]
    if ref.layout == "mask":
        space = LabelSpace.mask()
    else:
        names: dict = {}
        for f in files:
            for lab, name in f.class_names.items():
                if names.setdefault(lab, name) != name:
                    raise DataError(f"label {lab} is {names[lab]!r} in one file and {name!r} in {f.path}")
        probs = {f.prob_classes for f in files if f.prob_classes}
        if len(probs) > 1:
            raise DataError(f"submission files have different prob_ columns: {sorted(probs)}")
        prob_classes = probs.pop() if probs else ()
        c = max([int(f.labels.max()) + 1 for f in files] + [max(names, default=-1) + 1, len(prob_classes)])
        if prob_classes:
            classes = list(prob_classes)
            for lab, name in names.items():
                if lab < len(classes) and classes[lab] != name:
                    raise DataError(f"label {lab} is {name!r} but prob column {lab} is prob_{classes[lab]}")
        else:
            classes = [names.get(k, str(k)) for k in range(c)]
        if len(classes) < 2:
            classes.append(str(len(classes)))
        space = LabelSpace(tuple(classes))
    for f in files:
        if int(f.labels.max()) >= space.num_classes:
            bad = int(np.flatnonzero(f.labels >= space.num_classes)[0])
            raise DataError(f"submission file {f.path}, line {bad + 2}: label {int(f.labels[bad])} is outside "
                            f"0..{space.num_classes - 1}")
    return space


def _break_ties(scores: np.ndarray, member_pred: np.ndarray, tie_break: str) -> np.ndarray:
    """argmax of ``scores`` (N, C); ties to the smallest class, or to the earliest member voting a tied class."""
    pred = scores.argmax(1)
    if tie_break == "smallest":
        return pred
    top = scores.max(1, keepdims=True)
    tied = scores == top
    rows = np.flatnonzero(tied.sum(1) > 1)
    for r in rows:
        for p in member_pred[:, r]:
            if tied[r, p]:
                pred[r] = p
                break
    return pred


def top_scored_files(ledger, n: int, board: str = "public", among: Sequence = ()) -> list[tuple[Path, float]]:
    """The ``n`` best-scored submission files of a ledger, best first (``among``: only these files).

    Scores come from ``ensembler ledger score`` rows; a file's latest score on ``board`` counts.
    Raises :class:`EnsemblerError` when fewer than ``n`` scored files exist.
    """
    from .submit import ledger_scores

    scores = ledger_scores(ledger)
    if among:
        wanted = {str(Path(p).resolve()) for p in among}
        scores = {k: v for k, v in scores.items() if k in wanted}
    rows = [(Path(k), v[board]) for k, v in scores.items() if v.get(board) is not None]
    if len(rows) < n:
        raise ParameterError("top", f"top {n}: the ledger {ledger} has {board} scores for {len(rows)} file(s)"
                             + (" among those given" if among else "")
                             + "; record them with `ensembler ledger score FILE SCORE`")
    rows.sort(key=lambda kv: -kv[1])  # stable: equal scores keep the ledger's order
    return rows[:n]


def vote_files(paths: Sequence = (), *, vote: str = "hard", weights: Sequence[float] | None = None,
               tie_break: str = "smallest", top: int | None = None, board: str = "public",
               out: str | os.PathLike | None = None, ledger: str | os.PathLike | None = None,
               overwrite: bool = False) -> VoteFilesResult:
    """Combine earlier submission CSVs by a hard or soft vote; write the result and a ledger row.

    Parameters
    ----------
    paths : sequence of path
        Submission files (both layouts, see the module docstring). With ``top``, the
        candidates (default: every scored file of the ledger).
    vote : {"hard", "soft"}
        ``soft`` needs ``prob_<class>`` columns in every file.
    weights : sequence of float, optional
        One non-negative weight per file (in the order used, i.e. best score first with ``top``).
    tie_break : {"smallest", "first"}
        See the module docstring.
    top : int, optional
        Use the ``top`` best-scored files by their ``board`` score in the ledger, best first.
    out : path, optional
        The CSV to write (an existing file is kept unless ``overwrite``: refused before any work).
    ledger : path, optional
        Default ``<folder of out>/ledger.jsonl`` (``submissions/ledger.jsonl`` without ``out``).

    Returns
    -------
    VoteFilesResult

    Examples
    --------
    >>> res = vote_files(["a.csv", "b.csv", "c.csv"], vote="hard", out="submissions/vote3.csv")  # doctest: +SKIP
    >>> res.tie_rate, res.submission.path  # doctest: +SKIP
    """
    from .ensemble import check_weights
    from .ensemble import vote as vote_fn

    if vote not in FILE_VOTES:
        raise ParameterError("vote",
                             f"vote must be one of {', '.join(FILE_VOTES)} for submission files, got {vote!r}")
    if tie_break not in TIE_BREAKS:
        raise ParameterError("tie_break", f"tie_break must be one of {', '.join(TIE_BREAKS)}, got {tie_break!r}")
    if out is not None:
        refuse_existing(out, overwrite=overwrite)  # the one --out rule, before any file is read
    ledger_path = Path(ledger) if ledger is not None else (Path(out).parent if out else Path("submissions")) / \
        "ledger.jsonl"
    scores: dict = {}
    if top is not None:
        if top < 1:
            raise ParameterError("top", f"top must be at least 1, got {top}")
        picked = top_scored_files(ledger_path, top, board, among=paths)
        paths = [p for p, _ in picked]
        scores = {str(p): s for p, s in picked}
    paths = list(paths)
    if len(paths) < 2:
        raise EnsemblerError(f"vote-files needs at least two submission files, got {len(paths)}")
    if len({str(Path(p).resolve()) for p in paths}) != len(paths):
        raise EnsemblerError("a submission file is listed twice")
    files = [read_submission_file(p) for p in paths]
    take = _check_same_ids(files)
    space = _label_space(files)
    names = [str(f.path) for f in files]
    try:
        w = check_weights(weights, len(files), names)
    except ValueError as exc:
        raise ParameterError("weights", f"weights: {exc}") from None
    c = space.num_classes
    member_pred = np.stack([f.labels[t] for f, t in zip(files, take)])
    if vote == "hard":
        onehot = np.eye(c)[member_pred]  # (M, N, C): argmax is each file's label
        res = vote_fn(onehot, "hard", weights=w, names=names)
    else:
        lacking = [str(f.path) for f in files if f.probs is None]
        if lacking:
            raise ParameterError("vote", f"vote 'soft' needs prob_<class> columns (`predict --probs`); {lacking[0]} has none")
        probs = np.stack([f.probs[t] for f, t in zip(files, take)])
        if probs.shape[2] != c:
            raise DataError(f"prob_ columns give {probs.shape[2]} classes, the labels {c}")
        with np.errstate(divide="ignore"):
            res = vote_fn(np.log(probs), "soft", weights=w, names=names)
    scores_nc = res.probs
    pred = _break_ties(scores_nc, member_pred, tie_break)
    result = VoteFilesResult(ids=files[0].ids, pred=pred.astype(np.int64), label_space=space, vote=vote,
                             tie_break=tie_break, tie_rate=res.tie_rate, files=files,
                             weights=None if w is None else [float(x) for x in w], scores=scores,
                             agreement=float((member_pred == member_pred[0]).all(0).mean()),
                             changed=float((pred != member_pred[0]).mean()))
    if out is not None:
        result.submission = _write(result, scores_nc, Path(out), ledger_path, overwrite)
    return result


def _write(result: VoteFilesResult, probs: np.ndarray, out: Path, ledger: Path, overwrite: bool):
    import pandas as pd

    from .data import SampleTable
    from .submit import ledger_scores, write_submission

    ref = result.files[0]
    frame = pd.DataFrame({"id": ref.ids, "path": "", "label": pd.array([None] * len(ref.ids), dtype="Int64"),
                          "group": ref.ids})
    source = {"kind": "submission", "path": str(ref.path)}
    if ref.layout == "mask":
        source["info_csv"] = str(ref.path)  # the first file's rows and columns, 'ans' refilled
    table = SampleTable(frame, result.label_space, source)
    known = ledger_scores(ledger)
    inputs = {
        "kind": "vote-files",
        "vote": result.vote,
        "tie_break": result.tie_break,
        "weights": result.weights,
        "tie_rate": result.tie_rate,
        "inputs": [{"file": str(f.path), "sha256": f.sha256,
                    **{b: s for b, s in known.get(str(f.path.resolve()), {}).items() if s is not None}}
                   for f in result.files],
    }
    with_probs = result.vote == "soft" and ref.layout == "id"
    return write_submission(table, result.pred, out, probs=probs, with_probs=with_probs, inputs=inputs,
                            overwrite=overwrite, ledger=ledger)
