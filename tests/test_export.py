"""export-ensemble: the recipe as one ONNX graph, parity with predict --recipe, refusals."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from ensembler.cli import main
from ensembler.data import SampleTable, load_source
from ensembler.ensemble import Recipe, RecipeMember
from ensembler.export import ExportError, export_ensemble, predict_onnx, read_ensemble_meta
from ensembler.labels import LabelSpace
from ensembler.models import create_model
from ensembler.predict import predict
from ensembler.preprocess import Preprocess
from ensembler.registry import Registry

from conftest import res_eff_registry, write_mask_eval

LABELS = LabelSpace(("cat", "dog", "fox"))
PRE = Preprocess(input_size=(32, 32), crop_pct=1.0, interpolation="bilinear", mean=(0.5, 0.5, 0.5),
                 std=(0.5, 0.5, 0.5))
TTA = "hflip+five-crop=24"


def _table(folder, n=11, size=(40, 36), seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)).save(path)
        rows.append({"id": f"s{i}", "path": str(path), "label": i % 3, "group": f"g{i}"})
    return SampleTable(pd.DataFrame(rows), LABELS, {"kind": "csv", "path": str(folder)})


def _shas(reg, family):
    return tuple(e.sha256 for e in reg.entries() if e.family == family)


def _registry(root, eff_pre):
    """Seeded: family 'res' (two test_resnet folds at PRE) and 'eff' (one test_efficientnet at ``eff_pre``)."""
    return res_eff_registry(root, LABELS, PRE, eff_pre)


@pytest.fixture
def setup(tmp_path, one_torch_thread):
    eff_pre = Preprocess(input_size=(32, 32), crop_pct=1.0, interpolation="bilinear")  # imagenet mean/std
    return _table(tmp_path / "images"), _registry(tmp_path / "checkpoints", eff_pre)


def _recipe(reg, vote="weighted", biases=(0.2, -0.3, 0.05)):
    return Recipe(members=(RecipeMember("res", "family", LABELS.classes, weight=0.7, temperature=1.3,
                                        sha256=_shas(reg, "res")),
                           RecipeMember("eff", "family", LABELS.classes, weight=0.3, temperature=0.8,
                                        sha256=_shas(reg, "eff"))),
                  vote=vote, class_biases=biases, method="scipy")


@pytest.mark.parametrize("vote,biases", [("weighted", (0.2, -0.3, 0.05)), ("hard", None)])
def test_exported_ensemble_equals_predict_recipe(setup, tmp_path, vote, biases):
    table, reg = setup
    recipe = _recipe(reg, vote, biases)
    want = predict(table, reg, recipe=recipe, tta=TTA, cache_dir=tmp_path / "cache", progress=False)
    res = export_ensemble(recipe, reg, tmp_path / "ensemble.onnx", tta=TTA)
    got = predict_onnx(table, res.path, batch_size=4, progress=False)  # 4+4+3: the batch axis is dynamic
    np.testing.assert_allclose(got.probs, want.probs, atol=1e-4)
    np.testing.assert_array_equal(got.pred, want.pred)
    meta = read_ensemble_meta(res.path)
    assert meta["recipe_hash"] == recipe.hash() == got.recipe_hash
    assert meta["tta"] == "hflip+five-crop=24x24" and meta["views"] == 10
    assert [g["input_size"] for g in meta["inputs"]] == [[32, 32]]
    recorded = {c["id"]: c["sha256"] for m in meta["members"] for c in m["checkpoints"]}
    assert recorded == {e.id: e.sha256 for e in reg.entries()}


def test_stacked_recipe_exports_its_regression(setup, tmp_path):
    table, reg = setup
    rng = np.random.default_rng(0)
    stack = {"coef": rng.normal(size=(3, 6)).tolist(), "intercept": [0.1, -0.2, 0.0], "classes": [0, 2], "C": 1.0}
    recipe = Recipe(members=_recipe(reg).members, vote="stack", method="stack", stack=stack)
    want = predict(table, reg, recipe=recipe, tta="hflip", cache_dir=tmp_path / "cache", progress=False)
    got = predict_onnx(table, export_ensemble(recipe, reg, tmp_path / "stack.onnx", tta="hflip").path, progress=False)
    np.testing.assert_allclose(got.probs, want.probs, atol=1e-4)
    np.testing.assert_array_equal(got.pred, want.pred)
    assert np.all(got.probs[:, 1] == 0)  # a class the stack never saw


def test_factored_head_and_per_factor_members_export(tmp_path, one_torch_thread):
    torch.manual_seed(0)
    space = LabelSpace.mask()
    reg = Registry(tmp_path / "checkpoints")
    for f in ("mask", "gender", "age"):
        fs = space.factor_space(f)
        reg.add(create_model("test_resnet", label_space=fs), family=f"only-{f}", fold=None, arch="test_resnet",
                head="flat", label_space=fs, preprocess=PRE, target=f)
    reg.add(create_model("test_efficientnet", label_space=space, head="factored"), family="fact", fold=None,
            arch="test_efficientnet", head="factored", label_space=space, preprocess=PRE)
    parts = ("only-mask", "only-gender", "only-age")
    recipe = Recipe(members=(
        RecipeMember("+".join(parts), "composed", space.classes, weight=0.4, temperature=1.1, parts=parts,
                     sha256=tuple(s for p in parts for s in _shas(reg, p))),
        RecipeMember("fact", "family", space.classes, weight=0.6, temperature=0.9, sha256=_shas(reg, "fact"))),
        vote="weighted", class_biases=tuple(np.linspace(-0.2, 0.2, 18)))
    table = load_source(write_mask_eval(tmp_path / "eval", n=5, size=(32, 32)))
    want = predict(table, reg, recipe=recipe, tta="flip", cache_dir=tmp_path / "cache", progress=False)
    res = export_ensemble(recipe, reg, tmp_path / "mask.onnx", tta="flip")
    got = predict_onnx(table, res.path, progress=False)
    np.testing.assert_allclose(got.probs, want.probs, atol=1e-4)
    np.testing.assert_array_equal(got.pred, want.pred)
    assert got.label_space.classes == space.classes
    assert read_ensemble_meta(res.path)["members"][0]["parts"] == list(parts)


def test_members_with_another_geometry_are_resized_in_the_graph(tmp_path, one_torch_thread):
    """A member at another input size is resized from the input geometry inside the graph: a
    resize of the already-cropped image, so close to the engine (which resizes the original)."""
    reg = _registry(tmp_path / "checkpoints", Preprocess(input_size=(28, 28), crop_pct=0.875, interpolation="bicubic"))
    table = _table(tmp_path / "images", size=(32, 32))
    recipe = _recipe(reg)
    want = predict(table, reg, recipe=recipe, cache_dir=tmp_path / "cache", progress=False)
    res = export_ensemble(recipe, reg, tmp_path / "ensemble.onnx")
    assert res.input_size == (32, 32)  # the geometry most checkpoints share
    got = predict_onnx(table, res.path, progress=False)
    assert np.abs(got.probs - want.probs).max() < 5e-3
    np.testing.assert_array_equal(got.pred, want.pred)
    # one input per geometry: each decoded as the engine decodes it, so equal to float precision
    exact = export_ensemble(recipe, reg, tmp_path / "exact.onnx", inputs="per-geometry")
    assert [g["input_size"] for g in exact.meta["inputs"]] == [[32, 32], [28, 28]]
    got = predict_onnx(table, exact.path, batch_size=5, progress=False)
    np.testing.assert_allclose(got.probs, want.probs, atol=1e-4)
    np.testing.assert_array_equal(got.pred, want.pred)


def test_what_cannot_be_exported_is_refused_with_the_reason(setup, tmp_path):
    table, reg = setup
    raw = Recipe(members=(RecipeMember("oof", "file", LABELS.classes),))
    with pytest.raises(ExportError, match="raw OOF file"):
        export_ensemble(raw, reg, tmp_path / "a.onnx")
    unknown = Recipe(members=_recipe(reg).members, vote="weighted", method="ridge-stack")
    with pytest.raises(ExportError, match="method 'ridge-stack' cannot be exported"):
        export_ensemble(unknown, reg, tmp_path / "b.onnx")
    stale = Recipe(members=(RecipeMember("res", "family", LABELS.classes, sha256=("0" * 64, "1" * 64)),))
    with pytest.raises(ExportError, match="re-run tune-weights"):
        export_ensemble(stale, reg, tmp_path / "c.onnx")
    assert not list(tmp_path.glob("*.onnx"))
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    with pytest.raises(ExportError, match="bad.onnx is not an ONNX file"):
        predict_onnx(table, tmp_path / "bad.onnx", progress=False)


def test_cli_export_then_predict_writes_the_same_submission(setup, tmp_path, capsys):
    table, reg = setup
    recipe_path = _recipe(reg).save(tmp_path / "recipe.json")
    csv = tmp_path / "data.csv"
    table.frame[["path", "id"]].to_csv(csv, index=False)  # unlabeled test data
    base = ["--registry", str(reg.root)]
    assert main(["predict", "--data", str(csv), *base, "--recipe", str(recipe_path), "--tta", "hflip",
                 "--cache-dir", str(tmp_path / "cache"), "--workers", "0", "--out", str(tmp_path / "s1" / "a.csv")]) == 0
    assert main(["export-ensemble", *base, "--recipe", str(recipe_path), "--tta", "hflip",
                 "--out", str(tmp_path / "e.onnx")]) == 0
    assert "input 'images': uint8 (batch, 3, 32, 32)" in capsys.readouterr().out
    assert main(["export-ensemble", *base, "--recipe", str(recipe_path), "--out", str(tmp_path / "e.onnx")]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["predict", "--data", str(csv), "--backend", "onnx-ensemble", "--model", str(tmp_path / "e.onnx"),
                 "--workers", "0", "--out", str(tmp_path / "s2" / "a.csv")]) == 0
    assert (tmp_path / "s1" / "a.csv").read_bytes() == (tmp_path / "s2" / "a.csv").read_bytes()
    row = json.loads((tmp_path / "s2" / "ledger.jsonl").read_text().splitlines()[-1])
    assert json.dumps(row).count(Recipe.load(recipe_path).hash()) >= 1 and "onnx-ensemble" in json.dumps(row)
    assert main(["predict", "--data", str(csv), "--backend", "onnx-ensemble", "--model", str(tmp_path / "e.onnx"),
                 "--tta", "flip", "--out", str(tmp_path / "s3.csv")]) == 2
    assert "--tta cannot be used with --backend onnx-ensemble" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_recipe_exports_with_parity(tmp_path):
    """The acceptance run: the demo's tuned recipe, its TTA, probabilities within 1e-4 of predict --recipe."""
    from ensembler.demo import TTA, run_demo

    demo = run_demo(tmp_path / "demo", quick=True, progress=False)
    reg = Registry(demo.out_dir / "checkpoints")
    test = load_source(demo.out_dir / "splits" / "test.csv")
    want = predict(test, reg, recipe=demo.out_dir / "recipe.json", tta=TTA, progress=False)
    res = export_ensemble(demo.out_dir / "recipe.json", reg, tmp_path / "demo.onnx", tta=TTA)
    got = predict_onnx(test, res.path, progress=False)
    np.testing.assert_allclose(got.probs, want.probs, atol=1e-4)
    np.testing.assert_array_equal(got.pred, want.pred)
