"""Reliability of recipes and blending (issue 11, ensemble part): a recipe that would skip a
check or give a silent wrong answer is refused naming the file and field; members that do not
agree on the OOF split are refused naming the first id; nothing already written changes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ensembler.cli import main
from ensembler.ensemble import Recipe, RecipeError, RecipeMember, load_members, vote
from ensembler.errors import LogitError

SHA = "ab" * 32


def recipe_file(tmp_path, **member_fields):
    member = {"name": "res", "kind": "family", "weight": 1.0, "temperature": 1.0, "classes": ["x", "y", "z"],
              "sha256": [SHA]}
    member.update(member_fields)
    member = {k: v for k, v in member.items() if v is not ...}
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps({"version": 1, "vote": "weighted", "metric": "f1", "members": [member]}))
    return path


@pytest.mark.parametrize("sha, why", [
    ([], "is empty: a family member must record the sha256"),
    (..., "is missing: a family member must record the sha256"),
    (None, "must be a list of sha256 hex digests"),
    (["xyz"], "must be a list of sha256 hex digests"),
    ([SHA.upper()], "must be a list of sha256 hex digests"),
    ("ab" * 32, "must be a list of sha256 hex digests"),
])
def test_recipe_member_without_a_real_sha256_is_refused(tmp_path, sha, why):
    # BAD 10: `sha256: []` used to skip predict's check that the weights are the tuned ones.
    path = recipe_file(tmp_path, sha256=sha)
    before = path.read_bytes()
    with pytest.raises(RecipeError, match=rf"recipe {path}: field 'members\[0\]\.sha256' {why}"):
        Recipe.load(path)
    assert path.read_bytes() == before


def test_a_raw_oof_member_needs_no_sha256(tmp_path):
    path = recipe_file(tmp_path, kind="file", sha256=...)
    assert Recipe.load(path).members[0].sha256 == ()


def test_huge_weights_give_the_blend_of_their_ratios():
    # BAD 11: weights of 1e308 overflowed their sum: probabilities 0,0,0 and label 0, exit 0.
    a = np.log(np.array([[0.1, 0.3, 0.6], [0.7, 0.2, 0.1]]))
    b = np.log(np.array([[0.2, 0.5, 0.3], [0.1, 0.1, 0.8]]))
    members = lambda w: (RecipeMember("a", "file", ("x", "y", "z"), weight=w[0]),  # noqa: E731
                         RecipeMember("b", "file", ("x", "y", "z"), weight=w[1]))
    pred, probs = Recipe(members=members((1e308, 1e308))).apply({"a": a, "b": b})
    ref_pred, ref_probs = Recipe(members=members((1.0, 1.0))).apply({"a": a, "b": b})
    assert pred.tolist() == ref_pred.tolist() == [2, 2]
    np.testing.assert_allclose(probs, ref_probs)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    hard = vote([a, b], "hard", weights=[1e308, 1e308])
    assert np.isfinite(hard.probs).all()


@pytest.mark.parametrize("t", [1e-300, 1e300, 0.0, -1.0, "1"])
def test_absurd_temperature_is_refused_naming_the_field(tmp_path, t):
    path = recipe_file(tmp_path, temperature=t)
    with pytest.raises(RecipeError, match=rf"recipe {path}: field 'members\[0\]\.temperature'"):
        Recipe.load(path)


def test_weights_must_be_finite_and_not_all_zero(tmp_path):
    for w, why in ((float("inf"), "weight' must be a finite number"), (-1.0, "weight' must be a finite number"),
                   (0.0, "has all weights zero")):
        path = recipe_file(tmp_path, weight=w)
        with pytest.raises(RecipeError, match=why):
            Recipe.load(path)


def _oof(path, folds, n=90, c=3, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % c
    ids = np.array([f"img{i:03d}" for i in range(n)])
    z = (np.eye(c)[y] * 2 + rng.normal(size=(n, c))).astype(np.float32)
    np.savez(path, ids=ids, logits=z, labels=y, folds=np.asarray(folds, np.int64))
    return path


def test_members_whose_folds_disagree_are_refused_naming_the_first_id(tmp_path, capsys):
    # BAD 12: a phantom fold 9 in one member gave an "honest" score over it, silently.
    folds = np.arange(90) % 3
    phantom = folds.copy()
    phantom[17] = 9
    a = _oof(tmp_path / "a.npz", folds)
    b = _oof(tmp_path / "b.npz", phantom, seed=1)
    with pytest.raises(LogitError, match=r"b\.npz \(member 'b'\): folds disagree with 'a'.* 1 id\(s\); the first is "
                                         r"'img017': fold 9 in 'b', fold 2 in 'a'"):
        load_members(None, oof_files=[a, b])
    earlier = tmp_path / "recipe.json"
    earlier.write_text("{}")
    rc = main(["tune-weights", "--oof", str(a), str(b), "--rounds", "3", "--no-temperature",
               "--out", str(tmp_path / "new.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "'img017'" in err and "fold 9" in err
    assert not (tmp_path / "new.json").exists() and earlier.read_text() == "{}"
    # the same split in another row order is fine
    perm = np.random.default_rng(0).permutation(90)
    with np.load(b) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["folds"] = folds
    np.savez(tmp_path / "c.npz", **{k: v[perm] for k, v in arrays.items()})
    assert len(load_members(None, oof_files=[a, tmp_path / "c.npz"])) == 2
