"""OOF TTA report: each fold checkpoint over its own validation rows, view by view, honest scores."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from ensembler.cli import main
from ensembler.data import decode_image, load_source
from ensembler.ensemble.members import load_members, load_oof
from ensembler.errors import LogitError
from ensembler.infer import engine, oof_tta, tta_report
from ensembler.logits import read_logits, write_logits
from ensembler.metrics import classification_scores
from ensembler.registry import Registry
from ensembler.train import TrainConfig, train_folds


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A k=3 test_resnet family trained 1 epoch on 96 digits (32 px), from a CSV manifest."""
    from ensembler.data import digits_folder

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("oof_tta")
    digits = load_source("digits", cache_dir=digits_folder(root / "digits_cache"))
    rng = np.random.default_rng(0)
    sub = digits.subset(np.sort(rng.choice(len(digits), 96, replace=False)))
    f = sub.frame
    manifest = root / "train.csv"
    names = sub.label_space.classes
    lines = ["path,label,group,id"] + [
        f"{p},{names[int(y)]},{g},{i}" for p, y, g, i in zip(f["path"], f["label"], f["group"], f["id"])
    ]
    manifest.write_text("\n".join(lines) + "\n")
    table = load_source(str(manifest))
    registry = Registry(root / "registry")
    config = TrainConfig(arch="test_resnet", k=3, epochs=1, img_size=32, pretrained=False, lr=1e-2, workers=0,
                         batch_size=32, device="cpu")
    result = train_folds(table, config, registry, progress=False)
    return table, registry, result.family, manifest


def _oof(registry, fam):
    with np.load(registry.family_dir(fam) / "oof.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def test_identity_view_equals_the_family_oof_logits(family, tmp_path):
    table, registry, fam, _ = family
    rep = tta_report(table, fam, registry, tta="hflip", progress=False, cache_dir=tmp_path)
    oof = _oof(registry, fam)
    np.testing.assert_array_equal(rep.ids, oof["ids"])
    np.testing.assert_allclose(rep.identity_logits, oof["logits"], rtol=1e-5, atol=1e-5)
    assert rep.identity_matches and rep.identity_note == ""
    assert rep.identity_max_abs_diff < 1e-5
    # The no-TTA row is the family's OOF score; every row is scored over all OOF rows.
    base = classification_scores(oof["labels"], oof["logits"])
    assert rep.baseline.name == oof_tta.IDENTITY_ROW
    assert rep.baseline.f1 == pytest.approx(base["f1"]) and rep.baseline.acc == pytest.approx(base["acc"])
    assert rep.baseline.logloss == pytest.approx(base["logloss"], rel=1e-5)
    assert [s.name for s in rep.scores] == [oof_tta.IDENTITY_ROW, "identity", "hflip", "merged mean-logits"]


def test_hflip_view_and_merge_match_an_independent_forward(family, tmp_path):
    table, registry, fam, _ = family
    rep = tta_report(table, fam, registry, tta="hflip", progress=False, cache_dir=tmp_path)
    assert rep.views == ["identity", "hflip"]
    ident, flipped = rep.view_logits[:, 0], rep.view_logits[:, 1]
    assert not np.allclose(ident, flipped)  # the view does change the prediction

    # The hflip view of each row, recomputed by hand with that row's fold checkpoint.
    paths = dict(zip(table.ids, table.paths))
    for e in registry.family(fam):
        rows = np.flatnonzero(rep.folds == e.fold)
        model = registry.load_model(e)
        tf = e.pre.geometry_transform()
        x = e.pre.normalize(torch.stack([tf(decode_image(paths[i])) for i in rep.ids[rows]]))
        with torch.inference_mode():
            expected = model(torch.flip(x, dims=(3,))).numpy()
        np.testing.assert_allclose(flipped[rows], expected, rtol=1e-4, atol=1e-4)

    merged = rep.merged_logits["mean-logits"]
    np.testing.assert_allclose(merged, (ident + flipped) / 2, rtol=1e-6, atol=1e-6)
    want = classification_scores(rep.labels, (ident + flipped) / 2)
    assert rep.merged.f1 == pytest.approx(want["f1"]) and rep.merged.logloss == pytest.approx(want["logloss"])
    assert rep.merged.delta_logloss == pytest.approx(want["logloss"] - rep.baseline.logloss)
    hflip = rep.score("hflip")
    assert hflip.f1 == pytest.approx(classification_scores(rep.labels, flipped)["f1"])


def test_each_fold_checkpoint_sees_only_its_own_validation_rows(family, tmp_path, monkeypatch):
    table, registry, fam, _ = family
    loaders, forwards = [], []
    real_loader, real_views = engine.make_decode_loader, engine._views_joint

    def spy_loader(paths, pre, *a, **kw):
        loaders.append(list(paths))
        return real_loader(paths, pre, *a, **kw)

    def spy_views(fwd, x, plan, entry, *a, **kw):
        forwards.append((entry.fold, int(x.shape[0]), len(plan)))
        return real_views(fwd, x, plan, entry, *a, **kw)

    monkeypatch.setattr(engine, "make_decode_loader", spy_loader)
    monkeypatch.setattr(engine, "_views_joint", spy_views)
    rep = tta_report(table, fam, registry, tta="flip", progress=False, cache_dir=tmp_path, batch_size=8,
                     use_cache=False)
    oof = _oof(registry, fam)
    paths = dict(zip(table.ids, table.paths))
    folds = [e.fold for e in registry.family(fam)]
    assert folds == [0, 1, 2] and len(loaders) == 3
    for fold, seen in zip(folds, loaders):
        own = oof["ids"][oof["folds"] == fold]
        assert seen == [paths[i] for i in own]  # exactly its validation rows, in OOF order
        images = [b for f, b, v in forwards if f == fold]
        assert sum(images) == len(own) and all(v == 4 for f, _, v in forwards if f == fold)
    assert sum(len(s) for s in loaders) == len(oof["ids"]) == len(table)  # each row once, by its own fold
    assert rep.meta["rows_per_fold"] == {f: int((oof["folds"] == f).sum()) for f in folds}


def test_written_oof_tta_file_loads_as_an_oof_member(family, tmp_path):
    table, registry, fam, _ = family
    rep = tta_report(table, fam, registry, tta="hflip+center-crop=28", progress=False, cache_dir=tmp_path)
    assert rep.output == registry.family_dir(fam) / f"{fam}_oof_tta_hflip_center-crop_28x28.npz"
    assert rep.output.with_suffix(".json").is_file()
    m = load_oof(rep.output)
    oof = _oof(registry, fam)
    np.testing.assert_array_equal(m.ids, oof["ids"])
    np.testing.assert_array_equal(m.labels, oof["labels"])
    np.testing.assert_array_equal(m.folds, oof["folds"])
    np.testing.assert_array_equal(m.logits, rep.merged_logits["mean-logits"])
    assert m.label_space is not None and m.label_space.num_classes == m.num_classes
    # tune-weights names --oof members by file stem: no '+' (composition), and the family is in it.
    members = load_members(oof_files=[rep.output, registry.family_dir(fam) / "oof.npz"])
    assert [x.name for x in members] == [rep.output.stem, "oof"]


def test_plan_without_identity_still_scores_no_tta_and_every_merge(family, tmp_path, monkeypatch):
    table, registry, fam, _ = family
    rep = tta_report(table, fam, registry, tta="center-crop=28", merge="mean-probs", all_merges=True,
                     progress=False, cache_dir=tmp_path)
    assert rep.views == ["crop-center-28x28"]
    np.testing.assert_allclose(rep.identity_logits, _oof(registry, fam)["logits"], rtol=1e-5, atol=1e-5)
    assert not np.allclose(rep.view_logits[:, 0], rep.identity_logits)
    assert [s.name for s in rep.scores if s.kind == "merged"] == [
        "merged mean-probs", "merged mean-logits", "merged gmean-probs", "merged max-probs"]
    assert rep.output.name == f"{fam}_oof_tta_center-crop_28x28_mean-probs.npz"

    # A second run is served from the per-view cache: no forward, same numbers.
    monkeypatch.setattr(oof_tta, "checkpoint_view_logits", lambda *a, **k: pytest.fail("forward ran despite the cache"))
    again = tta_report(table, fam, registry, tta="center-crop=28", merge="mean-probs", progress=False,
                       cache_dir=tmp_path)
    assert again.meta["cached_folds"] == [0, 1, 2]
    np.testing.assert_array_equal(again.view_logits, rep.view_logits)


def test_missing_ids_name_the_oof_file_and_write_nothing(family, tmp_path):
    table, registry, fam, _ = family
    dropped = table.ids[[3, 10]]
    before = sorted(p.name for p in registry.family_dir(fam).iterdir())
    with pytest.raises(LogitError, match=r"2 id\(s\) of OOF file .*oof\.npz are not in the data") as err:
        tta_report(table.subset(~np.isin(table.ids, dropped)), fam, registry, tta="hflip", progress=False,
                   cache_dir=tmp_path)
    assert all(repr(str(i)) in str(err.value) for i in dropped)
    assert sorted(p.name for p in registry.family_dir(fam).iterdir()) == before


def test_identity_mismatch_is_reported_with_its_size_not_raised(family, tmp_path):
    table, registry, fam, _ = family
    root = tmp_path / "registry"
    shutil.copytree(registry.root, root)
    copy = Registry(root)
    path = copy.family_dir(fam) / "oof.npz"
    oof = read_logits(path)
    write_logits(path, oof.replace(logits=oof.logits + np.float32(0.5)))  # as if the trainer preprocessed otherwise
    rep = tta_report(table, fam, copy, tta="hflip", progress=False, cache_dir=tmp_path / "cache")
    assert not rep.identity_matches
    assert rep.identity_max_abs_diff == pytest.approx(0.5, abs=1e-4)
    assert "eval transform" in rep.identity_note and "oof.npz" in rep.identity_note


def test_cli_prints_the_table_and_the_written_file(family, tmp_path, capsys, monkeypatch, wide_console):
    table, registry, fam, manifest = family
    monkeypatch.setenv("ENSEMBLER_CACHE", str(tmp_path))
    rc = main(["tta-report", "--data", str(manifest), "--registry", str(registry.root), "--family", fam,
               "--tta", "hflip", "--all-merges", "--workers", "0"])
    out = capsys.readouterr().out
    assert rc == 0
    for row in ("no TTA (identity)", "view hflip", "merged mean-logits", "merged gmean-probs", "macro-F1",
                "log-loss", "Δ F1"):
        assert row in out
    assert f"wrote {registry.family_dir(fam) / f'{fam}_oof_tta_hflip.npz'}" in out
    assert "identity view = oof.npz logits" in out

    rc = main(["tta-report", "--data", str(manifest), "--registry", str(registry.root), "--family", "nope",
               "--tta", "hflip"])
    assert rc == 2 and "nope" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:.*span fewer than k=2 groups")  # 9 profiles cannot cover 18 classes
def test_factored_head_views_are_joint_log_probs(tmp_path):
    from conftest import write_mask_tree

    from ensembler.labels import factored_to_joint_logprobs

    table = load_source(write_mask_tree(tmp_path / "train", n_profiles=9, size=(16, 20)))
    registry = Registry(tmp_path / "registry")
    config = TrainConfig(arch="test_resnet", head="factored", k=2, epochs=1, img_size=32, pretrained=False,
                         lr=1e-2, workers=0, batch_size=16, device="cpu")
    fam = train_folds(table, config, registry, progress=False).family
    rep = tta_report(table, fam, registry, tta="hflip", progress=False, cache_dir=tmp_path / "cache")
    assert rep.view_logits.shape == (63, 2, 18)
    np.testing.assert_allclose(rep.identity_logits, _oof(registry, fam)["logits"], rtol=1e-5, atol=1e-5)
    # Each view is turned into joint log-probabilities before merging (as the engine does).
    lse = np.log(np.exp(rep.view_logits.astype(np.float64)).sum(-1))
    np.testing.assert_allclose(lse, 0.0, atol=1e-4)
    paths = dict(zip(table.ids, table.paths))
    for e in registry.family(fam):
        rows = np.flatnonzero(rep.folds == e.fold)
        tf = e.pre.geometry_transform()
        x = e.pre.normalize(torch.stack([tf(decode_image(paths[i])) for i in rep.ids[rows]]))
        with torch.inference_mode():
            out = registry.load_model(e)(torch.flip(x, dims=(3,)))
        expected = factored_to_joint_logprobs(out, e.labels.factor_sizes).numpy()
        np.testing.assert_allclose(rep.view_logits[rows, 1], expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(rep.merged_logits["mean-logits"], rep.view_logits.mean(axis=1), atol=1e-6)
