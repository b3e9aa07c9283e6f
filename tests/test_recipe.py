"""Recipe JSON round trip, validation, hash, apply; OOF member loading, alignment and composition."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ensembler.ensemble import (
    Recipe,
    RecipeError,
    RecipeMember,
    align_members,
    compose_members,
    load_members,
    load_oof,
    tune_weights,
    vote,
)
from ensembler.errors import EnsemblerError, LogitError
from ensembler.labels import LabelSpace, factored_to_joint_logprobs
from ensembler.metrics import softmax


def write_oof(path, n=60, c=4, seed=0, shuffle=False, **override):
    rng = np.random.default_rng(seed)
    y = np.random.default_rng(0).integers(0, c, n)
    arrays = dict(ids=np.array([f"id{i:04d}" for i in range(n)]),
                  logits=(np.eye(c)[y] * 2 + rng.normal(size=(n, c))).astype(np.float32),
                  labels=y.astype(np.int64), folds=(np.arange(n) % 3).astype(np.int64))
    if shuffle:
        perm = rng.permutation(n)
        arrays = {k: v[perm] for k, v in arrays.items()}
    arrays.update(override)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return path


def small_recipe(**kw):
    members = (RecipeMember("a", "family", ("x", "y", "z"), weight=0.75, temperature=2.0, sha256=("ab" * 32,)),
               RecipeMember("b", "file", ("x", "y", "z"), weight=0.25, temperature=0.5))
    return Recipe(members=members, **kw)


# ---------------------------------------------------------------------------- Recipe
def test_save_load_round_trip_and_stable_hash(tmp_path):
    r = small_recipe(class_biases=(0.0, 0.5, -0.2), method="caruana",
                     scores={"in_sample": {"f1": 0.8}, "honest": {"mean": 0.75, "per_fold": {"0": 0.7}}})
    path = r.save(tmp_path / "recipe.json")
    loaded = Recipe.load(path)
    assert loaded.created  # stamped on save
    assert loaded.names == ["a", "b"] and loaded.class_biases == (0.0, 0.5, -0.2)
    assert loaded.hash() == r.hash()  # time excluded
    d = json.loads(path.read_text())
    d["created"] = "2001-01-01T00:00:00+00:00"
    assert Recipe.from_dict(d).hash() == r.hash()
    d["members"][0]["weight"] = 0.7
    assert Recipe.from_dict(d).hash() != r.hash()
    assert [p.name for p in tmp_path.iterdir()] == ["recipe.json"]  # no temp files left


def test_apply_matches_temperatures_weights_and_biases():
    rng = np.random.default_rng(0)
    za, zb = rng.normal(size=(50, 3)), rng.normal(size=(50, 3))
    r = small_recipe(class_biases=(0.0, 0.5, -0.2))
    pred, probs = r.apply({"a": za, "b": zb, "unused": np.zeros((50, 3))})
    blend = 0.75 * softmax(za / 2.0) + 0.25 * softmax(zb / 0.5)
    logp = np.log(blend) + np.array([0.0, 0.5, -0.2])
    np.testing.assert_array_equal(pred, logp.argmax(1))
    np.testing.assert_allclose(probs, softmax(logp))
    # without biases it is the weighted vote of tempered logits
    pred2, probs2 = small_recipe().apply({"a": za, "b": zb})
    np.testing.assert_allclose(probs2, vote([za / 2.0, zb / 0.5], "weighted", weights=[0.75, 0.25]).probs)


def test_apply_errors_name_the_member():
    r = small_recipe()
    with pytest.raises(LogitError, match=r"recipe member 'b' is missing"):
        r.apply({"a": np.zeros((5, 3))})
    with pytest.raises(LogitError, match=r"recipe member 'b': logits of shape \(5, 4\).*3 classes"):
        r.apply({"a": np.zeros((5, 3)), "b": np.zeros((5, 4))})
    bad = np.zeros((5, 3))
    bad[0, 0] = np.nan
    with pytest.raises(LogitError, match="'a': logits contain NaN"):
        r.apply({"a": bad, "b": np.zeros((5, 3))})


def test_zero_weight_members_are_not_needed():
    members = (RecipeMember("a", "file", ("x", "y"), weight=1.0), RecipeMember("b", "file", ("x", "y"), weight=0.0))
    r = Recipe(members=members)
    assert [m.name for m in r.active_members] == ["a"]
    pred, _ = r.apply({"a": np.array([[0.0, 1.0]])})
    assert pred.tolist() == [1]


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d.pop("members"), r"field 'members' is missing"),
        (lambda d: d.update(version=99), r"field 'version' is 99"),
        (lambda d: d.update(vote="median"), r"field 'vote' is 'median'"),
        (lambda d: d.update(metric="auc"), r"field 'metric'"),
        (lambda d: d["members"][0].update(weight=-1), r"field 'members\[0\].weight' must be a finite number >= 0"),
        (lambda d: d["members"][1].update(temperature=0), r"field 'members\[1\].temperature' must be a finite number > 0"),
        (lambda d: d["members"][1].update(classes=["x", "z", "y"]), r"members\[1\].classes' differ from members\[0\]"),
        (lambda d: d["members"][1].update(name="a"), r"lists a name twice"),
        (lambda d: d["members"][0].update(kind="zip"), r"members\[0\].kind' is 'zip'"),
        (lambda d: d.update(class_biases=[0.1]), r"field 'class_biases' must be 3 finite numbers"),
        (lambda d: [m.update(weight=0) for m in d["members"]], r"all weights zero"),
    ],
)
def test_load_rejects_bad_fields_naming_file_and_field(tmp_path, mutate, match):
    d = small_recipe().to_dict()
    mutate(d)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    with pytest.raises(RecipeError, match=match) as info:
        Recipe.load(path)
    assert str(path) in str(info.value)


def test_load_rejects_missing_and_non_json_files(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        Recipe.load(tmp_path / "nope.json")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(RecipeError, match=r"x.json is not valid JSON"):
        Recipe.load(tmp_path / "x.json")
    assert issubclass(RecipeError, EnsemblerError)


def test_a_recipe_with_hard_vote_cannot_have_biases():
    with pytest.raises(RecipeError, match="hard vote"):
        small_recipe(vote="hard", class_biases=(0.0, 0.0, 0.0))


# ---------------------------------------------------------------------------- OOF members
def test_load_oof_and_align_by_id(tmp_path):
    a = load_oof(write_oof(tmp_path / "a.npz"))
    b = load_oof(write_oof(tmp_path / "b.npz", seed=1, shuffle=True))
    assert a.name == "a" and a.num_classes == 4 and len(a) == 60
    aligned = align_members([a, b])
    np.testing.assert_array_equal(aligned[1].ids, a.ids)
    np.testing.assert_array_equal(aligned[1].labels, a.labels)
    b_sorted = load_oof(write_oof(tmp_path / "b2.npz", seed=1))
    np.testing.assert_array_equal(aligned[1].logits, b_sorted.logits)


@pytest.mark.parametrize(
    "override, match",
    [
        ({"logits": np.full((60, 4), np.nan, np.float32)}, r"60 row\(s\) of logits are NaN or inf, e.g. ids 'id0000'"),
        ({"labels": None}, r"lacks array\(s\) \['labels'\]"),
        ({"ids": np.array([f"id{i:04d}" for i in range(59)])}, r"'ids' has shape \(59,\)"),
        ({"ids": np.array(["same"] * 60)}, r"duplicate ids 'same'"),
        ({"labels": np.arange(60) % 7}, r"labels outside 0..3 \(wrong class count\?\)"),
        ({"logits": np.zeros(60, np.float32)}, r"'logits' must be a float \(N, C>=2\) array"),
    ],
)
def test_corrupt_oof_file_is_an_error_naming_the_file(tmp_path, override, match):
    path = write_oof(tmp_path / "broken.npz", **override)
    with pytest.raises(LogitError, match=match) as info:
        load_oof(path)
    assert "broken.npz" in str(info.value)


def test_not_an_npz_and_missing_file(tmp_path):
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(LogitError, match=r"text.npz is not a readable .npz file"):
        load_oof(tmp_path / "text.npz")
    np.save(tmp_path / "arr.npy", np.zeros((3, 3)))
    with pytest.raises(LogitError, match=r"arr.npy is a bare .npy array"):
        load_oof(tmp_path / "arr.npy")
    with pytest.raises(LogitError, match=r"missing.npz does not exist"):
        load_oof(tmp_path / "missing.npz")


def test_mismatched_members_are_errors_naming_the_file(tmp_path):
    a = write_oof(tmp_path / "a.npz")
    wrong_ids = write_oof(tmp_path / "wrong_ids.npz", ids=np.array([f"x{i:04d}" for i in range(60)]))
    with pytest.raises(LogitError, match=r"wrong_ids.npz \(member 'wrong_ids'\) ids do not match: 60 id\(s\) of 'a' "
                                         r"missing, e.g. 'id0000'"):
        load_members(oof_files=[a, wrong_ids])
    wrong_c = write_oof(tmp_path / "five.npz", c=5)
    with pytest.raises(LogitError, match=r"class-count mismatch: member 'a' .* has 4 classes, member 'five' "
                                         r"\(.*five.npz\) has 5"):
        load_members(oof_files=[a, wrong_c])
    labels = np.random.default_rng(0).integers(0, 4, 60)
    labels[:3] = (labels[:3] + 1) % 4
    wrong_labels = write_oof(tmp_path / "relabelled.npz", labels=labels)
    with pytest.raises(LogitError, match=r"relabelled.npz \(member 'relabelled'\): labels disagree .* on 3 id\(s\), "
                                         r"e.g. 'id0000', 'id0001', 'id0002'"):
        load_members(oof_files=[a, wrong_labels])


def test_members_with_different_label_spaces_are_an_error_naming_them(tmp_path):
    a = load_oof(write_oof(tmp_path / "a.npz", c=3), label_space=LabelSpace(("cat", "dog", "fox")))
    b = load_oof(write_oof(tmp_path / "b.npz", c=3), label_space=LabelSpace(("cat", "fox", "dog")))
    with pytest.raises(LogitError, match=r"class maps differ: member 'a' .* and member 'b'"):
        align_members([a, b])


def test_composed_factor_members_equal_a_factored_model(tmp_path):
    space = LabelSpace.mask()
    n = 40
    rng = np.random.default_rng(0)
    outputs = rng.normal(size=(n, 8)) * 2  # a factored head: mask(3) + gender(2) + age(3)
    expected = factored_to_joint_logprobs(outputs, space.factor_sizes)
    y_mask, y_gender, y_age = rng.integers(0, 3, n), rng.integers(0, 2, n), rng.integers(0, 3, n)
    ids = np.array([f"p{i}" for i in range(n)])
    parts, blocks, labels = [], {"mask": outputs[:, :3], "gender": outputs[:, 3:5], "age": outputs[:, 5:]}, {
        "mask": y_mask, "gender": y_gender, "age": y_age}
    # per-factor models saved in a different row order and listed in a different factor order
    for factor in ("age", "mask", "gender"):
        perm = rng.permutation(n)
        path = tmp_path / f"{factor}_only.npz"
        np.savez(path, ids=ids[perm], logits=blocks[factor][perm].astype(np.float64), labels=labels[factor][perm],
                 folds=(np.arange(n) % 2)[perm],
                 label_space=json.dumps(space.factor_space(factor).to_dict()))
        parts.append(load_oof(path))
    composed = compose_members(parts)
    assert composed.kind == "composed" and composed.parts == ("mask_only", "gender_only", "age_only")
    order = np.argsort(composed.ids)
    ref_order = np.argsort(ids)
    # members are float32 logits (ensembler.logits): equal to float32 precision
    np.testing.assert_allclose(softmax(composed.logits[order]), softmax(expected[ref_order]), atol=1e-6)
    joint_y = y_mask * 6 + y_gender * 3 + y_age
    np.testing.assert_array_equal(composed.labels[order], joint_y[ref_order])
    assert composed.label_space.same_classes(space)
    # the same through load_members with a 'a+b+c' spec, and a Recipe applied to the parts
    files = [tmp_path / f"{f}_only.npz" for f in ("age", "mask", "gender")]
    (member,) = load_members(["age_only+mask_only+gender_only"], oof_files=files)
    res = tune_weights([member], rounds=2, temperature=False, honest=False)
    rm = res.recipe.members[0]
    assert rm.kind == "composed" and rm.parts == ("mask_only", "gender_only", "age_only")
    assert rm.classes == space.classes
    _, probs = res.recipe.apply({"mask_only": blocks["mask"], "gender_only": blocks["gender"],
                                 "age_only": blocks["age"]})
    np.testing.assert_allclose(probs, softmax(expected), atol=1e-12)


def test_compose_rejects_non_factor_members(tmp_path):
    a = load_oof(write_oof(tmp_path / "a.npz", c=3))
    b = load_oof(write_oof(tmp_path / "b.npz", c=2))
    with pytest.raises(LogitError, match=r"member 'a' .* cannot be composed"):
        compose_members([a, b])
    space = LabelSpace.mask()
    age = load_oof(write_oof(tmp_path / "age.npz", c=3), label_space=space.factor_space("age"))
    mask = load_oof(write_oof(tmp_path / "mask.npz", c=3), label_space=space.factor_space("mask"))
    with pytest.raises(LogitError, match=r"covers factors \['age', 'mask'\], the joint space needs"):
        compose_members([age, mask])
