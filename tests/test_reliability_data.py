"""Reliability of data input and limits (issue 11, part "data").

Integer labels are class names (never an index to allocate up to) and keep their meaning in
the submission; one image is one row (compared by real path: a symlinked class folder or a
CSV listing a file twice is refused or reported); float TIFFs decode to the right values or
are refused by name; a non-UTF-8 file name is refused before any image runs; sizes, TTA
scales and class counts have limits with errors naming the flag; class maps of data and
members are checked before any forward.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from ensembler.cli import main
from ensembler.data import load_source, split_folds
from ensembler.errors import DataError, EnsemblerError
from ensembler.labels import LabelSpace


def _png(path, value=0):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (value, value, value)).save(path)
    return path


def _csv(folder, header, rows):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data.csv").write_text("\n".join([header, *rows]) + "\n")
    return folder / "data.csv"


def _bytes_of(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------- integer labels
def test_a_label_of_10000000_is_one_more_class_not_an_index_to_allocate_up_to(tmp_path, capsys):
    for i in range(6):
        _png(tmp_path / f"{i}.png", i)
    csv = _csv(tmp_path, "path,label", [f"{i}.png,{lab}" for i, lab in enumerate([0, 1, 0, 1, 10000000, 0])])
    table = load_source(csv)
    assert table.label_space.classes == ("0", "1", "10000000")
    assert table.class_counts().tolist() == [3, 2, 1]
    from ensembler.models import head_num_outputs

    assert head_num_outputs(table.label_space, "flat") == 3  # train-folds builds a 3-way head
    assert main(["data", "inspect", "--data", str(csv)]) == 0
    assert "10000000" in capsys.readouterr().out


def test_more_distinct_labels_than_the_class_limit_are_refused(tmp_path, monkeypatch):
    from ensembler.data import sources

    monkeypatch.setattr(sources, "MAX_CLASSES", 4)
    for i in range(5):
        _png(tmp_path / f"{i}.png", i)
    csv = _csv(tmp_path, "path,label", [f"{i}.png,{i * 7}" for i in range(5)])
    with pytest.raises(DataError, match=r"data\.csv: 5 distinct labels, more than the limit of 4 classes"):
        load_source(csv)


def test_integer_labels_minus_one_zero_one_keep_their_meaning(tmp_path):
    from ensembler.submit import render_submission

    for i in range(6):
        _png(tmp_path / f"{i}.png", i)
    csv = _csv(tmp_path, "path,label", [f"{i}.png,{lab}" for i, lab in enumerate([-1, 0, 1, -1, 0, 1])])
    table = load_source(csv)
    assert table.label_space.classes == ("-1", "0", "1")
    assert table.class_names().tolist() == ["-1", "0", "1", "-1", "0", "1"]
    # a prediction of the class named "0" is written as 0, not as its index 1
    sub = pd.read_csv(__import__("io").BytesIO(render_submission(table, np.array([1, 0, 2, 1, 1, 0]))))
    assert sub["label"].tolist() == [0, -1, 1, 0, 0, -1] and sub["class_name"].astype(str).tolist()[0] == "0"
    # data split writes them as themselves and reads them back unchanged
    out = tmp_path / "folds.csv"
    split_folds(table, k=2).to_csv(out)
    assert pd.read_csv(out)["label"].tolist() == [-1, 0, 1, -1, 0, 1]
    again = load_source(out)
    assert again.label_space.classes == table.label_space.classes and (again.labels == table.labels).all()
    # against a model's integer-named classes, "2" is an unknown name, never the index 2
    with pytest.raises(DataError, match=r"unknown class '2'"):
        table.label_space.index("2")


# ---------------------------------------------------------------------------- one image, one row
def test_a_class_folder_symlinked_to_the_root_is_refused_naming_the_link(tmp_path):
    root = tmp_path / "images"
    for cls in ("cat", "dog"):
        for i in range(2):
            _png(root / cls / f"{i}.png", i)
    os.symlink(".", root / "loopcls")
    before = _bytes_of(root / "cat")
    with pytest.raises(DataError, match=r"(?s)reached twice .*symlinked class folder\(s\): loopcls -> \..*"
                                        r"'cat/0\.png' and 'loopcls/cat/0\.png' are both .*cat/0\.png"):
        load_source(root)
    assert _bytes_of(root / "cat") == before


def test_the_same_image_twice_with_different_labels_or_groups_is_refused(tmp_path):
    _png(tmp_path / "img" / "a.png")
    _png(tmp_path / "img" / "b.png", 90)
    os.symlink("a.png", tmp_path / "img" / "a_link.png")
    rows = ["img/a.png,cat,p1,a", "img/b.png,dog,p2,b", "img/../img/a.png,dog,p1,a-again"]
    with pytest.raises(DataError, match=r"(?s)line 2 \(id 'a', label 'cat', group 'p1'\) and line 4 .*"
                                        r"same image .*a\.png with different labels"):
        load_source(_csv(tmp_path, "path,label,group,id", rows))
    rows = ["img/a.png,cat,p1", "img/b.png,dog,p2", "img/a_link.png,cat,p3"]
    with pytest.raises(DataError, match=r"(?s)line 4 .*group 'p3'.* in different groups: it could land in train and "
                                        r"validation at once"):
        load_source(_csv(tmp_path, "path,label,group", rows))


def test_the_same_image_twice_in_one_group_or_unlabeled_is_reported_and_stays_in_one_fold(tmp_path):
    for i in range(6):
        _png(tmp_path / "img" / f"{i}.png", 20 * i)
    rows = [f"img/{i}.png,{'cat' if i % 2 else 'dog'},p{i},{i}" for i in range(6)] + ["img/./0.png,dog,p0,0b"]
    with pytest.warns(UserWarning, match=r"1 image file\(s\) are listed on two rows.*same label and group"):
        table = load_source(_csv(tmp_path, "path,label,group,id", rows))
    folds = split_folds(table, k=2).folds
    assert folds[0] == folds[6]  # one group: never in two folds
    with pytest.warns(UserWarning, match=r"each id gets its own prediction"):
        load_source(_csv(tmp_path / "test", "path,id", [f"{tmp_path}/img/0.png,x", f"{tmp_path}/img/0.png,y"]))


def test_byte_identical_copies_in_other_groups_or_labels_are_reported_by_split_train_and_inspect(tmp_path, capsys):
    """Copies with the same bytes under two file names (BAD 9, by content): data split and
    train-folds warn, naming both ids, and inspect --verify lists every pair whole; copies in
    one group with one label are harmless and not reported; nothing is written by inspect."""
    import shutil
    import warnings

    from ensembler.data import identical_images, warn_identical_images

    for i in range(6):
        _png(tmp_path / "img" / f"{i}.png", 20 * i)
    shutil.copy(tmp_path / "img" / "0.png", tmp_path / "img" / "copy_of_0.png")  # person p9: a leak
    shutil.copy(tmp_path / "img" / "1.png", tmp_path / "img" / "copy_of_1.png")  # same person, same label
    shutil.copy(tmp_path / "img" / "2.png", tmp_path / "img" / "relabelled_2.png")  # same person, other label
    rows = [f"img/{i}.png,{'cat' if i % 2 else 'dog'},p{i},{i}" for i in range(6)]
    rows += ["img/copy_of_0.png,dog,p9,c0", "img/copy_of_1.png,cat,p1,c1", "img/relabelled_2.png,cat,p2,r2"]
    csv = _csv(tmp_path, "path,label,group,id", rows)
    table = load_source(csv)
    pairs = identical_images(table)
    assert [(p.first, p.second, p.other_group, p.other_label) for p in pairs] == [
        (0, 6, True, False), (1, 7, False, False), (2, 8, False, True)]
    with pytest.warns(UserWarning, match=r"(?s)2 image\(s\) have a byte-identical copy in another group or with another "
                                         r"label.*id '0' .*group 'p0'\) and id 'c0' .*group 'p9'\) are the same image "
                                         r"\(sha256 [0-9a-f]{12}\) in different groups.*id 'r2'.* with different labels"):
        lines = warn_identical_images(table)
    assert len(lines) == 2 and not any("'c1'" in line for line in lines)

    out = tmp_path / "folds.csv"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["data", "split", "--data", str(csv), "--k", "2", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "byte-identical copy in another group" in err and "'c0'" in err and out.is_file()

    before = _bytes_of(tmp_path / "img")
    assert main(["data", "inspect", "--data", str(csv), "--verify"]) == 0
    text = capsys.readouterr().out
    assert "2 image(s) have a byte-identical copy" in text
    assert f"{tmp_path}/img/copy_of_0.png" in text and "relabelled_2.png" in text and "copy_of_1.png" not in text
    assert _bytes_of(tmp_path / "img") == before

    from ensembler.registry import Registry
    from ensembler.train import TrainConfig, train_folds

    cfg = TrainConfig(arch="test_resnet", k=2, epochs=1, img_size=16, pretrained=False, workers=0, batch_size=8,
                      device="cpu", family="fam")
    with pytest.warns(UserWarning, match=r"a copy in another group can sit in train and validation at once"):
        train_folds(table, cfg, Registry(tmp_path / "reg"), progress=False)


# ---------------------------------------------------------------------------- decoding, file names
def test_a_float32_tiff_in_0_to_1_decodes_to_the_right_8bit_values(tmp_path):
    from PIL import Image

    from ensembler.data import decode_image
    from ensembler.errors import ImageDecodeError

    arr = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(arr, mode="F").save(tmp_path / "f.tif")
    got = np.asarray(decode_image(tmp_path / "f.tif"))
    assert got.shape == (8, 8, 3) and got[..., 0].max() == 255
    np.testing.assert_array_equal(got[..., 0], np.rint(arr * 255).astype(np.uint8))
    bad = arr.copy()
    bad[0, 0] = np.nan
    Image.fromarray(bad, mode="F").save(tmp_path / "nan.tif")
    with pytest.raises(ImageDecodeError, match=r"nan\.tif: a 32-bit float image with NaN"):
        decode_image(tmp_path / "nan.tif")
    Image.fromarray(arr - 0.5, mode="F").save(tmp_path / "neg.tif")
    with pytest.raises(ImageDecodeError, match=r"neg\.tif: a 32-bit float image with values -0\.5\.\.0\.5"):
        decode_image(tmp_path / "neg.tif")


def test_a_non_utf8_file_name_is_refused_before_any_image_runs(tmp_path):
    root = tmp_path / "images"
    _png(root / "cat" / "ok.png")
    _png(root / "dog" / "ok.png")
    raw = os.path.join(os.fsencode(root / "dog"), b"caf\xe9.png")
    with open(raw, "wb") as fh:
        fh.write((root / "dog" / "ok.png").read_bytes())
    with pytest.raises(DataError, match=r"path of row \d+ is not valid UTF-8: .*caf\\\\xe9\.png.*rename the file"):
        load_source(root)


def test_inspect_verify_prints_whole_file_names_in_an_80_column_terminal(tmp_path, capsys, monkeypatch):
    from ensembler.cli import _common

    monkeypatch.setenv("COLUMNS", "80")
    _common.console.cache_clear()
    root = tmp_path / "images"
    _png(root / "cat" / "ok.png")
    long = "x" * 110 + ".png"
    (root / "dog").mkdir()
    (root / "dog" / long).write_bytes(b"not an image")
    try:
        assert main(["data", "inspect", "--data", str(root), "--verify"]) == 1
    finally:
        _common.console.cache_clear()
    out = capsys.readouterr().out
    assert f"{root / 'dog' / long}: not a recognised image" in out.replace("\n", "")
    assert "1 of 2 images fail to decode" in out


# ---------------------------------------------------------------------------- limits
def test_img_size_tta_scales_and_views_have_limits_naming_the_flag(tmp_path):
    from ensembler.infer import parse_tta
    from ensembler.preprocess import MAX_INPUT_SIZE
    from ensembler.registry import Registry
    from ensembler.train import TrainConfig

    with pytest.raises(EnsemblerError, match=rf"--img-size must be an integer from 8 to {MAX_INPUT_SIZE}.*100000"):
        TrainConfig(arch="resnet18", img_size=100000)
    with pytest.raises(EnsemblerError, match=r"scales=1000.*positive factors up to 4"):
        parse_tta("scales=1000")
    with pytest.raises(EnsemblerError, match=r"center-crop is over the limit of 2048"):
        parse_tta("center-crop=100000")
    with pytest.raises(EnsemblerError, match=r"200 views, more than the limit of 128"):
        parse_tta("ten-crop=32+scales=" + ",".join(f"{0.5 + k / 100:g}" for k in range(20)))
    reg = Registry(tmp_path / "reg")
    (tmp_path / "x.pth").write_bytes(b"")
    with pytest.raises(EnsemblerError, match=r"--img-size must be an integer from 8 to 2048.*99999"):
        reg.import_checkpoint(tmp_path / "x.pth", arch="resnet18", num_classes=3, img_size=99999)
    assert not (tmp_path / "reg").exists()


def test_registry_import_classes_and_label_space_json_are_checked(tmp_path, capsys):
    (tmp_path / "x.pth").write_bytes(b"")
    reg = tmp_path / "reg"
    base = ["registry", "import", str(tmp_path / "x.pth"), "--arch", "resnet18", "--registry", str(reg)]
    assert main(base + ["--classes", "a,a,b"]) == 2
    err = capsys.readouterr().err.replace("\n", "")
    assert "--classes: not a valid set of classes (duplicate class names" in err and "['a']" in err and "Traceback" not in err
    for text, expect in (('{"classes": "abc"}', "expected a JSON object like"), ("[1, 2]", "expected a JSON object"),
                         ('{"classes": ["a", "b"], "factors": [3]}', "'factors' must be a list"),
                         ('{"classes": ["a"]}', "needs at least 2 classes")):
        (tmp_path / "ls.json").write_text(text)
        assert main(base + ["--label-space", str(tmp_path / "ls.json")]) == 2
        err = capsys.readouterr().err.replace("\n", "")
        assert f"--label-space {tmp_path / 'ls.json'}" in err and expect in err and "Traceback" not in err, err
    assert not reg.exists()


# ---------------------------------------------------------------------------- class maps before inference
@pytest.fixture
def members(tmp_path):
    import torch

    from ensembler.models import create_model
    from ensembler.preprocess import Preprocess
    from ensembler.registry import Registry

    torch.manual_seed(0)
    pre = Preprocess(input_size=(16, 16), crop_pct=1.0, interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3)
    reg = Registry(tmp_path / "checkpoints")
    for fam, classes in (("animals", ("cat", "dog", "fox")), ("animals2", ("cat", "dog", "fox")),
                         ("colours", ("red", "green", "blue"))):
        ls = LabelSpace(classes)
        reg.add(create_model("test_resnet", label_space=ls), family=fam, fold=None, arch="test_resnet",
                head="flat", label_space=ls, preprocess=pre)
    for i in range(4):
        _png(tmp_path / "img" / f"{i}.png", 40 * i)
    return tmp_path, reg


def _evaluate_cli(capsys, folder, reg, csv, members):
    rc = main(["evaluate", "--data", str(csv), "--registry", str(reg.root), "--members", members, "--workers", "0",
               "--cache-dir", str(folder / "cache")])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err.replace("\n", "")


def test_a_labelled_eval_set_lacking_a_class_is_scored_in_the_members_classes(members, capsys):
    from ensembler.evaluate import evaluate

    folder, reg = members
    csv = _csv(folder / "eval", "path,label", [f"{folder}/img/{i}.png,{'dog' if i % 2 else 'fox'}" for i in range(4)])
    res = evaluate(load_source(csv), reg, members="animals", workers=0, cache_dir=folder / "cache", progress=False)
    # 'dog' is class 1 and 'fox' class 2 of the members, not the data's own 0 and 1
    assert [r["class"] for r in res.per_class] == ["cat", "dog", "fox"]
    assert [r["support"] for r in res.per_class] == [0, 2, 2]


def test_eval_labels_the_members_do_not_know_are_refused_before_any_forward(members, capsys):
    folder, reg = members
    csv = _csv(folder / "eval", "path,label", [f"{folder}/img/{i}.png,{'dog' if i % 2 else 'wolf'}" for i in range(4)])
    rc, out, err = _evaluate_cli(capsys, folder, reg, csv, "animals")
    assert rc == 2 and "classes the members do not predict: ['wolf']" in err and "Traceback" not in err
    assert not (folder / "cache").exists()  # no model ran


def test_members_with_different_class_maps_are_refused_before_any_forward(members, capsys):
    folder, reg = members
    csv = _csv(folder / "eval", "path,label", [f"{folder}/img/{i}.png,{'dog' if i % 2 else 'cat'}" for i in range(4)])
    rc, out, err = _evaluate_cli(capsys, folder, reg, csv, "animals,colours")
    assert rc == 2 and "class maps differ: member 'animals'" in err and "'colours'" in err
    assert not (folder / "cache").exists()
