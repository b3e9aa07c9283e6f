import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from ensembler import metrics


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 7), st.integers(1, 60), st.integers(0, 10_000))
def test_macro_f1_and_accuracy_match_sklearn(c, n, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    p = rng.integers(0, c, n)
    # The default is scikit-learn's default: labels present in truth or prediction.
    assert metrics.macro_f1(y, p, c) == pytest.approx(skm.f1_score(y, p, average="macro", zero_division=0))
    assert metrics.macro_f1(y, p) == pytest.approx(skm.f1_score(y, p, average="macro", zero_division=0))
    # The fixed label set is scikit-learn with labels=range(C).
    assert metrics.macro_f1(y, p, c, labels="all") == pytest.approx(
        skm.f1_score(y, p, average="macro", labels=list(range(c)), zero_division=0)
    )
    some = sorted(set(rng.integers(0, c, 2).tolist()))
    assert metrics.macro_f1(y, p, c, labels=some) == pytest.approx(
        skm.f1_score(y, p, average="macro", labels=some, zero_division=0)
    )
    assert metrics.accuracy(y, p) == pytest.approx(skm.accuracy_score(y, p))
    np.testing.assert_array_equal(metrics.confusion_matrix(y, p, c), skm.confusion_matrix(y, p, labels=range(c)))


def test_log_loss_matches_sklearn():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(50, 4)) * 3
    y = rng.integers(0, 4, 50)
    assert metrics.log_loss(y, z) == pytest.approx(skm.log_loss(y, metrics.softmax(z), labels=range(4)))


def test_ece_zero_for_perfectly_calibrated_certain_predictions():
    z = np.array([[50.0, 0.0], [0.0, 50.0]])
    assert metrics.expected_calibration_error([0, 1], z) == pytest.approx(0.0, abs=1e-9)
    assert metrics.expected_calibration_error([1, 0], z) == pytest.approx(1.0, abs=1e-9)


def test_macro_f1_over_18_classes_with_15_present_is_sklearns_not_a_fixed_18():
    # The case: 15 of 18 classes present. Absent classes must not drag the mean down.
    rng = np.random.default_rng(3)
    y = rng.integers(0, 15, 400)
    p = np.where(rng.random(400) < 0.3, y, rng.integers(0, 15, 400))
    ours = metrics.macro_f1(y, p, 18)
    assert ours == pytest.approx(skm.f1_score(y, p, average="macro", zero_division=0))
    assert metrics.macro_f1(y, p, 18, labels="all") == pytest.approx(ours * 15 / 18)
    # A class predicted but never true counts as 0, as in scikit-learn.
    p2 = p.copy()
    p2[0] = 17
    assert metrics.macro_f1(y, p2, 18) == pytest.approx(skm.f1_score(y, p2, average="macro", zero_division=0))
    with pytest.raises(ValueError, match="labels must be one of"):
        metrics.macro_f1(y, p, 18, labels="fixed")
