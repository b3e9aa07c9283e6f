"""Evaluate: macro-F1, accuracy, per-class table and confusion matrix of any prediction.

:func:`evaluate` is what ``ensembler evaluate`` runs. It scores a prediction against labels:
macro-F1, accuracy, log-loss (when there are probabilities), per-class
precision/recall/F1/support, the confusion matrix and its PNG. It takes a logits file (an OOF
file, or ``ensembler infer`` output, read by :func:`load_logits_file`), or runs a
recipe/members over labeled data through :func:`ensembler.predict.predict` (which resolves
members, runs the engine and applies the recipe or vote; nothing of that lives here) and
scores each member alone with :meth:`~ensembler.predict.PredictionResult.member_joint_logits`.

Nothing is written until every input has been validated, so a bad recipe, member or logits
file leaves no plot behind.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from ._io import refuse_existing
from .errors import DataError, EnsemblerError, LogitError
from .logits import few, read_logits_set
from .names import member_names
from .predict import predict

__all__ = ["EvaluationResult", "evaluate", "load_logits_file", "logits_age_bands", "plot_confusion_matrix", "per_class_table"]


# ============================================================================ result
@dataclass
class EvaluationResult:
    """Scores of one prediction against labels (see :func:`evaluate`).

    Attributes
    ----------
    name : str
        What was scored (a file, a recipe, a vote over members).
    f1, acc : float
        Macro-F1 (scikit-learn's ``f1_score(average="macro")``: over the classes present in
        truth or prediction; ``f1_labels="all"``: every class, absent ones count 0) and accuracy.
    logloss : float or None
        When probabilities/logits were available (not for the hard vote).
    per_class : list of dict
        ``{"class", "precision", "recall", "f1", "support", "predicted"}`` per class.
    confusion : ndarray (C, C)
        Rows true class, columns predicted class.
    classes : list of str
    rows : int
    plot : Path or None
        The confusion-matrix PNG, when asked for.
    member_scores : dict name -> {"f1", "acc", "logloss"}
        Each member alone (when the prediction was a vote over several).
    tie_rate : float or None
    """

    name: str
    f1: float
    acc: float
    logloss: float | None
    per_class: list[dict]
    confusion: np.ndarray
    classes: list[str]
    rows: int
    plot: Path | None = None
    member_scores: dict = field(default_factory=dict)
    tie_rate: float | None = None


# ============================================================================ logits files
def load_logits_file(path, *, members: str | Sequence[str] | None = None, vote: str = "soft",
                     weights: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, dict]:
    """Read a logits ``.npz`` for scoring: an OOF/single file or ``ensembler infer`` output.

    Parameters
    ----------
    path : path
        A logits file (:mod:`ensembler.logits`, any version): one member (an OOF file of
        ``train-folds``, an OOF-TTA file, a hand-made ``ids`` + ``logits`` npz) is scored as
        it is; several (what ``ensembler infer --out`` writes) are combined with ``vote``.
    members : names, optional
        The members of a several-member file to use (default all).
    vote, weights : see :func:`ensembler.ensemble.vote`.

    Returns
    -------
    ids : ndarray (N,) str
    logits : ndarray (N, C)
        Log-probabilities of the combined prediction (single files: the raw logits).
    labels : ndarray (N,) int64 or None
    info : dict
        ``classes`` (or None), ``members`` {name: (N, C) logits}, ``tie_rate``, ``rule``.

    Raises
    ------
    LogitError
        Naming the file: not a readable npz, missing arrays, NaN/inf, duplicate ids, a class
        count that disagrees with its label space, unknown members.
    """
    from .ensemble import vote as vote_fn
    from .labels import age_bands_of

    path = Path(path)
    loaded = read_logits_set(path)  # LogitError naming the file and what is wrong
    names = list(loaded)
    if len(loaded) == 1 and members in (None, "all"):
        m = loaded[names[0]]
        classes = list(m.label_space.classes) if m.label_space is not None else None
        info = {"classes": classes, "members": {m.name: m.logits}, "tie_rate": None, "rule": None,
                "age_bands": age_bands_of(m.label_space)}
        return m.ids, np.asarray(m.logits, dtype=np.float64), m.labels, info
    if members not in (None, "all"):
        want = member_names(members, all_names=lambda: list(loaded))
        unknown = [n for n in want if n not in loaded]
        if unknown:
            raise LogitError(f"logits file {path} has no member(s) {unknown}; it holds {names}")
        names = want
    arrays = {n: np.asarray(loaded[n].logits) for n in names}
    spaces = {tuple(loaded[n].label_space.classes) if loaded[n].label_space is not None else None for n in names}
    if len(spaces) > 1:
        raise LogitError(f"logits file {path}: its members predict different classes ({names})")
    ref = loaded[names[0]]
    try:
        res = vote_fn(arrays, vote, weights=weights, names=names)
    except LogitError as exc:  # the file's logits: say which file (a bad vote/weights passes as it is)
        raise LogitError(f"logits file {path}: {exc}") from None
    classes = spaces.pop()
    bands = {age_bands_of(loaded[n].label_space) for n in names} - {None}
    if len(bands) > 1:
        raise LogitError(f"logits file {path}: its members were made with different age bands {sorted(bands)}")
    info = {"classes": list(classes) if classes is not None else None, "members": arrays,
            "tie_rate": res.tie_rate if vote == "hard" else None, "rule": vote,
            "age_bands": bands.pop() if bands else None}
    with np.errstate(divide="ignore"):
        logp = np.log(res.probs)
    return ref.ids, logp, ref.labels, info


def logits_age_bands(path) -> tuple[int, int] | None:
    """The age bands a logits file's members were made with (None when none depends on age or they disagree)."""
    from .labels import age_bands_of

    try:
        bands = {age_bands_of(m.label_space) for m in read_logits_set(path).values()} - {None}
    except LogitError:
        return None  # evaluate reports the bad file itself
    return bands.pop() if len(bands) == 1 else None


def _check_file_age_bands(path, file_bands, table) -> None:
    from .labels import age_bands_of

    have = age_bands_of(table.label_space)
    if file_bands is not None and have is not None and tuple(file_bands) != have:
        raise DataError(
            f"{table.describe()} is labelled with age bands {have[0]},{have[1]} but logits file {path} was made "
            f"with {file_bands[0]},{file_bands[1]}: pass --age-bands {file_bands[0]},{file_bands[1]} (or omit "
            "--age-bands to take the file's)")


def _align_to_table(path, ids: np.ndarray, table) -> np.ndarray:
    """Row positions in the file of each table id; LogitError naming the file when they differ."""
    pos = {i: n for n, i in enumerate(ids)}
    table_ids = np.asarray(table.ids).astype(str)
    missing = [i for i in table_ids if i not in pos]
    extra = sorted(set(pos) - set(table_ids.tolist()))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} id(s) of the data missing from it, e.g. {few(missing, 3)}")
        if extra:
            parts.append(f"{len(extra)} id(s) not in the data, e.g. {few(extra, 3)}")
        raise LogitError(f"logits file {path} does not match {table.describe()}: " + "; ".join(parts))
    return np.fromiter((pos[i] for i in table_ids), dtype=np.int64, count=len(table_ids))


# ============================================================================ evaluate
def per_class_table(y, pred, classes: Sequence[str]) -> tuple[list[dict], np.ndarray]:
    """Per-class precision, recall, F1, support and the confusion matrix (rows = truth)."""
    from .metrics import confusion_matrix

    c = len(classes)
    cm = confusion_matrix(y, pred, c)
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(1), cm.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / np.maximum(predicted, 1), 0.0)
        recall = np.where(support > 0, tp / np.maximum(support, 1), 0.0)
        f1 = np.where(support + predicted > 0, 2 * tp / np.maximum(support + predicted, 1), 0.0)
    rows = [{"class": str(classes[k]), "precision": float(precision[k]), "recall": float(recall[k]),
             "f1": float(f1[k]), "support": int(support[k]), "predicted": int(predicted[k])} for k in range(c)]
    return rows, cm


def plot_confusion_matrix(cm: np.ndarray, classes: Sequence[str], path, title: str = "confusion matrix",
                          normalize: bool = True) -> Path:
    """A confusion-matrix PNG (rows true, columns predicted; colour = row share), written atomically."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from ._io import atomic_path

    cm = np.asarray(cm)
    c = len(classes)
    shown = cm / np.maximum(cm.sum(1, keepdims=True), 1) if normalize else cm
    size = min(14.0, 2.5 + 0.45 * c)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    try:
        im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else None)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class" if normalize else "count")
        ax.set_xticks(range(c), [str(k) for k in classes], rotation=60, ha="right", fontsize=7 if c > 10 else 9)
        ax.set_yticks(range(c), [str(k) for k in classes], fontsize=7 if c > 10 else 9)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        if c <= 20:
            for i in range(c):
                for j in range(c):
                    if cm[i, j]:
                        ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=6 if c > 10 else 8,
                                color="white" if shown[i, j] > 0.5 else "black")
        ax.set_title(title)
        path = Path(path)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        return path
    finally:
        plt.close(fig)


def evaluate(table=None, registry=None, *, logits: str | os.PathLike | None = None, recipe=None,
             members: str | Sequence[str] | None = None, vote: str = "soft", weights: Sequence[float] | None = None,
             tta: str | None = None, merge: str | None = None, backend: str = "torch",
             plot: str | os.PathLike | None = None, use_cache: bool = True, batch_size: int = 32,
             workers: int = 0, device: str | None = None, cache_dir=None, progress: bool = True,
             overwrite: bool = False, f1_labels="present") -> EvaluationResult:
    """Score a prediction against labels: macro-F1, accuracy, per-class table, confusion matrix.

    Exactly one of:

    - ``logits``: a logits ``.npz`` (see :func:`load_logits_file`), aligned to ``table`` by
      id (every id once, no extra); without ``table`` the file's own ``labels`` are used
      (an OOF file carries them). ``members``/``vote`` pick and combine the members of an
      ``ensembler infer`` file.
    - ``recipe`` or ``members``: run :func:`predict` (no submission) over the labeled
      ``table``; each member is scored alone as well.

    Parameters
    ----------
    table : SampleTable, optional
        Labeled data (required unless ``logits`` carries labels).
    plot : path, optional
        Write the confusion-matrix PNG there (after every check passed). An existing file is
        kept unless ``overwrite=True``, and a folder that cannot be written is refused, both
        before any work.
    f1_labels : {"present", "all"} or sequence of int
        The classes macro-F1 averages over (see :func:`ensembler.metrics.macro_f1`).

    Returns
    -------
    EvaluationResult

    Examples
    --------
    >>> r = evaluate(logits="checkpoints/resnet18-flat/oof.npz", plot="cm.png")  # doctest: +SKIP
    >>> round(r.f1, 4), r.plot  # doctest: +SKIP
    """
    from .metrics import accuracy, macro_f1

    given = [x is not None for x in (logits, recipe)] + [members is not None and logits is None]
    if sum(given) != 1:
        raise EnsemblerError("evaluate needs exactly one of --logits FILE, --recipe R or --members NAMES")
    if plot is not None:
        refuse_existing(plot, overwrite=overwrite, flag="--plot")
    if logits is not None:
        s = _score_logits_file(logits, table, members=members, vote=vote, weights=weights, f1_labels=f1_labels)
    else:
        s = _score_prediction(table, registry, f1_labels=f1_labels, members=members or "all", vote=vote,
                              weights=weights, recipe=recipe, tta=tta, merge=merge, backend=backend,
                              use_cache=use_cache, batch_size=batch_size, workers=workers, device=device,
                              cache_dir=cache_dir, progress=progress)
    y, pred, classes, name = s.y, s.pred, s.classes, s.name
    if len(y) == 0:
        raise DataError("nothing to evaluate: no rows")
    rows, cm = per_class_table(y, pred, classes)
    plot_path = None
    if plot is not None:
        plot_path = plot_confusion_matrix(cm, classes, plot, title=f"{Path(name).name if logits else name}"[:80])
    return EvaluationResult(name=name, f1=macro_f1(y, pred, len(classes), f1_labels), acc=accuracy(y, pred),
                            logloss=s.logloss, per_class=rows, confusion=cm, classes=list(classes), rows=int(len(y)),
                            plot=plot_path, member_scores=s.member_scores, tie_rate=s.tie_rate)


class _Scored(NamedTuple):
    """What one way of predicting gives :func:`evaluate` to score."""

    name: str
    y: np.ndarray
    pred: np.ndarray
    classes: list
    logloss: float | None
    tie_rate: float | None
    member_scores: dict


def _score_logits_file(path, table, *, members, vote, weights, f1_labels) -> _Scored:
    """A logits file's prediction, labels (the table's, aligned by id, else the file's) and member scores."""
    from .metrics import classification_scores, log_loss

    ids, z, file_labels, info = load_logits_file(path, members=members, vote=vote, weights=weights)
    classes = info["classes"]
    if table is not None:
        z, info["members"] = _file_on_table(path, table, ids, z, info["members"], classes, info.get("age_bands"))
        y = table.labels
        classes = classes or list(table.label_space.classes)
    elif file_labels is not None:
        y = file_labels
    else:
        raise DataError(f"logits file {path} carries no labels: pass labeled --data to score it")
    classes = classes or [str(k) for k in range(z.shape[1])]
    member_scores = {}
    if len(info["members"]) > 1:
        member_scores = {k: classification_scores(y, v, f1_labels) for k, v in info["members"].items()}
    # argmax of log-shares is the vote's own pred: the first maximum, i.e. the smallest class on ties
    ll = None if info["rule"] == "hard" else log_loss(y, z)
    return _Scored(str(path), y, z.argmax(1), classes, ll, info["tie_rate"], member_scores)


def _file_on_table(path, table, ids, z, member_logits: dict, classes, file_bands):
    """A logits file's logits and member logits in the table's row order (classes and age bands checked)."""
    _check_file_age_bands(path, file_bands, table)
    if table.label_space is not None and classes is not None and list(table.label_space.classes) != classes:
        raise LogitError(f"logits file {path}: its classes {classes[:6]}... differ from "
                         f"{table.describe()}'s {list(table.label_space.classes)[:6]}...")
    if table.label_space is not None and z.shape[1] != table.label_space.num_classes:
        raise LogitError(f"logits file {path} has {z.shape[1]} classes, {table.describe()} has "
                         f"{table.label_space.num_classes}")
    take = _align_to_table(path, ids, table)
    return z[take], {k: v[take] for k, v in member_logits.items()}


def _score_prediction(table, registry, *, f1_labels, members, recipe, vote, **run) -> _Scored:
    """:func:`predict` (no submission) over the labeled table, and each member alone."""
    from .metrics import classification_scores

    if table is None:
        raise DataError("evaluate with --recipe/--members needs labeled --data")
    y = table.labels  # DataError naming the data when unlabeled
    res = predict(table, registry, members=members, vote=vote, recipe=recipe, out=None, **run)
    y = res.table.labels  # the data's labels in the members' classes (re-indexed by name)
    with np.errstate(divide="ignore"):
        ll = None if res.vote == "hard" else float(-np.log(np.maximum(res.probs[np.arange(len(y)), y], 1e-15)).mean())
    member_scores = {}
    if len(res.members) > 1:
        for s in res.members:
            member_scores[s] = classification_scores(y, res.member_joint_logits(s), f1_labels)
    name = f"recipe {recipe}" if recipe is not None else f"{res.vote} vote over {', '.join(res.members)}"
    return _Scored(name, y, res.pred, list(res.label_space.classes), ll, res.tie_rate, member_scores)
