"""Crash-safe, resumable training: a killed run resumes to the same weights; finished folds are skipped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ensembler.data import digits_folder, load_source
from ensembler.errors import EnsemblerError
from ensembler.logits import read_logits
from ensembler.registry import Registry
from ensembler.train import TrainConfig, train_folds
from ensembler.train.state import FoldState, load_state, save_state


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits_csv(tmp_path_factory) -> Path:
    """A CSV manifest of 240 digits (24 per class): small enough for a few epochs in seconds."""
    root = tmp_path_factory.mktemp("digits")
    folder = digits_folder(root / "digits")
    table = load_source("digits", cache_dir=folder)
    labels = table.labels
    keep = np.concatenate([np.flatnonzero(labels == c)[:24] for c in range(10)])
    keep.sort()
    lines = ["id,path,label,group"] + [
        f"{table.ids[i]},{table.paths[i]},{labels[i]},{table.ids[i]}" for i in keep
    ]
    csv = root / "digits240.csv"
    csv.write_text("\n".join(lines) + "\n")
    return csv


def _cli(csv: Path, registry: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ensembler", "train-folds", "--data", str(csv), "--arch", "test_resnet",
            "--no-pretrained", "--img-size", "32", "--k", "2", "--folds", "0", "--epochs", "3",
            "--batch-size", "16", "--lr", "0.01", "--workers", "0", "--device", "cpu", "--deterministic",
            "--family", "fam", "--registry", str(registry), "--no-progress", *extra]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


def test_killed_run_resumes_to_identical_weights(digits_csv, tmp_path):
    # The uninterrupted reference runs in this process (same settings as the CLI run below).
    ref_reg = tmp_path / "ref"
    train_folds(load_source(digits_csv), TrainConfig(
        arch="test_resnet", pretrained=False, img_size=32, k=2, folds=[0], epochs=3, batch_size=16, lr=0.01,
        workers=0, device="cpu", deterministic=True, family="fam"), Registry(ref_reg), progress=False)

    # The same run through the CLI, SIGKILLed as soon as the first epoch's state is on disk.
    reg = tmp_path / "crash"
    state_path = reg / "fam" / "fold0" / "state.pt"
    proc = subprocess.Popen(_cli(digits_csv, reg), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not state_path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    state = load_state(state_path)
    assert 1 <= state.epoch < 3 and not state.finished
    assert state.fold == 0 and state.config["epochs"] == 3 and len(state.history) == state.epoch
    assert not (reg / "registry.json").exists() or not json.loads((reg / "registry.json").read_text() or "[]")

    # A fresh run into the same family refuses; --resume continues it.
    cfg = TrainConfig(arch="test_resnet", pretrained=False, img_size=32, k=2, folds=[0], epochs=3, family="fam")
    with pytest.raises(EnsemblerError, match="--resume"):
        train_folds(load_source(digits_csv), cfg, Registry(reg), progress=False)
    resumed = subprocess.run(_cli(digits_csv, reg, "--resume"), env=_env(), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr

    a = load_file(str(ref_reg / "fam" / "fold0" / "weights.safetensors"))
    b = load_file(str(reg / "fam" / "fold0" / "weights.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    # Every epoch's metrics (including those trained after the kill) match the reference.
    assert (ref_reg / "fam" / "metrics.csv").read_text() == (reg / "fam" / "metrics.csv").read_text()
    with np.load(ref_reg / "fam" / "oof.npz") as x, np.load(reg / "fam" / "oof.npz") as y:
        np.testing.assert_array_equal(x["logits"], y["logits"])
        np.testing.assert_array_equal(x["ids"], y["ids"])
    assert not state_path.exists()


def _config(**kw):
    base = dict(arch="test_resnet", k=3, epochs=1, img_size=32, pretrained=False, lr=1e-2, workers=0,
                batch_size=16, device="cpu", family="fam")
    base.update(kw)
    return TrainConfig(**base)


def test_partial_oof_then_resume_completes_it(digits_csv, tmp_path):
    table = load_source(digits_csv)
    registry = Registry(tmp_path / "reg")
    part = train_folds(table, _config(folds=[1]), registry, progress=False)
    assert not part.oof_complete
    assert any("OOF is partial" in n for n in part.notes)
    with np.load(part.oof_path) as z:
        fold1 = part.table.ids[part.table.folds == 1]
        assert sorted(z["ids"].tolist()) == sorted(fold1.tolist())
        assert set(z["folds"].tolist()) == {1}
    meta = read_logits(part.oof_path).meta  # the sidecar oof.json
    assert meta["complete"] is False and meta["rows"] < len(table)
    sha1 = registry.get("fam-fold1").sha256

    full = train_folds(table, _config(), registry, progress=False, resume=True)
    assert full.oof_complete and full.oof_rows == len(table)
    assert [f.skipped for f in full.folds] == [False, True, False]
    assert registry.get("fam-fold1").sha256 == sha1  # the finished fold was not retrained
    assert [e.oof for e in registry.family("fam")] == ["fam/oof.npz"] * 3
    with np.load(full.oof_path) as z:
        np.testing.assert_array_equal(z["ids"], table.ids)


def test_resume_refuses_changed_settings(digits_csv, tmp_path):
    table = load_source(digits_csv)
    registry = Registry(tmp_path / "reg")
    train_folds(table, _config(folds=[0]), registry, progress=False)
    with pytest.raises(EnsemblerError, match="seed: 0 -> 1"):
        train_folds(table, _config(seed=1), registry, progress=False, resume=True)


def test_corrupt_state_is_named(tmp_path):
    path = tmp_path / "fold0" / "state.pt"
    state = FoldState(epoch=1, finished=False, stopped_early=False, model={"w": torch.ones(3)}, optimizer={},
                      scheduler=None, scaler=None, rng={}, best_score=0.5, best_epoch=1, bad_epochs=0,
                      best_model={"w": torch.ones(3)}, best_val_logits=np.zeros((4, 2), np.float32),
                      history=[{"epoch": 1}], fold=0)
    save_state(path, state)
    back = load_state(path)
    assert back.epoch == 1 and back.best_score == 0.5 and back.fold == 0
    assert back.best_val_logits.dtype == np.float32 and back.best_val_logits.shape == (4, 2)
    incomplete = state.to_dict()
    del incomplete["best_model"]
    torch.save(incomplete, path)
    with pytest.raises(EnsemblerError, match=r"state.pt is not a complete training state \(missing \['best_model'\]\)"):
        load_state(path)
    save_state(path, state)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(EnsemblerError, match="state.pt"):
        load_state(path)
