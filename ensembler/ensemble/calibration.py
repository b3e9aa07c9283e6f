"""Temperature scaling: one temperature per member, fitted on its OOF logits.

``softmax(z / T)`` with ``T > 1`` softens over-confident probabilities and ``T < 1``
sharpens them. Dividing by a positive scalar never changes a row's argmax, so a single
member's predictions (and the hard vote) are unchanged; soft blends change, because
members then enter the average with comparable confidence.

The fit is a bounded 1-D search on ``log T`` (``scipy.optimize.minimize_scalar`` with
``method="bounded"``) minimising the mean negative log-likelihood. The common LBFGS recipe
on ``T`` itself often stops early or walks to a negative ``T``; a bounded search on the
log scale cannot.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..errors import LogitError, ParameterError
from ..metrics import expected_calibration_error

DEFAULT_T_BOUNDS = (0.05, 20.0)


@dataclass(frozen=True)
class TemperatureFit:
    """A fitted temperature with the member's NLL and ECE before and after applying it."""

    temperature: float
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float

    def to_dict(self) -> dict:
        return asdict(self)


def _nll(logits: np.ndarray, true_logit: np.ndarray, temperature: float) -> float:
    z = logits / temperature
    m = z.max(axis=1)
    lse = m + np.log(np.exp(z - m[:, None]).sum(axis=1))
    return float(np.mean(lse - true_logit / temperature))


def fit_temperature(logits, labels, bounds=DEFAULT_T_BOUNDS, xatol: float = 1e-4) -> float:
    """Temperature ``T`` minimising the NLL of ``softmax(logits / T)`` against ``labels``.

    Parameters
    ----------
    logits : array (N, C)
        Joint logits (or joint log-probs) of one member.
    labels : array (N,) of int
    bounds : (float, float), default (0.05, 20.0)
        Search interval for ``T`` (searched on the log scale).
    xatol : float
        Absolute tolerance on ``log T`` (1e-4 is a 0.01 % relative error on ``T``).

    Returns
    -------
    float

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> z = rng.normal(size=(20000, 5)) * 3
    >>> p = np.exp(z / 2.0); p /= p.sum(1, keepdims=True)
    >>> y = (p.cumsum(1) > rng.random((20000, 1))).argmax(1)
    >>> round(fit_temperature(z, y), 1)
    2.0
    """
    from scipy.optimize import minimize_scalar

    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if z.ndim != 2 or y.shape != (z.shape[0],):
        raise LogitError(f"fit_temperature: logits (N, C) and labels (N,) expected, got {z.shape} and {y.shape}")
    if z.shape[0] == 0:
        raise LogitError("fit_temperature: cannot fit a temperature on zero rows")
    lo, hi = float(bounds[0]), float(bounds[1])
    if not 0 < lo < hi:
        raise ParameterError("bounds", f"temperature bounds must satisfy 0 < lo < hi, got {bounds}")
    true_logit = z[np.arange(len(y)), y]
    res = minimize_scalar(
        lambda log_t: _nll(z, true_logit, float(np.exp(log_t))),
        bounds=(np.log(lo), np.log(hi)),
        method="bounded",
        options={"xatol": xatol},
    )
    return float(np.exp(res.x))


def apply_temperature(logits, temperature: float) -> np.ndarray:
    """``logits / temperature`` (float64); the argmax of every row is unchanged."""
    if not temperature > 0:
        raise ParameterError("temperature", f"temperature must be positive, got {temperature}")
    return np.asarray(logits, dtype=np.float64) / float(temperature)


def calibrate(logits, labels, bounds=DEFAULT_T_BOUNDS) -> TemperatureFit:
    """Fit a temperature and report NLL and ECE before and after it.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(1)
    >>> y = rng.integers(0, 4, 5000)
    >>> z = np.eye(4)[y] * 5 + rng.normal(size=(5000, 4)) * 2.5   # over-confident
    >>> fit = calibrate(z, y)
    >>> fit.temperature > 1 and fit.nll_after < fit.nll_before
    True
    """
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    t = fit_temperature(z, y, bounds)
    true_logit = z[np.arange(len(y)), y]
    return TemperatureFit(
        temperature=t,
        nll_before=_nll(z, true_logit, 1.0),
        nll_after=_nll(z, true_logit, t),
        ece_before=expected_calibration_error(y, z),
        ece_after=expected_calibration_error(y, z / t),
    )
