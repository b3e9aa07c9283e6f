"""What ships: tune_weights keeps the tuned blend only when its paired honest gain over the best
simple candidate beats the fold-to-fold noise; otherwise the recipe is that simpler candidate."""

from __future__ import annotations

import numpy as np
import pytest

from ensembler.ensemble import Candidate, choose, tune_weights
from ensembler.ensemble.choice import paired_gain
from ensembler.metrics import macro_f1


def _folds(n, k=5, seed=0):
    return np.random.default_rng(seed).integers(0, k, n)


def test_one_clearly_worse_member_ships_the_better_single_member_and_says_why():
    rng = np.random.default_rng(0)
    n, c = 3000, 6
    y = rng.integers(0, c, n)
    good = np.eye(c)[y] * 2.5 + rng.normal(size=(n, c))
    worse = good + rng.normal(size=(n, c)) * 3.0  # good's own errors plus more: nothing new to add
    res = tune_weights({"good": good, "worse": worse}, y, _folds(n), method="caruana", metric="f1")
    assert res.decision.name == "good" and res.decision.kind == "member"
    assert res.recipe.weights.tolist() == [1.0, 0.0]
    assert [m.name for m in res.recipe.active_members] == ["good"]
    assert "good ships" in res.decision.reason and "within the fold-to-fold noise" in res.decision.reason
    # the recipe predicts exactly what the member predicts, and its honest score is the member's
    pred, _ = res.recipe.apply({"good": good, "worse": worse})
    np.testing.assert_array_equal(pred, good.argmax(1))
    assert res.recipe.scores["honest"]["pooled"]["f1"] == pytest.approx(macro_f1(y, good.argmax(1), c))
    assert res.recipe.scores["ships"]["name"] == "good"
    shipped = [r["name"] for r in res.rows if r["ships"]]
    assert shipped == ["good"]
    # the tuned blend is still there to look at
    assert res.tuned_recipe is not None and res.tuned_recipe.scores["honest"] == res.honest


def test_complementary_members_ship_the_blend():
    rng = np.random.default_rng(1)
    n, c = 3000, 6
    y = rng.integers(0, c, n)
    onehot = np.eye(c)[y]
    low, high = (y < 3)[:, None], (y >= 3)[:, None]
    # a knows classes 0-2 well and 3-5 barely; b the other way round, and b is over-confident
    # (its logits 4x too large), so the uniform soft vote follows b: temperatures and weights fix it
    a = onehot * np.where(low, 3.0, 0.3) + rng.normal(size=(n, c))
    b = 4 * (onehot * np.where(high, 2.0, 0.3) + rng.normal(size=(n, c)))
    res = tune_weights({"a": a, "b": b}, y, _folds(n), method="caruana", metric="f1")
    assert res.decision.kind == "tuned", res.decision.reason
    assert "gain over" in res.decision.reason and "> one standard error" in res.decision.reason
    w = dict(zip(res.recipe.names, res.recipe.weights))
    assert w["a"] > 0.2 and w["b"] > 0.2
    best_single = max(macro_f1(y, a.argmax(1), c), macro_f1(y, b.argmax(1), c))
    assert res.recipe.scores["honest"]["pooled"]["f1"] > best_single + 0.05
    assert [r["kind"] for r in res.rows if r["ships"]] == ["honest"]


def test_the_comparison_is_paired_over_the_same_folds():
    # Fold scores vary a lot from fold to fold (hard and easy folds), but the tuned blend is
    # better on every one of them by 0.01: paired, that is a clear gain. An unpaired look
    # (difference of means against the spread of either) would call it noise.
    member = Candidate("m", "member", {0: 0.50, 1: 0.70, 2: 0.90})
    tuned = Candidate("tuned", "tuned", {0: 0.51, 1: 0.71, 2: 0.91})
    gain, se, k = paired_gain(tuned, member, "f1")
    assert gain == pytest.approx(0.01) and se == pytest.approx(0.0, abs=1e-12) and k == 3
    assert choose([member], [tuned], "f1").name == "tuned"
    # the same mean gain, but won on one fold and lost on the others: noise
    shaky = Candidate("tuned", "tuned", {0: 0.56, 1: 0.69, 2: 0.88})
    gain, se, _ = paired_gain(shaky, member, "f1")
    assert gain == pytest.approx(0.01) and se > gain
    assert choose([member], [shaky], "f1").name == "m"
    # log-loss: lower is better, so the gain is the decrease
    ll_m = Candidate("m", "member", {0: 1.0, 1: 0.8, 2: 0.9})
    ll_t = Candidate("t", "tuned", {0: 0.9, 1: 0.7, 2: 0.8})
    assert paired_gain(ll_t, ll_m, "logloss")[0] == pytest.approx(0.1)
    assert choose([ll_m], [ll_t], "logloss").name == "t"


def test_ladder_votes_then_tuned_then_biases():
    m1 = Candidate("m1", "member", {0: 0.70, 1: 0.72, 2: 0.71})
    m2 = Candidate("m2", "member", {0: 0.60, 1: 0.61, 2: 0.62})
    soft = Candidate("soft vote (uniform)", "soft", {0: 0.74, 1: 0.76, 2: 0.75})
    hard = Candidate("hard vote", "hard", {0: 0.69, 1: 0.70, 2: 0.69})
    tuned = Candidate("tuned", "tuned", {0: 0.745, 1: 0.755, 2: 0.752})  # no better than soft
    biased = Candidate("tuned+b", "tuned+bias", {0: 0.78, 1: 0.80, 2: 0.79})
    d = choose([m1, m2, soft, hard], [tuned, biased], "f1")
    assert d.name == "tuned+b"
    assert [s[0] for s in d.steps] == ["soft vote (uniform)", "tuned", "tuned+b"]
    assert [s[4] for s in d.steps] == [True, False, True]
    assert [s[1] for s in d.steps] == ["m1", "soft vote (uniform)", "soft vote (uniform)"]
    d = choose([m1, m2, soft, hard], [tuned], "f1")
    assert d.name == "soft vote (uniform)" and "tuned's gain over it" in d.reason


def test_no_folds_ships_the_tuned_blend_marked_unchecked():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 300)
    z = np.eye(3)[y] + rng.normal(size=(300, 3))
    res = tune_weights({"a": z, "b": z[::-1]}, y, None, rounds=5)
    assert not res.decision.checked and res.decision.kind == "tuned"
    assert res.decision.reason.startswith("unchecked")
    d = choose([Candidate("m", "member", {})], [Candidate("t", "tuned", {})], "f1")
    assert d.name == "t" and not d.checked


def test_choose_validates_its_candidates():
    with pytest.raises(ValueError, match="at least one single-member candidate"):
        choose([], [Candidate("t", "tuned", {0: 1.0})], "f1")
    with pytest.raises(ValueError, match="unknown kind 'stacked'"):
        choose([Candidate("m", "member", {0: 1.0})], [Candidate("s", "stacked", {0: 1.0})], "f1")


def test_a_temperature_at_its_bound_is_reported():
    rng = np.random.default_rng(3)
    n, c = 2000, 4
    y = rng.integers(0, c, n)
    good = np.eye(c)[y] * 3 + rng.normal(size=(n, c))
    weak = np.eye(c)[y] * 0.05 + rng.normal(size=(n, c)) * 5  # barely informative, over-confident
    res = tune_weights({"good": good, "weak": weak}, y, _folds(n), metric="f1")
    row = next(r for r in res.rows if r["name"] == "weak")
    assert row["t_at_bound"] and "search bound" in row["note"]
    assert not next(r for r in res.rows if r["name"] == "good")["t_at_bound"]
