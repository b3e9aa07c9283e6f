"""Stacking (tune-weights --method stack): the same model as scikit-learn's StackingClassifier
(cv="prefit") on the same inputs, C by inner CV over the OOF folds, nested in the honest score,
shipped only through the fold-by-fold rule, and applied by a saved recipe and by predict."""

from __future__ import annotations

import numpy as np
import pytest

from sklearn.base import BaseEstimator, ClassifierMixin

from ensembler.ensemble import Recipe, RecipeError, tune_weights
from ensembler.ensemble import stacking
from ensembler.ensemble.stacking import fit_stack, stack_features
from ensembler.metrics import log_softmax


def specialists(n=3000, c=6, seed=0):
    """Member 'low' knows classes 0-2 and guesses on 3-5; 'high' the reverse; 'noise' knows nothing.

    A weighted soft vote can only give each member one weight; a stack can trust 'low' for
    the low classes and 'high' for the high ones.
    """
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    folds = rng.integers(0, 4, n)
    onehot = np.eye(c)[y]
    low_cls = (y < c // 2)[:, None]
    low = rng.normal(size=(n, c)) + np.where(low_cls, onehot * 3.0, 0.0)
    high = rng.normal(size=(n, c)) + np.where(~low_cls, onehot * 3.0, 0.0)
    return {"low": low, "high": high, "noise": rng.normal(size=(n, c))}, y, folds


class _Prefit(ClassifierMixin, BaseEstimator):
    """A prefit 'estimator' for StackingClassifier: row indices in, a member's features out."""

    def __init__(self, features=None, classes=None):
        self.features = features
        self.classes = classes
        self.classes_ = classes
        self.fitted_ = True

    def fit(self, X, y):  # pragma: no cover - prefit, never called
        return self

    def decision_function(self, X):
        return self.features[np.asarray(X).ravel().astype(int)]


def _sklearn_stack(member_logits, y, C):
    from sklearn.ensemble import StackingClassifier
    from sklearn.linear_model import LogisticRegression

    classes = np.unique(y)
    ests = [(f"m{i}", _Prefit(np.maximum(log_softmax(z.astype(np.float64)), stacking.LOG_FLOOR), classes))
            for i, z in enumerate(member_logits)]
    clf = StackingClassifier(ests, final_estimator=LogisticRegression(C=C, max_iter=stacking.MAX_ITER), cv="prefit",
                             stack_method="decision_function")
    rows = np.arange(len(y)).reshape(-1, 1)
    clf.fit(rows, y)
    return clf, rows


@pytest.mark.parametrize("c", [2, 5])
def test_stack_equals_sklearn_stacking_classifier_prefit(c):
    rng = np.random.default_rng(c)
    n = 400
    y = rng.integers(0, c, n)
    folds = np.arange(n) % 3
    members = np.stack([np.eye(c)[y] * s + rng.normal(size=(n, c)) for s in (1.5, 0.7)])
    fit = fit_stack(members, y, folds)
    assert fit.coef.shape == (c, 2 * c) and fit.classes == tuple(range(c))
    clf, rows = _sklearn_stack(list(members), y, fit.C)
    ours = np.exp(fit.log_proba(members))
    np.testing.assert_allclose(ours, clf.predict_proba(rows), atol=1e-6)
    np.testing.assert_array_equal(ours.argmax(1), clf.predict(rows))
    # The recipe applies the same numbers.
    rec = tune_weights({"a": members[0], "b": members[1]}, y, folds, method="stack", honest=False).tuned_recipe
    _, probs = rec.apply({"a": members[0], "b": members[1]})
    np.testing.assert_allclose(probs, clf.predict_proba(rows), atol=1e-6)


def test_c_is_chosen_by_inner_cv_over_the_oof_folds():
    from sklearn.linear_model import LogisticRegression

    members, y, folds = specialists(n=900)
    z = np.stack(list(members.values()))
    fit = fit_stack(z, y, folds, Cs=(0.001, 1.0))
    x = stack_features(z)
    by_hand = {}
    for C in (0.001, 1.0):
        losses = []
        for f in np.unique(folds):
            t = folds == f
            p = LogisticRegression(C=C, max_iter=1000).fit(x[~t], y[~t]).predict_proba(x[t])
            losses.append(-np.log(p[np.arange(t.sum()), y[t]]).mean())
        by_hand[C] = np.mean(losses)
    assert fit.cv_logloss == pytest.approx(by_hand, rel=1e-3)  # ours warm-starts along the C path
    assert fit.C == min(by_hand, key=by_hand.get) == 1.0  # 0.001 squashes the signal
    assert "inner CV over folds [0, 1, 2, 3]" in fit.c_chosen_by
    one_fold = fit_stack(z, y, np.zeros_like(folds))
    assert one_fold.C == 1.0 and "inner CV needs two" in one_fold.c_chosen_by


def test_stack_beats_weights_on_specialists_and_ships_through_the_fold_rule(tmp_path):
    members, y, folds = specialists(n=1500)
    stack = tune_weights(members, y, folds, method="stack", metric="f1", stack_cs=(0.1, 1.0))
    caruana = tune_weights(members, y, folds, method="caruana", metric="f1")
    assert stack.honest["mean"] > caruana.honest["mean"] + 0.03, (stack.honest["mean"], caruana.honest["mean"])
    # The stack is the tuned candidate the ladder climbs to, compared fold by fold.
    assert stack.decision.kind == "tuned" and stack.decision.name == "tuned stack"
    step = [s for s in stack.decision.to_dict()["steps"] if s["candidate"] == "tuned stack"][0]
    assert step["shipped"] and step["gain"] > step["se"]
    r = stack.recipe
    assert r.vote == "stack" and r.method == "stack" and len(r.active_members) == 3
    w = dict(zip(r.names, r.weights))
    assert w["noise"] < 0.5 * min(w["low"], w["high"])  # |coef| shares: noise gets the least
    # Saved and loaded, the recipe predicts exactly what the tuning scored in-sample.
    path = r.save(tmp_path / "stack.json")
    back = Recipe.load(path)
    assert back.hash() == r.hash()
    pred, probs = back.apply(members)
    assert pred.tolist() == probs.argmax(1).tolist()
    assert stack.recipe.scores["in_sample"]["f1"] == pytest.approx(stack.in_sample["f1"])
    from ensembler.metrics import macro_f1

    assert macro_f1(y, pred, 6) == pytest.approx(stack.in_sample["f1"])


def test_honest_score_refits_the_stack_and_its_c_without_the_held_out_fold(monkeypatch):
    members, y, folds = specialists(n=800)
    seen = []
    real = stacking.fit_stack

    def spy(logits, labels, folds_=None, **kw):
        seen.append((len(labels), tuple(np.unique(folds_).tolist())))
        return real(logits, labels, folds_, **kw)

    from ensembler.ensemble import blend

    monkeypatch.setattr(blend, "fit_stack", spy)
    res = tune_weights(members, y, folds, method="stack", stack_cs=(0.1, 1.0))
    assert seen[0] == (800, (0, 1, 2, 3))  # in-sample: every row, inner CV over every fold
    for f in range(4):  # each honest fit sees the other folds only, and picks C among them
        assert (int((folds != f).sum()), tuple(x for x in range(4) if x != f)) in seen[1:]
    assert sorted(res.honest["per_fold"]) == [0, 1, 2, 3]


def test_stack_with_class_biases_and_unseen_classes():
    rng = np.random.default_rng(3)
    n, c = 600, 4
    y = rng.choice(3, n, p=[0.7, 0.2, 0.1])  # class 3 never appears
    folds = np.arange(n) % 3
    z = {"a": np.eye(c)[y] * 1.2 + rng.normal(size=(n, c)), "b": np.eye(c)[y] + rng.normal(size=(n, c))}
    res = tune_weights(z, y, folds, method="stack", class_bias=True)
    rec = res.tuned_recipe
    assert rec.stack["classes"] == [0, 1, 2]
    _, probs = rec.apply(z)
    assert np.all(probs[:, 3] == 0) and np.allclose(probs.sum(1), 1)


def test_bad_stack_in_a_recipe_names_the_field(tmp_path):
    members, y, folds = specialists(n=300)
    rec = tune_weights(members, y, folds, method="stack", honest=False).tuned_recipe
    d = rec.to_dict()
    d["stack"]["coef"] = d["stack"]["coef"][:-1]
    with pytest.raises(RecipeError, match=r"field 'stack.coef' has shape \(5, 18\); 3 member\(s\) of 6 classes "
                                          r"need \(6, 18\)"):
        Recipe.from_dict(d)
    d = rec.to_dict()
    del d["stack"]
    with pytest.raises(RecipeError, match="field 'stack' is missing: vote 'stack' needs the fitted regression"):
        Recipe.from_dict(d)
    d = rec.to_dict()
    d["stack"]["intercept"][0] = float("nan")
    with pytest.raises(RecipeError, match="stack.coef' must be finite"):
        Recipe.from_dict(d)
