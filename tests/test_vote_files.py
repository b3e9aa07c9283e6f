"""`ensembler vote-files` and `ensembler ledger score`: voting over earlier submission CSVs."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from ensembler._io import sha256_file
from ensembler.cli import main
from ensembler.ensemble import vote
from ensembler.errors import DataError, EnsemblerError, LogitError
from ensembler.vote_files import read_submission_file, vote_files


def _mask_subs(folder, labels_by_file, ids=None):
    folder.mkdir(parents=True, exist_ok=True)
    n = len(labels_by_file[0])
    ids = ids or [f"{i:040x}.jpg" for i in range(n)]
    paths = []
    for k, labels in enumerate(labels_by_file):
        p = folder / f"sub{k}.csv"
        pd.DataFrame({"ImageID": ids, "ans": labels}).to_csv(p, index=False)
        paths.append(p)
    return paths


def test_hard_vote_equals_vote_hard_row_by_row_with_weights(tmp_path):
    rng = np.random.default_rng(0)
    labels = [rng.integers(0, 18, 400) for _ in range(5)]
    paths = _mask_subs(tmp_path / "subs", labels)
    for weights in (None, [3, 1, 1, 2, 0.5]):
        res = vote_files(paths, vote="hard", weights=weights)
        ref = vote([np.eye(18)[y] for y in labels], "hard", weights=weights)
        np.testing.assert_array_equal(res.pred, ref.pred)
        assert res.tie_rate == pytest.approx(ref.tie_rate)
        assert res.tie_rate > 0.05  # five random voters over 18 classes tie often: the rule matters here
    # scikit-learn's rule, by hand: argmax of the per-row bincount
    counts = np.stack([np.bincount(np.array(col), minlength=18) for col in zip(*labels)])
    np.testing.assert_array_equal(vote_files(paths).pred, counts.argmax(1))


def test_tie_rules_smallest_class_or_the_earliest_file(tmp_path):
    # row 0: 5 vs 2, one vote each -> tie; row 1: 7,7,3 -> 7; row 2: 9 vs 4 tie with file order 9 first
    a, b, c = [5, 7, 9], [2, 7, 4], [2, 3, 9]
    paths = _mask_subs(tmp_path / "subs", [a[:], b[:]])
    res = vote_files(paths)  # two files: rows 0 and 2 tie
    assert res.pred.tolist() == [2, 7, 4] and res.tie_rate == pytest.approx(2 / 3)
    first = vote_files(paths, tie_break="first")
    assert first.pred.tolist() == [5, 7, 9]
    # a tie between classes the first file did not vote for goes to the earliest file that did
    paths3 = _mask_subs(tmp_path / "three", [[0, 0], [4, 1], [6, 1]])
    # row 0: 0, 4, 6 all tied -> 0 (smallest) / 0 (first); row 1: 1 wins outright
    assert vote_files(paths3, tie_break="first").pred.tolist() == [0, 1]
    paths3 = _mask_subs(tmp_path / "three2", [[0, 2], [4, 5], [4, 2], [6, 5]])
    # row 0: 4 has two votes -> 4; row 1: 2 and 5 tied, file 0 voted 2 -> 2 either way; reverse the files:
    assert vote_files(paths3[::-1], tie_break="first").pred.tolist() == [4, 5]
    assert vote_files(paths3[::-1]).pred.tolist() == [4, 2]
    del c


def test_id_layout_soft_vote_and_the_ledger_row(tmp_path, capsys):
    classes = ["cat", "dog", "fox"]
    rng = np.random.default_rng(1)
    ids = [f"s{i}" for i in range(50)]
    paths, probs = [], []
    for k in range(3):
        p = rng.dirichlet(np.ones(3), 50)
        lab = p.argmax(1)
        df = pd.DataFrame({"id": ids, "label": lab, "class_name": [classes[x] for x in lab]})
        for j, cname in enumerate(classes):
            df[f"prob_{cname}"] = p[:, j].round(6)
        path = tmp_path / f"p{k}.csv"
        df.to_csv(path, index=False)
        paths.append(path)
        probs.append(df[[f"prob_{c}" for c in classes]].to_numpy())
    out = tmp_path / "subs" / "soft.csv"
    res = vote_files(paths, vote="soft", weights=[2, 1, 1], out=out)
    want = np.average(np.stack(probs), axis=0, weights=[2, 1, 1])
    np.testing.assert_array_equal(res.pred, want.argmax(1))
    written = pd.read_csv(out)
    assert list(written.columns[:3]) == ["id", "label", "class_name"]
    assert written["class_name"].tolist() == [classes[x] for x in want.argmax(1)]
    rows = [json.loads(line) for line in (tmp_path / "subs" / "ledger.jsonl").read_text().splitlines()]
    assert rows[-1]["kind"] == "vote-files" and rows[-1]["vote"] == "soft"
    assert [r["sha256"] for r in rows[-1]["inputs"]] == [sha256_file(p) for p in paths]
    assert rows[-1]["output_sha256"] == sha256_file(out)
    # hard files cannot soft-vote
    mask = _mask_subs(tmp_path / "m", [[1, 2], [1, 2]])
    with pytest.raises(EnsemblerError, match=r"^vote 'soft' needs prob_<class> columns .*sub0.csv has none"):
        vote_files(mask, vote="soft")


def test_ids_must_match_exactly_and_bad_files_are_named(tmp_path):
    paths = _mask_subs(tmp_path / "a", [[1, 2, 3], [1, 2, 3]])
    other = _mask_subs(tmp_path / "b", [[1, 2, 3]], ids=[f"{i:040x}.jpg" for i in (0, 1, 7)])[0]
    with pytest.raises(DataError, match=r"ids differ: '0+2.jpg' \(row 3 of .*a/sub0.csv\) is missing from .*b/sub0.csv"):
        vote_files([paths[0], other])
    # same ids in another order is fine: the output keeps the first file's order
    shuffled = tmp_path / "shuffled.csv"
    pd.read_csv(paths[1]).iloc[[2, 0, 1]].to_csv(shuffled, index=False)
    out = tmp_path / "subs" / "v.csv"
    vote_files([paths[0], shuffled], out=out)
    assert pd.read_csv(out).equals(pd.read_csv(paths[0]))
    bad = tmp_path / "bad.csv"
    bad.write_text("ImageID,ans\nx.jpg,3\ny.jpg,two\n")
    with pytest.raises(DataError, match=r"bad.csv, line 3: ans 'two' is not a class index"):
        read_submission_file(bad)
    (tmp_path / "cols.csv").write_text("image,pred\nx,1\n")
    with pytest.raises(DataError, match=r"neither layout"):
        read_submission_file(tmp_path / "cols.csv")
    big = _mask_subs(tmp_path / "c", [[1, 2, 30]])[0]
    with pytest.raises(DataError, match=r"line 4: label 30 is outside 0..17"):
        vote_files([paths[0], big])


def test_ledger_score_then_top_n_picks_the_best_files_best_first(tmp_path, capsys):
    subs = tmp_path / "submissions"
    labels = [[0, 1, 2, 3], [0, 1, 2, 4], [5, 1, 2, 4], [6, 6, 6, 6]]
    paths = _mask_subs(subs, labels)
    for p, s in zip(paths, (0.71, 0.8022, 0.79, 0.50)):
        assert main(["ledger", "score", str(p), str(s)]) == 0
    assert main(["ledger", "score", str(paths[3]), "0.95", "--private"]) == 0
    assert "public score 0.7100 recorded" in capsys.readouterr().out
    res = vote_files(top=3, ledger=subs / "ledger.jsonl")
    assert [f.path.name for f in res.files] == ["sub1.csv", "sub2.csv", "sub0.csv"]
    rc = main(["vote-files", "--top", "3", "--tie-break", "first", "--out", str(subs / "top3.csv")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "0.8022" in out and "ties:" in out
    # row 0: 0, 5, 0 -> 0; row 3: 4, 4, 3 -> 4
    assert pd.read_csv(subs / "top3.csv")["ans"].tolist() == [0, 1, 2, 4]
    row = json.loads((subs / "ledger.jsonl").read_text().splitlines()[-1])
    assert [r.get("public") for r in row["inputs"]] == [0.8022, 0.79, 0.71]
    with pytest.raises(EnsemblerError, match=r"^top 5: the ledger .* has public scores for 4 file"):
        vote_files(top=5, ledger=subs / "ledger.jsonl")
    assert main(["ledger", "score", str(tmp_path / "nope.csv"), "0.5"]) == 2


def test_evaluate_logits_csv_says_what_it_is(tmp_path, capsys):
    p = _mask_subs(tmp_path, [[1, 2]])[0]
    from ensembler.logits import read_logits

    with pytest.raises(LogitError, match=r"is a text/CSV file. Submission CSVs are combined with `ensembler vote-files`"):
        read_logits(p)
    assert main(["evaluate", "--logits", str(p)]) == 2
    err = capsys.readouterr().err
    assert "pickled" not in err and "vote-files" in err


def test_an_existing_out_is_refused_before_any_file_is_read(tmp_path):
    paths = _mask_subs(tmp_path / "a", [[1, 2], [1, 2]])
    out = tmp_path / "subs" / "v.csv"
    out.parent.mkdir()
    out.write_text("keep me")
    with pytest.raises(EnsemblerError, match=r"--out .*v.csv exists; pass --overwrite"):
        vote_files([paths[0], tmp_path / "missing.csv"], out=out)
    assert out.read_text() == "keep me"
    vote_files(paths, out=out, overwrite=True)
    assert pd.read_csv(out)["ans"].tolist() == [1, 2]
