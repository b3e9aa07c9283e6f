"""`ensembler demo`: the whole pipeline on digits (slow), and its output-folder rules (fast)."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from ensembler.cli import main
from ensembler.demo import MARKER, OUTPUTS, _prepare_out_dir
from ensembler.errors import EnsemblerError


def test_demo_never_clears_a_folder_that_is_not_a_demo_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("keep me")
    with pytest.raises(EnsemblerError, match="mine is not empty and is not a demo folder"):
        _prepare_out_dir(tmp_path / "mine")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "keep me"


def test_demo_rerun_starts_clean_but_keeps_the_digits_cache(tmp_path):
    out = tmp_path / "demo"
    _prepare_out_dir(out)
    for name in OUTPUTS:
        (out / name).mkdir()
        (out / name / "old").write_text("stale")
    (out / "data").mkdir()
    (out / "data" / "digits.png").write_text("cache")
    _prepare_out_dir(out)
    assert (out / MARKER).exists()
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "data"])
    assert (out / "data" / "digits.png").read_text() == "cache"


def _table_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃]", line) if c.strip()]
        if cells:
            rows[cells[0]] = cells[1:]
    return rows


def _check_run(out_dir, text):
    rows = _table_rows(text)
    for name in ("resnet", "effnet", "hard vote", "soft vote (uniform)", "tuned caruana blend", "recipe (what ships)"):
        assert name in rows, f"{name!r} missing from the printed table"
        # OOF F1, OOF acc, honest F1, held-out F1, held-out acc are printed numbers
        assert sum(bool(re.fullmatch(r"\d\.\d{4}", c)) for c in rows[name]) == 5, rows[name]
    # exactly one candidate is marked as what ships, and the reason is printed
    assert sum("◀ ships" in cells for cells in rows.values()) == 1
    assert re.search(r"ships: \S.* ships: ", text)
    recipe_row, shipped = rows["recipe (what ships)"], next(r for r in rows.values() if "◀ ships" in r)
    assert recipe_row[3] == shipped[3]  # the recipe predicts the held-out part as the shipped candidate does
    for artifact in ("registry", "recipe", "submission", "ledger", "confusion matrix", "resnet OOF logits"):
        assert artifact in text
    sub = pd.read_csv(out_dir / "submissions" / "tuned.csv")
    test = pd.read_csv(out_dir / "splits" / "test.csv")
    assert sub["id"].tolist() == test["id"].tolist()
    ledger = [json.loads(x) for x in (out_dir / "submissions" / "ledger.jsonl").read_text().splitlines()]
    assert len(ledger) == 1 and ledger[0]["recipe_hash"] and ledger[0]["tta"].startswith("scales")
    recipe = json.loads((out_dir / "recipe.json").read_text())
    assert [m["name"] for m in recipe["members"]] == ["resnet", "effnet"]
    for p in ("recipe_plots/weights.png", "plots/confusion_tuned.png", "checkpoints/resnet/oof.npz",
              "checkpoints/effnet/learning_curves.png"):
        assert (out_dir / p).is_file(), p
    return rows


@pytest.mark.slow
def test_demo_quick_runs_end_to_end_and_reruns(tmp_path, capsys, wide_console):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    _check_run(out, capsys.readouterr().out)
    assert main(["demo", "--quick", "--out", str(out)]) == 0  # a re-run starts clean
    _check_run(out, capsys.readouterr().out)


@pytest.mark.slow
def test_full_demo_prints_tuned_ensemble_next_to_every_member(tmp_path, capsys, wide_console):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    rows = _check_run(out, capsys.readouterr().out)
    # real training: every member and the tuned ensemble are far above chance (0.1) on held-out digits
    for name in ("resnet", "effnet", "tuned caruana blend", "recipe (what ships)"):
        held_out_f1 = float(rows[name][3])
        assert held_out_f1 > 0.7, (name, rows[name])
