"""Temperature scaling: recovers a known temperature, never moves an argmax, lowers NLL."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ensembler.ensemble import apply_temperature, calibrate, fit_temperature
from ensembler.metrics import log_loss, softmax


def sample_labels(z, t_true, rng):
    """Labels drawn from softmax(z / t_true): the NLL-optimal temperature for z is t_true."""
    p = softmax(z / t_true)
    return (p.cumsum(1) > rng.random((len(z), 1))).argmax(1)


@pytest.mark.parametrize("t_true", [0.5, 1.0, 2.5, 6.0])
def test_recovers_known_temperature_within_5_percent(t_true):
    rng = np.random.default_rng(int(t_true * 10))
    z = rng.normal(size=(20000, 6)) * 4
    y = sample_labels(z, t_true, rng)
    t = fit_temperature(z, y)
    assert abs(t - t_true) / t_true < 0.05, (t, t_true)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(0.05, 20.0))
def test_temperature_never_changes_argmax(seed, t):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(64, 7)) * rng.uniform(0.1, 10)
    np.testing.assert_array_equal(apply_temperature(z, t).argmax(1), z.argmax(1))


def test_fitted_temperature_keeps_argmax_and_improves_nll_and_ece():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 4, 5000)
    z = np.eye(4)[y] * 5 + rng.normal(size=(5000, 4)) * 2.5  # over-confident member
    fit = calibrate(z, y)
    assert fit.temperature > 1
    np.testing.assert_array_equal(apply_temperature(z, fit.temperature).argmax(1), z.argmax(1))
    assert fit.nll_before == pytest.approx(log_loss(y, z))
    assert fit.nll_after == pytest.approx(log_loss(y, z / fit.temperature))
    assert fit.nll_after < fit.nll_before
    assert fit.ece_after < fit.ece_before


def test_bad_inputs():
    with pytest.raises(ValueError, match="bounds"):
        fit_temperature(np.zeros((3, 2)), np.zeros(3, int), bounds=(2.0, 1.0))
    with pytest.raises(ValueError, match="labels"):
        fit_temperature(np.zeros((3, 2)), np.zeros(4, int))
    with pytest.raises(ValueError, match="positive"):
        apply_temperature(np.zeros((3, 2)), 0.0)
