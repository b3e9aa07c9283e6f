"""Classification metrics on integer labels and logits (numpy, no torch).

Macro-F1 follows scikit-learn's ``f1_score(average="macro", labels=range(C),
zero_division=0)`` when ``num_classes`` is given: classes with no true and no predicted
samples count as F1 = 0. Pass ``present_only=True`` to average over classes that occur in
``y_true`` or ``y_pred`` only (scikit-learn's default when ``labels`` is omitted).
"""

from __future__ import annotations

import numpy as np


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


def macro_f1(y_true, y_pred, num_classes: int | None = None, present_only: bool = False) -> float:
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if num_classes is None:
        num_classes = int(max(y_true.max(initial=0), y_pred.max(initial=0))) + 1
        present_only = True
    f1 = per_class_f1(y_true, y_pred, num_classes)
    if present_only:
        present = np.zeros(num_classes, bool)
        present[np.unique(y_true)] = True
        present[np.unique(y_pred)] = True
        return float(f1[present].mean()) if present.any() else 0.0
    return float(f1.mean())


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


def classification_scores(y_true, logits: np.ndarray) -> dict[str, float]:
    """macro-F1, accuracy and log-loss of ``logits`` (N x C) against ``y_true``."""
    logits = np.asarray(logits)
    pred = logits.argmax(1)
    c = logits.shape[1]
    return {"f1": macro_f1(y_true, pred, c), "acc": accuracy(y_true, pred), "logloss": log_loss(y_true, logits)}
