"""Grouped, stratified k-fold split (ensembler.data.split_folds / check_folds)."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.model_selection import StratifiedGroupKFold

from ensembler.data import SampleTable, check_folds, fold_class_counts, load_source, split_folds
from ensembler.errors import DataError
from ensembler.labels import LabelSpace


def _table(labels, groups, num_classes=None) -> SampleTable:
    labels = np.asarray(labels)
    n = len(labels)
    c = num_classes or int(labels.max()) + 1
    frame = pd.DataFrame({
        "id": [f"r{i:05d}" for i in range(n)],
        "path": [f"/nowhere/r{i}.png" for i in range(n)],
        "label": labels,
        "group": [str(g) for g in groups],
    })
    return SampleTable(frame, LabelSpace(tuple(f"c{j}" for j in range(max(c, 2)))), {"kind": "test"})


def _grouped_table(n_groups=60, num_classes=4, seed=0) -> SampleTable:
    """Groups of 1-7 images; labels vary inside a group (as the mask photos of one person do)."""
    rng = np.random.default_rng(seed)
    labels, groups = [], []
    for g in range(n_groups):
        size = int(rng.integers(1, 8))
        base = int(rng.integers(0, num_classes))
        for _ in range(size):
            labels.append(base if rng.random() < 0.7 else int(rng.integers(0, num_classes)))
            groups.append(f"g{g}")
    return _table(labels, groups, num_classes)


def _assert_sound(split: SampleTable, table: SampleTable, k: int) -> None:
    folds = split.folds
    assert split.ids.tolist() == table.ids.tolist()  # order and rows unchanged
    assert folds.dtype == np.int64 and set(folds.tolist()) == set(range(k))
    per_group = pd.Series(folds).groupby(split.groups).nunique()
    assert (per_group == 1).all()  # no group straddles folds
    assert len(folds) == len(table)  # every row exactly once


def test_matches_sklearn_stratified_group_kfold():
    table = _grouped_table(n_groups=80, num_classes=5, seed=3)
    split = split_folds(table, k=5, seed=11)
    sgkf = StratifiedGroupKFold(n_splits=5, shuffle=True, random_state=11)
    expected = np.full(len(table), -1)
    for f, (_, val) in enumerate(sgkf.split(np.zeros(len(table)), table.labels, table.groups)):
        expected[val] = f
    assert (split.folds == expected).all()
    # Same class balance per fold as the reference.
    ref = np.zeros((5, 5), dtype=int)
    np.add.at(ref, (table.labels, expected), 1)
    assert (fold_class_counts(split) == ref).all()
    assert split.source["folds"] == {"k": 5, "seed": 11, "method": "StratifiedGroupKFold"}
    assert "fold" not in table.frame.columns  # the input table is left alone


def test_stable_for_a_seed_and_varies_across_seeds():
    table = _grouped_table(seed=1)
    a = split_folds(table, 5, seed=7).folds
    assert (split_folds(table, 5, seed=7).folds == a).all()
    assert any((split_folds(table, 5, seed=s).folds != a).any() for s in range(8, 12))


def test_balance_on_ungrouped_data():
    labels = np.repeat(np.arange(4), [100, 60, 30, 10])
    table = _table(labels, [f"g{i}" for i in range(len(labels))])
    split = split_folds(table, 5, seed=0)
    counts = fold_class_counts(split)
    assert (counts.max(axis=1) - counts.min(axis=1) <= 1).all()  # each class spread evenly
    sizes = counts.sum(axis=0)
    assert sizes.max() - sizes.min() <= 2


@pytest.mark.parametrize("seed", range(25))
def test_disjoint_groups_and_full_coverage_over_seeds(seed):
    table = _grouped_table(n_groups=40, num_classes=3, seed=seed)
    for k in (2, 3, 5):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            split = split_folds(table, k, seed=seed)
        _assert_sound(split, table, k)
        check_folds(split.frame, k)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.lists(st.tuples(st.integers(1, 7), st.integers(0, 4)), min_size=5, max_size=60),
    k=st.integers(2, 5),
    seed=st.integers(0, 2**31 - 1),
)
def test_hypothesis_grouped_folds_are_sound(data, k, seed):
    labels, groups = [], []
    for g, (size, label) in enumerate(data):
        labels += [(label + j) % 5 for j in range(size)]  # mixed labels inside a group
        groups += [g] * size
    table = _table(labels, groups, num_classes=5)
    if len(data) < k or np.bincount(labels).max() < k:
        with pytest.raises(DataError, match=r"(group|fewer than \d+ images)"):
            split_folds(table, k, seed)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        split = split_folds(table, k, seed)
    _assert_sound(split, table, k)


def test_mask_tree_profiles_stay_together(mask_tree):
    table = load_source(mask_tree)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for seed in range(10):
            split = split_folds(table, 4, seed)
            _assert_sound(split, table, 4)
            assert (split.frame.groupby("group")["fold"].count() == 7).all()


def test_too_few_groups_is_an_error_with_counts():
    table = _table([0, 1, 0, 1, 0, 1], ["a", "a", "b", "b", "c", "c"])
    with pytest.raises(DataError, match=r"cannot make 5 folds from 3 group\(s\) \(6 images\).*k <= 3"):
        split_folds(table, 5)


def test_every_class_smaller_than_k_is_an_error():
    table = _table([0, 0, 1, 1, 2], range(5))
    with pytest.raises(DataError, match=r"every class has fewer than 5 images \(the largest has 2\)"):
        split_folds(table, 5)


def test_small_class_warns_naming_it():
    labels = [0] * 20 + [1] * 20 + [2] * 2
    table = _table(labels, range(len(labels)), 3)
    with pytest.warns(UserWarning, match=r"'c2' \(2 images, 2 groups\)") as rec:
        split = split_folds(table, 5, seed=0)
    assert len(rec) == 1  # one warning of ours; sklearn's unnamed one is not repeated
    _assert_sound(split, table, 5)


def test_class_in_few_groups_warns_even_with_many_images():
    labels = [0] * 30 + [1] * 30 + [2] * 14
    groups = list(range(60)) + ["big1"] * 7 + ["big2"] * 7
    table = _table(labels, groups, 3)
    with pytest.warns(UserWarning, match=r"'c2' \(14 images, 2 groups\)"):
        split_folds(table, 5, seed=0)


def test_unlabeled_and_bad_k():
    frame = pd.DataFrame({"id": ["a", "b"], "path": ["/a", "/b"], "label": [pd.NA, pd.NA], "group": ["a", "b"]})
    unlabeled = SampleTable(frame, LabelSpace(("x", "y")), {"kind": "csv", "path": "/t.csv"})
    with pytest.raises(DataError, match=r"cannot split csv data /t\.csv: it is unlabeled"):
        split_folds(unlabeled, 2)
    table = _grouped_table()
    for k in (1, 0, 2.5, True):
        with pytest.raises(DataError, match="k must be an integer >= 2"):
            split_folds(table, k)


def test_check_folds_names_the_offender():
    frame = pd.DataFrame({"id": ["a", "b", "c", "d"], "group": ["g1", "g1", "g2", "g3"], "fold": [0, 1, 1, 0]})
    with pytest.raises(DataError, match=r"group 'g1' is in folds \[0, 1\]"):
        check_folds(frame)
    frame["group"] = ["g1", "g2", "g3", "g4"]
    check_folds(frame, 2)
    with pytest.raises(DataError, match=r"fold\(s\) \[2\] of 3 hold no rows"):
        check_folds(frame, 3)
    frame.loc[3, "fold"] = 4
    with pytest.raises(DataError, match="id 'd' has fold 4, outside 0..1"):
        check_folds(frame, 2)
    with pytest.raises(DataError, match="no 'fold' column"):
        check_folds(frame.drop(columns="fold"))
    frame2 = pd.DataFrame({"id": ["a", "a"], "group": ["g", "h"], "fold": [0, 1]})
    with pytest.raises(DataError, match="id 'a' appears in more than one row"):
        check_folds(frame2)
    frame3 = pd.DataFrame({"id": ["a", "b"], "group": ["g", "h"], "fold": pd.array([0, pd.NA], dtype="Int64")})
    with pytest.raises(DataError, match="id 'b' has no fold"):
        check_folds(frame3)


def test_fold_split():
    table = split_folds(_grouped_table(), 4, seed=2)
    train, valid = table.fold_split(1)
    assert len(train) + len(valid) == len(table)
    assert (valid.folds == 1).all() and (train.folds != 1).all()
    assert not set(train.groups) & set(valid.groups)
    with pytest.raises(DataError, match="fold 9 not in"):
        table.fold_split(9)
