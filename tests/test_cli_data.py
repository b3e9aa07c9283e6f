"""`ensembler data inspect` / `ensembler data split`, driven in-process."""

from __future__ import annotations

import pandas as pd
import pytest

from conftest import write_mask_tree
from ensembler.cli import main


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    """One temp cache per module: the digits PNGs are written once, not once per test."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _env(cache_root, monkeypatch):
    monkeypatch.setenv("ENSEMBLER_CACHE", str(cache_root))
    monkeypatch.setenv("COLUMNS", "160")  # wide tables: no wrapped class names


def test_split_digits_writes_balanced_folds(tmp_path, cache_root, capsys):
    out = tmp_path / "f.csv"
    assert main(["data", "split", "--data", "digits", "--k", "5", "--out", str(out)]) == 0
    df = pd.read_csv(out)
    assert list(df.columns[:6]) == ["id", "path", "label", "group", "fold", "class_name"]
    assert len(df) == 1797 and df["id"].is_unique
    shares = df["fold"].value_counts(normalize=True).sort_index()
    assert list(shares.index) == [0, 1, 2, 3, 4]
    assert shares.between(0.18, 0.22).all()
    assert (df.groupby("group")["fold"].nunique() == 1).all()
    assert (df["class_name"].astype(str) == df["label"].astype(str)).all()
    assert (cache_root / "digits" / "manifest.json").is_file()
    assert df["path"].str.startswith(str(cache_root / "digits")).all()
    text = capsys.readouterr().out
    assert "class balance over 5 folds" in text and "wrote 1797 rows" in text
    # Same seed, same file.
    again = tmp_path / "g.csv"
    assert main(["data", "split", "--data", "digits", "--k", "5", "--out", str(again)]) == 0
    assert again.read_bytes() == out.read_bytes()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_inspect_digits_prints_class_table(capsys):
    assert main(["data", "inspect", "--data", "digits"]) == 0
    text = capsys.readouterr().out
    assert "images per class" in text and "1797" in text
    for digit, count in [("0", 178), ("8", 174)]:
        assert any(line.split("│")[1:4] and line.split("│")[2].strip() == digit
                   and line.split("│")[3].strip() == str(count) for line in text.splitlines() if "│" in line)
    assert "class balance" not in text


def test_inspect_mask_with_folds_and_age_bands(tmp_path, capsys):
    root = write_mask_tree(tmp_path / "train")
    assert main(["data", "inspect", "--data", str(root), "--k", "3", "--seed", "4", "--age-bands", "29,58"]) == 0
    captured = capsys.readouterr()
    text = captured.out
    assert "mask (train)" in text and "84" in text and "12  (7 images per group)" in text
    assert "<29, 29-57, >=58" in text and "mask 3 x gender 2 x age 3" in text
    assert "class balance over 3 folds (seed 4)" in text and "incorrect-female-old" in text
    assert "warning:" in captured.err and "fewer than k=3 groups" in captured.err


def test_inspect_unlabeled_eval(mask_eval, capsys):
    assert main(["data", "inspect", "--data", str(mask_eval)]) == 0
    text = capsys.readouterr().out
    assert "no (a set to predict)" in text and "info.csv" in text and "images per class" not in text


def test_inspect_split_csv_shows_its_folds(tmp_path, capsys):
    out = tmp_path / "f.csv"
    assert main(["data", "split", "--data", "digits", "--k", "4", "--seed", "3", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["data", "inspect", "--data", str(out)]) == 0
    text = capsys.readouterr().out
    assert "source  │ csv" in text and "class balance over 4 folds" in text


def test_split_unlabeled_fails_and_writes_nothing(mask_eval, tmp_path, capsys):
    out = tmp_path / "f.csv"
    out.write_text("previous\n")
    assert main(["data", "split", "--data", str(mask_eval), "--k", "5", "--out", str(out), "--overwrite"]) == 2
    assert "is unlabeled" in capsys.readouterr().err
    assert out.read_text() == "previous\n"


def test_errors_name_the_offender(tmp_path, capsys):
    assert main(["data", "inspect", "--data", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: no such file or folder" in capsys.readouterr().err
    root = write_mask_tree(tmp_path / "train", n_profiles=3)
    assert main(["data", "split", "--data", str(root), "--k", "5", "--out", str(tmp_path / "o.csv")]) == 2
    assert "cannot make 5 folds from 3 group(s)" in capsys.readouterr().err
    assert not (tmp_path / "o.csv").exists()
    assert main(["data", "inspect", "--data", "digits", "--age-bands", "29,58"]) == 2
    assert "--age-bands) applies to mask data only" in capsys.readouterr().err
    assert main(["data", "inspect", "--data", str(root), "--age-bands", "29"]) == 2
    assert "--age-bands needs two increasing ages" in capsys.readouterr().err


def test_inspect_verify_reports_corrupt_files(tmp_path, capsys):
    from PIL import Image

    root = tmp_path / "pets"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / cls / "ok.png")
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    assert main(["data", "inspect", "--data", str(root), "--verify"]) == 1
    text = capsys.readouterr().out
    assert "1 of 3 images fail to decode" in text and "broken.jpg" in text
    (root / "dog" / "broken.jpg").unlink()
    assert main(["data", "inspect", "--data", str(root), "--verify"]) == 0
    assert "all 2 images decode" in capsys.readouterr().out


def test_bare_group_prints_help(capsys):
    assert main(["data"]) == 2
    text = capsys.readouterr().out
    assert "inspect" in text and "split" in text


def test_help_lists_data_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["data", "split", "--help"])
    assert exc.value.code == 0
    assert "--out" in capsys.readouterr().out
