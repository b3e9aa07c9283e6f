"""ONNX export parity (ResNet, EfficientNet), the CPU-provider backend, sha256 checks, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ensembler.errors import IntegrityError
from ensembler.infer import export_onnx, predict_members
from ensembler.infer.onnx import load_onnx_forward, make_session, onnx_path
from ensembler.labels import LabelSpace
from ensembler.models import create_model
from ensembler.preprocess import Preprocess
from ensembler.registry import Registry

from conftest import write_image_table

LABELS = LabelSpace(("a", "b", "c", "d"))


@pytest.fixture
def reg(tmp_path):
    torch.manual_seed(0)
    reg = Registry(tmp_path / "checkpoints")
    for arch, size in (("test_resnet", 32), ("test_efficientnet", 40)):
        reg.add(create_model(arch, label_space=LABELS), family=arch, fold=0, arch=arch, head="flat",
                label_space=LABELS, preprocess=Preprocess(input_size=(size, size), crop_pct=1.0))
    return reg


@pytest.mark.parametrize("entry_id", ["test_resnet-fold0", "test_efficientnet-fold0"])
def test_export_parity_and_dynamic_batch(reg, entry_id):
    result = export_onnx(reg, entry_id)
    entry = reg.get(entry_id)
    assert result.path == reg.path(entry.weights).parent / "model.onnx" and result.path.exists()
    assert result.max_abs_diff <= 1e-4
    record = json.loads(result.path.with_name("model.onnx.json").read_text())
    assert record["onnx_sha256"] == result.sha256 and record["weights_sha256"] == entry.sha256
    # the registry entry itself records which ONNX file belongs to these weights
    onnx_info = reg.get(entry_id).extra["onnx"]
    assert onnx_info["onnx_sha256"] == result.sha256 and onnx_info["file"] == "model.onnx"
    # any batch size runs, and matches torch on it
    model = reg.load_model(entry_id)
    session = make_session(result.path, "cpu", threads=1)
    x = torch.randn(5, 3, *entry.pre.input_size)
    got = session.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), atol=1e-4, rtol=0)
    assert [o for o in session.get_providers()] == ["CPUExecutionProvider"]


def test_onnx_backend_matches_torch_with_tta(reg, tmp_path):
    table = write_image_table(tmp_path, LABELS, 5, size=(44, 50), ext="jpg", name="im{i}", id="{i}")
    kw = dict(tta="flip+center-crop=28", cache_dir=tmp_path / "cache", progress=False, batch_size=2)
    eager = predict_members(table, "all", reg, backend="torch", **kw)
    # not exported yet: the onnx backend exports on first use (with the parity check)
    onnx = predict_members(table, "all", reg, backend="onnx", **kw)
    for name in eager:
        assert onnx[name].meta["backend"] == "onnx" and not onnx[name].meta["cached"]
        np.testing.assert_allclose(onnx[name].logits, eager[name].logits, atol=1e-4, rtol=0)
    assert all(onnx_path(reg, e).exists() for e in reg.entries())
    # backend is part of the cache key: the onnx results are cached separately
    assert predict_members(table, "all", reg, backend="onnx", **kw)["test_resnet"].meta["cached"]


def test_modified_onnx_file_is_refused(reg):
    result = export_onnx(reg, "test_resnet-fold0")
    with open(result.path, "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(IntegrityError, match=r"model\.onnx of 'test_resnet-fold0' was modified"):
        load_onnx_forward(reg, reg.get("test_resnet-fold0"))


def test_missing_onnx_without_export_gives_the_command(reg):
    with pytest.raises(IntegrityError, match=r"is missing; run `ensembler export-onnx test_resnet-fold0`"):
        load_onnx_forward(reg, reg.get("test_resnet-fold0"), export_if_missing=False)


def test_parity_failure_writes_nothing(reg):
    with pytest.raises(IntegrityError, match=r"does not match torch: max abs diff .* > tolerance 1e-12"):
        export_onnx(reg, "test_efficientnet-fold0", atol=1e-12)
    folder = reg.path(reg.get("test_efficientnet-fold0").weights).parent
    assert sorted(p.name for p in folder.iterdir()) == ["weights.safetensors"]


def test_cli_export_onnx_prints_parity(reg, capsys):
    from ensembler.cli import main

    assert main(["export-onnx", "test_resnet-fold0", "--registry", str(reg.root), "--opset", "17"]) == 0
    out = capsys.readouterr().out
    assert "max abs diff" in out and "model.onnx" in out
    assert main(["export-onnx", "test_efficientnet-fold0", "--registry", str(reg.root), "--atol", "1e-15"]) == 2
    assert "does not match torch" in capsys.readouterr().err
    assert main(["export-onnx", "nope", "--registry", str(reg.root)]) == 2
