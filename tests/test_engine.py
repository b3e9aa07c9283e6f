"""Engine: per-member preprocessing, decode once per geometry, families, cache, corrupt images, CLI."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from ensembler.data import SampleTable, decode_image
from ensembler.errors import ImageDecodeError, RegistryError
from ensembler.infer import CacheWarning, LogitStore, TTAError, predict_batch, predict_members
from ensembler.logits import read_logits_set
from ensembler.labels import Factor, LabelSpace
from ensembler.models import create_model, joint_logits
from ensembler.preprocess import Preprocess
from ensembler.registry import Registry

from conftest import res_eff_registry, write_image_table

LABELS = LabelSpace(("cat", "dog", "fox"))


def _write_images(folder, n=7, seed=0):
    # different sizes and aspect ratios: each member's resize/crop matters
    return write_image_table(folder, LABELS, n, seed=seed, size=lambda i: (36 + 3 * i, 48 - 2 * i),
                             ext=lambda i: "png" if i % 2 else "jpg")


@pytest.fixture
def setup(tmp_path):
    table = _write_images(tmp_path / "images")
    pre_r = Preprocess(input_size=(32, 32), crop_pct=0.9, interpolation="bilinear", mean=(0.5, 0.5, 0.5),
                       std=(0.5, 0.5, 0.5))
    pre_e = Preprocess(input_size=(40, 40), crop_pct=1.0, interpolation="bicubic", mean=(0.485, 0.456, 0.406),
                       std=(0.229, 0.224, 0.225))
    reg = res_eff_registry(tmp_path / "checkpoints", LABELS, pre_r, pre_e)
    return table, reg, tmp_path / "cache"


def _alone(reg, entry_id, table, tta):
    """What one checkpoint gives on its own eval transform, one image at a time."""
    entry = reg.get(entry_id)
    model = reg.load_model(entry)
    pre = entry.pre
    rows = []
    for path in table.paths:
        x = pre.normalize(pre.geometry_transform()(decode_image(path)).unsqueeze(0))
        rows.append(predict_batch(model, x, tta=tta).numpy()[0])
    return np.stack(rows)


@pytest.mark.parametrize("tta", ["none", "flip"])
def test_each_member_gets_its_own_preprocessing(setup, tta):
    table, reg, cache = setup
    out = predict_members(table, ["res-fold0", "eff"], reg, tta=tta, cache_dir=cache, progress=False,
                          batch_size=3)
    assert list(out) == ["res-fold0", "eff"]
    for name in out:
        assert out[name].logits.dtype == np.float32 and out[name].logits.shape == (len(table), 3)
        np.testing.assert_allclose(out[name].logits, _alone(reg, name, table, tta), atol=1e-5, rtol=0)
        assert list(out[name].ids) == list(table.ids)
        # ... and exactly what the member gets when it runs alone through the engine
        alone = predict_members(table, name, reg, tta=tta, cache_dir=cache, use_cache=False, progress=False,
                                batch_size=3)
        np.testing.assert_array_equal(alone[name].logits, out[name].logits)


def test_one_decode_per_geometry_and_family_is_mean_of_folds(setup, monkeypatch):
    table, reg, cache = setup
    import ensembler.data

    calls = []
    real = ensembler.data.decode_image
    monkeypatch.setattr(ensembler.data, "decode_image", lambda p: calls.append(p) or real(p))
    out = predict_members(table, "all", reg, tta="hflip", cache_dir=cache, progress=False)
    assert list(out) == ["res", "eff"]
    # res-fold0 and res-fold1 share a geometry: one decode each image for both, one more for eff
    assert len(calls) == 2 * len(table)
    folds = predict_members(table, "res-fold0,res-fold1", reg, tta="hflip", cache_dir=cache, progress=False)
    np.testing.assert_allclose(out["res"].logits, (folds["res-fold0"].logits + folds["res-fold1"].logits) / 2,
                               atol=1e-6)
    assert out["res"].meta["checkpoints"] == ["res-fold0", "res-fold1"]
    assert not np.allclose(folds["res-fold0"].logits, folds["res-fold1"].logits)


def test_second_run_does_no_forward_and_no_cache_forces_one(setup, monkeypatch):
    table, reg, cache = setup
    forwards = []
    real_load = Registry.load_model

    def counting_load(self, entry, device="cpu"):
        model = real_load(self, entry, device)
        model.register_forward_hook(lambda m, i, o: forwards.append(i[0].shape[0]))
        return model

    monkeypatch.setattr(Registry, "load_model", counting_load)
    first = predict_members(table, "all", reg, tta="flip", cache_dir=cache, progress=False)
    assert sum(forwards) == 3 * 4 * len(table)  # 3 checkpoints x 4 views x N images
    assert not any(m.meta["cached"] for m in first.values())

    forwards.clear()
    second = predict_members(table, "all", reg, tta="flip", cache_dir=cache, progress=False)
    assert forwards == []
    assert all(m.meta["cached"] for m in second.values())
    for name in first:
        np.testing.assert_array_equal(first[name].logits, second[name].logits)

    forced = predict_members(table, "all", reg, tta="flip", cache_dir=cache, use_cache=False, progress=False)
    assert sum(forwards) == 3 * 4 * len(table)
    assert not any(m.meta["cached"] for m in forced.values())

    # another plan or merge is another key: computed, not served from the flip cache
    forwards.clear()
    other = predict_members(table, "eff", reg, tta="flip", merge="mean-probs", cache_dir=cache, progress=False)
    assert sum(forwards) == 4 * len(table) and not other["eff"].meta["cached"]


def test_changed_image_invalidates_the_cache(setup):
    table, reg, cache = setup
    predict_members(table, "eff", reg, cache_dir=cache, progress=False)
    from PIL import Image

    Image.new("RGB", (30, 30), (255, 0, 0)).save(table.paths[0])  # new size/mtime: new fingerprint
    again = predict_members(table, "eff", reg, cache_dir=cache, progress=False)
    assert not again["eff"].meta["cached"]


def test_corrupt_cache_file_is_recomputed_with_a_warning(setup):
    table, reg, cache = setup
    first = predict_members(table, "eff", reg, cache_dir=cache, progress=False)
    npz = first["eff"].meta["cache_files"][0]
    with open(npz, "r+b") as fh:
        fh.truncate(40)
    with pytest.warns(CacheWarning, match="unreadable cached logits .*eff-"):
        again = predict_members(table, "eff", reg, cache_dir=cache, progress=False)
    assert not again["eff"].meta["cached"]
    np.testing.assert_array_equal(again["eff"].logits, first["eff"].logits)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert predict_members(table, "eff", reg, cache_dir=cache, progress=False)["eff"].meta["cached"]


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_stops_the_run_naming_the_file_and_caches_nothing(setup, workers):
    table, reg, cache = setup
    bad = table.paths[4]
    with open(bad, "wb") as fh:
        fh.write(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ImageDecodeError, match=rf"img4\.jpg"):
        predict_members(table, "all", reg, tta="flip", cache_dir=cache, workers=workers, batch_size=2,
                        progress=False)
    leftovers = list(cache.rglob("*")) if cache.exists() else []
    assert leftovers == []


def test_d4_on_non_square_member_is_refused_naming_it(setup):
    table, reg, cache = setup
    reg.add(create_model("test_resnet", label_space=LABELS), family="wide", fold=None, arch="test_resnet",
            head="flat", label_space=LABELS, preprocess=Preprocess(input_size=(32, 48), crop_pct=1.0))
    with pytest.raises(TTAError, match=r"checkpoint 'wide' \(input 32x48\).*d4.*square"):
        predict_members(table, "wide", reg, tta="d4", cache_dir=cache, progress=False)
    predict_members(table, "wide", reg, tta="flip", cache_dir=cache, progress=False)  # flip is fine


def test_bad_arguments_are_refused(setup):
    table, reg, cache = setup
    with pytest.raises(TTAError, match="refused.*NaN"):
        predict_members(table, "all", reg, merge="gmean", cache_dir=cache, progress=False)
    with pytest.raises(RegistryError, match="no entry or family 'nope'"):
        predict_members(table, "nope", reg, cache_dir=cache, progress=False)
    with pytest.raises(Exception, match="backend must be one of"):
        predict_members(table, "all", reg, backend="tensorrt", cache_dir=cache, progress=False)


def test_factored_head_views_merge_in_joint_space(tmp_path):
    space = LabelSpace.from_factors([Factor("a", ("x", "y")), Factor("b", ("p", "q", "r"))])
    table = _write_images(tmp_path / "images", n=4)
    table = SampleTable(table.frame.assign(label=0), space)
    reg = Registry(tmp_path / "checkpoints")
    pre = Preprocess(input_size=(32, 32), crop_pct=1.0)
    reg.add(create_model("test_resnet", label_space=space, head="factored"), family="fac", fold=None,
            arch="test_resnet", head="factored", label_space=space, preprocess=pre)
    out = predict_members(table, "fac", reg, tta="hflip", merge="mean-probs", cache_dir=tmp_path / "c",
                          progress=False)["fac"]
    assert out.logits.shape == (4, 6)
    model = reg.load_model("fac")
    x = torch.stack([pre.geometry_transform()(decode_image(p)) for p in table.paths])
    x = pre.normalize(x)
    with torch.no_grad():
        probs = [joint_logits(model(v), "factored", space).exp() for v in (x, x.flip(3))]
    np.testing.assert_allclose(np.exp(out.logits), ((probs[0] + probs[1]) / 2).numpy(), atol=1e-5)


def test_cli_infer_writes_member_logits(setup, tmp_path, monkeypatch):
    from ensembler.cli import main

    table, reg, cache = setup
    csv = tmp_path / "manifest.csv"
    table.frame[["id", "path", "label", "group"]].assign(label=lambda f: f["label"].map(
        lambda i: LABELS.classes[i])).to_csv(csv, index=False)
    out = tmp_path / "logits.npz"
    argv = ["infer", "--data", str(csv), "--registry", str(reg.root), "--members", "res,eff", "--tta", "hflip",
            "--out", str(out), "--workers", "0", "--cache-dir", str(cache)]
    assert main(argv) == 0
    got = read_logits_set(out)
    assert list(got) == ["res", "eff"] and got["res"].logits.shape == (len(table), 3)
    direct = predict_members(table, "res,eff", reg, tta="hflip", cache_dir=cache, progress=False)
    assert direct["res"].meta["cached"]  # the CLI run filled the cache
    np.testing.assert_array_equal(got["eff"].logits, direct["eff"].logits)
    assert main(argv[:-4] + ["--merge", "tsharpen", "--out", str(out)]) == 2
    assert len(LogitStore(cache).entries()) == 3


@pytest.mark.parametrize("chunk_size, expected_max", [(None, 8), (3, 3), (64, 7 * 4)])
def test_cpu_forwards_are_chunked_and_channels_last(setup, monkeypatch, chunk_size, expected_max):
    # On a CPU small forwards are faster per image (see tta.CPU_CHUNK_SIZE), so by default
    # the 7 images x 4 flip views run 8 at a time, in channels-last, with the same result.
    table, reg, cache = setup
    seen = []
    real_load = Registry.load_model

    def spying_load(self, entry, device="cpu"):
        model = real_load(self, entry, device)
        model.register_forward_hook(
            lambda m, i, o: seen.append((i[0].shape[0], i[0].is_contiguous(memory_format=torch.channels_last))))
        return model

    monkeypatch.setattr(Registry, "load_model", spying_load)
    out = predict_members(table, "eff", reg, tta="flip", batch_size=16, cache_dir=cache, use_cache=False,
                          chunk_size=chunk_size, progress=False)["eff"]
    assert max(n for n, _ in seen) == expected_max and sum(n for n, _ in seen) == 7 * 4
    assert all(cl for _, cl in seen)
    monkeypatch.setattr(Registry, "load_model", real_load)
    np.testing.assert_allclose(out.logits, _alone(reg, "eff", table, "flip"), atol=1e-4)
