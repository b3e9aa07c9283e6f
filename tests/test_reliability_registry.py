"""Reliability of the registry (issue 11, part "registry").

``registry.json`` may be hand-edited or hostile: every path it names resolves inside the registry
root or its entry is refused by name (``registry remove`` never deletes a file outside it); entry
fields are checked when the index is read, naming ``registry.json``, the entry and the field, and
``registry verify`` checks what ``predict`` and ``tune-weights`` will read; ``model_kwargs`` holds
only allowlisted loader arguments. Nothing already written changes when a case is refused.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest

from ensembler import LabelSpace, Preprocess, RegistryError
from ensembler.cli import main
from ensembler.registry import Registry

from conftest import RunsCode, tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread", "wide_console")

AB = LabelSpace(("a", "b"))


def _registry(tmp_path: Path) -> Registry:
    reg = Registry(tmp_path / "reg")
    for fold in (0, 1):
        reg.add(tiny_model(num_classes=2, seed=fold), family="r", fold=fold, arch="test_resnet", head="flat",
                label_space=AB, preprocess=Preprocess.from_timm("test_resnet", 32))
    return reg


def _edit(reg: Registry, entry_id: str, **fields) -> None:
    """Hand-edit one entry of registry.json (a value of ``...`` deletes the field)."""
    doc = json.loads(reg.index_path.read_text())
    for d in doc["entries"]:
        if d["id"] == entry_id:
            for k, v in fields.items():
                if v is ...:
                    d.pop(k, None)
                else:
                    d[k] = v
    reg.index_path.write_text(json.dumps(doc))  # NaN is written as NaN, as a hand edit could


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.endswith(".lock")}


def _images(folder: Path, n: int = 2) -> None:
    from PIL import Image

    for i in range(n):  # class folders a/ and b/
        (folder / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(folder / "ab"[i % 2] / f"img{i}.png")


def _cli(capsys, *argv) -> tuple[int, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, (out.out + out.err).replace("\n", "")


# ---------------------------------------------------------------------------- paths
@pytest.mark.parametrize("field", ["weights", "oof"])
@pytest.mark.parametrize("escape", ["absolute", "dotdot", "symlink"])
def test_remove_never_deletes_a_file_outside_the_registry(tmp_path, capsys, field, escape):
    reg = _registry(tmp_path)
    outside = tmp_path / "outside" / "precious.bin"
    outside.parent.mkdir()
    outside.write_bytes(b"not yours to delete\n")
    if escape == "absolute":
        rel = str(outside)
    elif escape == "dotdot":
        rel = os.path.relpath(outside, reg.root)  # ../outside/precious.bin
    else:
        (reg.root / "r" / "link").symlink_to(outside.parent, target_is_directory=True)
        rel = "r/link/precious.bin"
    _edit(reg, "r-fold1", **{field: rel})
    before = _snapshot(tmp_path)

    rc, err = _cli(capsys, "registry", "remove", "r-fold1", "--registry", str(reg.root))
    assert rc == 2 and "Traceback" not in err, err
    assert "entry 'r-fold1' (family 'r', fold 1)" in err and f"field '{field}'" in err, err
    assert "outside the registry root" in err or "absolute paths are refused" in err, err
    assert outside.read_bytes() == b"not yours to delete\n"
    assert _snapshot(tmp_path) == before  # the index and every file byte-identical

    with pytest.raises(RegistryError, match=rf"registry\.json: entry 'r-fold1' \(family 'r', fold 1\): field '{field}'"):
        reg.entries()  # no command reads through it
    with pytest.raises(RegistryError, match=rf"entry 'r-fold1'.*field '{field}'"):
        reg.remove("r-fold1")
    rc, err = _cli(capsys, "registry", "verify", "--registry", str(reg.root))
    assert rc == 1 and f"FAIL r-fold1: {reg.index_path}: entry 'r-fold1'" in err and f"field '{field}'" in err, err
    assert "FAIL r-fold0" not in err
    assert _snapshot(tmp_path) == before

    # The sound entry can still be removed, and the file outside stays.
    reg.remove("r-fold0")
    assert not (reg.root / "r" / "fold0").exists() and outside.read_bytes() == b"not yours to delete\n"


def test_an_update_cannot_point_an_entry_outside_the_registry(tmp_path):
    reg = _registry(tmp_path)
    before = _snapshot(tmp_path)
    with pytest.raises(RegistryError, match=r"entry 'r-fold0' \(family 'r', fold 0\): field 'oof'.*outside"):
        reg.update("r-fold0", oof="../../elsewhere.npz")
    assert _snapshot(tmp_path) == before


# ---------------------------------------------------------------------------- fields
def test_entries_that_are_not_objects_are_named_and_verify_reports_them(tmp_path, capsys):
    root = tmp_path / "reg"
    root.mkdir()
    (root / "registry.json").write_text('{"version": 1, "entries": [1, 2]}')
    before = _snapshot(tmp_path)
    with pytest.raises(RegistryError, match=r"registry\.json: entries\[0\] is a int \(1\), not an entry object"):
        Registry(root).entries()
    rc, err = _cli(capsys, "registry", "list", "--registry", str(root))
    assert rc == 2 and "Traceback" not in err and "entries[0] is a int" in err, err
    rc, err = _cli(capsys, "registry", "verify", "--registry", str(root))
    assert rc == 1 and "FAIL entries[0]:" in err and "FAIL entries[1]:" in err and "not an entry object" in err, err
    assert "2 of 2 checkpoints failed" in err
    assert _snapshot(tmp_path) == before


BAD_FIELDS = [
    ("label_space", "abc", r"field 'label_space' must be an object"),
    ("label_space", {"classes": "abc"}, r"field 'label_space' must hold 'classes': a list of class names"),
    ("label_space", {"classes": ["a"]}, r"field 'label_space' is not a valid label space \(a LabelSpace needs at least 2"),
    ("label_space", {"classes": ["a", "b"], "factors": "x"}, r"field 'label_space' 'factors' must be a list"),
    ("preprocess", [1, 2], r"field 'preprocess' must be an object"),
    ("preprocess", {"input_size": "big"}, r"field 'preprocess' is not a valid preprocess"),
    ("preprocess", {"input_size": [32, 32], "std": [0, 0, 0]}, r"field 'preprocess' is not a valid preprocess.*std > 0"),
    ("fold", "1", r"field 'fold' must be a non-negative integer or null, got '1'"),
    ("fold", -1, r"field 'fold' must be a non-negative integer or null, got -1"),
    ("head", "wide", r"field 'head' must be one of flat, factored, multilabel, got 'wide'"),
    ("sha256", [], r"field 'sha256' must be 64 lower-case hex digits, got \[\]"),
    ("arch", 5, r"field 'arch' must be a timm architecture name, got 5"),
    ("metrics", {"val_f1": float("nan")}, r"field 'metrics\.val_f1' is not finite \(NaN/inf\)"),
    ("train_config", {"lr": float("inf")}, r"field 'train_config\.lr' is not finite \(NaN/inf\)"),
    ("metrics", [0.5], r"field 'metrics' must be an object"),
    ("model_kwargs", [], r"field 'model_kwargs' must be an object"),
    ("target", 3, r"field 'target' must be a string or null"),
    ("sha256", ..., r"lacks field 'sha256'"),
    ("weights", ..., r"lacks field 'weights'"),
]


@pytest.mark.parametrize("field,value,match", BAD_FIELDS, ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(BAD_FIELDS)])
def test_a_malformed_entry_field_is_named_on_load_and_by_verify(tmp_path, capsys, field, value, match):
    reg = _registry(tmp_path)
    _images(tmp_path / "data")
    _edit(reg, "r-fold1", **{field: value})
    before = _snapshot(tmp_path)
    name = r"entry 'r-fold1' \(family 'r', fold 1\)" if field != "fold" else r"entry 'r-fold1' \(family 'r'(, fold -1)?\)"
    with pytest.raises(RegistryError, match=rf"registry\.json: {name}:? .*{match}"):
        reg.entries()
    with pytest.raises(RegistryError, match=match):
        reg.load_model("r-fold0")  # any read of the index names the bad entry: no TypeError later
    for argv in (["registry", "list"], ["registry", "show", "r-fold0"],
                 ["predict", "--data", str(tmp_path / "data"), "--members", "r", "--out", str(tmp_path / "sub.csv")]):
        rc, err = _cli(capsys, *argv, "--registry", str(reg.root))
        assert rc == 2 and "Traceback" not in err and "r-fold1" in err and "registry.json" in err, (argv, err)
    rc, err = _cli(capsys, "registry", "verify", "--registry", str(reg.root))
    assert rc == 1 and "FAIL r-fold1:" in err and "FAIL r-fold0" not in err and "1 of 2 checkpoints failed" in err, err
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("field,value,match", [
    ("arch", "resnet_nonexistent", r"unknown timm architecture 'resnet_nonexistent'"),
    ("head", "factored", r"a factored head needs a factored LabelSpace"),
    ("label_space", {"classes": ["a", "b", "c"]}, r"does not match test_resnet.*shape mismatch"),
])
def test_verify_checks_what_predict_will_need(tmp_path, capsys, field, value, match):
    """Well-formed fields that predict cannot use: verify says so (it said OK before)."""
    reg = _registry(tmp_path)
    _edit(reg, "r-fold1", **{field: value})
    before = _snapshot(tmp_path)
    rc, err = _cli(capsys, "registry", "verify", "--registry", str(reg.root))
    assert rc == 1 and "FAIL r-fold1:" in err and "r-fold1" in err, err
    assert __import__("re").search(match, err), err
    assert _snapshot(tmp_path) == before


def test_verify_checks_the_oof_file_tune_weights_reads(tmp_path, capsys):
    reg = _registry(tmp_path)
    (reg.root / "r" / "oof.npz").write_text("id,label\n1,a\n")
    _edit(reg, "r-fold1", oof="r/oof.npz")
    rc, err = _cli(capsys, "registry", "verify", "--registry", str(reg.root))
    assert rc == 1 and "FAIL r-fold1: OOF logits file of 'r-fold1'" in err and "oof.npz" in err, err


# ---------------------------------------------------------------------------- loader kwargs
@pytest.mark.parametrize("key", ["checkpoint_path", "pretrained_cfg_overlay", "pretrained_cfg", "features_only"])
def test_model_kwargs_off_the_allowlist_never_reach_timm(tmp_path, capsys, key):
    reg = _registry(tmp_path)
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps(RunsCode(marker)))
    value = {"checkpoint_path": str(evil), "pretrained_cfg_overlay": {"file": str(evil)},
             "pretrained_cfg": {"file": str(evil)}, "features_only": True}[key]
    _edit(reg, "r-fold1", model_kwargs={key: value})
    before = _snapshot(tmp_path)
    expected = rf"entry 'r-fold1' \(family 'r', fold 1\): field 'model_kwargs' key '{key}' is not a loader argument"
    with pytest.raises(RegistryError, match=expected):
        reg.load_model("r-fold1")
    rc, err = _cli(capsys, "registry", "verify", "--registry", str(reg.root))
    assert rc == 1 and f"field 'model_kwargs' key '{key}'" in err and "allowed: drop_path_rate, drop_rate, img_size" in err
    assert not marker.exists() and _snapshot(tmp_path) == before


def test_add_refuses_loader_kwargs_off_the_allowlist_and_keeps_the_safe_ones(tmp_path):
    reg = _registry(tmp_path)
    before = _snapshot(tmp_path)
    with pytest.raises(RegistryError, match=r"entry 's-fold0': field 'model_kwargs' key 'checkpoint_path'"):
        reg.add(tiny_model(num_classes=2), family="s", fold=0, arch="test_resnet", head="flat", label_space=AB,
                model_kwargs={"checkpoint_path": "/etc/passwd"})
    with pytest.raises(RegistryError, match=r"key 'drop_rate' must be a number in \[0, 1\), got 7"):
        reg.add(tiny_model(num_classes=2), family="s", fold=0, arch="test_resnet", head="flat", label_space=AB,
                model_kwargs={"drop_rate": 7})
    assert _snapshot(tmp_path) == before and not (reg.root / "s").exists()
    e = reg.add(tiny_model(num_classes=2), family="s", fold=0, arch="test_resnet", head="flat", label_space=AB,
                model_kwargs={"drop_rate": 0.2})
    assert reg.load_model(e.id) is not None and reg.verify() == []


# ---------------------------------------------------------------------------- file messages
@pytest.mark.parametrize("content,kind", [("hello world\n", "it is a text file (it starts 'hello world')"),
                                          ("model weights v1\n", "it is a text file (it starts 'model weights v1')"),
                                          ("", "it is empty")])
def test_a_text_file_named_pth_is_not_a_pytorch_checkpoint(tmp_path, capsys, content, kind):
    reg = _registry(tmp_path)
    (tmp_path / "t.pth").write_text(content)
    before = _snapshot(tmp_path)
    rc, err = _cli(capsys, "registry", "import", str(tmp_path / "t.pth"), "--arch", "test_resnet",
                   "--num-classes", "2", "--registry", str(reg.root))
    assert rc == 2 and "Traceback" not in err, err
    assert f"t.pth is not a PyTorch checkpoint: {kind}; expected a file written by torch.save" in err, err
    assert "weights_only" not in err and "likely succeed" not in err and "KeyError" not in err
    assert _snapshot(tmp_path) == before


def test_a_pickle_that_needs_code_is_refused_without_torchs_advice(tmp_path, capsys):
    import torch

    reg = _registry(tmp_path)
    marker = tmp_path / "code-ran"
    torch.save({"state_dict": tiny_model(num_classes=2).state_dict(), "payload": RunsCode(marker)}, tmp_path / "evil.pth")
    before = _snapshot(tmp_path)
    rc, err = _cli(capsys, "registry", "import", str(tmp_path / "evil.pth"), "--arch", "test_resnet",
                   "--num-classes", "2", "--registry", str(reg.root))
    assert rc == 2 and "refused to load" in err and "evil.pth for safety" in err and "(it needs io.open)" in err, err
    assert "weights_only=False" not in err and "likely succeed" not in err and "can still be loaded" not in err, err
    assert not marker.exists() and _snapshot(tmp_path) == before


def test_a_state_dict_with_a_string_value_names_the_key(tmp_path, capsys):
    import torch

    reg = _registry(tmp_path)
    sd = tiny_model(num_classes=2).state_dict()
    torch.save({**sd, "fc.note": "hello"}, tmp_path / "bare.pth")
    torch.save({"state_dict": {**sd, "fc.note": "hello"}, "epoch": 3}, tmp_path / "wrapped.pth")
    before = _snapshot(tmp_path)
    for name, expected in (("bare.pth", "bare.pth holds no state dict: key 'fc.note' holds a str, not a tensor"),
                           ("wrapped.pth", "wrapped.pth: 'state_dict' is not a state dict of tensors: key 'fc.note' "
                                           "holds a str, not a tensor")):
        rc, err = _cli(capsys, "registry", "import", str(tmp_path / name), "--arch", "test_resnet",
                       "--num-classes", "2", "--registry", str(reg.root))
        assert rc == 2 and expected in err, err
    assert _snapshot(tmp_path) == before


def _oof_commands(tmp_path, path):
    return [["evaluate", "--logits", str(path)], ["tune-weights", "--oof", str(path), "--out", str(tmp_path / "r.json")]]


@pytest.mark.parametrize("content,kind", [(b"hello world\n", "it is a text file (it starts 'hello world')"),
                                          (b"\x00\x01\x02\x03binary", r"it starts with the bytes b'\x00\x01\x02\x03bina'"),
                                          (b"", "it is empty")])
def test_a_file_named_npz_that_is_not_an_npz_archive_is_named(tmp_path, capsys, content, kind):
    path = tmp_path / "t.npz"
    path.write_bytes(content)
    before = _snapshot(tmp_path)
    for argv in _oof_commands(tmp_path, path):
        rc, err = _cli(capsys, *argv)
        assert rc == 2 and "Traceback" not in err, (argv, err)
        assert f"logits file {path} is not a readable .npz file: {kind}, not an npz archive; expected an .npz" in err, err
        assert "pickled" not in err
    assert _snapshot(tmp_path) == before


def test_a_bare_npy_says_what_layout_is_expected(tmp_path, capsys):
    import numpy as np

    path = tmp_path / "b.npy"
    np.save(path, np.zeros((3, 2)))
    before = _snapshot(tmp_path)
    for argv in _oof_commands(tmp_path, path):
        rc, err = _cli(capsys, *argv)
        assert rc == 2 and "Traceback" not in err and "TypeError" not in err, (argv, err)
        assert (f"logits file {path} is a bare .npy array (float64 (3, 2)), not a logits file: expected an .npz "
                "archive holding 'ids' (N,) and 'logits' (N, C) arrays") in err, err
    assert _snapshot(tmp_path) == before


def test_object_arrays_in_an_npz_are_refused_naming_the_array(tmp_path, capsys):
    import numpy as np

    marker = tmp_path / "code-ran"
    path = tmp_path / "o.npz"
    np.savez(path, ids=np.array(["a", "b"]), logits=np.array([RunsCode(marker), 1.0], dtype=object))
    before = _snapshot(tmp_path)
    for argv in _oof_commands(tmp_path, path):
        rc, err = _cli(capsys, *argv)
        assert rc == 2 and f"logits file {path}: array 'logits' is an object array" in err and "refused" in err, err
    assert not marker.exists() and _snapshot(tmp_path) == before
