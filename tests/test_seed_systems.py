"""The five strongest teams' systems of the mask competition, as `ensembler` commands (tiny scale).

Each system is the recipe of commands the README shows (there with the real architectures:
Swin-Large 384, EfficientNet-B3/B4, ResNet-152, ResNeXt50); here timm's test architectures on a
synthetic mask-layout tree, so the whole chain (train -> compose / tune -> predict or vote ->
submission + ledger) runs on a CPU. What is asserted is what a team relies on: every command
succeeds, every submission is a valid 18-class `ImageID,ans` file over the eval ids, and the
ledger records it.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from ensembler.cli import main

from conftest import write_mask_eval, write_mask_tree

pytestmark = pytest.mark.slow

TINY = ["--k", "2", "--epochs", "1", "--img-size", "32", "--no-pretrained", "--workers", "0", "--device", "cpu",
        "--batch-size", "16", "--no-progress"]


@pytest.fixture(scope="module")
def comp(tmp_path_factory):
    root = tmp_path_factory.mktemp("mask_comp")
    train = write_mask_tree(root / "train", n_profiles=8, size=(16, 20))
    ev = write_mask_eval(root / "eval", n=6, size=(16, 20))
    return root, str(train), str(ev)


def run(*argv):
    rc = main([str(a) for a in argv])
    assert rc == 0, argv
    return rc


def check_submission(path, ev):
    sub = pd.read_csv(path)
    info = pd.read_csv(f"{ev}/info.csv")
    assert list(sub.columns) == ["ImageID", "ans"]
    assert sub["ImageID"].tolist() == info["ImageID"].tolist()
    assert sub["ans"].between(0, 17).all()
    ledger = [json.loads(x) for x in (path.parent / "ledger.jsonl").read_text().splitlines()]
    assert any(r.get("output") == str(path) for r in ledger)


def test_winner_swin_soft_f1_age_bands_29_58_center_crop(comp, one_torch_thread):
    root, train, ev = comp
    reg = root / "reg_winner"
    run("train-folds", "--data", train, "--registry", reg, "--arch", "test_vit", "--loss", "f1",
        "--age-bands", "29,58", "--family", "swin", *TINY)
    out = root / "subs_winner" / "swin.csv"
    run("predict", "--data", ev, "--registry", reg, "--members", "swin", "--tta", "center-crop=28",
        "--cache-dir", root / "cache", "--out", out)
    check_submission(out, ev)
    # evaluate without --age-bands takes 29,58 from the member
    run("evaluate", "--data", train, "--registry", reg, "--members", "swin", "--cache-dir", root / "cache")


def test_third_place_per_factor_models_focal_age_tta(comp, one_torch_thread):
    root, train, ev = comp
    reg = root / "reg_third"
    run("train-folds", "--data", train, "--registry", reg, "--arch", "test_efficientnet", "--target", "mask",
        "--family", "b3-mask", *TINY)
    run("train-folds", "--data", train, "--registry", reg, "--arch", "test_efficientnet", "--target", "gender",
        "--family", "b3-gender", *TINY)
    run("train-folds", "--data", train, "--registry", reg, "--arch", "test_efficientnet", "--target", "age",
        "--loss", "focal", "--family", "b3-age", *TINY)
    out = root / "subs_third" / "factors.csv"
    run("predict", "--data", ev, "--registry", reg, "--members", "all", "--tta", "hflip",
        "--cache-dir", root / "cache", "--out", out)  # 'all' composes b3-mask+b3-gender+b3-age
    check_submission(out, ev)
    run("tune-weights", "--registry", reg, "--members", "b3-mask+b3-gender+b3-age", "--no-plots",
        "--out", root / "third_recipe.json")


def test_multilabel_heads_ensembled(comp, one_torch_thread):
    root, train, ev = comp
    reg = root / "reg_multilabel"
    run("train-folds", "--data", train, "--registry", reg, "--arch", "test_efficientnet", "--head", "multilabel",
        "--family", "b4-ml", *TINY)
    run("train-folds", "--data", train, "--registry", reg, "--arch", "test_resnet", "--head", "multilabel",
        "--family", "r152-ml", *TINY)
    recipe = root / "ml_recipe.json"
    run("tune-weights", "--registry", reg, "--members", "all", "--method", "scipy", "--no-plots", "--out", recipe)
    out = root / "subs_ml" / "blend.csv"
    run("predict", "--data", ev, "--registry", reg, "--recipe", recipe, "--cache-dir", root / "cache", "--out", out)
    check_submission(out, ev)


def test_resnext_mask_plus_b3_gender_age_mix_loss_soft_vote_of_three(comp, one_torch_thread):
    root, train, ev = comp
    reg = root / "reg_mix"
    run("train-folds", "--data", train, "--registry", reg, "--arch", "test_resnet", "--target", "mask",
        "--family", "rx50-mask", *TINY)
    for seed in (0, 1):  # two gender/age models (the third member is a joint model)
        run("train-folds", "--data", train, "--registry", reg, "--arch", "test_efficientnet",
            "--target", "gender,age", "--head", "factored", "--loss", "mix", "--loss-weights", "ce=0.3,f1=0.7",
            "--family", f"b3-ga{seed}", "--seed", "0", "--lr", str(1e-2 * (seed + 1)), *TINY)
    run("train-folds", "--data", train, "--registry", reg, "--arch", "test_efficientnet", "--loss", "mix",
        "--loss-weights", "ce=0.3,f1=0.7", "--family", "b3-joint", *TINY)
    out = root / "subs_mix" / "soft3.csv"
    run("predict", "--data", ev, "--registry", reg, "--vote", "soft", "--members",
        "rx50-mask+b3-ga0,rx50-mask+b3-ga1,b3-joint", "--cache-dir", root / "cache", "--out", out)
    check_submission(out, ev)


def test_hard_vote_of_the_top_8_earlier_submissions(comp, one_torch_thread):
    root, train, ev = comp
    reg = root / "reg_top8"
    subs = root / "subs_top8"
    run("train-folds", "--data", train, "--registry", reg, "--arch", "test_resnet", "--family", "r", *TINY)
    run("train-folds", "--data", train, "--registry", reg, "--arch", "test_efficientnet", "--family", "e", *TINY)
    files = []
    for i, (members, vote, tta) in enumerate([("r", "soft", "none"), ("e", "soft", "none"), ("r,e", "soft", "none"),
                                              ("r,e", "hard", "none"), ("r", "soft", "hflip"), ("e", "soft", "hflip"),
                                              ("r,e", "gmean", "hflip"), ("r,e", "logits", "none"),
                                              ("r,e", "soft", "vflip"), ("e", "soft", "vflip")]):
        f = subs / f"sub{i}.csv"
        run("predict", "--data", ev, "--registry", reg, "--members", members, "--vote", vote, "--tta", tta,
            "--cache-dir", root / "cache", "--out", f, "--overwrite")
        run("ledger", "score", f, f"{0.70 + 0.01 * ((i * 7) % 10):.4f}")
        files.append(f)
    out = subs / "top8.csv"
    run("vote-files", "--top", "8", "--vote", "hard", "--tie-break", "first", "--ledger", subs / "ledger.jsonl",
        "--out", out)
    check_submission(out, ev)
    row = json.loads((subs / "ledger.jsonl").read_text().splitlines()[-1])
    assert row["kind"] == "vote-files" and len(row["inputs"]) == 8
