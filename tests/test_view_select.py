"""TTA views chosen on OOF per member (tune-weights --tta), and recipes tuned on TTA'd OOF that
predict: the recipe names registry members and their plans, predict runs exactly those views."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ensembler.cli import main
from ensembler.data import load_source
from ensembler.ensemble import Recipe, tune_weights
from ensembler.infer import engine, parse_tta, predict_members, select_views
from ensembler.infer.views import TTAError
from ensembler.predict import predict
from ensembler.registry import Registry
from ensembler.train import TrainConfig, train_folds
from ensembler.view_select import tune_views

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------- synthetic views
def synthetic_views(n=1500, c=5, seed=0):
    """Two families x three views; the 'bad' view of each is mostly wrong (it hurts when merged)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    folds = rng.integers(0, 4, n)
    onehot = np.eye(c)[y]
    wrong = np.eye(c)[(y + 1 + rng.integers(0, c - 1, n)) % c]
    pairs, merged = {}, {}
    for fam, s in (("a", 1.6), ("b", 1.3)):
        views = {"identity": onehot * s + rng.normal(size=(n, c)),
                 "hflip": onehot * s + rng.normal(size=(n, c)),
                 "bad": wrong * 2.5 + onehot * 0.3 + rng.normal(size=(n, c))}
        for v, z in views.items():
            pairs[f"{fam}@{v}"] = z
        merged[fam] = np.mean(list(views.values()), axis=0)
    return pairs, merged, y, folds


@pytest.mark.parametrize("method", ["caruana", "scipy"])
def test_view_selection_drops_the_view_that_hurts_and_beats_all_views_honestly(method):
    pairs, merged, y, folds = synthetic_views()
    chosen = tune_weights(pairs, y, folds, method=method, rounds=25)
    all_views = tune_weights(merged, y, folds, method=method, rounds=25)
    w = dict(zip(chosen.recipe.names, chosen.recipe.weights))
    assert w["a@bad"] == 0 and w["b@bad"] == 0, w
    assert w["a@identity"] > 0 and w["a@hflip"] > 0
    # The honest score re-selects with each fold held out: the selection is inside it.
    assert chosen.honest["mean"] > all_views.honest["mean"] + 0.02, (chosen.honest["mean"], all_views.honest["mean"])
    gains = [chosen.honest["per_fold"][f] - all_views.honest["per_fold"][f] for f in chosen.honest["per_fold"]]
    assert min(gains) > 0
    assert {r["a"] for r in chosen.diversity} | {r["b"] for r in chosen.diversity} == set(pairs)


def test_plan_at_views_keeps_only_those_views():
    sub = parse_tta("flip@hflip,identity")
    assert sub.spec == "flip@identity,hflip" and len(sub) == 2
    assert [v.name for v in sub.views] == ["identity", "hflip"]
    assert select_views("hflip", ["identity", "hflip"]).spec == "hflip"  # every view kept: the plan itself
    assert select_views(sub, ["vflip"]).spec == "flip@vflip"
    with pytest.raises(TTAError, match="TTA plan 'flip' has no view 'rot90'; its views: identity, vflip, hflip"):
        parse_tta("flip@rot90")
    with pytest.raises(TTAError, match="no view names after '@'"):
        parse_tta("flip@")
    assert not parse_tta("d4@identity,hflip").needs_square and parse_tta("d4@rot90").needs_square


# ---------------------------------------------------------------------------- a real family
@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A k=2 test_resnet family trained 1 epoch on 64 digits (32 px), from a CSV manifest."""
    from ensembler.data import digits_folder

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("view_select")
    digits = load_source("digits", cache_dir=digits_folder(root / "digits_cache"))
    rng = np.random.default_rng(0)
    sub = digits.subset(np.sort(rng.choice(len(digits), 64, replace=False)))
    f = sub.frame
    manifest = root / "train.csv"
    names = sub.label_space.classes
    manifest.write_text("\n".join(["path,label,group,id"] + [
        f"{p},{names[int(y)]},{g},{i}" for p, y, g, i in zip(f["path"], f["label"], f["group"], f["id"])]) + "\n")
    table = load_source(str(manifest))
    registry = Registry(root / "registry")
    config = TrainConfig(arch="test_resnet", k=2, epochs=1, img_size=32, pretrained=False, lr=1e-2, workers=0,
                         batch_size=32, device="cpu")
    fam = train_folds(table, config, registry, progress=False).family
    return table, registry, fam, manifest, root


def _count_views(monkeypatch):
    """Every forward of the engine: (checkpoint id, images, view names)."""
    calls = []
    real = engine._views_joint

    def spy(fwd, x, plan, entry, *a, **kw):
        calls.append((entry.id, int(x.shape[0]), tuple(v.name for v in plan.views)))
        return real(fwd, x, plan, entry, *a, **kw)

    monkeypatch.setattr(engine, "_views_joint", spy)
    return calls


def _cli(monkeypatch, argv):
    from ensembler.cli import _common

    monkeypatch.setenv("COLUMNS", "200")
    _common.console.cache_clear()
    _common.err_console.cache_clear()
    return main(argv)


def test_recipe_tuned_with_tta_runs_exactly_the_chosen_views(family, tmp_path, monkeypatch, capsys):
    table, registry, fam, manifest, _ = family
    cache = tmp_path / "cache"
    monkeypatch.setenv("ENSEMBLER_CACHE", str(cache))
    recipe_path = tmp_path / "views.json"
    rc = _cli(monkeypatch, ["tune-weights", "--registry", str(registry.root), "--members", fam, "--tta", "hflip",
                            "--data", str(manifest), "--workers", "0", "--rounds", "10", "--no-plots",
                            "--out", str(recipe_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"{fam}@identity" in out and f"{fam}@hflip" in out and "diversity on OOF rows" in out
    assert f"views chosen for {fam}:" in out and "every view merged" in out
    recipe = Recipe.load(recipe_path)
    active = recipe.active_members
    assert active and all(m.member == fam and m.kind == "family" for m in active)
    chosen = {m.name: m.tta for m in active}
    assert set(chosen.values()) <= {"hflip@identity", "hflip@hflip"}

    calls = _count_views(monkeypatch)
    res = predict(table, registry, recipe=recipe_path, cache_dir=cache, progress=False, use_cache=False,
                  out=tmp_path / "subs" / "v.csv")
    ckpts = sorted(e.id for e in registry.family(fam))
    ran = sorted((cid, views) for cid, _, views in calls)
    want = sorted((cid, (parse_tta(t).views[0].name,)) for t in chosen.values() for cid in ckpts)
    assert sorted(set(ran)) == want  # each checkpoint ran each chosen view, and nothing else
    for cid, views in set(ran):  # ... over every image once
        assert sum(b for c, b, v in calls if (c, v) == (cid, views)) == len(table)
    # The blend is the recipe applied to each chosen view's own logits.
    own = {m.name: predict_members(table, fam, registry, tta=m.tta, cache_dir=cache, progress=False)[fam].logits
           for m in active}
    pred, probs = recipe.apply(own)
    np.testing.assert_allclose(res.probs, probs, atol=1e-6)
    row = json.loads((tmp_path / "subs" / "ledger.jsonl").read_text().splitlines()[-1])
    assert {m["name"]: m["tta"] for m in row["members"]} == chosen
    # Told otherwise (--tta given), every member runs that plan instead.
    calls.clear()
    told = predict(table, registry, recipe=recipe_path, tta="hflip", cache_dir=cache, progress=False,
                   use_cache=False)
    assert {v for _, _, v in calls} == {("identity", "hflip")}
    assert told.inputs["tta_replaced"] == chosen and told.inputs["tta"] == "hflip"


def test_readme_flow_tta_report_then_tune_on_its_file_then_predict(family, tmp_path, monkeypatch, capsys):
    """judge TTA with tta-report, blend with its TTA'd OOF file, submit: the recipe names the family
    and the plan, and predict runs that plan without being told."""
    table, registry, fam, manifest, root = family
    cache = tmp_path / "cache"
    monkeypatch.setenv("ENSEMBLER_CACHE", str(cache))
    reg = ["--registry", str(registry.root)]
    assert _cli(monkeypatch, ["tta-report", "--data", str(manifest), *reg, "--family", fam, "--tta", "hflip",
                              "--workers", "0"]) == 0
    tta_file = registry.family_dir(fam) / f"{fam}_oof_tta_hflip.npz"
    recipe_path = tmp_path / "recipe.json"
    assert _cli(monkeypatch, ["tune-weights", *reg, "--oof", str(tta_file), "--no-plots", "--out",
                              str(recipe_path)]) == 0
    recipe = Recipe.load(recipe_path)
    (member,) = recipe.members
    assert member.name == tta_file.stem and member.kind == "family" and member.member == fam
    assert member.tta == "hflip" and member.merge == "mean-logits"
    assert sorted(member.sha256) == sorted(e.sha256 for e in registry.family(fam))
    capsys.readouterr()

    calls = _count_views(monkeypatch)
    subs = tmp_path / "submissions"
    rc = _cli(monkeypatch, ["predict", "--data", str(manifest), *reg, "--recipe", str(recipe_path), "--workers", "0",
                            "--no-cache", "--out", str(subs / "tta.csv")])
    assert rc == 0, capsys.readouterr()
    assert {v for _, _, v in calls} == {("identity", "hflip")}  # the recipe's plan, without --tta
    engine_out = predict_members(table, fam, registry, tta="hflip", cache_dir=cache, progress=False)
    pred, _ = recipe.apply({tta_file.stem: engine_out[fam].logits})
    import pandas as pd

    assert pd.read_csv(subs / "tta.csv")["label"].tolist() == pred.tolist()
    row = json.loads((subs / "ledger.jsonl").read_text().splitlines()[-1])
    assert row["members"][0]["member"] == fam and row["members"][0]["tta"] == "hflip" and row["tta"] == "hflip"

    # The family's plain OOF next to its TTA'd file: two members of one family, each run with its own plan.
    both = tmp_path / "both.json"
    assert _cli(monkeypatch, ["tune-weights", *reg, "--members", f"{fam},{tta_file.stem}", "--oof", str(tta_file),
                              "--no-plots", "--method", "scipy", "--out", str(both)]) == 0
    active = Recipe.load(both).active_members
    calls.clear()
    capsys.readouterr()
    rc = _cli(monkeypatch, ["predict", "--data", str(manifest), *reg, "--recipe", str(both), "--workers", "0",
                            "--no-cache", "--out", str(subs / "both.csv")])
    assert rc == 0, capsys.readouterr()
    want = {("identity", "hflip") if m.tta == "hflip" else ("identity",) for m in active}
    assert {v for _, _, v in calls} == want


def test_tta_flag_errors_name_the_fault_before_any_work(tmp_path, monkeypatch, capsys):
    missing = str(tmp_path / "no-such-data")
    for argv, msg in ((["--tta", "none", "--data", missing], "has one view: there is nothing to choose between"),
                      (["--tta", "flip@foo", "--data", missing], "TTA plan 'flip' has no view 'foo'"),
                      (["--tta", "flip"], "give --data"),
                      (["--tta", "flip", "--oof", "x.npz", "--data", missing], "cannot be combined with --oof")):
        rc = _cli(monkeypatch, ["tune-weights", "--registry", str(tmp_path / "reg"), *argv, "--no-plots",
                                "--out", str(tmp_path / "r.json")])
        assert rc == 2 and msg in capsys.readouterr().err, argv
    assert not (tmp_path / "r.json").exists()
