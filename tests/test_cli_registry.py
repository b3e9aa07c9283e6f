"""`ensembler registry list|show|import|verify|remove`, driven in-process."""

from __future__ import annotations

import json

import pytest
import timm
import torch

from ensembler.cli import main
from ensembler.registry import Registry


pytestmark = pytest.mark.usefixtures("wide_console")


def _err(capsys) -> str:
    # cli.main prints errors through rich, which wraps long lines at spaces: undo that.
    return " ".join(capsys.readouterr().err.split())


def _save(path, num_classes=3, seed=0, wrap=None):
    torch.manual_seed(seed)
    sd = timm.create_model("test_resnet", num_classes=num_classes).state_dict()
    torch.save(wrap(sd) if wrap else sd, path)
    return sd


def test_import_list_show_verify_remove(tmp_path, capsys):
    reg_dir = tmp_path / "reg"
    r = ["--registry", str(reg_dir)]
    _save(tmp_path / "best.pth")
    _save(tmp_path / "other.pth.tar", seed=1, wrap=lambda sd: {"state_dict": {"module." + k: v for k, v in sd.items()}})

    assert main(["registry", "import", str(tmp_path / "best.pth"), "--arch", "test_resnet",
                 "--classes", "cat,dog,bird", "--family", "res", "--fold", "0", "--img-size", "32", *r]) == 0
    out = capsys.readouterr().out
    assert "imported res-fold0" in out and "3 classes" in out and "input 32x32" in out
    assert main(["registry", "import", str(tmp_path / "other.pth.tar"), "--arch", "test_resnet",
                 "--num-classes", "3", "--fold", "1", "--family", "res", *r]) == 0
    capsys.readouterr()

    reg = Registry(reg_dir)
    entries = {e.id: e for e in reg.entries()}
    assert set(entries) == {"res-fold0", "res-fold1"}
    assert entries["res-fold0"].labels.classes == ("cat", "dog", "bird")
    reg.update("res-fold0", metrics={"val_macro_f1": 0.8125})

    assert main(["registry", "list", *r]) == 0
    out = capsys.readouterr().out
    for text in ("res-fold0", "res-fold1", "test_resnet", "32x32", "160x160", "0.8125",
                 entries["res-fold0"].sha256[:12], "val macro-F1"):
        assert text in out, text

    assert main(["registry", "show", "res-fold0", *r]) == 0
    out = capsys.readouterr().out
    for text in ("test_resnet", "cat", "bird", entries["res-fold0"].sha256[:40], "weights.safetensors",
                 "crop_pct", "torch", "0.8125"):
        assert text in out, text
    assert main(["registry", "show", "res-fold0", "--json", *r]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["sha256"] == entries["res-fold0"].sha256 and shown["fold"] == 0

    assert main(["registry", "verify", *r]) == 0
    assert "all 2 checkpoints verified" in capsys.readouterr().out

    # tamper with fold 1: verify exits non-zero naming the file; fold 0 still verifies alone
    path = reg.path(entries["res-fold1"].weights)
    data = bytearray(path.read_bytes())
    data[-7] ^= 0xFF
    path.write_bytes(bytes(data))
    assert main(["registry", "verify", *r]) == 1
    err = _err(capsys)
    assert str(path) in err and "res-fold1" in err and "1 of 2 checkpoints failed" in err
    assert "res-fold0:" not in err
    assert main(["registry", "verify", "res-fold0", *r]) == 0
    capsys.readouterr()

    assert main(["registry", "remove", "res-fold1", *r]) == 0
    assert "removed res-fold1" in capsys.readouterr().out
    assert not path.exists()
    assert [e.id for e in Registry(reg_dir).entries()] == ["res-fold0"]
    assert main(["registry", "remove", "res-fold1", *r]) == 2
    assert "no entry or family 'res-fold1'" in _err(capsys)


def test_registry_root_from_environment(tmp_path, capsys, monkeypatch):
    _save(tmp_path / "m.pth")
    monkeypatch.setenv("ENSEMBLER_REGISTRY", str(tmp_path / "env_reg"))
    assert main(["registry", "import", str(tmp_path / "m.pth"), "--arch", "test_resnet", "--num-classes", "3"]) == 0
    assert [e.id for e in Registry(tmp_path / "env_reg").entries()] == ["m"]
    capsys.readouterr()
    assert main(["registry", "list"]) == 0
    assert "m " in capsys.readouterr().out


def test_import_errors_exit_2_with_clear_messages(tmp_path, capsys):
    r = ["--registry", str(tmp_path / "reg")]
    _save(tmp_path / "ten.pth", num_classes=10)
    assert main(["registry", "import", str(tmp_path / "ten.pth"), "--arch", "test_resnet",
                 "--num-classes", "3", *r]) == 2
    err = _err(capsys)
    assert "fc.weight checkpoint [10, 96] vs model [3, 96]" in err and "fc.bias" in err

    torch.manual_seed(0)
    sd = timm.create_model("test_resnet", num_classes=3).state_dict()
    torch.save({"state_dict": sd, "state_dict_ema": sd}, tmp_path / "ema.pth")
    base = ["registry", "import", str(tmp_path / "ema.pth"), "--arch", "test_resnet", "--num-classes", "3", *r]
    assert main(base) == 2
    assert "--ema or --no-ema" in _err(capsys)
    assert main([*base, "--ema"]) == 0
    assert Registry(tmp_path / "reg").get("ema").train_config["import"]["key"] == "state_dict_ema"
    capsys.readouterr()
    assert main([*base, "--no-ema"]) == 2  # same id again
    assert "already has an entry 'ema'" in _err(capsys)

    assert main(["registry", "import", str(tmp_path / "ten.pth"), "--arch", "resnet5O",
                 "--num-classes", "10", *r]) == 2
    assert "unknown timm architecture 'resnet5O'" in _err(capsys)

    assert main(["registry", "show", "nope", *r]) == 2
    assert "no entry" in _err(capsys)


def test_import_factored_mask_head(tmp_path, capsys):
    _save(tmp_path / "fact.pth", num_classes=8)
    r = ["--registry", str(tmp_path / "reg")]
    assert main(["registry", "import", str(tmp_path / "fact.pth"), "--arch", "test_resnet",
                 "--label-space", "mask", "--age-bands", "29,58", "--head", "factored", "--img-size", "32", *r]) == 0
    entry = Registry(tmp_path / "reg").get("fact")
    assert entry.head == "factored" and entry.num_classes == 18 and entry.num_outputs == 8
    assert entry.labels.meta["age_bands"] == [29, 58]


def test_list_and_verify_empty_registry(tmp_path, capsys):
    assert main(["registry", "list", "--registry", str(tmp_path / "none")]) == 0
    assert "has no entries" in capsys.readouterr().out
    assert main(["registry", "verify", "--registry", str(tmp_path / "none")]) == 0
    assert not (tmp_path / "none").exists()  # reading never creates the folder
