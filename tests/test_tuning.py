"""Weight tuning on synthetic OOF: noise members get ~no weight, the honest score beats a uniform
vote, class biases lift macro-F1 on imbalanced data, and tuning is honest about folds."""

from __future__ import annotations

import numpy as np
import pytest

from ensembler.ensemble import (
    caruana_select,
    class_prior_nll,
    fit_blend,
    fit_class_biases,
    member_probabilities,
    no_signal_members,
    scipy_weights,
    tune_weights,
)
from ensembler.errors import LogitError
from ensembler.metrics import macro_f1


def synthetic_oof(n=4000, c=6, seed=0, class_probs=None):
    """Two informative members (one better than the other) and one confident pure-noise member."""
    rng = np.random.default_rng(seed)
    y = rng.choice(c, n, p=class_probs) if class_probs is not None else rng.integers(0, c, n)
    folds = rng.integers(0, 5, n)
    good = np.eye(c)[y] * 2.0 + rng.normal(size=(n, c)) * 1.2
    fair = np.eye(c)[y] * 1.5 + rng.normal(size=(n, c)) * 1.0
    noise = rng.normal(size=(n, c)) * 2.0
    return {"good": good, "fair": fair, "noise": noise}, y, folds


@pytest.mark.parametrize("temperature", [False, True])
@pytest.mark.parametrize("metric", ["f1", "acc", "logloss"])
def test_caruana_gives_noise_member_near_zero_weight_and_honest_beats_uniform(metric, temperature):
    members, y, folds = synthetic_oof()
    res = tune_weights(members, y, folds, method="caruana", metric=metric, temperature=temperature)
    w = dict(zip(res.recipe.names, res.recipe.weights))
    assert w["noise"] <= 0.05, w
    assert w["good"] > 0.3 and w["fair"] > 0.2
    uniform = res.recipe.scores["soft_uniform"][metric]
    honest = res.honest["pooled"][metric]
    better = honest < uniform if metric == "logloss" else honest > uniform
    assert better, (honest, uniform)
    # the honest estimate is not flattered: it does not beat the in-sample score by more than noise
    assert res.honest["mean"] <= res.in_sample[metric] + 0.01 if metric != "logloss" else True


@pytest.mark.parametrize("temperature", [False, True])
def test_scipy_gives_noise_member_zero_weight_and_honest_beats_uniform(temperature):
    members, y, folds = synthetic_oof(seed=1)
    res = tune_weights(members, y, folds, method="scipy", metric="f1", temperature=temperature)
    w = dict(zip(res.recipe.names, res.recipe.weights))
    assert w["noise"] < 1e-3, w
    assert res.honest["pooled"]["f1"] > res.recipe.scores["soft_uniform"]["f1"] + 0.05
    assert res.honest["mean"] > res.recipe.scores["soft_uniform"]["f1"]


def test_member_without_signal_is_left_out_and_said_so():
    # Calibrated, the noise member's T runs to the upper bound and its probabilities are ~flat:
    # adding it is a near no-op, which greedy selection used to pad the blend with (weight
    # 0.78 on such a member in a 3-member case) whenever adding a real member unbalanced it.
    members, y, folds = synthetic_oof(seed=2)
    res = tune_weights(members, y, folds, method="caruana", metric="f1", temperature=True)
    t = dict(zip(res.recipe.names, res.recipe.temperatures))
    w = dict(zip(res.recipe.names, res.recipe.weights))
    assert t["noise"] > 15 and w["noise"] == 0.0
    assert 2 in res.fit.no_signal and set(res.fit.no_signal) == {2}
    nll, prior = res.fit.no_signal[2]
    assert nll >= prior and prior == pytest.approx(class_prior_nll(y, 6))
    row = next(r for r in res.rows if r["name"] == "noise")
    assert row["note"].startswith("no signal: calibrated log-loss") and "left out" in row["note"]
    # informative members are never left out, however weak
    assert no_signal_members(np.stack([members["good"], members["fair"]]), y) == {}


def test_every_member_without_signal_leaves_the_blend_as_it_is():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 4, 400)
    noise = rng.normal(size=(3, 400, 4))
    fit = fit_blend(noise, y, method="caruana", metric="f1", rounds=5)
    assert fit.no_signal == {} and fit.weights.sum() == pytest.approx(1.0)


def test_class_prior_nll_is_the_log_loss_of_predicting_frequencies():
    y = np.array([0, 0, 0, 1])
    freq = (np.array([3, 1]) + 0.5) / (4 + 1.0)
    assert class_prior_nll(y, 2) == pytest.approx(-np.mean(np.log(freq[y])))


def test_caruana_rules_on_a_hand_made_case():
    y = np.array([0, 1, 2, 0, 1, 2])
    eye = np.eye(3)
    perfect = eye[y] * 0.8 + 0.2 / 3
    wrong = eye[(y + 1) % 3] * 0.8 + 0.2 / 3
    # Tie between two identical perfect members: the lower index is chosen, then re-chosen
    # (ties prefer already-chosen members), and the cut-back keeps the first best round.
    res = caruana_select(np.stack([wrong, perfect, perfect]), y, "acc", rounds=6)
    assert res.counts.tolist() == [0, 1, 0]
    assert res.best_round == 1
    assert res.weights.tolist() == [0.0, 1.0, 0.0]
    assert len(res.history) == 6
    with pytest.raises(ValueError, match="rounds must be a positive integer"):
        caruana_select(np.stack([perfect]), y, "acc", rounds=0)
    with pytest.raises(ValueError, match="unknown metric 'auc'"):
        caruana_select(np.stack([perfect]), y, "auc")


def test_caruana_matches_a_plain_reference_implementation():
    rng = np.random.default_rng(5)
    m, n, c = 5, 300, 4
    y = rng.integers(0, c, n)
    probs = member_probabilities(np.eye(c)[y][None] * rng.uniform(0, 2, (m, 1, 1)) + rng.normal(size=(m, n, c)),
                                 dtype=np.float64)
    for metric in ("f1", "acc", "logloss"):
        res = caruana_select(probs, y, metric, rounds=15)
        # reference: recompute each candidate blend from scratch
        counts = np.zeros(m, int)
        hist = []
        for _ in range(15):
            scores = []
            for j in range(m):
                cnt = counts.copy()
                cnt[j] += 1
                blend = np.tensordot(cnt / cnt.sum(), probs, axes=1)
                if metric == "logloss":
                    scores.append(np.log(np.maximum(blend[np.arange(n), y], 1e-15)).mean())
                elif metric == "acc":
                    scores.append((blend.argmax(1) == y).mean())
                else:
                    scores.append(macro_f1(y, blend.argmax(1), c))
            scores = np.array(scores)
            tied = np.flatnonzero(np.isclose(scores, scores.max(), rtol=0, atol=1e-12))
            chosen = tied[counts[tied] > 0]
            counts[chosen[0] if len(chosen) else tied[0]] += 1
            hist.append(scores.max())
        np.testing.assert_allclose(res.history, hist, atol=1e-9)


def test_scipy_weights_match_a_direct_simplex_optimum():
    from scipy.optimize import minimize

    rng = np.random.default_rng(7)
    m, n, c = 3, 2000, 5
    y = rng.integers(0, c, n)
    probs = member_probabilities(np.eye(c)[y][None] * np.array([1.5, 1.0, 0.7])[:, None, None]
                                 + rng.normal(size=(m, n, c)), dtype=np.float64)
    w = scipy_weights(probs, y)
    p_true = probs[:, np.arange(n), y]

    def nll(v):
        return -np.log(v @ p_true).mean()

    ref = minimize(nll, np.full(m, 1 / m), method="SLSQP", bounds=[(0, 1)] * m,
                   constraints={"type": "eq", "fun": lambda v: v.sum() - 1})
    assert nll(w) <= ref.fun + 1e-6
    np.testing.assert_allclose(w, ref.x, atol=0.02)


def test_class_biases_raise_macro_f1_on_imbalanced_data():
    c = 6
    class_probs = np.array([0.4, 0.3, 0.2, 0.06, 0.03, 0.01])
    members, y, folds = synthetic_oof(n=6000, c=c, seed=3, class_probs=class_probs)
    # Members biased towards frequent classes (as models trained on imbalanced data are).
    prior = np.log(class_probs)
    members = {k: v + prior for k, v in members.items() if k != "noise"}
    plain = tune_weights(members, y, folds, method="scipy", class_bias=False)
    biased = tune_weights(members, y, folds, method="scipy", class_bias=True)
    assert biased.recipe.class_biases is not None
    b = np.array(biased.recipe.class_biases)
    assert b[5] > b[0]  # the rarest class is pushed up relative to the most frequent
    assert biased.in_sample["f1"] > plain.in_sample["f1"] + 0.01
    assert biased.honest["pooled"]["f1"] > plain.honest["pooled"]["f1"] + 0.01


def test_class_biases_prefix_counts_match_brute_force():
    rng = np.random.default_rng(11)
    n, c = 500, 4
    y = rng.integers(0, c, n)
    lp = np.log(member_probabilities((np.eye(c)[y] + rng.normal(size=(n, c)))[None], dtype=np.float64)[0])
    grid = np.round(np.arange(-1, 1.0001, 0.25), 6)
    b = fit_class_biases(lp, y, "f1", grid=grid, sweeps=1)
    # brute force one sweep of coordinate ascent with real argmax
    ref = np.zeros(c)
    for k in range(c):
        scores = []
        for v in grid:
            trial = ref.copy()
            trial[k] = v
            scores.append(macro_f1(y, (lp + trial).argmax(1), c))
        scores = np.array(scores)
        cand = grid[scores >= scores.max() - 1e-12]
        if not np.any(cand == ref[k]):
            ref[k] = cand[np.argmin(np.abs(cand))]
    if macro_f1(y, (lp + ref).argmax(1), c) <= macro_f1(y, lp.argmax(1), c):
        ref = np.zeros(c)
    np.testing.assert_allclose(b, ref)


def test_class_bias_kept_only_if_it_improves():
    y = np.array([0, 1, 0, 1])
    lp = np.log(np.array([[0.9, 0.1], [0.1, 0.9], [0.8, 0.2], [0.3, 0.7]]))  # already perfect
    np.testing.assert_array_equal(fit_class_biases(lp, y), [0.0, 0.0])
    with pytest.raises(ValueError, match="class biases tune decisions"):
        fit_class_biases(lp, y, "logloss")


def test_honest_score_holds_each_fold_out():
    members, y, folds = synthetic_oof(n=1500)
    res = tune_weights(members, y, folds, method="scipy", temperature=True)
    assert sorted(res.honest["per_fold"]) == sorted(np.unique(folds).tolist())
    for f, score in res.honest["per_fold"].items():
        assert 0 < score <= 1
    assert res.honest["mean"] == pytest.approx(np.mean(list(res.honest["per_fold"].values())))
    kinds = [r["kind"] for r in res.rows]
    assert kinds == ["member"] * 3 + ["hard", "soft", "tuned", "honest"]
    assert res.recipe.scores["honest"]["per_fold"] == res.honest["per_fold"]
    # in-sample score comes from applying the recipe itself (what predict will do)
    pred, _ = res.recipe.apply(members)
    assert macro_f1(y, pred, 6) == pytest.approx(res.in_sample["f1"])


def test_no_folds_means_no_honest_score():
    members, y, _ = synthetic_oof(n=600)
    res = tune_weights(members, y, None, method="caruana", rounds=5)
    assert res.honest is None
    assert res.rows[-1]["kind"] == "honest" and res.rows[-1]["f1"] is None


def test_parameter_validation():
    members, y, folds = synthetic_oof(n=100)
    with pytest.raises(ValueError, match="unknown tuning method 'greedy'"):
        tune_weights(members, y, folds, method="greedy")
    with pytest.raises(ValueError, match="unknown metric"):
        tune_weights(members, y, folds, metric="auc")
    with pytest.raises(ValueError, match="rounds must be a positive integer"):
        tune_weights(members, y, folds, rounds=0)
    with pytest.raises(ValueError, match="class biases tune argmax decisions"):
        tune_weights(members, y, folds, metric="logloss", class_bias=True)
    with pytest.raises(LogitError, match="labels outside 0..5"):
        tune_weights(members, y + 6, folds)
    bad = dict(members)
    bad["noise"] = bad["noise"].copy()
    bad["noise"][3, 2] = np.inf
    with pytest.raises(LogitError, match="non-finite logits .* 'noise'"):
        tune_weights(bad, y, folds)
    with pytest.raises(LogitError, match="class-count mismatch: member 'good' has 6 classes, member 'x' has 4"):
        tune_weights({"good": members["good"], "x": np.zeros((100, 4))}, y, folds)


def test_class_biases_leave_classes_without_training_rows_at_zero():
    from ensembler.ensemble import fit_class_biases

    rng = np.random.default_rng(5)
    n, c = 600, 4
    y = rng.integers(0, 3, n)  # class 3 never occurs
    lp = np.log(np.full((n, c), 0.25)) + rng.normal(0, 0.5, (n, c))
    lp[np.arange(n), y] += 0.4
    lp[:, 3] += 0.3  # class 3 steals some rows: pushing it down would help, but it has no rows to learn from
    b = fit_class_biases(lp, y)
    assert b[3] == 0.0
    # macro-F1 under the biases (scikit-learn's present-label rule) is no worse than without
    assert macro_f1(y, (lp + b).argmax(1), c) >= macro_f1(y, lp.argmax(1), c)
