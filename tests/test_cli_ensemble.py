"""`ensembler tune-weights` on OOF npz files in a temp folder."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ensembler.cli import main
from ensembler.ensemble import Recipe


@pytest.fixture
def oof_dir(tmp_path):
    rng = np.random.default_rng(0)
    n, c = 900, 5
    y = rng.integers(0, c, n)
    ids = np.array([f"img{i:04d}" for i in range(n)])
    folds = rng.integers(0, 3, n)
    for name, scale, noise in (("effnet", 2.0, 1.2), ("swin", 1.5, 1.0), ("noise", 0.0, 2.0)):
        perm = rng.permutation(n)
        z = (np.eye(c)[y] * scale + rng.normal(size=(n, c)) * noise).astype(np.float32)
        np.savez(tmp_path / f"{name}.npz", ids=ids[perm], logits=z[perm], labels=y[perm], folds=folds[perm])
    return tmp_path


def run(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_tune_weights_writes_recipe_plots_and_prints_every_row(oof_dir, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    out = oof_dir / "recipe.json"
    files = [str(oof_dir / f"{n}.npz") for n in ("effnet", "swin", "noise")]
    rc, stdout, _ = run(capsys, "tune-weights", "--oof", *files, "--method", "scipy", "--class-bias",
                        "--out", str(out), "--plots", str(oof_dir / "charts"))
    assert rc == 0
    for label in ("effnet", "swin", "noise", "hard vote", "soft vote (uniform)", "tuned scipy (in-sample)",
                  "tuned scipy (honest, 3-fold)", "honest f1 per held-out fold"):
        assert label in stdout, label
    recipe = Recipe.load(out)
    assert recipe.names == ["effnet", "swin", "noise"] and recipe.method == "scipy"
    assert recipe.weights[2] < 1e-3
    assert set(recipe.scores["honest"]["per_fold"]) == {"0", "1", "2"}  # JSON keys
    assert recipe.scores["in_sample"]["f1"] >= recipe.scores["honest"]["mean"] - 0.02
    assert f"hash {recipe.hash()[:12]}" in stdout
    for png in ("weights.png", "per_class_f1.png"):
        assert (oof_dir / "charts" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the in-sample score printed is the recipe's
    assert f"{recipe.scores['in_sample']['f1']:.4f}" in stdout


def test_default_plots_go_next_to_the_recipe(oof_dir, capsys):
    out = oof_dir / "sub" / "r.json"
    rc, _, _ = run(capsys, "tune-weights", "--oof", str(oof_dir / "effnet.npz"), str(oof_dir / "swin.npz"),
                   "--rounds", "5", "--no-temperature", "--out", str(out))
    assert rc == 0
    assert (oof_dir / "sub" / "r_plots" / "weights.png").exists()
    d = json.loads(out.read_text())
    assert all(m["temperature"] == 1.0 for m in d["members"])


@pytest.mark.parametrize(
    "make_bad, match",
    [
        (lambda p: p.write_text("not a zip"), "not a readable .npz"),
        (lambda p: np.savez(p, ids=np.array([f"x{i}" for i in range(900)]), logits=np.zeros((900, 5), np.float32),
                            labels=np.zeros(900, np.int64), folds=np.zeros(900, np.int64)), "ids do not match"),
        (lambda p: np.savez(p, ids=np.array([f"img{i:04d}" for i in range(900)]),
                            logits=np.zeros((900, 7), np.float32), labels=np.zeros(900, np.int64),
                            folds=np.zeros(900, np.int64)), "class-count mismatch"),
        (lambda p: np.savez(p, ids=np.array([f"img{i:04d}" for i in range(900)]),
                            logits=np.full((900, 5), np.nan, np.float32), labels=np.zeros(900, np.int64),
                            folds=np.zeros(900, np.int64)), "NaN or inf"),
        (lambda p: np.savez(p, ids=np.array([f"img{i:04d}" for i in range(900)]),
                            logits=np.zeros((900, 5), np.float32), folds=np.zeros(900, np.int64)), "lacks array"),
    ],
)
def test_bad_oof_file_is_an_error_naming_it_and_leaves_no_recipe(oof_dir, capsys, monkeypatch, make_bad, match):
    monkeypatch.setenv("COLUMNS", "300")
    bad = oof_dir / "bad.npz"
    make_bad(bad)
    out = oof_dir / "recipe.json"
    rc, _, err = run(capsys, "tune-weights", "--oof", str(oof_dir / "effnet.npz"), str(bad), "--out", str(out))
    assert rc == 2
    assert "bad.npz" in err and match in err
    assert not out.exists()
    assert not any(p.name.startswith(".recipe.json") for p in oof_dir.iterdir())
    assert not (oof_dir / "recipe_plots").exists()


def test_bad_flags(oof_dir, capsys):
    f = str(oof_dir / "effnet.npz")
    rc, _, err = run(capsys, "tune-weights", "--oof", f, "--metric", "logloss", "--class-bias")
    assert rc == 2 and "--class-bias" in err
    rc, _, err = run(capsys, "tune-weights", "--oof", f, "--rounds", "0")
    assert rc == 2 and "--rounds" in err
