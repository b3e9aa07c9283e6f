"""Reliability of submissions and their ledger (issue 11, part "submit").

The submission and its ledger row stand or fall together: a short write of the row (a full
disk) is detected, the ledger is cut back and the CSV put back as it was; a torn last line
left by an older crash is reported and moved aside, the whole rows kept. Every test checks
that the files written before are byte-identical afterwards.
"""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from ensembler import _io
from ensembler.errors import EnsemblerError, WriteError
from ensembler.labels import LabelSpace
from ensembler.submit import read_ledger, write_submission

from conftest import fill_disk, unlabeled_table

SPACE = LabelSpace(("cat", "dog", "fox"))


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and not p.name.endswith(".lock")}


def _short_writes(monkeypatch):
    """os.write in ensembler._io writes half of what it is given, then the disk is full."""
    calls = []
    real = os.write

    def short(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            return real(fd, bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_io.os, "write", short)
    return calls


def test_short_ledger_write_is_rolled_back_with_its_new_submission(tmp_path, monkeypatch):
    write_submission(unlabeled_table(SPACE), np.array([0, 1, 2, 0, 1]), tmp_path / "a.csv", inputs={"vote": "soft"})
    before = _snapshot(tmp_path)
    calls = _short_writes(monkeypatch)
    with pytest.raises(WriteError, match=r"cannot append to .*ledger\.jsonl: no space left on the device"):
        write_submission(unlabeled_table(SPACE), np.array([2, 2, 1, 0, 1]), tmp_path / "b.csv", inputs={"vote": "hard"})
    assert calls, "the ledger append went through append_whole"
    monkeypatch.undo()
    assert _snapshot(tmp_path) == before  # no b.csv, no half row, no temp file
    assert len(read_ledger(tmp_path / "ledger.jsonl")) == 1


def test_short_ledger_write_restores_the_replaced_submission(tmp_path, monkeypatch):
    write_submission(unlabeled_table(SPACE), np.array([0, 1, 2, 0, 1]), tmp_path / "a.csv")
    before = _snapshot(tmp_path)
    _short_writes(monkeypatch)
    with pytest.raises(WriteError, match="ledger.jsonl"):
        write_submission(unlabeled_table(SPACE), np.array([2, 2, 2, 2, 2]), tmp_path / "a.csv", overwrite=True)
    monkeypatch.undo()
    assert _snapshot(tmp_path) == before  # the earlier a.csv is back, byte for byte


def test_torn_last_line_from_an_older_crash_is_reported_and_the_rest_kept(tmp_path):
    write_submission(unlabeled_table(SPACE), np.array([0, 1, 2, 0, 1]), tmp_path / "a.csv")
    write_submission(unlabeled_table(SPACE), np.array([1, 1, 2, 0, 1]), tmp_path / "b.csv")
    ledger = tmp_path / "ledger.jsonl"
    whole = ledger.read_bytes()
    ledger.write_bytes(whole + b'{"time": "2026-12-01T10:00:00", "output": "c.cs')  # cut by a crash
    with pytest.warns(UserWarning, match=r"ledger\.jsonl, line 3: a torn last line \(\d+ bytes"):
        rows = read_ledger(ledger)
    assert [os.path.basename(r["output"]) for r in rows] == ["a.csv", "b.csv"]
    with pytest.warns(UserWarning, match=r"line 3: a torn last line"), pytest.warns(UserWarning, match=r"moved a torn last line .* to ledger\.jsonl\.torn"):
        write_submission(unlabeled_table(SPACE), np.array([2, 1, 2, 0, 1]), tmp_path / "c.csv")
    after = ledger.read_bytes()
    assert after.startswith(whole) and after.count(b"\n") == 3  # the two rows byte-identical, one new
    assert [os.path.basename(r["output"]) for r in read_ledger(ledger)] == ["a.csv", "b.csv", "c.csv"]
    assert (tmp_path / "ledger.jsonl.torn").read_bytes().startswith(b'{"time": "2026-12-01T10:00:00"')


def test_a_broken_line_in_the_middle_is_still_an_error_naming_it(tmp_path):
    ledger = tmp_path / "ledger.jsonl"
    ledger.write_text('{"output": "a.csv"}\n{broken\n{"output": "b.csv"}\n')
    before = _snapshot(tmp_path)
    with pytest.raises(EnsemblerError, match=r"ledger\.jsonl, line 2: not valid JSON"):
        write_submission(unlabeled_table(SPACE), np.zeros(5, int), tmp_path / "s.csv")
    assert _snapshot(tmp_path) == before


def test_full_disk_leaves_the_ledger_and_earlier_submissions_whole(small_tmpfs):
    """A real full disk (tmpfs): whichever write hits it, the ledger keeps only whole rows and
    the new submission stands only together with its row."""
    pad = {"note": "x" * 3000}
    write_submission(unlabeled_table(SPACE), np.array([0, 1, 2, 0, 1]), small_tmpfs / "a.csv", inputs=pad)
    before = _snapshot(small_tmpfs)
    fill_disk(small_tmpfs)
    before_all = {k: v for k, v in _snapshot(small_tmpfs).items() if k != "filler.bin"}
    assert before_all == before
    with pytest.raises(WriteError, match=r"cannot (write|append to) .*(b\.csv|ledger\.jsonl): no space left"):
        write_submission(unlabeled_table(SPACE), np.array([2, 2, 1, 0, 1]), small_tmpfs / "b.csv", inputs=pad)
    (small_tmpfs / "filler.bin").unlink()
    assert _snapshot(small_tmpfs) == before
    # the folder is not locked: with space again the next submission goes through
    write_submission(unlabeled_table(SPACE), np.array([2, 2, 1, 0, 1]), small_tmpfs / "b.csv", inputs=pad)
    assert len(read_ledger(small_tmpfs / "ledger.jsonl")) == 2


def test_full_disk_at_the_ledger_row_removes_the_new_submission(small_tmpfs):
    """The disk holds exactly one more page: the CSV takes it and the ledger row finds none."""
    ledger = small_tmpfs / "ledger.jsonl"
    write_submission(unlabeled_table(SPACE), np.array([0, 1, 2, 0, 1]), small_tmpfs / "a.csv")
    with open(ledger, "ab") as fh:  # pad the ledger to a whole page with a valid row
        fh.write(b'{"pad": "' + b"x" * (4096 - ledger.stat().st_size - 12) + b'"}\n')
    assert ledger.stat().st_size == 4096
    before = _snapshot(small_tmpfs)
    fill_disk(small_tmpfs, leave=4096)
    with pytest.raises(WriteError) as info:
        write_submission(unlabeled_table(SPACE), np.array([2, 2, 1, 0, 1]), small_tmpfs / "b.csv")
    (small_tmpfs / "filler.bin").unlink()
    assert "no space left" in str(info.value) and "ledger.jsonl" in str(info.value), str(info.value)
    assert _snapshot(small_tmpfs) == before


# ---------------------------------------------------------------------------- predict's flags, printed raw
@pytest.fixture
def two_members(tmp_path):
    import torch
    from PIL import Image

    from ensembler.models import create_model
    from ensembler.preprocess import Preprocess
    from ensembler.registry import Registry

    torch.manual_seed(0)
    pre = Preprocess(input_size=(16, 16), crop_pct=1.0, interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3)
    reg = Registry(tmp_path / "checkpoints")
    for fam in ("a", "b"):
        reg.add(create_model("test_resnet", label_space=SPACE), family=fam, fold=None, arch="test_resnet",
                head="flat", label_space=SPACE, preprocess=pre)
    (tmp_path / "img").mkdir()
    rows = ["path"]
    for i in range(4):
        Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(tmp_path / "img" / f"{i}.png")
        rows.append(f"img/{i}.png")
    (tmp_path / "test.csv").write_text("\n".join(rows) + "\n")
    return tmp_path, reg


def _predict_cli(capsys, folder, reg, *extra):
    from ensembler.cli import main

    rc = main(["predict", "--data", str(folder / "test.csv"), "--registry", str(reg.root), "--workers", "0",
               "--cache-dir", str(folder / "cache"), "--out", str(folder / "subs" / "s.csv"), *extra])
    cap = capsys.readouterr()
    return rc, cap.err.replace("\n", "")


def test_weights_nan_is_named_raw_not_swallowed_as_markup(two_members, capsys):
    folder, reg = two_members
    rc, err = _predict_cli(capsys, folder, reg, "--members", "a,b", "--vote", "weighted", "--weights", "nan,1")
    assert rc == 2 and "--weights" in err and "nan" in err.lower() and "Traceback" not in err
    assert not (folder / "subs").exists() and not (folder / "cache").exists()


def test_predict_device_bogus_is_named_before_any_image_is_read(two_members, capsys):
    folder, reg = two_members
    rc, err = _predict_cli(capsys, folder, reg, "--device", "bogus")
    assert rc == 2 and "device 'bogus' is not a device" in err and "Traceback" not in err
    rc, err = _predict_cli(capsys, folder, reg, "--device", "cuda:99")
    assert rc == 2 and "cuda:99" in err
    assert not (folder / "subs").exists() and not (folder / "cache").exists()
