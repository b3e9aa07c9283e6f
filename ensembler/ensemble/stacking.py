"""Stacking: a multinomial logistic regression on the members' OOF log-probabilities.

Where a weighted soft vote gives each member one weight, a stack learns how much each
member's log-probability of *each class* says about *each class*: a member that is good at
telling masks apart but poor at ages can count for masks and not for ages. It is the
``final_estimator`` of scikit-learn's ``StackingClassifier(cv="prefit")`` with the members'
OOF logits as the prefit predictions, and it is fitted only on out-of-fold rows (the members
never saw those rows while training), which is what keeps it from learning their overfit.

**Features.** ``x = [log_softmax(z_1), ..., log_softmax(z_M)]`` (``M*C`` columns, member
order, then class order), each log-probability floored at ``log(1e-8)`` so that a member
that is certain (log-prob -700) cannot dominate the penalty. The model is
``log p(c | x) = log_softmax(x @ coef.T + intercept)``.

**Regularisation** (``C``, scikit-learn's inverse L2 strength) is chosen by inner
cross-validation *grouped by the OOF folds* of the rows it is given: for every ``C`` of the
grid the regression is fitted with one fold held out at a time and scored by the held-out
log-loss; the ``C`` with the best mean wins (ties: the smaller ``C``, the simpler model), and
the regression is refitted on every row with it. With fewer than two folds there is nothing
to hold out and ``C = 1`` (scikit-learn's default) is used, said in :attr:`StackFit.c_chosen_by`.
Log-loss, not macro-F1, picks ``C``: the regression minimises log-loss, and macro-F1 is
piecewise constant in ``C``.

:mod:`ensembler.ensemble.tuning` runs :func:`fit_stack` on all OOF rows and again with each
fold held out (the honest score: the inner CV for ``C`` runs inside each outer fit, on the
remaining folds only).

Classes with no row in the fitted rows get probability 0 (the regression never saw them).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from ..errors import LogitError, ParameterError
from ..metrics import log_softmax

#: Inverse L2 strengths tried by the inner CV.
DEFAULT_CS = (0.01, 0.1, 1.0, 10.0, 100.0)
#: Log-probabilities are floored here before they become features.
LOG_FLOOR = float(np.log(1e-8))
MAX_ITER = 1000


def stack_features(logits) -> np.ndarray:
    """``(N, M*C)`` features of ``(M, N, C)`` member logits: floored log-softmax, members side by side.

    Examples
    --------
    >>> import numpy as np
    >>> stack_features(np.zeros((2, 3, 4))).shape
    (3, 8)
    """
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 3:
        raise LogitError(f"member logits must be (M, N, C), got shape {z.shape}")
    m, n, c = z.shape
    lp = np.maximum(log_softmax(z.transpose(1, 0, 2).reshape(n * m, c)), LOG_FLOOR)  # rows: (sample, member)
    return np.ascontiguousarray(lp.reshape(n, m * c))


@dataclass(frozen=True)
class StackFit:
    """A fitted stack (one :func:`fit_stack` run).

    Attributes
    ----------
    coef : ndarray (C, M*C)
        Rows for every class of the label space; rows of classes never seen are zero.
    intercept : ndarray (C,)
    classes : tuple of int
        The classes the regression was fitted on (others get probability 0).
    C : float
        The inverse L2 strength used.
    c_chosen_by : str
        ``"inner CV over folds [...]"`` or why the default was used.
    cv_logloss : dict C -> mean held-out log-loss (empty without inner CV)
    converged : bool
    """

    coef: np.ndarray
    intercept: np.ndarray
    classes: tuple
    C: float
    c_chosen_by: str
    cv_logloss: dict = field(default_factory=dict)
    converged: bool = True

    @property
    def num_members(self) -> int:
        return self.coef.shape[1] // self.coef.shape[0]

    def member_weights(self) -> np.ndarray:
        """Each member's share of the absolute coefficients (what the table shows as its weight)."""
        c = self.coef.shape[0]
        mass = np.abs(self.coef).reshape(c, self.num_members, c).sum(axis=(0, 2))
        total = mass.sum()
        return mass / total if total > 0 else np.full(self.num_members, 1.0 / self.num_members)

    def log_proba(self, logits) -> np.ndarray:
        """``(N, C)`` log-probabilities of the stack on ``(M, N, C)`` member logits."""
        return stack_log_proba(stack_features(logits), self.coef, self.intercept, self.classes)

    def to_dict(self) -> dict:
        return {"coef": self.coef.tolist(), "intercept": self.intercept.tolist(),
                "classes": [int(k) for k in self.classes], "C": float(self.C), "c_chosen_by": self.c_chosen_by,
                "features": "log_softmax per member, floored at log(1e-8)", "log_floor": LOG_FLOOR}


def stack_log_proba(features, coef, intercept, classes) -> np.ndarray:
    """``log_softmax(features @ coef.T + intercept)`` over ``classes``; other classes get -inf."""
    coef = np.asarray(coef, dtype=np.float64)
    scores = np.asarray(features, dtype=np.float64) @ coef.T + np.asarray(intercept, dtype=np.float64)
    out = np.full_like(scores, -np.inf)
    known = np.asarray(classes, dtype=np.int64)
    out[:, known] = log_softmax(scores[:, known])
    return out


def _fit_lr(x, y, c_reg, lr=None):
    """Fit (``lr`` given: warm-started from its last solution, as along a C path)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    if lr is None:
        lr = LogisticRegression(C=float(c_reg), max_iter=MAX_ITER)
    else:
        lr.set_params(C=float(c_reg), warm_start=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        lr.fit(x, y)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return lr, converged


def _held_logloss(lr, x, y) -> float:
    p = np.zeros((len(y), int(max(y.max(), lr.classes_.max())) + 1))
    p[:, lr.classes_] = lr.predict_proba(x)
    return float(-np.log(np.maximum(p[np.arange(len(y)), y], 1e-15)).mean())


def fit_stack(logits, labels, folds=None, *, Cs=DEFAULT_CS) -> StackFit:
    """Fit the stacking regression, choosing ``C`` by inner CV over ``folds``.

    Parameters
    ----------
    logits : array (M, N, C)
        Members' OOF joint logits.
    labels : array (N,)
    folds : array (N,), optional
        OOF fold of each row: the inner CV holds out one fold at a time.
    Cs : sequence of float
        Inverse L2 strengths to try.

    Returns
    -------
    StackFit

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> y = rng.integers(0, 3, 300); folds = np.arange(300) % 3
    >>> good = np.eye(3)[y] * 3 + rng.normal(size=(300, 3))
    >>> fit = fit_stack(np.stack([good, rng.normal(size=(300, 3))]), y, folds)
    >>> fit.coef.shape, bool(fit.member_weights()[0] > 0.5)
    ((3, 6), True)
    """
    z = np.asarray(logits)
    m, n, c = z.shape
    y = np.asarray(labels, dtype=np.int64)
    cs = sorted({float(v) for v in Cs})
    if not cs or any(not np.isfinite(v) or v <= 0 for v in cs):
        raise ParameterError("Cs", f"stacking needs positive finite Cs values, got {list(Cs)!r}")
    present = np.unique(y)
    if len(present) < 2:
        raise LogitError(f"stacking needs rows of at least two classes, got only class {present.tolist()}")
    x = stack_features(z)
    fold_values = np.unique(folds) if folds is not None else np.array([])
    cv: dict = {}
    if len(fold_values) >= 2 and len(cs) > 1:
        losses: dict = {c_reg: [] for c_reg in cs}
        for f in fold_values:
            test = folds == f
            if len(np.unique(y[~test])) < 2:
                continue
            lr = None
            for c_reg in cs:  # ascending: each fit starts from the previous, more regularised one
                lr, _ = _fit_lr(x[~test], y[~test], c_reg, lr)
                losses[c_reg].append(_held_logloss(lr, x[test], y[test]))
        cv = {c_reg: float(np.mean(v)) for c_reg, v in losses.items() if v}
    if cv:
        best = min(cv.values())
        c_reg = min(k for k, v in cv.items() if v <= best + 1e-12)
        how = f"inner CV over folds {[int(f) for f in fold_values]} (held-out log-loss)"
    else:
        c_reg = 1.0 if len(cs) > 1 else cs[0]
        how = ("the only C given" if len(cs) == 1 else
               f"default C=1: {len(fold_values)} fold(s) in these rows, inner CV needs two")
    lr, converged = _fit_lr(x, y, c_reg)
    coef = np.zeros((c, m * c))
    intercept = np.zeros(c)
    known = lr.classes_.astype(np.int64)
    if len(known) == 2:  # scikit-learn keeps one row for two classes: p(k1) = sigmoid(w.x + b)
        coef[known[1]] = lr.coef_[0]
        intercept[known[1]] = lr.intercept_[0]
    else:
        coef[known] = lr.coef_
        intercept[known] = lr.intercept_
    return StackFit(coef, intercept, tuple(int(k) for k in known), c_reg, how, cv, converged)
