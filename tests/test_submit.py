"""Submission files and the ledger: formats, refusal to overwrite, repeats reported, atomic appends."""

from __future__ import annotations

import json
from multiprocessing import get_context

import numpy as np
import pandas as pd
import pytest

from ensembler.data import SampleTable, load_source
from ensembler.errors import DataError, EnsemblerError
from ensembler.labels import LabelSpace
from ensembler.submit import append_ledger, inputs_key, read_ledger, render_submission, write_submission

from conftest import unlabeled_table, write_mask_eval

SPACE = LabelSpace(("cat", "dog", "fox"))


def test_plain_layout_and_probability_columns(tmp_path):
    t = unlabeled_table(SPACE)
    pred = np.array([2, 0, 1, 1, 0])
    probs = np.eye(3)[pred] * 0.8 + 0.2 / 3
    res = write_submission(t, pred, tmp_path / "s.csv", probs=probs, with_probs=True)
    df = pd.read_csv(res.path)
    assert list(df.columns) == ["id", "label", "class_name", "prob_cat", "prob_dog", "prob_fox"]
    assert df["id"].tolist() == list(t.ids) and df["label"].tolist() == pred.tolist()
    assert df["class_name"].tolist() == ["fox", "cat", "dog", "dog", "cat"]
    np.testing.assert_allclose(df[["prob_cat", "prob_dog", "prob_fox"]].to_numpy(), probs, atol=1e-6)
    plain = render_submission(t, pred)
    assert plain.decode().splitlines()[0] == "id,label,class_name"
    with pytest.raises(EnsemblerError, match="out of range 0..2"):
        render_submission(t, np.array([0, 1, 3, 0, 0]))
    with pytest.raises(EnsemblerError, match="4 predictions for 5 samples"):
        render_submission(t, np.array([0, 1, 2, 0]))


def test_mask_eval_layout_fills_ans_in_the_original_row_order(tmp_path):
    root = write_mask_eval(tmp_path / "eval", n=6)
    info = pd.read_csv(root / "info.csv").iloc[[4, 1, 5, 0, 3, 2]]
    info.to_csv(root / "info.csv", index=False)
    table = load_source(root)
    assert table.source.get("info_csv")
    pred = np.array([17, 0, 5, 6, 11, 12])  # aligned with table.ids (info.csv order)
    res = write_submission(table, pred, tmp_path / "sub" / "submission.csv")
    sub = pd.read_csv(res.path)
    assert list(sub.columns) == ["ImageID", "ans"]
    assert sub["ImageID"].tolist() == info["ImageID"].tolist()
    assert sub["ans"].tolist() == [dict(zip(table.ids, pred.tolist()))[i] for i in info["ImageID"]]
    # an info.csv row with no prediction is named
    short = SampleTable(table.frame.iloc[:5], table.label_space, table.source)
    with pytest.raises(DataError, match="info.csv: 1 ImageIDs have no prediction"):
        render_submission(short, pred[:5])


def test_an_existing_different_file_is_kept_unless_overwrite(tmp_path):
    t = unlabeled_table(SPACE)
    out = tmp_path / "s.csv"
    out.write_text("precious\n")
    with pytest.raises(EnsemblerError, match="s.csv exists; pass --overwrite"):
        write_submission(t, np.zeros(5, int), out)
    assert out.read_text() == "precious\n" and not (tmp_path / "ledger.jsonl").exists()
    write_submission(t, np.zeros(5, int), out, overwrite=True)
    assert pd.read_csv(out)["label"].tolist() == [0] * 5


def test_ledger_reports_identical_outputs_and_identical_inputs(tmp_path):
    t = unlabeled_table(SPACE)
    inputs = {"recipe_hash": "abc", "members": [{"id": "m/fold0", "sha256": "f" * 64}], "tta": "hflip",
              "vote": "soft", "data_fingerprint": "d1"}
    first = write_submission(t, np.array([0, 1, 2, 0, 1]), tmp_path / "a.csv", inputs=inputs)
    assert not first.is_repeat and first.repeat_message() is None
    same = write_submission(t, np.array([0, 1, 2, 0, 1]), tmp_path / "b.csv", inputs=inputs)
    assert same.is_repeat and "a.csv" in same.repeat_message() and "identical" in same.repeat_message()
    # same inputs, different output (non-determinism): reported as such
    drift = write_submission(t, np.array([0, 1, 2, 0, 2]), tmp_path / "c.csv", inputs=inputs)
    assert not drift.same_output and drift.same_inputs
    assert "same recipe, members, TTA and data" in drift.repeat_message()
    # other inputs, other output: no repeat
    other = write_submission(t, np.array([2, 2, 2, 0, 2]), tmp_path / "d.csv", inputs={**inputs, "tta": "none"})
    assert not other.is_repeat
    rows = read_ledger(tmp_path / "ledger.jsonl")
    assert [r["output"] for r in rows] == [str(tmp_path / f"{c}.csv") for c in "abcd"]
    assert rows[0]["inputs_key"] == inputs_key(inputs) and rows[0]["output_sha256"] == first.sha256
    assert rows[0]["members"][0]["sha256"] == "f" * 64 and rows[0]["rows"] == 5


def test_a_broken_ledger_line_is_named(tmp_path):
    ledger = tmp_path / "ledger.jsonl"
    ledger.write_text('{"output": "a.csv"}\n{not json\n')
    with pytest.raises(EnsemblerError, match=r"ledger.jsonl, line 2: not valid JSON"):
        read_ledger(ledger)
    # ... and nothing is written when the ledger beside the submission cannot be read
    with pytest.raises(EnsemblerError, match=r"ledger.jsonl, line 2"):
        write_submission(unlabeled_table(SPACE), np.zeros(5, int), tmp_path / "s.csv")
    assert not (tmp_path / "s.csv").exists()


def _append_many(args):
    path, k = args
    for i in range(25):
        append_ledger(path, {"writer": k, "i": i, "pad": "x" * 2000})


def test_concurrent_appends_give_whole_lines(tmp_path):
    path = tmp_path / "ledger.jsonl"
    with get_context("fork").Pool(2) as pool:
        pool.map(_append_many, [(path, 0), (path, 1)])
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 50
    assert sorted((r["writer"], r["i"]) for r in rows) == [(w, i) for w in (0, 1) for i in range(25)]
