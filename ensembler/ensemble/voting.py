"""Voting over per-member logits: hard, soft, weighted, gmean and logits.

Every rule takes the members' *joint logits* (raw logits for flat heads, joint
log-probabilities for factored heads: a softmax of either gives the probabilities) stacked
as ``(M, N, C)`` or given as a list/dict of ``(N, C)`` arrays, and returns a
:class:`VoteResult` with the predicted class of each row and a row-normalised score matrix.

Rules
-----
``hard``
    Each member votes for its argmax; the votes are counted with the member weights and the
    class with the largest count wins. **Tie rule:** the smallest class index wins, exactly
    as scikit-learn's ``VotingClassifier`` does with
    ``np.argmax(np.bincount(member_predictions, weights=weights))``. The fraction of rows
    whose top count is shared by two or more classes is reported as ``tie_rate``.
``soft``
    Mean of the members' probabilities (``np.average`` semantics; weights are honoured when
    given, as in scikit-learn's soft voting).
``weighted``
    ``soft`` with weights; the weights are required.
``gmean``
    Geometric mean of the probabilities: the (weighted) mean of the log-probabilities,
    renormalised. Taken on log-softmax, never on raw logits, so it cannot give NaN.
``logits``
    The (weighted) mean of the raw logits, then a softmax.

Errors: a bad ``rule``, ``weights`` or ``names`` is a :class:`~ensembler.errors.ParameterError`
naming the parameter; logits that cannot be combined (shapes, NaN) are a
:class:`~ensembler.errors.LogitError` naming the member. Both subclass ``ValueError``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from ..errors import LogitError, ParameterError
from ..metrics import log_softmax
from ..names import VOTE_RULES


@dataclass(frozen=True)
class VoteResult:
    """What a vote returns.

    Attributes
    ----------
    pred : ndarray of shape (N,), int64
        Winning class of each row.
    probs : ndarray of shape (N, C), float64
        Row-normalised scores: blended probabilities for ``soft``/``weighted``/``gmean``/
        ``logits``; the weighted share of votes for ``hard``.
    tie_rate : float
        Fraction of rows whose top score is shared by two or more classes (resolved to the
        smallest class index). Exact float ties are common for ``hard`` and rare otherwise.
    rule : str
        The vote rule used.
    """

    pred: np.ndarray
    probs: np.ndarray
    tie_rate: float
    rule: str


def stack_member_logits(member_logits, names: Sequence[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Stack per-member ``(N, C)`` logits into one ``(M, N, C)`` float array.

    Parameters
    ----------
    member_logits : array of shape (M, N, C), sequence of (N, C) arrays, or dict name -> (N, C)
    names : sequence of str, optional
        Member names used in error messages (default: the dict keys, else ``member0``...).

    Returns
    -------
    stacked : ndarray (M, N, C)
    names : list of str

    Raises
    ------
    ParameterError
        No members, or as many names as members.
    LogitError
        A member that is not 2-D, or members whose row/class counts differ (the message
        names the members).
    """
    if isinstance(member_logits, Mapping):
        names = list(member_logits) if names is None else list(names)
        arrays = [np.asarray(member_logits[k]) for k in member_logits]
    elif isinstance(member_logits, np.ndarray) and member_logits.ndim == 3:
        arrays = list(member_logits)
    else:
        arrays = [np.asarray(a) for a in member_logits]
    if not arrays:
        raise ParameterError("member_logits", "a vote needs at least one member (member_logits is empty)")
    if names is None:
        names = [f"member{i}" for i in range(len(arrays))]
    names = [str(n) for n in names]
    if len(names) != len(arrays):
        raise ParameterError("names", f"{len(names)} names given for {len(arrays)} members")
    for name, a in zip(names, arrays):
        if a.ndim != 2:
            raise LogitError(f"member {name!r}: logits must be 2-D (N, C), got shape {a.shape}")
    ref_name, ref = names[0], arrays[0]
    for name, a in zip(names[1:], arrays[1:]):
        if a.shape[1] != ref.shape[1]:
            raise LogitError(
                f"class-count mismatch: member {ref_name!r} has {ref.shape[1]} classes, "
                f"member {name!r} has {a.shape[1]}"
            )
        if a.shape[0] != ref.shape[0]:
            raise LogitError(
                f"row-count mismatch: member {ref_name!r} has {ref.shape[0]} rows, member {name!r} has {a.shape[0]}"
            )
    if isinstance(member_logits, np.ndarray) and member_logits.ndim == 3:
        return member_logits, names
    return np.stack(arrays), names


def check_weights(weights, n_members: int, names: Sequence[str] | None = None) -> np.ndarray | None:
    """Validate member weights: length ``n_members``, finite, non-negative, not all zero.

    Returns ``None`` when ``weights`` is ``None`` (uniform), else a float64 array.
    """
    if weights is None:
        return None
    w = np.asarray(weights, dtype=np.float64).ravel()
    if w.shape[0] != n_members:
        who = f" ({', '.join(map(str, names))})" if names is not None else ""
        raise ParameterError("weights", f"weights has {w.shape[0]} entries but there are {n_members} members{who}")
    if not np.all(np.isfinite(w)):
        raise ParameterError("weights", f"weights must be finite, got {w.tolist()}")
    if np.any(w < 0):
        raise ParameterError("weights", f"weights must be non-negative, got {w.tolist()}")
    if not np.any(w > 0):
        raise ParameterError("weights", "weights are all zero: at least one member needs a positive weight")
    return w


def member_probabilities(stacked_logits: np.ndarray) -> np.ndarray:
    """Softmax of each member's logits, ``(M, N, C)`` -> ``(M, N, C)`` float64."""
    return np.exp(log_softmax(stacked_logits, axis=-1))


def tie_rate(scores: np.ndarray) -> float:
    """Fraction of rows whose top score is shared by two or more classes: the project's one tie rule.

    A tie is **exact** equality with the row's maximum, which is exactly when ``argmax`` has
    to choose (it takes the first maximum: the smallest class index). Near-equal scores are
    not ties: ``argmax`` decides them by the larger value, deterministically. Hard-vote counts
    are sums of member weights in member order, so equal counts are equal bit for bit
    (:func:`hard_vote_counts`); dividing every count of a row by the same total keeps them equal.

    Examples
    --------
    >>> tie_rate(np.array([[1.0, 1.0, 0.0], [0.2, 0.5, 0.3]]))
    0.5
    >>> tie_rate(np.array([[0.5, 0.5 + 1e-12]]))  # near-equal: argmax is not choosing
    0.0
    """
    if scores.shape[0] == 0:
        return 0.0
    top = scores.max(axis=1, keepdims=True)
    return float(((scores == top).sum(axis=1) > 1).mean())


def hard_vote_counts(member_pred: np.ndarray, num_classes: int, weights=None) -> np.ndarray:
    """Weighted vote counts ``(N, C)`` from member predictions ``(M, N)``.

    Adds each member's weight in member order, the same order ``np.bincount`` sums in, so
    the counts (and hence the ties) are bit-identical to scikit-learn's per-row bincount.
    """
    member_pred = np.asarray(member_pred, dtype=np.int64)
    m, n = member_pred.shape
    counts = np.zeros((n, num_classes), dtype=np.float64)
    rows = np.arange(n)
    for i in range(m):
        counts[rows, member_pred[i]] += 1.0 if weights is None else weights[i]
    return counts


def vote(member_logits, rule: str = "soft", weights=None, names: Sequence[str] | None = None) -> VoteResult:
    """Combine members' logits into one prediction.

    Parameters
    ----------
    member_logits : array (M, N, C), list of (N, C) arrays, or dict name -> (N, C)
        Joint logits or joint log-probs of each member, rows aligned.
    rule : {"hard", "soft", "weighted", "gmean", "logits"}, default "soft"
        See the module docstring.
    weights : array-like of shape (M,), optional
        Non-negative member weights (need not sum to 1). Required by ``weighted``.
    names : sequence of str, optional
        Member names for error messages.

    Returns
    -------
    VoteResult

    Examples
    --------
    >>> import numpy as np
    >>> a = np.log([[0.6, 0.4], [0.2, 0.8]])
    >>> b = np.log([[0.3, 0.7], [0.4, 0.6]])
    >>> vote([a, b], "soft").pred.tolist()
    [1, 1]
    >>> vote([a, b], "hard").pred.tolist()  # row 0 is a 1-1 tie: smallest class wins
    [0, 1]
    >>> vote([a, b], "weighted", weights=[3, 1]).pred.tolist()
    [0, 1]
    """
    if rule not in VOTE_RULES:
        raise ParameterError("rule", f"unknown vote rule {rule!r}; choose one of {', '.join(VOTE_RULES)}")
    stacked, names = stack_member_logits(member_logits, names)
    w = check_weights(weights, stacked.shape[0], names)
    if rule == "weighted" and w is None:
        raise ParameterError("weights", "vote rule 'weighted' needs weights (use 'soft' for a uniform mean)")
    with np.errstate(over="ignore"):
        overflows = w is not None and not np.isfinite(w.sum())
    if overflows:
        w = w / w.max()  # huge finite weights (1e308 each) overflow their sum; only ratios matter
    if not np.all(np.isfinite(stacked)):
        bad = [n for n, a in zip(names, stacked) if not np.all(np.isfinite(a))]
        raise LogitError(f"non-finite logits (NaN or inf) in member(s) {', '.join(map(repr, bad))}")
    num_classes = stacked.shape[2]

    if rule == "hard":
        counts = hard_vote_counts(stacked.argmax(axis=2), num_classes, w)
        pred = counts.argmax(axis=1)  # first maximum: the smallest class index wins ties
        probs = counts / counts.sum(axis=1, keepdims=True) if counts.shape[0] else counts
        return VoteResult(pred.astype(np.int64), probs, tie_rate(counts), rule)

    if rule in ("soft", "weighted"):
        probs = np.average(member_probabilities(stacked), axis=0, weights=w)
    elif rule == "gmean":
        probs = np.exp(log_softmax(np.average(log_softmax(stacked, axis=-1), axis=0, weights=w)))
    else:  # logits
        probs = np.exp(log_softmax(np.average(np.asarray(stacked, dtype=np.float64), axis=0, weights=w)))
    return VoteResult(probs.argmax(axis=1).astype(np.int64), probs, tie_rate(probs), rule)
