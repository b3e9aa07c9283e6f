"""The flows between commands: per-factor families, age bands, splits, the metric rule, registry list."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ensembler.cli import main
from ensembler.data import load_source
from ensembler.ensemble import load_members
from ensembler.errors import DataError, LogitError
from ensembler.evaluate import evaluate
from ensembler.labels import LabelSpace
from ensembler.logits import Logits, write_logits
from ensembler.models import create_model
from ensembler.preprocess import Preprocess
from ensembler.registry import Registry

from conftest import write_mask_tree

PRE = Preprocess(input_size=(32, 24), crop_pct=1.0, interpolation="bilinear", mean=(0.5, 0.5, 0.5),
                 std=(0.5, 0.5, 0.5))


def _family(reg, name, space, *, target=None, n=120, k=3, seed=0, folds=None, rng=None, train_config=None):
    """A registered one-fold family with a synthetic OOF file over ids img000..."""
    rng = rng or np.random.default_rng(0)
    ids = np.array([f"img{i:03d}" for i in range(n)])
    y = np.arange(n) % space.num_classes
    z = (np.eye(space.num_classes)[y] * 1.5 + rng.normal(size=(n, space.num_classes))).astype(np.float32)
    folds = np.arange(n) % k if folds is None else folds
    rel = f"{name}/oof.npz"
    write_logits(reg.path(rel), Logits(ids, z, label_space=space, labels=y, folds=folds, name=name,
                                       meta={"k": k, "split_seed": seed}))
    reg.add(create_model("test_resnet", label_space=space), family=name, fold=0, arch="test_resnet", head="flat",
            label_space=space, preprocess=PRE, oof=rel, target=target,
            train_config=train_config or {"loss": "ce", "k": k, "seed": seed})
    return y


def test_tune_weights_all_over_per_factor_families_composes_them(tmp_path, capsys):
    reg = Registry(tmp_path / "reg")
    space = LabelSpace.mask()
    # labels consistent across factor models: row i is joint class i % 18
    n = 180
    joint_y = np.arange(n) % 18
    rng = np.random.default_rng(1)
    for f, idx in (("mask", 0), ("gender", 1), ("age", 2)):
        fs = space.factor_space(f)
        y = np.asarray(space.factor_indices(joint_y)[idx])
        z = (np.eye(fs.num_classes)[y] * 2 + rng.normal(size=(n, fs.num_classes))).astype(np.float32)
        rel = f"only-{f}/oof.npz"
        ids = np.array([f"img{i:03d}" for i in range(n)])
        write_logits(reg.path(rel), Logits(ids, z, label_space=fs, labels=y, folds=np.arange(n) % 3, name=f))
        reg.add(create_model("test_resnet", label_space=fs), family=f"only-{f}", fold=0, arch="test_resnet",
                head="flat", label_space=fs, preprocess=PRE, oof=rel, target=f)
    members = load_members("all", registry=reg)
    assert [m.name for m in members] == ["only-mask+only-gender+only-age"]
    assert members[0].num_classes == 18
    np.testing.assert_array_equal(members[0].labels, joint_y)
    # A family left out: the message names the composition instead of "class-count mismatch".
    with pytest.raises(LogitError, match=r"per-factor models .*only-age predicts age.*compose|pass --members"):
        load_members("only-mask,only-age", registry=reg)
    rc = main(["tune-weights", "--registry", str(tmp_path / "reg"), "--no-plots", "--rounds", "3",
               "--out", str(tmp_path / "r.json")])
    assert rc == 0
    assert "only-mask+only-gender+only-age" in capsys.readouterr().out


def test_families_with_different_splits_are_refused_for_honest_scores(tmp_path):
    reg = Registry(tmp_path / "reg")
    space = LabelSpace(("a", "b", "c"))
    _family(reg, "k3", space, k=3)
    _family(reg, "k3-again", space, k=3, folds=(np.arange(120) + 1) % 3)  # same partition, renumbered: fine
    assert len(load_members("k3,k3-again", registry=reg)) == 2
    _family(reg, "k5", space, k=5, seed=7)
    with pytest.raises(LogitError, match=r"folds disagree with 'k3'.*Members 'k3' \(k=3, split seed 0\) and 'k5' "
                                         r"\(k=5, split seed 7\) were trained on different splits"):
        load_members("k3,k5", registry=reg)


def test_registry_list_shows_target_head_loss_age_bands_k_and_seed(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    from ensembler.cli import _common

    _common.console.cache_clear()
    reg = Registry(tmp_path / "reg")
    space = LabelSpace.mask((29, 58))
    _family(reg, "age-fam", space.factor_space("age"), target="age", k=4, seed=3,
            train_config={"loss": "focal", "k": 4, "seed": 3})
    _family(reg, "mask-fam", space.factor_space("mask"), target="mask", train_config={"loss": "f1", "k": 5, "seed": 0})
    assert main(["registry", "list", "--registry", str(tmp_path / "reg")]) == 0
    out = capsys.readouterr().out
    for word in ("target", "loss", "age bands", "split seed", "focal", "29,58"):
        assert word in out, word
    age_row = next(line for line in out.splitlines() if "age-fam-fold0" in line)
    assert "age" in age_row and "focal" in age_row and "29,58" in age_row and " 4 " in age_row and " 3 " in age_row
    mask_row = next(line for line in out.splitlines() if "mask-fam-fold0" in line)
    assert "29,58" not in mask_row  # a mask-only model does not depend on the age bands


def test_evaluate_takes_age_bands_from_the_member_or_refuses(tmp_path, capsys):
    torch.manual_seed(0)
    root = write_mask_tree(tmp_path / "train", n_profiles=6)  # ages 20, 25, 45, 59, 60, 70
    reg = Registry(tmp_path / "reg")
    space = LabelSpace.mask((29, 58))
    reg.add(create_model("test_resnet", label_space=space), family="swin", fold=None, arch="test_resnet",
            head="flat", label_space=space, preprocess=PRE)
    default = load_source(root)  # 30/60: age 59 is "middle" here, "old" for the model
    with pytest.raises(DataError, match=r"labelled with age bands 30,60 but member 'swin' was trained with 29,58: "
                                        r"pass --age-bands 29,58"):
        evaluate(default, reg, members="swin", cache_dir=tmp_path / "cache", progress=False)
    right = evaluate(load_source(root, age_bands=(29, 58)), reg, members="swin", cache_dir=tmp_path / "cache",
                     progress=False)
    rc = main(["evaluate", "--data", str(root), "--registry", str(tmp_path / "reg"), "--members", "swin",
               "--cache-dir", str(tmp_path / "cache")])
    assert rc == 0
    out = capsys.readouterr()
    assert "age bands 29,58: taken from the members" in out.err
    assert f"macro-F1 {right.f1:.4f}" in out.out
    # An explicit, wrong --age-bands is refused with the flag to pass.
    rc = main(["evaluate", "--data", str(root), "--age-bands", "30,60", "--registry", str(tmp_path / "reg"),
               "--members", "swin", "--cache-dir", str(tmp_path / "cache")])
    assert rc == 2
    assert "pass --age-bands 29,58" in capsys.readouterr().err


def test_evaluate_macro_f1_is_sklearns_with_a_flag_for_all_classes(tmp_path, capsys):
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    space = LabelSpace.mask()
    n = 300
    y = rng.integers(0, 15, n)  # classes 15..17 never occur
    z = (np.eye(18)[y] * 1.0 + rng.normal(size=(n, 18))).astype(np.float32)
    z[:, 15:] -= 10  # and are never predicted
    path = write_logits(tmp_path / "oof.npz", Logits(np.array([f"i{k}" for k in range(n)]), z, label_space=space,
                                                     labels=y, folds=np.arange(n) % 3))
    pred = z.argmax(1)
    res = evaluate(logits=path)
    assert res.f1 == pytest.approx(f1_score(y, pred, average="macro"))
    fixed = evaluate(logits=path, f1_labels="all")
    assert fixed.f1 == pytest.approx(f1_score(y, pred, average="macro", labels=range(18), zero_division=0))
    assert fixed.f1 == pytest.approx(res.f1 * 15 / 18)
    assert main(["evaluate", "--logits", str(path), "--f1-labels", "all"]) == 0
    assert f"macro-F1 (all classes) {fixed.f1:.4f}" in capsys.readouterr().out


def test_tune_weights_no_honest_writes_a_recipe(tmp_path):
    # --no-honest left NaN candidate means in the recipe, and its (strict JSON) hash crashed.
    from ensembler.ensemble import Recipe

    rng = np.random.default_rng(0)
    n = 90
    y = rng.integers(0, 3, n)
    ids = np.array([f"i{k}" for k in range(n)])
    files = []
    for name in ("a", "b"):
        p = tmp_path / f"{name}.npz"
        np.savez(p, ids=ids, logits=(np.eye(3)[y] + rng.normal(size=(n, 3))).astype(np.float32), labels=y,
                 folds=np.arange(n) % 3)
        files.append(str(p))
    out = tmp_path / "r.json"
    assert main(["tune-weights", "--oof", *files, "--no-honest", "--no-plots", "--out", str(out)]) == 0
    assert Recipe.load(out).hash()


def test_evaluate_logits_file_age_bands_taken_from_the_file_or_refused(tmp_path, capsys):
    root = write_mask_tree(tmp_path / "train", n_profiles=6)
    t29 = load_source(root, age_bands=(29, 58))
    rng = np.random.default_rng(0)
    z = (np.eye(18)[t29.labels] * 2 + rng.normal(size=(len(t29), 18))).astype(np.float32)
    path = write_logits(tmp_path / "oof.npz", Logits(t29.ids, z, label_space=LabelSpace.mask((29, 58)),
                                                     labels=t29.labels, folds=np.arange(len(t29)) % 2))
    with pytest.raises(DataError, match=r"labelled with age bands 30,60 but logits file .*oof.npz was made with "
                                        r"29,58: pass --age-bands 29,58"):
        evaluate(load_source(root), logits=path)
    want = evaluate(t29, logits=path)
    assert main(["evaluate", "--data", str(root), "--logits", str(path)]) == 0
    out = capsys.readouterr()
    assert "age bands 29,58: taken from the members" in out.err and f"macro-F1 {want.f1:.4f}" in out.out
