"""Reliability of writing files (issue 11, part "files").

One rule for every file a user names (``--out``, ``--plot``): an existing file is replaced
only with ``--overwrite``, checked before any work; every file the project writes gets
``0666`` minus the umask; a read-only folder or a full disk is a clear error naming the file
(never a raw ``OSError``), and the file that was there is byte-identical afterwards; JSON is
strict (no NaN).
"""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import pandas as pd
import pytest
import torch

from ensembler import _io
from ensembler.cli import main
from ensembler.data import SampleTable
from ensembler.errors import EnsemblerError, WriteError
from ensembler.labels import LabelSpace
from ensembler.models import create_model
from ensembler.preprocess import Preprocess
from ensembler.registry import Registry

from conftest import fill_disk

LABELS = LabelSpace(("cat", "dog", "fox"))
PRE = Preprocess(input_size=(16, 16), crop_pct=1.0, interpolation="bilinear", mean=(0.5, 0.5, 0.5),
                 std=(0.5, 0.5, 0.5))


def _manifest(folder, n=9):
    from PIL import Image

    rng = np.random.default_rng(0)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = ["path,label,group"]
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / "img" / f"{i}.png")
        rows.append(f"img/{i}.png,{LABELS.classes[i % 3]},g{i}")
    (folder / "data.csv").write_text("\n".join(rows) + "\n")
    return folder / "data.csv"


@pytest.fixture
def registry(tmp_path):
    torch.manual_seed(0)
    reg = Registry(tmp_path / "checkpoints")
    reg.add(create_model("test_resnet", label_space=LABELS), family="res", fold=None, arch="test_resnet",
            head="flat", label_space=LABELS, preprocess=PRE)
    return reg


@pytest.fixture
def oof_files(tmp_path):
    rng = np.random.default_rng(0)
    n = 60
    y = rng.integers(0, 3, n)
    ids = np.array([f"i{k}" for k in range(n)])
    folds = np.arange(n) % 3
    paths = []
    for name in ("a", "b"):
        z = (np.eye(3)[y] * 2 + rng.normal(size=(n, 3))).astype(np.float32)
        np.savez(tmp_path / f"{name}.npz", ids=ids, logits=z, labels=y, folds=folds)
        paths.append(str(tmp_path / f"{name}.npz"))
    return paths


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _precious(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"precious\n")
    return path


# ---------------------------------------------------------------------------- one rule for --out
def test_data_split_out_is_kept_without_overwrite(tmp_path, capsys):
    data = _manifest(tmp_path)
    out = _precious(tmp_path / "folds.csv")
    rc, _, err = _run(capsys, "data", "split", "--data", data, "--k", "3", "--out", out)
    assert rc == 2 and f"--out {out} exists; pass --overwrite" in err.replace("\n", "")
    assert out.read_bytes() == b"precious\n"
    rc, _, _ = _run(capsys, "data", "split", "--data", data, "--k", "3", "--out", out, "--overwrite")
    assert rc == 0 and pd.read_csv(out)["fold"].nunique() == 3


def test_tune_weights_out_and_its_charts_are_kept_without_overwrite(tmp_path, oof_files, capsys):
    out = _precious(tmp_path / "recipe.json")
    args = ["tune-weights", "--oof", *oof_files, "--rounds", "3", "--no-honest", "--no-temperature", "--out", out]
    rc, _, err = _run(capsys, *args)
    assert rc == 2 and "--out" in err and "recipe.json exists; pass --overwrite" in err.replace("\n", "")
    assert out.read_bytes() == b"precious\n" and not (tmp_path / "recipe_plots").exists()
    out.unlink()
    chart = _precious(tmp_path / "recipe_plots" / "weights.png")
    rc, _, err = _run(capsys, *args)
    assert rc == 2 and "--plots" in err and "weights.png exists" in err.replace("\n", "")
    assert chart.read_bytes() == b"precious\n" and not out.exists()
    rc, _, _ = _run(capsys, *args, "--overwrite")
    assert rc == 0 and json.loads(out.read_text())["members"]
    assert chart.read_bytes()[:4] == b"\x89PNG"


def test_infer_out_is_refused_before_any_forward(tmp_path, registry, capsys):
    data = _manifest(tmp_path)
    out = _precious(tmp_path / "logits.npz")
    cache = tmp_path / "cache"
    args = ["infer", "--data", data, "--registry", registry.root, "--cache-dir", cache, "--workers", "0",
            "--out", out]
    rc, _, err = _run(capsys, *args)
    assert rc == 2 and "logits.npz exists; pass --overwrite" in err.replace("\n", "")
    assert out.read_bytes() == b"precious\n" and not cache.exists()  # no model ran
    sidecar = _precious(tmp_path / "l2.json")
    rc, _, err = _run(capsys, *args[:-1], tmp_path / "l2.npz")
    assert rc == 2 and "l2.json exists" in err.replace("\n", "") and sidecar.read_bytes() == b"precious\n"
    rc, _, _ = _run(capsys, *args, "--overwrite")
    assert rc == 0 and np.load(out)["logits"].shape == (9, 3)


def test_predict_out_is_refused_before_any_forward(tmp_path, registry, capsys):
    data = _manifest(tmp_path)
    out = _precious(tmp_path / "subs" / "s.csv")
    cache = tmp_path / "cache"
    rc, _, err = _run(capsys, "predict", "--data", data, "--registry", registry.root, "--cache-dir", cache,
                      "--workers", "0", "--out", out)
    assert rc == 2 and "s.csv exists; pass --overwrite" in err.replace("\n", "")
    assert out.read_bytes() == b"precious\n" and not cache.exists()
    assert not (out.parent / "ledger.jsonl").exists()


def test_evaluate_plot_is_kept_without_overwrite_and_an_unwritable_folder_refused_first(
        tmp_path, oof_files, capsys, readonly_dir):
    plot = _precious(tmp_path / "cm.png")
    rc, _, err = _run(capsys, "evaluate", "--logits", oof_files[0], "--plot", plot)
    assert rc == 2 and "--plot" in err and "cm.png exists; pass --overwrite" in err.replace("\n", "")
    assert plot.read_bytes() == b"precious\n"
    rc, out, err = _run(capsys, "evaluate", "--logits", oof_files[0], "--plot", readonly_dir / "sub" / "cm.png")
    text = err.replace("\n", "")
    assert rc == 2 and "cannot write --plot" in text and str(readonly_dir) in text
    assert "macro-F1" not in out  # refused before scoring, not after
    assert "Traceback" not in err
    rc, _, _ = _run(capsys, "evaluate", "--logits", oof_files[0], "--plot", plot, "--overwrite")
    assert rc == 0 and plot.read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------------------- modes
def test_every_written_file_gets_0666_minus_the_umask(tmp_path):
    """safetensors and torch.save create their files 0600; the rest must not be 0644 either
    under a group-sharing umask of 002."""
    from ensembler.submit import write_submission

    old = os.umask(0o002)
    try:
        reg = Registry(tmp_path / "shared")
        reg.add(create_model("test_resnet", label_space=LABELS), family="res", fold=0, arch="test_resnet",
                head="flat", label_space=LABELS, preprocess=PRE)
        with _io.atomic_path(tmp_path / "shared" / "res" / "fold0" / "state.pt") as tmp:  # as save_state writes
            torch.save({"epoch": 1}, tmp)
        frame = pd.DataFrame({"id": ["a", "b"], "path": ["/x/a", "/x/b"], "label": [pd.NA] * 2, "group": ["a", "b"]})
        write_submission(SampleTable(frame, LABELS, {"kind": "csv"}), np.array([0, 1]), tmp_path / "subs" / "s.csv")
        from ensembler.evaluate import plot_confusion_matrix

        plot_confusion_matrix(np.eye(3, dtype=int), LABELS.classes, tmp_path / "cm.png")
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"weights.safetensors", "registry.json", "state.pt", "s.csv", "ledger.jsonl", "cm.png"} <= names
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {oct(0o664)}, modes


# ---------------------------------------------------------------------------- read-only folder, full disk
def test_a_read_only_output_folder_is_a_clear_error(tmp_path, capsys, readonly_dir):
    data = _manifest(tmp_path)
    rc, _, err = _run(capsys, "data", "split", "--data", data, "--k", "3", "--out", readonly_dir / "f.csv")
    text = err.replace("\n", "")
    assert rc == 2 and f"cannot write --out {readonly_dir / 'f.csv'}" in text and "Traceback" not in err
    with pytest.raises(WriteError, match=rf"cannot write {readonly_dir}/r\.json: "):
        _io.write_json_atomic(readonly_dir / "r.json", {"a": 1})
    assert list(readonly_dir.iterdir()) == []


def test_a_full_disk_is_a_clear_error_and_the_old_file_stays(small_tmpfs):
    target = small_tmpfs / "registry.json"
    _io.write_json_atomic(target, {"entries": [1, 2]})
    before = target.read_bytes()
    fill_disk(small_tmpfs)
    with pytest.raises(WriteError, match=r"cannot write .*registry\.json: no space left on the device"):
        _io.write_json_atomic(target, {"entries": list(range(20000))})
    assert target.read_bytes() == before
    assert sorted(p.name for p in small_tmpfs.iterdir()) == ["filler.bin", "registry.json"]  # no temp file


def test_a_full_disk_while_writing_weights_is_a_write_error_not_a_runtime_error(small_tmpfs):
    reg = Registry(small_tmpfs / "reg")
    reg.add(create_model("test_resnet", label_space=LABELS), family="res", fold=0, arch="test_resnet",
            head="flat", label_space=LABELS, preprocess=PRE)
    index = (small_tmpfs / "reg" / "registry.json").read_bytes()
    fill_disk(small_tmpfs)
    with pytest.raises(WriteError, match=r"cannot write .*res/fold1/weights\.safetensors: no space left"):
        reg.add(create_model("test_resnet", label_space=LABELS), family="res", fold=1, arch="test_resnet",
                head="flat", label_space=LABELS, preprocess=PRE)
    assert (small_tmpfs / "reg" / "registry.json").read_bytes() == index
    assert not list((small_tmpfs / "reg" / "res").rglob("*.tmp"))


def test_json_is_strict_a_nan_is_refused_naming_the_file_and_key(tmp_path):
    target = tmp_path / "registry.json"
    _io.write_json_atomic(target, {"ok": 1})
    with pytest.raises(EnsemblerError, match=r"registry\.json: refusing to write a non-finite number "
                                             r"\(entries\[0\]\.metrics\.val_loss = nan\)"):
        _io.write_json_atomic(target, {"entries": [{"metrics": {"val_loss": float("nan")}}]})
    assert json.loads(target.read_text()) == {"ok": 1}
