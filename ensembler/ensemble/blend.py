"""The weight searches of one tuning: Caruana selection, scipy simplex weights, class biases.

:func:`fit_blend` runs one tuning on the rows it is given (no cross-validation):

1. **Temperatures** (optional): one per member, :func:`~ensembler.ensemble.calibration.fit_temperature`.
2. **Weights** on the simplex, by one of

   - ``caruana``: greedy ensemble selection with replacement starting from an empty
     ensemble (Caruana et al. 2004, as AutoGluon does it): each round adds the member whose
     addition gives the best metric of the soft blend (probabilities averaged by counts);
     ties prefer a member already chosen, then the lower index; the ensemble is cut back to
     its best round and ``weights = counts / rounds kept``. A running sum keeps each
     candidate at O(N·C).
   - ``scipy``: L-BFGS-B on a softmax parametrisation of the weights minimising the OOF
     log-loss of the weighted soft blend, with an analytic gradient. Log-loss is used
     whatever ``metric`` is: macro-F1 and accuracy are piecewise constant in the weights,
     so a gradient method cannot follow them (Caruana and the class biases can).

   - ``stack``: a multinomial logistic regression on the members' log-probabilities
     (:mod:`ensembler.ensemble.stacking`), its regularisation chosen by inner CV over the
     rows' OOF folds; no temperatures (the regression scales each member itself). The
     members' "weights" are their shares of the absolute coefficients.

3. **Class biases** (optional): per-class additive biases on the blend's log-probabilities,
   by coordinate ascent on macro-F1 (or accuracy) over a grid, a few sweeps, starting from
   zero; kept only if they improve the score on the rows they were tuned on.

:mod:`ensembler.ensemble.tuning` runs it on every OOF row and once per held-out fold.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import ParameterError
from ..metrics import log_loss
from ..names import TUNING_METHODS, TUNING_METRICS
from .calibration import fit_temperature
from .stacking import DEFAULT_CS, StackFit, fit_stack

METHODS = TUNING_METHODS
METRICS = TUNING_METRICS
DEFAULT_BIAS_GRID = np.round(np.arange(-3.0, 3.0001, 0.1), 10)
_EPS = 1e-15


# ---------------------------------------------------------------------------- metric helpers
def _confusions(y: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """Confusion matrices (K, C, C) of each row of ``preds`` (K, N) against ``y``, one bincount."""
    k, c = preds.shape[0], num_classes
    codes = (np.arange(k, dtype=np.int64)[:, None] * (c * c) + y[None, :] * c + preds).ravel()
    return np.bincount(codes, minlength=k * c * c).reshape(k, c, c)


def _scores_from_confusions(metric: str, cm: np.ndarray) -> np.ndarray:
    tp = np.einsum("kii->ki", cm).astype(np.float64)
    if metric == "acc":
        return tp.sum(1) / np.maximum(cm.sum((1, 2)), 1)
    denom = cm.sum(1) + cm.sum(2)
    return _present_macro(np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0), denom > 0)


def _present_macro(f1: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Mean F1 over the classes present in truth or prediction (scikit-learn's macro rule), per row."""
    return f1.sum(-1) / np.maximum(present.sum(-1), 1)


def _decision_scores(metric: str, y: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    return _scores_from_confusions(metric, _confusions(y, preds, num_classes))


def member_probabilities(logits: np.ndarray, temperatures=None, dtype=np.float32) -> np.ndarray:
    """softmax(logits_m / T_m) for every member, ``(M, N, C)``, computed in ``dtype``."""
    z = np.asarray(logits, dtype=dtype)
    if temperatures is not None:
        z = z / np.asarray(temperatures, dtype=dtype)[:, None, None]
    else:
        z = z.copy()
    z -= z.max(axis=2, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=2, keepdims=True)
    return z


# ---------------------------------------------------------------------------- weight search
@dataclass(frozen=True)
class CaruanaResult:
    weights: np.ndarray       # (M,), counts at the best round / rounds kept
    counts: np.ndarray        # (M,), at the best round
    history: list[float]      # ensemble score after each round (higher is better; -logloss for logloss)
    best_round: int           # 1-based number of rounds kept


def caruana_select(probs: np.ndarray, labels, metric: str = "f1", rounds: int = 50,
                   chunk_elements: int = 1 << 22) -> CaruanaResult:
    """Greedy ensemble selection with replacement, from an empty ensemble.

    Parameters
    ----------
    probs : array (M, N, C)
        Each member's probabilities (after temperatures).
    labels : array (N,)
    metric : {"f1", "acc", "logloss"}
    rounds : int
        Selection rounds (members added, repeats allowed).

    Returns
    -------
    CaruanaResult

    Examples
    --------
    >>> import numpy as np
    >>> y = np.array([0, 1, 1, 0])
    >>> good = np.array([[.9, .1], [.2, .8], [.3, .7], [.6, .4]])
    >>> bad = good[:, ::-1]
    >>> caruana_select(np.stack([bad, good]), y, "acc", rounds=5).weights.tolist()
    [0.0, 1.0]
    """
    check_metric(metric)
    rounds = check_rounds(rounds)
    probs = np.asarray(probs)
    m, n, c = probs.shape
    y = np.asarray(labels, dtype=np.int64)
    counts = np.zeros(m, dtype=np.int64)
    history: list[float] = []
    snapshots: list[np.ndarray] = []
    if metric == "logloss":
        # The blend of normalised probabilities is normalised: only the true class matters.
        p_true = probs[:, np.arange(n), y].astype(np.float64)  # (M, N)
        running = np.zeros(n, dtype=np.float64)
    else:
        running = np.zeros((n, c), dtype=probs.dtype)
    for r in range(rounds):
        if metric == "logloss":
            goodness = np.log(np.maximum((running[None, :] + p_true) / (r + 1), _EPS)).mean(1)
        else:
            # argmax of (running + P_m) / (r+1) == argmax of running + P_m. Adding one member's
            # probabilities (each in [0, 1]) cannot overturn a lead larger than 1, so rows with
            # such a lead are decided for every candidate: only the others are re-scored.
            if r == 0:
                undecided = np.arange(n)
                cm_decided = np.zeros((c, c), dtype=np.int64)
            else:
                top2 = np.partition(running, c - 2, axis=1)[:, c - 2:]
                decided = (top2[:, 1] - top2[:, 0]) > 1.0 + 1e-4
                undecided = np.flatnonzero(~decided)
                cm_decided = _confusions(y[decided], running[decided].argmax(axis=1)[None], c)[0]
            u = len(undecided)
            y_u = y[undecided]
            step = max(1, chunk_elements // max(1, u * c))
            preds = np.empty((m, u), dtype=np.int64)
            run_u = running[undecided]
            for s in range(0, m, step):
                preds[s:s + step] = (run_u[None] + probs[s:s + step][:, undecided]).argmax(axis=2)
            goodness = _scores_from_confusions(metric, _confusions(y_u, preds, c) + cm_decided[None])
        best = goodness.max()
        tied = np.flatnonzero(goodness == best)
        chosen = tied[counts[tied] > 0]
        pick = int(chosen[0] if len(chosen) else tied[0])
        counts[pick] += 1
        if metric == "logloss":
            running += p_true[pick]
        else:
            running += probs[pick]
        history.append(float(best))
        snapshots.append(counts.copy())
    best_round = int(np.argmax(history))  # first best: the smallest ensemble reaching it
    kept = snapshots[best_round]
    return CaruanaResult(kept / kept.sum(), kept, history, best_round + 1)


def scipy_weights(probs: np.ndarray, labels, prune: float = 1e-4) -> np.ndarray:
    """Simplex weights minimising the OOF log-loss of the weighted soft blend.

    ``w = softmax(theta)``, L-BFGS-B from uniform weights with the analytic gradient; only
    each member's probability of the true class enters the loss, so one evaluation costs
    O(M·N). Weights under ``prune`` are set to zero (the softmax never reaches zero exactly).

    Examples
    --------
    >>> import numpy as np
    >>> y = np.array([0, 1, 1, 0])
    >>> good = np.array([[.9, .1], [.2, .8], [.3, .7], [.6, .4]])
    >>> noise = np.full((4, 2), 0.5)
    >>> w = scipy_weights(np.stack([noise, good]), y); bool(w[1] > 0.99)
    True
    """
    from scipy.optimize import minimize

    probs = np.asarray(probs)
    m, n, _ = probs.shape
    y = np.asarray(labels, dtype=np.int64)
    p_true = probs[:, np.arange(n), y].astype(np.float64)  # (M, N)
    if m == 1:
        return np.ones(1)

    def loss_and_grad(theta):
        w = np.exp(theta - theta.max())
        w /= w.sum()
        blend = np.maximum(w @ p_true, _EPS)
        loss = -np.log(blend).mean()
        g_w = -(p_true @ (1.0 / blend)) / n
        return loss, w * (g_w - w @ g_w)

    res = minimize(loss_and_grad, np.zeros(m), jac=True, method="L-BFGS-B",
                   options={"maxiter": 500, "gtol": 1e-9, "ftol": 1e-12})
    w = np.exp(res.x - res.x.max())
    w /= w.sum()
    w[w < prune] = 0.0
    return w / w.sum()


def fit_class_biases(log_probs, labels, metric: str = "f1", grid=None, sweeps: int = 3) -> np.ndarray:
    """Per-class additive biases on log-probabilities maximising macro-F1 (or accuracy).

    Coordinate ascent from zero: for each class in turn, every bias in ``grid`` is scored at
    once (rows sorted by their margin to the best other class, counts by prefix sums), and
    the best is kept (ties keep the current value, then the smallest magnitude). Stops after
    ``sweeps`` sweeps or a sweep that changes nothing. Classes with no row in ``labels``
    keep a zero bias (nothing to learn from). Macro-F1 is scikit-learn's: the mean over the
    classes present in truth or prediction.

    Returns
    -------
    ndarray (C,)
        The biases; all zero when no bias improves the score.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> y = (rng.random(3000) < 0.1).astype(int)          # a rare class 1
    >>> lp = np.log(np.c_[np.full(3000, .7), np.full(3000, .3)]) + np.c_[np.zeros(3000), y * 0.9
    ...      + rng.normal(0, .4, 3000)]
    >>> b = fit_class_biases(lp, y)
    >>> bool(b[1] - b[0] > 0)     # the rare class is pushed up
    True
    """
    if metric not in ("f1", "acc"):
        raise ParameterError("metric", f"class biases tune decisions for metric 'f1' or 'acc', not {metric!r}")
    lp = np.asarray(log_probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    n, c = lp.shape
    grid = np.unique(np.asarray(DEFAULT_BIAS_GRID if grid is None else grid, dtype=np.float64))
    if n == 0:
        return np.zeros(c)
    true_counts = np.bincount(y, minlength=c).astype(np.float64)
    biases = np.zeros(c)
    rows = np.arange(n)
    positions = np.arange(n)
    for _ in range(int(sweeps)):
        changed = False
        for k in range(c):
            if true_counts[k] == 0:
                continue  # no row of class k to learn from: its bias stays 0 (it could only buy false positives)
            a = lp + biases
            a[:, k] = -np.inf
            other = a.argmax(axis=1)
            # Row goes to class k iff lp_k + b_k > best other score: margin d + b_k > 0.
            margin = lp[:, k] - a[rows, other]
            order = np.argsort(margin, kind="stable")
            sorted_margin = margin[order]
            other_s, y_s = other[order], y[order]
            # rows at sorted positions < cut keep their other class; the rest go to k.
            cuts = np.searchsorted(sorted_margin, -grid, side="right")
            uniq_cuts, inverse = np.unique(cuts, return_inverse=True)
            seg = np.searchsorted(uniq_cuts, positions, side="right")  # row i counts for cut j iff seg[i] <= j
            nseg = len(uniq_cuts) + 1
            pred_cnt = np.bincount(seg * c + other_s, minlength=nseg * c).reshape(nseg, c).cumsum(0)[:-1]
            hit = other_s == y_s
            tp = np.bincount(seg[hit] * c + other_s[hit], minlength=nseg * c).reshape(nseg, c).cumsum(0)[:-1]
            k_kept = np.bincount(seg[y_s == k], minlength=nseg).cumsum()[:-1]  # class-k rows not sent to k
            n_to_k = n - uniq_cuts
            pred_cnt = pred_cnt.astype(np.float64)
            tp = tp.astype(np.float64)
            pred_cnt[:, k] = n_to_k
            tp[:, k] = true_counts[k] - k_kept
            if metric == "f1":
                denom = pred_cnt + true_counts[None, :]
                score = _present_macro(np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0), denom > 0)
            else:
                score = tp.sum(1) / n
            score = score[inverse]  # per grid value
            best = score.max()
            cand = grid[score >= best - 1e-12]
            if np.any(cand == biases[k]):
                continue
            new = cand[np.argmin(np.abs(cand))]
            if new != biases[k]:
                biases[k] = new
                changed = True
        if not changed:
            break
    before = _decision_scores(metric, y, lp.argmax(1)[None], c)[0]
    after = _decision_scores(metric, y, (lp + biases).argmax(1)[None], c)[0]
    return biases if after > before else np.zeros(c)


# ---------------------------------------------------------------------------- one tuning
@dataclass(frozen=True)
class BlendFit:
    """Parameters found by one tuning run (:func:`fit_blend`)."""

    temperatures: np.ndarray
    weights: np.ndarray
    class_biases: np.ndarray | None
    caruana: CaruanaResult | None = None
    timings: dict = field(default_factory=dict)
    no_signal: dict = field(default_factory=dict)  # member index -> (calibrated NLL, class-prior NLL)
    stack: "StackFit | None" = None  # method "stack": the fitted regression


def class_prior_nll(labels, num_classes: int) -> float:
    """Log-loss of always predicting the class frequencies: the score of knowing nothing."""
    y = np.asarray(labels, dtype=np.int64)
    freq = (np.bincount(y, minlength=num_classes) + 0.5) / (len(y) + 0.5 * num_classes)
    return float(-np.log(freq[y]).mean())


def no_signal_members(logits: np.ndarray, labels, temperatures: np.ndarray | None = None) -> dict:
    """Members whose temperature-calibrated log-loss is no better than the class prior's.

    Such a member carries no information about the labels. Calibrated, its probabilities are
    nearly constant (its temperature runs to the search bound), so adding it to a blend is a
    near no-op: greedy selection then pads the ensemble with it whenever adding a real member
    would unbalance the blend, and reports a large weight on noise. Returns
    ``{index: (calibrated_nll, prior_nll)}``.
    """
    logits = np.asarray(logits)
    y = np.asarray(labels, dtype=np.int64)
    prior = class_prior_nll(y, logits.shape[2])
    out = {}
    for i in range(logits.shape[0]):
        t = fit_temperature(logits[i], y) if temperatures is None else float(temperatures[i])
        nll = log_loss(y, logits[i] / t)
        if nll >= prior - 1e-6:
            out[i] = (nll, prior)
    return out


def fit_blend(logits: np.ndarray, labels, *, method: str = "caruana", metric: str = "f1", rounds: int = 50,
              temperature: bool = True, class_bias: bool = False, bias_grid=None, sweeps: int = 3,
              folds=None, stack_cs=DEFAULT_CS) -> BlendFit:
    """Temperatures, weights and class biases on the given rows (one tuning, no CV).

    Parameters
    ----------
    logits : array (M, N, C)
    labels : array (N,)
    method, metric, rounds, temperature, class_bias : see :func:`tune_weights`.
    folds : array (N,), optional
        The rows' OOF folds: ``stack`` chooses its regularisation by inner CV over them.
    stack_cs : sequence of float
        ``stack``: the inverse L2 strengths its inner CV tries.
    """
    check_method(method)
    check_metric(metric)
    check_bias_metric(class_bias, metric)
    logits = np.asarray(logits)
    y = np.asarray(labels, dtype=np.int64)
    m = logits.shape[0]
    timings = {}
    if method == "stack":
        return _fit_stack_blend(logits, y, folds, stack_cs, metric, class_bias, bias_grid, sweeps)
    t0 = time.perf_counter()
    temps = np.array([fit_temperature(logits[i], y) for i in range(m)]) if temperature else np.ones(m)
    timings["temperature_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    probs = member_probabilities(logits, temps)
    timings["probabilities_s"] = time.perf_counter() - t0
    # Members with no signal are left out of the selection (weight 0); if every member is
    # such, nothing is left out and the blend is as good as the data allows.
    silent = no_signal_members(logits, y, temps if temperature else None)
    keep = np.array([i for i in range(m) if i not in silent]) if len(silent) < m else np.arange(m)
    if len(keep) == m:
        silent = {}
    t0 = time.perf_counter()
    car = None
    weights = np.zeros(m)
    if method == "caruana":
        car = caruana_select(probs[keep], y, metric, rounds)
        weights[keep] = car.weights
        if len(keep) < m:
            counts = np.zeros(m, dtype=car.counts.dtype)
            counts[keep] = car.counts
            car = CaruanaResult(weights.copy(), counts, car.history, car.best_round)
    else:
        weights[keep] = scipy_weights(probs[keep], y)
    timings[f"{method}_s"] = time.perf_counter() - t0
    biases = None
    if class_bias:
        t0 = time.perf_counter()
        used = np.flatnonzero(weights > 0)
        blend = np.tensordot(weights[used], probs[used], axes=1).astype(np.float64)
        b = fit_class_biases(np.log(np.maximum(blend, 1e-300)), y, metric, bias_grid, sweeps)
        biases = b if np.any(b != 0) else None
        timings["class_bias_s"] = time.perf_counter() - t0
    return BlendFit(temps, weights, biases, car, timings, silent)


def _fit_stack_blend(logits, y, folds, stack_cs, metric, class_bias, bias_grid, sweeps) -> BlendFit:
    m = logits.shape[0]
    t0 = time.perf_counter()
    stack = fit_stack(logits, y, folds, Cs=stack_cs)
    timings = {"stack_s": time.perf_counter() - t0}
    biases = None
    if class_bias:
        t0 = time.perf_counter()
        b = fit_class_biases(np.maximum(stack.log_proba(logits), -1e300), y, metric, bias_grid, sweeps)
        biases = b if np.any(b != 0) else None
        timings["class_bias_s"] = time.perf_counter() - t0
    return BlendFit(np.ones(m), stack.member_weights(), biases, None, timings, {}, stack)


def check_method(method):
    if method not in METHODS:
        raise ParameterError("method", f"unknown tuning method {method!r}; choose one of {', '.join(METHODS)}")


def check_metric(metric):
    if metric not in METRICS:
        raise ParameterError("metric", f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")


def check_rounds(rounds) -> int:
    if isinstance(rounds, bool) or not isinstance(rounds, (int, np.integer)) or rounds < 1:
        raise ParameterError("rounds", f"rounds must be a positive integer, got {rounds!r}")
    return int(rounds)


def check_bias_metric(class_bias, metric):
    if class_bias and metric == "logloss":
        raise ParameterError("class_bias", "class_bias: class biases tune argmax decisions for metric 'f1' or "
                             "'acc'; they are not fitted for metric 'logloss' (use metric 'f1')")
