"""Readable in a log file: `ensembler tune-weights ... > log.txt` and `ensembler predict ... > log.txt`
with an 80-column, non-terminal console keep every member name and every column header; long
work prints timed progress lines; warnings are printed when they arise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
LONG = ("efficientnet_b3-factored-age-29-58-seed1", "swin_base_patch4_window12_384-flat-seed0")


def _cli(args, log: Path, **env):
    """Run the installed CLI with stdout and stderr redirected to ``log`` (not a terminal)."""
    full_env = dict(os.environ, COLUMNS="80", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", **env)
    full_env.pop("FORCE_COLOR", None)
    with open(log, "w") as fh:
        rc = subprocess.run([sys.executable, "-c", "import sys; from ensembler.cli import main; sys.exit(main())",
                             *map(str, args)], stdout=fh, stderr=subprocess.STDOUT, env=full_env,
                            cwd=log.parent, timeout=600).returncode
    return rc, log.read_text()


def test_tune_weights_table_keeps_every_name_and_header_in_a_log_file(tmp_path):
    rng = np.random.default_rng(0)
    n, c = 600, 4
    y = rng.integers(0, c, n)
    ids = np.array([f"img{i:04d}" for i in range(n)])
    folds = rng.integers(0, 3, n)
    files = []
    for name, scale in zip(LONG, (2.0, 1.2)):
        z = (np.eye(c)[y] * scale + rng.normal(size=(n, c))).astype(np.float32)
        np.savez(tmp_path / f"{name}.npz", ids=ids, logits=z, labels=y, folds=folds)
        files.append(tmp_path / f"{name}.npz")
    rc, log = _cli(["tune-weights", "--oof", *files, "--out", tmp_path / "recipe.json", "--no-plots"],
                   tmp_path / "log.txt")
    assert rc == 0, log
    for name in LONG + ("hard vote", "soft vote (uniform)", "tuned caruana (in-sample)",
                        "tuned caruana (honest, 3-fold)"):
        assert name in log, name
    for header in ("member / blend", "F1", "acc", "logloss", "honest f1 (folds)", "weight", "T", "NLL→T", "ECE→T",
                   "ships", "note"):
        assert header in log, header
    assert "ships:" in log and "◀ ships" in log
    assert "…" not in log  # nothing was cut to fit


def test_predict_table_keeps_every_name_and_header_in_a_log_file(tmp_path):
    import torch
    from PIL import Image

    from ensembler.labels import LabelSpace
    from ensembler.models import create_model
    from ensembler.preprocess import Preprocess
    from ensembler.registry import Registry

    labels = LabelSpace(("cat", "dog", "fox"))
    pre = Preprocess(input_size=(32, 32), crop_pct=1.0, interpolation="bilinear")
    rows = []
    for i in range(6):
        path = tmp_path / "images" / f"img{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
        rows.append({"path": str(path), "label": labels.classes[i % 3]})
    pd.DataFrame(rows).to_csv(tmp_path / "data.csv", index=False)
    torch.manual_seed(0)
    reg = Registry(tmp_path / "checkpoints")
    for name in LONG:
        reg.add(create_model("test_resnet", label_space=labels), family=name, fold=0, arch="test_resnet",
                head="flat", label_space=labels, preprocess=pre)
    rc, log = _cli(["predict", "--data", tmp_path / "data.csv", "--registry", reg.root, "--members", ",".join(LONG),
                    "--vote", "soft", "--workers", "0", "--cache-dir", tmp_path / "cache",
                    "--out", tmp_path / "subs" / "s.csv"], tmp_path / "log.txt")
    assert rc == 0, log
    for name in LONG:
        assert name in log, name
    for header in ("member", "weight", "checkpoints", "sha256", "cached"):
        assert header in log, header
    assert "inference: 6/6 images (100%)" in log  # the plain progress line, not a silent bar (one geometry)


def test_ticker_prints_steady_lines_in_a_log_file(monkeypatch):
    import io

    from rich.console import Console

    from ensembler.progress import Ticker

    con = Console(file=io.StringIO(), width=80)
    clock = iter([0.0, 0.0, 10.0, 31.0, 40.0, 62.0, 70.0, 70.0])
    monkeypatch.setattr("ensembler.progress.time.perf_counter", lambda: next(clock))
    with Ticker("fold 0 (1/3) epoch 1/4", total=100, unit="batches", console=con, interval=30) as tick:
        for done in (10, 20, 30, 40, 50):
            tick.set_info("train loss 1.2345")
            tick.update(done)
    lines = con.file.getvalue().splitlines()
    # one line per 30 s, then one at the end
    assert lines[0].startswith("fold 0 (1/3) epoch 1/4: 30/100 batches (30%), 31 s elapsed, ETA 1:12")
    assert lines[0].endswith("train loss 1.2345")
    assert lines[1].startswith("fold 0 (1/3) epoch 1/4: 50/100 batches (50%), 1:02 elapsed")
    assert lines[-1].startswith("fold 0 (1/3) epoch 1/4: 50/100 batches (50%), 1:10 elapsed")
    assert len(lines) == 3


def test_warnings_are_printed_when_they_arise(capsys, wide_console):
    import warnings

    from ensembler.cli import _common

    with _common.printed_warnings():
        warnings.warn("3 class(es) span fewer than k=5 groups", UserWarning)
        first = capsys.readouterr().err  # already printed, before the work goes on
        warnings.warn("3 class(es) span fewer than k=5 groups", UserWarning)  # once only
    assert "warning: 3 class(es) span fewer than k=5 groups" in first
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_consoles_are_wide_when_not_a_terminal(stream, monkeypatch):
    from ensembler.progress import LOG_WIDTH, make_console

    monkeypatch.setenv("COLUMNS", "80")
    con = make_console(stderr=stream == "stderr")
    assert not con.is_terminal and con.width >= LOG_WIDTH
