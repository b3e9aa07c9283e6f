"""Reliability of train-folds (issue 11, part "train").

A diverged run (``--lr 1e9``) is refused with a message naming the flag and leaves no NaN
anywhere (JSON written by the project is strict); a full disk is a ``WriteError`` naming the
file (not torch's ``RuntimeError``), and a fresh run that failed before anything could be
resumed leaves no ``run.json`` behind; a second run of a family that is training is refused.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from ensembler.cli import main
from ensembler.data import load_source
from ensembler.errors import EnsemblerError, WriteError
from ensembler.registry import Registry
from ensembler.train import TrainConfig, train_folds

from conftest import fill_disk

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def tiny_csv(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    rows = ["path,label"]
    for i in range(12):
        arr = np.full((16, 16, 3), 40 if i % 2 else 200, np.uint8) + rng.integers(0, 20, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(arr).save(tmp_path / "img" / f"{i}.png")
        rows.append(f"img/{i}.png,{'a' if i % 2 else 'b'}")
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    return tmp_path / "data.csv"


def _config(**kw):
    base = dict(arch="test_resnet", k=2, folds=[0], epochs=1, batch_size=12, pretrained=False, img_size=16,
                workers=0, device="cpu", family="fam", augment="none")
    return TrainConfig(**{**base, **kw})


def _strict(path):
    def refuse(name):
        raise AssertionError(f"{path} holds {name}: not strict JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_lr_1e9_is_refused_naming_the_flag_and_leaves_no_nan(tmp_path, tiny_csv):
    reg = Registry(tmp_path / "reg")
    with pytest.raises(EnsemblerError, match=r"(diverged|training loss became).*lower --lr.*nothing of family 'fam'"):
        train_folds(load_source(tiny_csv), _config(lr=1e9), reg, progress=False)
    assert not (tmp_path / "reg" / "fam").exists()  # no run.json left: the same command can run again
    for f in (tmp_path / "reg").rglob("*.json"):
        _strict(f)


def test_a_full_disk_during_train_folds_is_a_write_error_and_leaves_no_run_json(small_tmpfs, tiny_csv, capsys):
    reg = small_tmpfs / "reg"
    Registry(reg)  # the folder exists before the disk fills
    reg.mkdir(parents=True, exist_ok=True)
    (reg / "keep.txt").write_text("earlier file\n")
    fill_disk(small_tmpfs, leave=32 << 10)  # room for run.json, none for a checkpoint
    rc = main(["train-folds", "--data", str(tiny_csv), "--arch", "test_resnet", "--no-pretrained", "--img-size", "16",
               "--k", "2", "--folds", "0", "--epochs", "1", "--batch-size", "12", "--workers", "0", "--device", "cpu",
               "--family", "fam", "--registry", str(reg), "--no-progress"])
    err = capsys.readouterr().err.replace("\n", "")
    assert rc == 2 and "Traceback" not in err and "RuntimeError" not in err, err
    assert "cannot write" in err and "fam/fold0/" in err and "no space left on the device" in err, err
    assert "nothing of family 'fam' was kept" in err
    assert not (reg / "fam").exists()
    assert (reg / "keep.txt").read_text() == "earlier file\n"


def test_a_second_run_of_a_family_that_is_training_is_refused(tmp_path, tiny_csv):
    from filelock import FileLock

    reg = Registry(tmp_path / "reg")
    fam = tmp_path / "reg" / "fam"
    fam.mkdir(parents=True)
    (fam / "run.json").write_text("{}")
    before = (fam / "run.json").read_bytes()
    with FileLock(str(fam / ".train.lock")):  # another process is training fam
        with pytest.raises(EnsemblerError, match=r"family 'fam' is being trained by another process.*--resume"):
            train_folds(load_source(tiny_csv), _config(), reg, progress=False, resume=True)
    assert (fam / "run.json").read_bytes() == before and sorted(p.name for p in fam.iterdir()) == [
        ".train.lock", "run.json"]


def test_non_finite_metrics_never_reach_registry_json(tmp_path):
    import torch

    from ensembler.labels import LabelSpace
    from ensembler.models import create_model

    reg = Registry(tmp_path / "reg")
    ls = LabelSpace(("a", "b"))
    reg.add(create_model("test_resnet", label_space=ls), family="f", fold=0, arch="test_resnet", head="flat",
            label_space=ls, metrics={"val_f1": 0.5})
    before = (tmp_path / "reg" / "registry.json").read_bytes()
    with pytest.raises(EnsemblerError, match=r"registry\.json: refusing to write a non-finite number .*val_loss = nan"):
        reg.update("f-fold0", metrics={"val_f1": 0.5, "val_loss": float("nan")})
    assert (tmp_path / "reg" / "registry.json").read_bytes() == before
    assert torch.isfinite(torch.tensor(_strict(tmp_path / "reg" / "registry.json")["entries"][0]["metrics"]["val_f1"]))
