"""predict / evaluate: engine -> vote or recipe -> submission + ledger; metrics of logits files."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from ensembler.cli import main
from ensembler.data import load_source
from ensembler.ensemble import Recipe, RecipeMember, vote
from ensembler.errors import EnsemblerError, LogitError, ParameterError
from ensembler.infer import predict_members
from ensembler.labels import LabelSpace, joint_from_factor_logprobs
from ensembler.metrics import log_softmax
from ensembler.models import create_model
from ensembler.evaluate import evaluate
from ensembler.predict import predict
from ensembler.preprocess import Preprocess
from ensembler.registry import Registry

from conftest import res_eff_registry, write_image_table, write_mask_eval

LABELS = LabelSpace(("cat", "dog", "fox"))
PRE = Preprocess(input_size=(32, 32), crop_pct=1.0, interpolation="bilinear", mean=(0.5, 0.5, 0.5),
                 std=(0.5, 0.5, 0.5))


def _images(folder, n=9, seed=0):
    return write_image_table(folder, LABELS, n, seed=seed)


@pytest.fixture
def setup(tmp_path):
    table = _images(tmp_path / "images")
    reg = res_eff_registry(tmp_path / "checkpoints", LABELS, PRE)
    return table, reg, tmp_path / "cache", tmp_path / "submissions"


def _count_loads(monkeypatch):
    loaded = []
    real = Registry.load_model

    def counting(self, entry, device="cpu"):
        loaded.append(getattr(entry, "id", entry))
        return real(self, entry, device)

    monkeypatch.setattr(Registry, "load_model", counting)
    return loaded


def test_second_identical_predict_reports_the_earlier_submission(setup, monkeypatch):
    table, reg, cache, subs = setup
    kw = dict(members="all", vote="soft", tta="hflip", cache_dir=cache, progress=False)
    first = predict(table, reg, out=subs / "a.csv", **kw)
    assert first.repeat_message() is None and not first.cached
    loaded = _count_loads(monkeypatch)
    again = predict(table, reg, out=subs / "b.csv", **kw)
    assert loaded == []  # every checkpoint came from the logit cache
    assert again.cached
    assert again.submission.same_output and again.submission.same_output[-1]["output"] == str(subs / "a.csv")
    assert str(subs / "a.csv") in again.repeat_message()
    # the ledger recorded both, with what produced them
    rows = [json.loads(line) for line in (subs / "ledger.jsonl").read_text().splitlines()]
    assert [r["output"] for r in rows] == [str(subs / "a.csv"), str(subs / "b.csv")]
    rec = rows[0]
    assert rec["vote"] == "soft" and rec["tta"] == "hflip" and rec["merge"] == "mean-logits"
    assert rec["backend"] == "torch" and rec["data_fingerprint"] == table.fingerprint()
    assert {c["id"]: c["sha256"] for m in rec["members"] for c in m["checkpoints"]} == {
        e.id: e.sha256 for e in reg.entries()}
    # the same path again is a replacement: refused before any work unless overwrite, then reported
    with pytest.raises(EnsemblerError, match="a.csv exists; pass --overwrite"):
        predict(table, reg, out=subs / "a.csv", **kw)
    third = predict(table, reg, out=subs / "a.csv", overwrite=True, **kw)
    assert third.submission.same_output


def test_submission_is_id_label_class_name_with_probs(setup):
    table, reg, cache, subs = setup
    res = predict(table, reg, members="res,eff", vote="gmean", cache_dir=cache, progress=False,
                  out=subs / "p.csv", with_probs=True)
    df = pd.read_csv(subs / "p.csv")
    assert list(df.columns) == ["id", "label", "class_name", "prob_cat", "prob_dog", "prob_fox"]
    assert df["id"].tolist() == list(table.ids)
    assert df["label"].tolist() == res.pred.tolist()
    assert df["class_name"].tolist() == [LABELS.classes[k] for k in res.pred]
    np.testing.assert_allclose(df[["prob_cat", "prob_dog", "prob_fox"]].to_numpy(), res.probs, atol=1e-6)


def test_existing_different_submission_is_not_overwritten(setup):
    table, reg, cache, subs = setup
    subs.mkdir()
    out = subs / "mine.csv"
    out.write_text("id,label\nsomething,else\n")
    with pytest.raises(EnsemblerError, match="mine.csv exists; pass --overwrite"):
        predict(table, reg, members="res", cache_dir=cache, progress=False, out=out)
    assert out.read_text() == "id,label\nsomething,else\n"
    assert not (subs / "ledger.jsonl").exists()
    res = predict(table, reg, members="res", cache_dir=cache, progress=False, out=out, overwrite=True)
    assert pd.read_csv(out)["label"].tolist() == res.pred.tolist()


def test_hard_vote_over_registry_members_equals_vote_on_engine_logits(setup):
    table, reg, cache, _ = setup
    res = predict(table, reg, members="res-fold0,res-fold1,eff", vote="hard", tta="flip", cache_dir=cache,
                  progress=False)
    engine = predict_members(table, ["res-fold0", "res-fold1", "eff"], reg, tta="flip", cache_dir=cache,
                             progress=False)
    ref = vote({k: m.logits for k, m in engine.items()}, "hard")
    np.testing.assert_array_equal(res.pred, ref.pred)
    np.testing.assert_allclose(res.probs, ref.probs)
    assert res.tie_rate == ref.tie_rate
    # weighted hard vote: the weights change the counts
    res_w = predict(table, reg, members="res-fold0,res-fold1,eff", vote="hard", weights=[1, 1, 3], tta="flip",
                    cache_dir=cache, progress=False)
    ref_w = vote({k: m.logits for k, m in engine.items()}, "hard", weights=[1, 1, 3])
    np.testing.assert_array_equal(res_w.pred, ref_w.pred)
    np.testing.assert_array_equal(res_w.pred, engine["eff"].logits.argmax(1))


def _recipe(reg, weights, vote_rule="weighted", sha=True, biases=None):
    members = []
    for name, w, t in zip(("res", "eff"), weights, (2.0, 0.5)):
        shas = tuple(e.sha256 for e in reg.family(name)) if sha else ()
        members.append(RecipeMember(name, "family", LABELS.classes, weight=w, temperature=t, sha256=shas))
    return Recipe(members=tuple(members), vote=vote_rule, class_biases=biases)


def test_recipe_runs_only_its_members_and_applies_them(setup, monkeypatch, tmp_path):
    table, reg, cache, subs = setup
    recipe = _recipe(reg, (1.0, 0.0), biases=(0.0, 0.3, -0.2))
    path = recipe.save(tmp_path / "recipe.json")
    loaded = _count_loads(monkeypatch)
    res = predict(table, reg, recipe=path, members="eff", tta="hflip", cache_dir=cache, progress=False,
                  out=subs / "r.csv")
    assert sorted(loaded) == ["res-fold0", "res-fold1"]  # eff has weight 0: never loaded
    assert list(res.member_logits) == ["res"] and res.members == ["res"]
    engine = predict_members(table, "res", reg, tta="hflip", cache_dir=cache, progress=False)
    pred, probs = Recipe.load(path).apply({"res": engine["res"].logits})
    np.testing.assert_array_equal(res.pred, pred)
    np.testing.assert_allclose(res.probs, probs)
    row = json.loads((subs / "ledger.jsonl").read_text().splitlines()[-1])
    assert row["recipe_hash"] == Recipe.load(path).hash()
    assert [m["name"] for m in row["members"]] == ["res"]


def test_recipe_tuned_on_other_weights_is_refused(setup, tmp_path):
    table, reg, cache, subs = setup
    bad = Recipe(members=(RecipeMember("res", "family", LABELS.classes, sha256=("0" * 64, "1" * 64)),),
                 vote="soft")
    with pytest.raises(EnsemblerError, match="recipe member 'res'.*sha256.*re-run tune-weights"):
        predict(table, reg, recipe=bad, cache_dir=cache, progress=False, out=subs / "x.csv")
    assert not subs.exists()
    shas = tuple(e.sha256 for e in reg.family("res"))
    wrong_classes = Recipe(members=(RecipeMember("res", "family", ("a", "b", "c"), sha256=shas),), vote="soft")
    with pytest.raises(LogitError, match="recipe expects classes"):
        predict(table, reg, recipe=wrong_classes, cache_dir=cache, progress=False, out=subs / "x.csv")
    assert not subs.exists()


def test_bad_member_specs_and_weights_are_named(setup):
    table, reg, cache, _ = setup
    with pytest.raises(ParameterError, match="^weights .one per member. or a recipe are needed by vote .weighted."):
        predict(table, reg, vote="weighted", cache_dir=cache, progress=False)
    with pytest.raises(ParameterError, match="weights has 1 entries but there are 2 members") as info:
        predict(table, reg, vote="weighted", weights=[1], cache_dir=cache, progress=False)
    assert info.value.parameter == "weights"
    with pytest.raises(EnsemblerError, match="nope"):
        predict(table, reg, members="res,nope", cache_dir=cache, progress=False)
    with pytest.raises(ParameterError, match="^vote must be one of"):
        predict(table, reg, vote="median", cache_dir=cache, progress=False)


def test_mask_eval_layout_gets_info_csv_back_with_ans_filled(tmp_path):
    torch.manual_seed(0)
    root = write_mask_eval(tmp_path / "eval", n=7)
    info = pd.read_csv(root / "info.csv")
    info = info.iloc[[3, 0, 6, 1, 5, 2, 4]]  # not sorted: the original row order must come back
    info.to_csv(root / "info.csv", index=False)
    space = LabelSpace.mask()
    reg = Registry(tmp_path / "checkpoints")
    reg.add(create_model("test_resnet", label_space=space), family="mask18", fold=None, arch="test_resnet",
            head="flat", label_space=space, preprocess=PRE)
    table = load_source(root)
    res = predict(table, reg, members="mask18", cache_dir=tmp_path / "cache", progress=False,
                  out=tmp_path / "subs" / "submission.csv")
    sub = pd.read_csv(tmp_path / "subs" / "submission.csv")
    assert list(sub.columns) == ["ImageID", "ans"]
    assert sub["ImageID"].tolist() == info["ImageID"].tolist()
    by_id = dict(zip(res.ids, res.pred.tolist()))
    assert sub["ans"].tolist() == [by_id[i] for i in info["ImageID"]]
    assert sub["ans"].between(0, 17).all()


def test_per_factor_members_compose_into_the_joint_space(tmp_path):
    torch.manual_seed(0)
    space = LabelSpace.mask()
    root = write_mask_eval(tmp_path / "eval", n=5)
    reg = Registry(tmp_path / "checkpoints")
    for f in ("mask", "gender", "age"):
        fs = space.factor_space(f)
        reg.add(create_model("test_resnet", label_space=fs), family=f"only-{f}", fold=None, arch="test_resnet",
                head="flat", label_space=fs, preprocess=PRE, target=f)
    reg.add(create_model("test_efficientnet", label_space=space), family="joint", fold=None,
            arch="test_efficientnet", head="flat", label_space=space, preprocess=PRE)
    table = load_source(root)
    spec = "only-age+only-mask+only-gender"  # any order: composed in the joint space's factor order
    res = predict(table, reg, members=[spec, "joint"], vote="soft", cache_dir=tmp_path / "cache", progress=False)
    parts = predict_members(table, ["only-mask", "only-gender", "only-age"], reg, cache_dir=tmp_path / "cache",
                            progress=False)
    joint = joint_from_factor_logprobs([log_softmax(parts[f"only-{f}"].logits) for f in ("mask", "gender", "age")])
    other = predict_members(table, "joint", reg, cache_dir=tmp_path / "cache", progress=False)["joint"].logits
    ref = vote({spec: joint, "joint": other}, "soft")
    np.testing.assert_array_equal(res.pred, ref.pred)
    np.testing.assert_allclose(res.probs, ref.probs, atol=1e-9)
    assert res.label_space.classes == space.classes
    # A lone factor model beside a joint one fails before any forward, naming the composition to type.
    calls = []
    import ensembler.infer as infer_mod
    monkey = pytest.MonkeyPatch()
    monkey.setattr(infer_mod, "predict_members", lambda *a, **k: calls.append(a) or {})
    try:
        with pytest.raises(LogitError, match=r"per-factor models .* pass --members only-mask\+only-gender\+only-age"):
            predict(table, reg, members="only-mask,joint", cache_dir=tmp_path / "cache", progress=False)
        # --members all composes the three factor families, once each, and votes them with the joint family.
        monkey.undo()
        res_all = predict(table, reg, members="all", vote="soft", cache_dir=tmp_path / "cache", progress=False)
    finally:
        monkey.undo()
    assert calls == []
    assert sorted(res_all.members) == ["joint", "only-mask+only-gender+only-age"]
    np.testing.assert_allclose(res_all.probs, ref.probs, atol=1e-9)
    # A second age family: 'all' no longer covers each factor once; the message names a composition.
    fs = space.factor_space("age")
    reg.add(create_model("test_resnet", label_space=fs), family="only-age2", fold=None, arch="test_resnet",
            head="flat", label_space=fs, preprocess=PRE, target="age")
    with pytest.raises(LogitError, match=r"pass --members only-mask\+only-gender\+only-age"):
        predict(table, reg, members="all", cache_dir=tmp_path / "cache", progress=False)


# ---------------------------------------------------------------------------- evaluate
def _oof_file(path, ids, logits, labels=None, **extra):
    arrays = {"ids": np.asarray(ids), "logits": np.asarray(logits, dtype=np.float32)}
    if labels is not None:
        arrays["labels"] = np.asarray(labels, dtype=np.int64)
    arrays.update(extra)
    np.savez(path, **arrays)
    return path


def test_evaluate_logits_file_matches_sklearn_and_writes_the_plot(tmp_path, setup):
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    table = setup[0]
    rng = np.random.default_rng(0)
    y = table.labels
    logits = rng.normal(size=(len(table), 3)) + 1.5 * np.eye(3)[y]
    order = rng.permutation(len(table))  # the file's row order differs from the data's
    f = _oof_file(tmp_path / "oof.npz", table.ids[order], logits[order])
    res = evaluate(table, logits=f, plot=tmp_path / "cm.png")
    pred = logits.argmax(1)
    assert res.f1 == pytest.approx(f1_score(y, pred, average="macro", labels=[0, 1, 2], zero_division=0))
    assert res.acc == pytest.approx(accuracy_score(y, pred))
    np.testing.assert_array_equal(res.confusion, confusion_matrix(y, pred, labels=[0, 1, 2]))
    p, r, f1, s = precision_recall_fscore_support(y, pred, labels=[0, 1, 2], zero_division=0)
    np.testing.assert_allclose([c["precision"] for c in res.per_class], p)
    np.testing.assert_allclose([c["recall"] for c in res.per_class], r)
    np.testing.assert_allclose([c["f1"] for c in res.per_class], f1)
    assert [c["support"] for c in res.per_class] == s.tolist()
    assert [c["class"] for c in res.per_class] == list(LABELS.classes)
    assert (tmp_path / "cm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # an OOF file carries its own labels: no --data needed
    own = evaluate(logits=_oof_file(tmp_path / "own.npz", table.ids, logits, y))
    assert own.f1 == pytest.approx(res.f1)


@pytest.mark.parametrize("case, match", [
    ("nan", "bad.npz.*NaN or inf"),
    ("wrong_ids", "bad.npz does not match.*id\\(s\\) not in the data"),
    ("missing_ids", "bad.npz does not match.*missing from it"),
    ("classes", "bad.npz has 4 classes"),
    ("not_npz", "bad.npz is not a readable .npz"),
])
def test_evaluate_refuses_corrupt_or_mismatched_logits_naming_the_file(tmp_path, setup, case, match):
    table = setup[0]
    n = len(table)
    logits = np.zeros((n, 3))
    ids = table.ids
    bad = tmp_path / "bad.npz"
    if case == "nan":
        logits[2, 1] = np.nan
    elif case == "wrong_ids":
        ids = np.array([*table.ids[:-1], "stranger"])
    elif case == "missing_ids":
        ids, logits = table.ids[:-2], logits[:-2]
    elif case == "classes":
        logits = np.zeros((n, 4))
    if case == "not_npz":
        bad.write_bytes(b"PK\x03\x04 truncated")
    else:
        _oof_file(bad, ids, logits)
    with pytest.raises(LogitError, match=match):
        evaluate(table, logits=bad, plot=tmp_path / "cm.png")
    assert not (tmp_path / "cm.png").exists()


def test_evaluate_members_scores_each_member_and_the_vote(setup):
    table, reg, cache, _ = setup
    res = evaluate(table, reg, members="res,eff", vote="soft", cache_dir=cache, progress=False)
    engine = predict_members(table, "res,eff", reg, cache_dir=cache, progress=False)
    from ensembler.metrics import macro_f1

    for name in ("res", "eff"):
        assert res.member_scores[name]["f1"] == pytest.approx(
            macro_f1(table.labels, engine[name].logits.argmax(1), 3))
    ref = vote({k: m.logits for k, m in engine.items()}, "soft")
    assert res.f1 == pytest.approx(macro_f1(table.labels, ref.pred, 3))


# ---------------------------------------------------------------------------- CLI
def test_cli_predict_twice_says_identical_submission_exists(setup, capsys, wide_console):
    table, reg, cache, subs = setup
    manifest = subs.parent / "data.csv"
    table.to_csv(manifest)
    args = ["predict", "--data", str(manifest), "--registry", str(reg.root), "--members", "res,eff", "--vote",
            "hard", "--tta", "hflip", "--cache-dir", str(cache), "--workers", "0", "--out", str(subs / "h.csv")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "h.csv" in out and "identical submission" not in out and "ties" in out
    assert main(args[:-1] + [str(subs / "h2.csv")]) == 0
    out = capsys.readouterr().out
    assert "identical submission already exists" in out and "h.csv" in out
    # an existing file without --overwrite: exit 2, named with the flag, file kept
    (subs / "other.csv").write_text("x\n")
    assert main(args[:-1] + [str(subs / "other.csv")]) == 2
    assert "other.csv exists; pass --overwrite" in capsys.readouterr().err
    assert (subs / "other.csv").read_text() == "x\n"
    assert main(args) == 2  # the same file again is a replacement too: --overwrite
    assert main(args + ["--overwrite"]) == 0


def test_cli_evaluate_logits(setup, tmp_path, capsys, wide_console):
    table, reg, cache, _ = setup
    manifest = tmp_path / "data.csv"
    table.to_csv(manifest)
    logits = np.eye(3)[table.labels] * 3
    logits[0] = [0, 0, 5]  # one mistake (s0 is class 0)
    f = _oof_file(tmp_path / "member.npz", table.ids, logits)
    assert main(["evaluate", "--logits", str(f), "--data", str(manifest), "--plot", str(tmp_path / "cm.png")]) == 0
    out = capsys.readouterr().out
    assert "macro-F1" in out and "accuracy 0.8889" in out and "cm.png" in out and "fox" in out
    assert (tmp_path / "cm.png").exists()
    assert main(["evaluate", "--data", str(manifest)]) == 2
    assert "exactly one of --logits" in capsys.readouterr().err


def test_evaluate_infer_output_votes_its_members(setup, tmp_path):
    from ensembler.logits import write_logits
    from ensembler.metrics import macro_f1

    table, reg, cache, _ = setup
    engine = predict_members(table, "res-fold0,res-fold1,eff", reg, cache_dir=cache, progress=False)
    f = write_logits(tmp_path / "infer.npz", engine)
    res = evaluate(table, logits=f, vote="hard")
    ref = vote({k: m.logits for k, m in engine.items()}, "hard")
    assert res.f1 == pytest.approx(macro_f1(table.labels, ref.pred, 3))
    assert res.tie_rate == ref.tie_rate and res.logloss is None
    assert set(res.member_scores) == {"res-fold0", "res-fold1", "eff"}
    one = evaluate(table, logits=f, members="eff")
    assert one.f1 == pytest.approx(macro_f1(table.labels, engine["eff"].logits.argmax(1), 3))
    with pytest.raises(LogitError, match="infer.npz has no member\\(s\\) \\['nope'\\]"):
        evaluate(table, logits=f, members="nope")


def test_stacked_recipe_runs_every_member_and_applies_the_regression(setup, tmp_path):
    from ensembler.ensemble.stacking import stack_features

    table, reg, cache, subs = setup
    rng = np.random.default_rng(0)
    coef, intercept = rng.normal(size=(3, 6)), rng.normal(size=3)
    members = tuple(RecipeMember(name, "family", LABELS.classes, weight=0.5,
                                 sha256=tuple(e.sha256 for e in reg.family(name))) for name in ("res", "eff"))
    recipe = Recipe(members=members, vote="stack", method="stack",
                    stack={"coef": coef.tolist(), "intercept": intercept.tolist(), "classes": [0, 1, 2], "C": 1.0})
    path = recipe.save(tmp_path / "stack.json")
    res = predict(table, reg, recipe=path, cache_dir=cache, progress=False, out=subs / "s.csv")
    assert res.vote == "stack" and sorted(res.member_logits) == ["eff", "res"]
    z = np.stack([res.member_logits[n].logits for n in ("res", "eff")])
    want = log_softmax(stack_features(z) @ coef.T + intercept)
    np.testing.assert_allclose(res.probs, np.exp(want), atol=1e-6)
    assert pd.read_csv(subs / "s.csv")["label"].tolist() == want.argmax(1).tolist()
