"""Classification metrics on integer labels and logits (numpy, no torch).

Macro-F1 is the metric the field scores with: scikit-learn's
``f1_score(y_true, y_pred, average="macro", zero_division=0)``, which averages over the
labels present in ``y_true`` **or** ``y_pred`` (a class that appears in neither does not
count; a class predicted but never true counts as 0). ``labels="all"`` gives the fixed label
set ``range(num_classes)`` instead (scikit-learn with ``labels=range(C)``: absent classes
count as 0), and a sequence of class indices gives exactly that set.

>>> macro_f1([0, 0, 1], [0, 0, 1], num_classes=18)              # 2 classes present
1.0
>>> round(macro_f1([0, 0, 1], [0, 0, 1], num_classes=18, labels="all"), 4)  # 16 absent ones count 0
0.1111
"""

from __future__ import annotations

import numpy as np

from .names import F1_LABEL_RULES


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """C x C counts, rows = true class, columns = predicted class."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def per_class_f1(y_true, y_pred, num_classes: int) -> np.ndarray:
    cm = confusion_matrix(y_true, y_pred, num_classes)
    tp = np.diag(cm).astype(np.float64)
    denom = cm.sum(0) + cm.sum(1)  # 2tp + fp + fn
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)




def f1_label_mask(y_true, y_pred, num_classes: int, labels="present") -> np.ndarray:
    """Boolean (C,) mask of the classes a macro average runs over (see the module docstring)."""
    if isinstance(labels, str):
        if labels not in F1_LABEL_RULES:
            raise ValueError(f"labels must be one of {F1_LABEL_RULES} or a list of class indices, got {labels!r}")
        if labels == "all":
            return np.ones(num_classes, bool)
        mask = np.zeros(num_classes, bool)
        mask[np.unique(np.asarray(y_true, dtype=np.int64))] = True
        mask[np.unique(np.asarray(y_pred, dtype=np.int64))] = True
        return mask
    idx = np.asarray(list(labels), dtype=np.int64)
    if idx.size == 0 or idx.min() < 0 or idx.max() >= num_classes:
        raise ValueError(f"labels {idx.tolist()} must be non-empty class indices in 0..{num_classes - 1}")
    mask = np.zeros(num_classes, bool)
    mask[idx] = True
    return mask


def macro_f1(y_true, y_pred, num_classes: int | None = None, labels="present") -> float:
    """Macro-F1, scikit-learn's ``f1_score(average="macro", zero_division=0)``.

    Parameters
    ----------
    y_true, y_pred : array-like of int
    num_classes : int, optional
        Class count (default: the largest index seen + 1).
    labels : {"present", "all"} or sequence of int, default "present"
        ``"present"``: classes in ``y_true`` or ``y_pred`` (scikit-learn's default);
        ``"all"``: every class ``0..num_classes-1`` (scikit-learn's ``labels=range(C)``);
        a sequence: those classes.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if num_classes is None:
        num_classes = int(max(y_true.max(initial=0), y_pred.max(initial=0))) + 1
    f1 = per_class_f1(y_true, y_pred, num_classes)
    mask = f1_label_mask(y_true, y_pred, num_classes, labels)
    return float(f1[mask].mean()) if mask.any() else 0.0


def accuracy(y_true, y_pred) -> float:
    y_true = np.asarray(y_true)
    return float((y_true == np.asarray(y_pred)).mean()) if len(y_true) else 0.0


def log_softmax(logits, axis: int = -1):
    """Numerically stable log-softmax along ``axis``: the project's one log-softmax.

    numpy input (any shape) gives float64 numpy; a torch tensor stays in torch
    (``tensor.log_softmax(dim=axis)``), so callers working on either need no branch.

    Examples
    --------
    >>> lp = log_softmax(np.array([[0.0, 0.0], [1000.0, 0.0]]))
    >>> np.exp(lp).round(3).tolist()
    [[0.5, 0.5], [1.0, 0.0]]
    >>> log_softmax(np.zeros((2, 3, 4))).shape  # members x rows x classes: the last axis
    (2, 3, 4)
    """
    if hasattr(logits, "log_softmax"):
        return logits.log_softmax(dim=axis)
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """``exp(log_softmax(logits, axis))`` (float64).

    >>> softmax(np.array([[0.0, np.log(3.0)]])).round(6).tolist()
    [[0.25, 0.75]]
    """
    return np.exp(log_softmax(logits, axis))


def log_loss(y_true, logits: np.ndarray) -> float:
    """Mean negative log-likelihood of ``y_true`` under ``softmax(logits)``."""
    lp = log_softmax(logits)
    y = np.asarray(y_true, dtype=np.int64)
    return float(-lp[np.arange(len(y)), y].mean())


def expected_calibration_error(y_true, logits: np.ndarray, n_bins: int = 15) -> float:
    """ECE with equal-width confidence bins (top-1 confidence vs accuracy)."""
    p = softmax(logits)
    conf = p.max(1)
    correct = (p.argmax(1) == np.asarray(y_true)).astype(np.float64)
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def classification_scores(y_true, logits: np.ndarray, labels="present") -> dict[str, float]:
    """macro-F1 (label rule ``labels``, see :func:`macro_f1`), accuracy and log-loss of ``logits`` (N x C)."""
    logits = np.asarray(logits)
    pred = logits.argmax(1)
    c = logits.shape[1]
    return {"f1": macro_f1(y_true, pred, c, labels), "acc": accuracy(y_true, pred),
            "logloss": log_loss(y_true, logits)}
