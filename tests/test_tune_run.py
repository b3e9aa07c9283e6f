"""``tune_recipe``: the tune-weights job from Python, with the recipe written last."""

from __future__ import annotations

import numpy as np
import pytest

from ensembler.ensemble import Recipe, tune_recipe
from ensembler.errors import EnsemblerError, LogitError, ParameterError
from ensembler.logits import Logits, write_logits


@pytest.fixture
def oof_files(tmp_path):
    rng = np.random.default_rng(0)
    n, c = 300, 3
    y = rng.integers(0, c, n)
    ids = [f"img{i:03d}" for i in range(n)]
    folds = np.arange(n) % 3
    out = []
    for name, scale in (("good", 2.0), ("weak", 0.7)):
        z = (np.eye(c)[y] * scale + rng.normal(size=(n, c))).astype(np.float32)
        out.append(write_logits(tmp_path / f"{name}.npz", Logits(ids, z, labels=y, folds=folds)))
    return out


def test_tune_recipe_writes_the_recipe_and_charts(oof_files, tmp_path):
    run = tune_recipe(oof_files=oof_files, out=tmp_path / "r.json", rounds=5, honest=False)
    assert run.recipe_path.is_file() and Recipe.load(run.recipe_path).hash() == run.result.recipe.hash()
    assert sorted(run.plots) == ["per_class_f1", "weights"]
    assert all(p.parent == tmp_path / "r_plots" and p.is_file() for p in run.plots.values())
    assert [m.name for m in run.members] == ["good", "weak"]


def test_a_failure_after_tuning_leaves_no_recipe_and_keeps_an_older_one(oof_files, tmp_path, monkeypatch):
    from ensembler.ensemble import plots

    out = tmp_path / "r.json"
    out.write_text("older recipe")

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(plots, "write_tuning_plots", broken)
    with pytest.raises(EnsemblerError, match="r.json exists; pass --overwrite"):
        tune_recipe(oof_files=oof_files, out=out, rounds=5, honest=False)  # refused before any work
    with pytest.raises(OSError, match="disk full"):
        tune_recipe(oof_files=oof_files, out=out, rounds=5, honest=False, overwrite=True)
    assert out.read_text() == "older recipe"
    fresh = tmp_path / "new.json"
    with pytest.raises(OSError):
        tune_recipe(oof_files=oof_files, out=fresh, rounds=5, honest=False)
    assert not fresh.exists()


@pytest.mark.parametrize("kw, parameter, match", [
    (dict(rounds=0), "rounds", "rounds must be a positive integer"),
    (dict(metric="logloss", class_bias=True), "class_bias", "class_bias: class biases tune argmax decisions"),
    (dict(method="grid"), "method", "unknown tuning method 'grid'"),
])
def test_bad_parameters_are_named_before_anything_is_read(tmp_path, kw, parameter, match):
    with pytest.raises(ParameterError, match=match) as info:
        tune_recipe(oof_files=[tmp_path / "missing.npz"], out=tmp_path / "r.json", **kw)
    assert info.value.parameter == parameter and isinstance(info.value, ValueError)
    assert not (tmp_path / "r.json").exists()


def test_plots_false_and_a_missing_member_file(oof_files, tmp_path):
    run = tune_recipe(oof_files=oof_files, out=tmp_path / "r.json", rounds=3, honest=False, plots=False)
    assert run.plots == {} and not (tmp_path / "r_plots").exists()
    with pytest.raises(LogitError, match="missing.npz"):
        tune_recipe(oof_files=[tmp_path / "missing.npz"], out=tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()
