"""Multi-factor targets (--target gender,age) and the multilabel head (sigmoid per factor level, BCE)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from ensembler.data import load_source
from ensembler.ensemble import load_members
from ensembler.errors import EnsemblerError
from ensembler.heads import joint_log_probs, joint_logits
from ensembler.infer import predict_members
from ensembler.labels import LabelSpace
from ensembler.logits import read_logits
from ensembler.predict import predict
from ensembler.registry import Registry
from ensembler.train import TrainConfig, train_folds
from ensembler.train.losses import TrainLoss, bce_loss

from conftest import write_mask_eval, write_mask_tree


def tiny(**kw):
    base = dict(arch="test_resnet", k=2, epochs=1, img_size=32, pretrained=False, lr=1e-2, workers=0,
                batch_size=16, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def test_factors_space_and_config_rules():
    space = LabelSpace.mask((29, 58))
    ga = space.factors_space(["age", "gender"])  # kept in the parent's order
    assert [f.name for f in ga.factors] == ["gender", "age"] and ga.num_classes == 6
    assert ga.meta["factor"] == "gender,age" and ga.meta["factor_of"]["meta"]["age_bands"] == [29, 58]
    assert tiny(target="age,gender", head="factored").target == "gender,age"
    assert tiny(target="gender,age", head="factored").default_family() == "test_resnet-factored-gender-age"
    with pytest.raises(EnsemblerError, match="^target must be one of"):
        tiny(target="gender,colour")
    with pytest.raises(EnsemblerError, match="names each factor once"):
        tiny(target="age,age")
    assert tiny(head="multilabel").loss == "bce"
    with pytest.raises(EnsemblerError, match="^loss .focal. is a softmax loss; head .multilabel. trains sigmoids"):
        tiny(head="multilabel", loss="focal")


def test_gender_age_model_composes_with_a_mask_family_and_predicts_18_classes(tmp_path, one_torch_thread):
    tree = write_mask_tree(tmp_path / "train", n_profiles=6, size=(16, 20))
    table = load_source(tree)
    reg = Registry(tmp_path / "reg")
    ga = train_folds(table, tiny(target="gender,age", head="factored"), reg, progress=False)
    mask = train_folds(table, tiny(target="mask"), reg, progress=False)
    oof = read_logits(ga.oof_path)
    assert oof.logits.shape == (42, 6) and oof.label_space.meta["factor"] == "gender,age"
    # its labels are gender*3 + age of each image
    f = table.label_space.factor_indices(table.labels)
    pos = {i: n for n, i in enumerate(table.ids)}
    rows = [pos[i] for i in oof.ids]
    np.testing.assert_array_equal(oof.labels, (f[1] * 3 + f[2])[rows])
    # tune-weights' members: 'all' composes the two families into the 18-class space
    members = load_members("all", registry=reg)
    assert [m.name for m in members] == [f"{mask.family}+{ga.family}"]
    composed = members[0]
    assert composed.num_classes == 18
    np.testing.assert_array_equal(composed.labels, table.labels[[pos[i] for i in composed.ids]])
    mask_oof = read_logits(mask.oof_path)
    lp_m = torch.log_softmax(torch.tensor(mask_oof.logits, dtype=torch.float64), 1).numpy()
    lp_ga = torch.log_softmax(torch.tensor(oof.logits, dtype=torch.float64), 1).numpy()
    m_rows = {i: n for n, i in enumerate(mask_oof.ids)}
    g_rows = {i: n for n, i in enumerate(oof.ids)}
    want = np.stack([np.add.outer(lp_m[m_rows[i]], lp_ga[g_rows[i]]).ravel() for i in composed.ids])
    np.testing.assert_allclose(composed.logits, want, atol=1e-6)
    # predict on eval data: --members all composes them and writes an 18-class submission
    ev = load_source(write_mask_eval(tmp_path / "eval", n=5))
    res = predict(ev, reg, members="all", cache_dir=tmp_path / "cache", progress=False,
                  out=tmp_path / "subs" / "composed.csv")
    assert res.members == [f"{mask.family}+{ga.family}"] and res.label_space.num_classes == 18
    parts = predict_members(ev, [mask.family, ga.family], reg, cache_dir=tmp_path / "cache", progress=False)
    joint = np.stack([np.add.outer(a, b).ravel() for a, b in zip(
        torch.log_softmax(torch.tensor(parts[mask.family].logits, dtype=torch.float64), 1).numpy(),
        torch.log_softmax(torch.tensor(parts[ga.family].logits, dtype=torch.float64), 1).numpy())])
    np.testing.assert_array_equal(res.pred, joint.argmax(1))
    assert (tmp_path / "subs" / "composed.csv").read_text().startswith("ImageID,ans")


def test_multilabel_joint_log_probs_are_the_sigmoids_given_one_level_per_factor():
    space = LabelSpace.mask()
    z = torch.randn(4, 8, dtype=torch.float64) * 2
    got = joint_log_probs(z, "multilabel", space)
    # by enumeration: P(m, g, a) ∝ prod over factors of σ(z_on) prod_{off} (1 - σ(z_off))
    sig = torch.sigmoid(z)
    blocks = [(0, 3), (3, 5), (5, 8)]
    want = torch.zeros(4, 18, dtype=torch.float64)
    for j, (m, g, a) in enumerate(itertools.product(range(3), range(2), range(3))):
        on = [blocks[0][0] + m, blocks[1][0] + g, blocks[2][0] + a]
        p = torch.ones(4, dtype=torch.float64)
        for k in range(8):
            p = p * (sig[:, k] if k in on else 1 - sig[:, k])
        want[:, j] = p
    want = torch.log(want / want.sum(1, keepdim=True))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(joint_logits(z, "multilabel", space), want)
    # an unfactored space: one block of C sigmoids
    flat = LabelSpace(("a", "b", "c"))
    torch.testing.assert_close(joint_log_probs(z[:, :3], "multilabel", flat), torch.log_softmax(z[:, :3], 1))


def test_bce_per_factor_block_matches_torch():
    z = torch.randn(6, 8)
    y = torch.tensor([0, 5, 17, 9, 3, 12])
    loss = TrainLoss("bce", factor_sizes=(3, 2, 3))(z, y)
    m, g, a = y // 6, (y // 3) % 2, y % 3
    onehot = torch.cat([torch.nn.functional.one_hot(m, 3), torch.nn.functional.one_hot(g, 2),
                        torch.nn.functional.one_hot(a, 3)], 1).float()
    want = torch.nn.functional.binary_cross_entropy_with_logits(z, onehot, reduction="sum") / 6
    torch.testing.assert_close(loss, want)
    assert bce_loss(z[:, :3], m).ndim == 0


@pytest.mark.slow
def test_multilabel_head_trains_and_registers(tmp_path, one_torch_thread):
    tree = write_mask_tree(tmp_path / "train", n_profiles=6, size=(16, 20))
    table = load_source(tree)
    reg = Registry(tmp_path / "reg")
    res = train_folds(table, tiny(head="multilabel"), reg, progress=False)
    entry = reg.family(res.family)[0]
    assert entry.head == "multilabel" and entry.train_config["loss"] == "bce"
    oof = read_logits(res.oof_path)
    assert oof.logits.shape == (42, 18)  # joint log-probs from 8 sigmoid outputs
    np.testing.assert_allclose(np.exp(oof.logits.astype(np.float64)).sum(1), 1.0, atol=1e-4)
    model = reg.load_model(entry)
    assert model.get_classifier().out_features == 8
