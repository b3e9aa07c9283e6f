"""Voting rules against scikit-learn's VotingClassifier (called for real) and by definition."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.ensemble import VotingClassifier
from sklearn.preprocessing import LabelEncoder

from ensembler.ensemble import vote
from ensembler.metrics import softmax


class _Fixed:
    """A 'fitted estimator' that returns fixed predictions/probabilities whatever X is."""

    def __init__(self, logits):
        self.logits = logits

    def predict(self, X):
        return self.logits.argmax(1)

    def predict_proba(self, X):
        return softmax(self.logits)


def sklearn_vote(member_logits, voting, weights):
    """Run scikit-learn's own VotingClassifier.predict / predict_proba on fixed members."""
    m, n, c = member_logits.shape
    vc = VotingClassifier([(f"m{i}", _Fixed(member_logits[i])) for i in range(m)], voting=voting,
                          weights=None if weights is None else list(weights))
    vc.estimators_ = [_Fixed(member_logits[i]) for i in range(m)]
    vc.le_ = LabelEncoder().fit(np.arange(c))
    vc.classes_ = vc.le_.classes_
    X = np.zeros((n, 1))
    pred = vc.predict(X)
    proba = vc.predict_proba(X) if voting == "soft" else None
    return pred, proba


@st.composite
def members_and_weights(draw, tie_prone=False):
    m = draw(st.integers(1, 6))
    n = draw(st.integers(1, 40))
    c = draw(st.integers(2, 5))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    if tie_prone:
        # Few distinct logit values -> many exact vote ties and equal probabilities.
        logits = rng.integers(0, 3, size=(m, n, c)).astype(np.float64)
    else:
        logits = rng.normal(size=(m, n, c)) * 3
    kind = draw(st.sampled_from(["none", "int", "float"]))
    if kind == "none":
        weights = None
    elif kind == "int":
        weights = rng.integers(0, 4, size=m).astype(float)
        weights[rng.integers(m)] = rng.integers(1, 4)  # not all zero
    else:
        weights = rng.uniform(0.01, 2.0, size=m)
    return logits, weights


@settings(max_examples=150, deadline=None)
@given(members_and_weights(tie_prone=True))
def test_hard_vote_equals_sklearn_including_ties(data):
    logits, weights = data
    expected, _ = sklearn_vote(logits, "hard", weights)
    got = vote(logits, "hard", weights=weights)
    np.testing.assert_array_equal(got.pred, expected)


@settings(max_examples=100, deadline=None)
@given(members_and_weights())
def test_hard_vote_equals_sklearn_random(data):
    logits, weights = data
    expected, _ = sklearn_vote(logits, "hard", weights)
    np.testing.assert_array_equal(vote(logits, "hard", weights=weights).pred, expected)


@settings(max_examples=100, deadline=None)
@given(members_and_weights())
def test_soft_and_weighted_vote_equal_sklearn(data):
    logits, weights = data
    expected_pred, expected_proba = sklearn_vote(logits, "soft", weights)
    rule = "soft" if weights is None else "weighted"
    got = vote(logits, rule, weights=weights)
    np.testing.assert_allclose(got.probs, expected_proba, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(got.pred, expected_pred)
    np.testing.assert_allclose(got.probs, np.average(softmax_3d(logits), axis=0, weights=weights))


def softmax_3d(x):
    return np.stack([softmax(a) for a in x])


def test_hard_tie_goes_to_smallest_class_and_tie_rate_is_reported():
    # two members, 3 rows: row0 tie (classes 2 vs 1 -> 1), row1 agreement, row2 tie (0 vs 2 -> 0)
    a = np.eye(3)[[2, 1, 2]] * 5
    b = np.eye(3)[[1, 1, 0]] * 5
    res = vote([a, b], "hard")
    assert res.pred.tolist() == [1, 1, 0]
    assert res.tie_rate == pytest.approx(2 / 3)
    # a weight breaks the tie in favour of member a
    assert vote([a, b], "hard", weights=[2, 1]).pred.tolist() == [2, 1, 2]
    assert vote([a, b], "hard", weights=[2, 1]).tie_rate == 0.0


def test_gmean_and_logits_rules():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(3, 50, 4))
    lp = np.stack([np.log(softmax(x)) for x in z])
    g = vote(z, "gmean")
    expected = softmax(lp.mean(0))
    np.testing.assert_allclose(g.probs, expected)
    lg = vote(z, "logits", weights=[1, 2, 3])
    np.testing.assert_allclose(lg.probs, softmax(np.average(z, axis=0, weights=[1, 2, 3])))
    # gmean is invariant to per-member logit shifts (it works on log-softmax): raw-logit mean is not.
    shifted = z + np.array([0.0, 100.0, -50.0])[:, None, None]
    np.testing.assert_allclose(vote(shifted, "gmean").probs, g.probs, atol=1e-10)


def test_dict_input_and_names_in_errors():
    a = np.zeros((4, 3))
    b = np.zeros((4, 5))
    with pytest.raises(ValueError, match=r"class-count mismatch: member 'effnet' has 3 classes, member 'swin' has 5"):
        vote({"effnet": a, "swin": b})
    with pytest.raises(ValueError, match="row-count mismatch"):
        vote({"effnet": a, "swin": np.zeros((5, 3))})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rule": "median"}, "unknown vote rule 'median'"),
        ({"rule": "soft", "weights": [1.0]}, "weights has 1 entries but there are 2 members"),
        ({"rule": "soft", "weights": [1.0, -1.0]}, "non-negative"),
        ({"rule": "soft", "weights": [0.0, 0.0]}, "all zero"),
        ({"rule": "soft", "weights": [np.nan, 1.0]}, "finite"),
        ({"rule": "weighted"}, "needs weights"),
    ],
)
def test_invalid_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        vote([np.zeros((2, 3)), np.zeros((2, 3))], **kwargs)


def test_nan_logits_named():
    bad = np.zeros((2, 3))
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match=r"non-finite logits .* member\(s\) 'b'"):
        vote({"a": np.zeros((2, 3)), "b": bad})
