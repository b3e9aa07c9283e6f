"""Sources -> SampleTable, image decoding, fingerprints (ensembler.data)."""

from __future__ import annotations

import argparse
import io
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFile

from conftest import MASK_STEMS, write_mask_eval, write_mask_tree
from ensembler.data import (
    SampleTable,
    decode_image,
    detect_source,
    digits_folder,
    load_source,
    load_source_from_args,
    read_label_fix,
    verify_images,
)
from ensembler.errors import DataError, ImageDecodeError
from ensembler.labels import LabelSpace


def _png(path: Path, color=(10, 20, 30), size=(8, 6), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def _jpeg_bytes(size=(64, 48), seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


# ---------------------------------------------------------------------------- digits
@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
    """A cache root shared by this module's digits tests (writing 1,797 PNGs takes seconds)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def digits_cache(digits_root, monkeypatch):
    monkeypatch.setenv("ENSEMBLER_CACHE", str(digits_root))
    return digits_root / "digits"


def test_digits_table(digits_cache):
    t = load_source("digits")
    assert len(t) == 1797 and t.labeled
    assert t.label_space.classes == tuple(str(d) for d in range(10))
    assert t.ids[42] == "digit_00042"
    assert len(set(t.groups)) == len(t)  # one group per image
    assert t.source["kind"] == "digits" and Path(t.source["path"]) == digits_cache
    assert np.bincount(t.labels).min() > 150
    img = decode_image(t.paths[0])
    assert img.mode == "RGB" and img.size == (32, 32)
    arr = np.asarray(img)
    assert (arr[..., 0] == arr[..., 1]).all() and arr.max() > 200 and arr.min() == 0


def test_digits_cache_is_reused_and_deterministic(tmp_path, digits_cache):
    a = digits_folder()  # $ENSEMBLER_CACHE/digits
    assert a == digits_cache
    before = {p.name: p.stat().st_mtime_ns for p in a.iterdir()}
    assert digits_folder(digits_cache) == a
    assert load_source("digits").source["path"] == str(a)
    assert {p.name: p.stat().st_mtime_ns for p in a.iterdir()} == before  # nothing rewritten
    b = digits_folder(tmp_path / "b")
    for name in ("digit_00000.png", "digit_00777.png", "digit_01796.png"):
        assert np.array_equal(np.asarray(Image.open(a / name)), np.asarray(Image.open(b / name)))
    assert (a / "labels.csv").read_text() == (b / "labels.csv").read_text()


def test_digits_from_args_ignores_a_commands_own_cache_dir(tmp_path, digits_cache):
    logits = tmp_path / "logit-cache"
    logits.mkdir()
    (logits / "abc.npz").write_bytes(b"not digits")
    args = argparse.Namespace(data="digits", source=None, age_bands=None, label_fix=None, cache_dir=str(logits))
    t = load_source_from_args(args)
    assert t.source["path"] == str(digits_cache) and [p.name for p in logits.iterdir()] == ["abc.npz"]


def test_digits_crash_mid_write_leaves_no_cache(tmp_path, monkeypatch):
    import ensembler.data as data

    real_save = Image.Image.save
    calls = {"n": 0}

    def flaky_save(self, fp, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 100:
            raise OSError("disk full")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", flaky_save)
    with pytest.raises(OSError, match="disk full"):
        data.digits_folder(tmp_path / "digits")
    assert not (tmp_path / "digits").exists()
    assert list(tmp_path.iterdir()) == []  # temp folder removed too


def test_digits_half_cache_is_rebuilt(tmp_path):
    folder = digits_folder(tmp_path / "d")
    (folder / "digit_00010.png").unlink()  # a cache someone half-deleted
    assert digits_folder(tmp_path / "d") == folder
    assert (folder / "digit_00010.png").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


def test_digits_refuses_to_overwrite_a_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.txt").write_text("precious")
    with pytest.raises(DataError, match="mine.*not a digits cache"):
        digits_folder(tmp_path / "mine")
    assert (tmp_path / "mine" / "thesis.txt").read_text() == "precious"


# ---------------------------------------------------------------------------- CSV manifests
def _manifest(tmp_path, text: str, n_images=4) -> Path:
    for i in range(n_images):
        _png(tmp_path / "imgs" / f"im{i}.png", color=(i, i, i))
    csv = tmp_path / "m.csv"
    csv.write_text(text)
    return csv


def test_csv_class_names_relative_paths_default_ids_and_groups(tmp_path, monkeypatch):
    csv = _manifest(tmp_path, "path,label\nimgs/im0.png,dog\nimgs/im1.png,cat\n./imgs/im2.png,dog\nimgs/im3.png,bird\n")
    monkeypatch.chdir(tmp_path.parent)  # paths resolve against the CSV's folder, not the cwd
    t = load_source(csv)
    assert t.source == {"kind": "csv", "path": str(csv)}
    assert t.label_space.classes == ("bird", "cat", "dog")  # sorted
    assert t.labels.tolist() == [2, 1, 2, 0]
    assert t.ids.tolist() == ["imgs/im0.png", "imgs/im1.png", "imgs/im2.png", "imgs/im3.png"]
    assert t.paths[1] == str(tmp_path / "imgs" / "im1.png") and os.path.isabs(t.paths[0])
    assert t.groups.tolist() == t.ids.tolist()
    assert t.frame["label"].dtype == "Int64"


def test_csv_integer_labels_groups_ids_and_absolute_paths(tmp_path):
    absolute = tmp_path / "imgs" / "im3.png"
    csv = _manifest(tmp_path, f"id,path,label,group\na,imgs/im0.png,0\tx\n".replace("\t", ",")
                    + f"b,imgs/im1.png,3,x\nc,imgs/im2.png,1,y\nd,{absolute},2,z\n")
    t = load_source(csv)
    assert t.label_space.classes == ("0", "1", "2", "3")
    assert t.labels.tolist() == [0, 3, 1, 2]
    assert t.ids.tolist() == ["a", "b", "c", "d"] and t.groups.tolist() == ["x", "x", "y", "z"]
    assert t.paths[3] == str(absolute)


def test_csv_header_case_bom_whitespace_and_extra_columns(tmp_path):
    csv = _manifest(tmp_path, "\ufeffPath , Label,note\n imgs/im0.png , a ,hi\nimgs/im1.png,b,\n", 2)
    t = load_source(csv)
    assert t.label_space.classes == ("a", "b") and t.frame["note"].tolist() == ["hi", ""]


def test_csv_with_label_space_maps_names_and_indices(tmp_path):
    space = LabelSpace(("neg", "pos", "unsure"))
    csv = _manifest(tmp_path, "path,label\nimgs/im0.png,pos\nimgs/im1.png,2\n", 2)
    t = load_source(csv, label_space=space)
    assert t.label_space is space and t.labels.tolist() == [1, 2]


def test_csv_without_label_column_is_unlabeled(tmp_path):
    csv = _manifest(tmp_path, "path\nimgs/im0.png\nimgs/im1.png\n", 2)
    t = load_source(csv)
    assert not t.labeled and t.label_space is None and len(t) == 2
    assert t.frame["label"].isna().all()
    with pytest.raises(DataError, match="unlabeled"):
        t.labels
    space = LabelSpace(("a", "b"))
    assert load_source(csv, label_space=space).label_space is space


def test_csv_missing_path_column_lists_columns(tmp_path):
    csv = _manifest(tmp_path, "file,label\nimgs/im0.png,a\n", 1)
    with pytest.raises(DataError, match=r"m\.csv: no 'path' column; columns found: \['file', 'label'\]"):
        load_source(csv)


def test_csv_duplicate_id_names_id_and_both_lines(tmp_path):
    csv = _manifest(tmp_path, "id,path,label\nx,imgs/im0.png,a\ny,imgs/im1.png,b\nx,imgs/im2.png,a\n", 3)
    with pytest.raises(DataError, match=r"m\.csv: duplicate id 'x' on line 2 and line 4"):
        load_source(csv)


def test_csv_duplicate_derived_id(tmp_path):
    csv = _manifest(tmp_path, "path,label\nimgs/im0.png,a\n./imgs/im0.png,b\n", 1)
    with pytest.raises(DataError, match="duplicate id 'imgs/im0.png'"):
        load_source(csv)


def test_csv_unknown_class_names_row_and_label(tmp_path):
    csv = _manifest(tmp_path, "path,label\nimgs/im0.png,cat\nimgs/im1.png,zebra\n", 2)
    with pytest.raises(DataError, match=r"m\.csv, line 3: unknown class 'zebra'"):
        load_source(csv, label_space=LabelSpace(("cat", "dog")))
    with pytest.raises(DataError, match=r"line 3: class index 7 out of range"):
        csv.write_text("path,label\nimgs/im0.png,0\nimgs/im1.png,7\n")
        load_source(csv, label_space=LabelSpace(("cat", "dog")))


def test_csv_missing_file_names_file_and_line(tmp_path):
    csv = _manifest(tmp_path, "path,label\nimgs/im0.png,a\nimgs/gone.png,b\n", 1)
    with pytest.raises(DataError, match=r"m\.csv: 1 image file\(s\) not found:\s+line 3: .*imgs/gone\.png"):
        load_source(csv)


def test_csv_empty(tmp_path):
    (tmp_path / "zero.csv").write_text("")
    with pytest.raises(DataError, match=r"zero\.csv is empty"):
        load_source(tmp_path / "zero.csv")
    (tmp_path / "header.csv").write_text("path,label\n")
    with pytest.raises(DataError, match=r"header\.csv: the CSV is empty"):
        load_source(tmp_path / "header.csv")


def test_csv_empty_cells_are_errors(tmp_path):
    csv = _manifest(tmp_path, "path,label\nimgs/im0.png,a\nimgs/im1.png,\n", 2)
    with pytest.raises(DataError, match="empty label on line 3"):
        load_source(csv)
    csv.write_text("path,label,group\nimgs/im0.png,a,g\nimgs/im1.png,b,\n")
    with pytest.raises(DataError, match="empty group on line 3"):
        load_source(csv)


def test_csv_single_class_is_an_error(tmp_path):
    csv = _manifest(tmp_path, "path,label\nimgs/im0.png,a\nimgs/im1.png,a\n", 2)
    with pytest.raises(DataError, match="only one class"):
        load_source(csv)


def test_csv_roundtrip_keeps_folds_and_class_names(tmp_path):
    from ensembler.data import split_folds

    t = load_source(write_mask_tree(tmp_path / "train"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = split_folds(t, 3, seed=1)
    out = s.to_csv(tmp_path / "split.csv")
    back = load_source(out)
    assert back.ids.tolist() == s.ids.tolist()
    assert back.labels.tolist() == s.labels.tolist()
    assert back.folds.tolist() == s.folds.tolist()
    assert back.groups.tolist() == s.groups.tolist()
    present = sorted(set(s.labels.tolist()))
    assert [back.label_space.classes[c] for c in present] == [s.label_space.classes[c] for c in present]
    # With the model's label space, class_name must agree with it.
    assert load_source(out, label_space=s.label_space).labels.tolist() == s.labels.tolist()
    with pytest.raises(DataError, match="class_name says"):
        load_source(out, label_space=LabelSpace.from_dict({"classes": list(reversed(s.label_space.classes))}))


def test_csv_with_a_group_in_two_folds_is_refused(tmp_path):
    csv = _manifest(tmp_path, "path,label,group,fold\nimgs/im0.png,a,g1,0\nimgs/im1.png,b,g1,1\n", 2)
    with pytest.raises(DataError, match=r"m\.csv: group 'g1' is in folds \[0, 1\]"):
        load_source(csv)


# ---------------------------------------------------------------------------- image folders
def test_image_folder(tmp_path):
    root = tmp_path / "pets"
    _png(root / "dog" / "b.png")
    _png(root / "dog" / "A.JPG".lower().replace("jpg", "png"))
    Image.new("RGB", (5, 5)).save(root / "dog" / "c.JPG", format="JPEG")  # upper-case extension
    _png(root / "cat" / "sub" / "x.png")  # nested
    _png(root / "cat" / "._x.png")  # macOS resource fork: skipped
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    t = load_source(root)
    assert t.source["kind"] == "folder"
    assert t.label_space.classes == ("cat", "dog")
    assert t.ids.tolist() == ["cat/sub/x.png", "dog/a.png", "dog/b.png", "dog/c.JPG"]
    assert t.labels.tolist() == [0, 1, 1, 1]
    assert t.groups.tolist() == t.ids.tolist()


def test_image_folder_with_label_space_and_unknown_class(tmp_path):
    root = tmp_path / "pets"
    _png(root / "dog" / "a.png")
    _png(root / "cat" / "a.png")
    t = load_source(root, label_space=LabelSpace(("bird", "cat", "dog")))
    assert t.labels.tolist() == [1, 2]
    with pytest.raises(DataError, match=r"unknown class folder '.*pets/dog'"):
        load_source(root, label_space=LabelSpace(("bird", "cat")))


def test_image_folder_empty_class_folder_named(tmp_path):
    root = tmp_path / "pets"
    _png(root / "dog" / "a.png")
    (root / "cat").mkdir()
    (root / "cat" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=r"class folder\(s\) without images.*\n\s+.*pets/cat"):
        load_source(root)


def test_image_folder_without_class_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"image folder .*empty has no class folders"):
        load_source(tmp_path / "empty")
    _png(tmp_path / "flat" / "a.png")
    with pytest.raises(DataError, match=r"flat has no class folders.*1 images lie directly"):
        load_source(tmp_path / "flat")


# ---------------------------------------------------------------------------- mask competition
def _mask_row(t, profile_prefix, stem):
    hit = t.frame[t.frame["id"].str.startswith(profile_prefix) & t.frame["id"].str.endswith("/" + stem)]
    assert len(hit) == 1
    return hit.iloc[0]


def test_mask_train(mask_tree):
    t = load_source(mask_tree)
    assert detect_source(str(mask_tree)) == "mask"
    assert t.source["kind"] == "mask" and t.source["layout"] == "train"
    assert t.source["age_bands"] == [30, 60]
    assert len(t) == 12 * 7 and t.labeled
    ls = t.label_space
    assert ls.num_classes == 18 and ls.factor_sizes == (3, 2, 3) and ls.meta["age_bands"] == [30, 60]
    # Mixed extensions were all found.
    assert {Path(p).suffix for p in t.paths} == {".jpg", ".jpeg", ".png"}
    # Profile 000001: female, 25 -> young.
    assert _mask_row(t, "000001_", "mask3")["label"] == ls.joint_index((0, 1, 0))
    assert _mask_row(t, "000001_", "incorrect_mask")["label"] == ls.joint_index((1, 1, 0))
    assert _mask_row(t, "000001_", "normal")["label"] == ls.joint_index((2, 1, 0))
    # 000003: female 59 -> middle; 000004: male 60 -> old; 000002: male 45 -> middle.
    assert _mask_row(t, "000003_", "normal")["label"] == 2 * 6 + 1 * 3 + 1
    assert _mask_row(t, "000004_", "mask1")["label"] == 0 * 6 + 0 * 3 + 2
    assert _mask_row(t, "000002_", "incorrect_mask")["label"] == 1 * 6 + 0 * 3 + 1
    row = _mask_row(t, "000002_", "normal")
    assert row["id"] == "000002_male_Asian_45/normal" and row["group"] == "000002"
    assert (row["mask"], row["gender"], row["age_years"]) == (2, 0, 45)
    # Every profile's seven photos share one group; groups are the profile ids.
    assert t.frame.groupby("group")["id"].count().eq(7).all() and len(set(t.groups)) == 12
    # Factor indices recover mask/gender from the joint label (what per-factor models read).
    m, g, _ = ls.factor_indices(t.labels)
    assert (m == t.frame["mask"].to_numpy()).all() and (g == t.frame["gender"].to_numpy()).all()


def test_mask_images_folder_itself_is_read_as_the_tree(mask_tree):
    # Not an image-folder tree with one "class" per person.
    assert detect_source(str(mask_tree / "images")) == "mask"
    t = load_source(mask_tree / "images")
    assert t.source["path"] == str(mask_tree) and len(t) == 84


def test_mask_age_bands_move_a_58_year_old_to_old(tmp_path):
    root = write_mask_tree(tmp_path / "train", n_profiles=6)
    (root / "images" / "000003_female_Asian_59").rename(root / "images" / "000003_female_Asian_58")
    default = load_source(root)
    shifted = load_source(root, age_bands=(29, 58))
    assert shifted.label_space.meta["age_bands"] == [29, 58]
    ls = shifted.label_space
    _, _, a_default = ls.factor_indices(int(_mask_row(default, "000003_", "mask1")["label"]))
    _, _, a_shifted = ls.factor_indices(int(_mask_row(shifted, "000003_", "mask1")["label"]))
    assert (ls.factor("age").classes[a_default], ls.factor("age").classes[a_shifted]) == ("middle", "old")
    # 000000 is 20: young either way.
    assert _mask_row(shifted, "000000_", "mask1")["label"] == _mask_row(default, "000000_", "mask1")["label"]


def test_mask_age_bands_from_args(tmp_path):
    root = write_mask_tree(tmp_path / "train", n_profiles=6)
    args = argparse.Namespace(data=str(root), source=None, age_bands="29,58", label_fix=None)
    assert load_source_from_args(args).source["age_bands"] == [29, 58]
    with pytest.raises(DataError, match="--age-bands"):
        load_source_from_args(argparse.Namespace(data=str(root), source=None, age_bands="58,29", label_fix=None))


def test_mask_label_fix_flips_gender_and_swaps_mask(tmp_path):
    root = write_mask_tree(tmp_path / "train", n_profiles=6)
    fix = tmp_path / "fix.csv"
    fix.write_text("id,gender,mask_swap,note\n000000,female,,was male\n000001,,1,\n000002_male_Asian_45,,,\n")
    base = load_source(root)
    fixed = load_source(root, label_fix=fix)
    ls = fixed.label_space
    # 000000: male -> female, same mask and age.
    for stem in MASK_STEMS:
        before = _mask_row(base, "000000_", stem)["label"]
        after = _mask_row(fixed, "000000_", stem)["label"]
        m, g, a = ls.factor_indices(int(before))
        assert (int(g), after) == (0, ls.joint_index((m, 1, a)))
    assert _mask_row(fixed, "000000_", "mask1")["gender"] == 1
    # 000001: incorrect_mask <-> normal swapped, masks untouched.
    assert _mask_row(fixed, "000001_", "normal")["label"] == _mask_row(base, "000001_", "incorrect_mask")["label"]
    assert _mask_row(fixed, "000001_", "incorrect_mask")["label"] == _mask_row(base, "000001_", "normal")["label"]
    assert _mask_row(fixed, "000001_", "mask2")["label"] == _mask_row(base, "000001_", "mask2")["label"]
    # The untouched profiles (and the whole-folder-name row with no change) are the same.
    same = ~fixed.frame["group"].isin(["000000", "000001"])
    assert (fixed.labels[same] == base.labels[same]).all()
    assert fixed.source["label_fix_profiles"] == 3


def test_mask_label_fix_bad_inputs(tmp_path):
    root = write_mask_tree(tmp_path / "train", n_profiles=6)
    fix = tmp_path / "fix.csv"
    fix.write_text("id,gender\n000000,femal\n")
    with pytest.raises(DataError, match=r"fix\.csv, line 2: gender 'femal' is not male or female"):
        load_source(root, label_fix=fix)
    fix.write_text("profile,gender\n000000,female\n")
    with pytest.raises(DataError, match=r"fix\.csv: no 'id' column; columns found: \['profile', 'gender'\]"):
        read_label_fix(fix)
    fix.write_text("id,sex\n000000,female\n")
    with pytest.raises(DataError, match=r"unknown column\(s\) \['sex'\]"):
        read_label_fix(fix)
    fix.write_text("id,gender\n000000,female\n000000,male\n")
    with pytest.raises(DataError, match="profile '000000' appears on line 2 and line 3"):
        read_label_fix(fix)
    fix.write_text("id,gender\n999999,female\n")
    with pytest.warns(UserWarning, match=r"999999"):
        load_source(root, label_fix=fix)


def test_mask_hidden_files_are_skipped(mask_tree):
    profile = next(p for p in (mask_tree / "images").iterdir() if p.name.startswith("000005_"))
    (profile / "._mask1.jpg").write_bytes(b"\x00\x05\x16\x07 resource fork")
    (profile / ".DS_Store").write_bytes(b"junk")
    (mask_tree / "images" / "._000005_female_Asian_70").write_bytes(b"junk")
    (mask_tree / "images" / ".DS_Store").write_bytes(b"junk")
    t = load_source(mask_tree)
    assert len(t) == 84


def test_mask_profile_missing_an_image_is_named(mask_tree):
    profile = next(p for p in (mask_tree / "images").iterdir() if p.name.startswith("000007_"))
    next(profile.glob("incorrect_mask.*")).unlink()
    with pytest.raises(DataError, match=r"000007_female_Asian_25: missing incorrect_mask"):
        load_source(mask_tree)


def test_mask_unexpected_image_and_folder_are_named(mask_tree):
    profile = next(p for p in (mask_tree / "images").iterdir() if p.name.startswith("000002_"))
    shutil.copy(next(profile.glob("mask1.*")), profile / "mask6.jpg")
    (mask_tree / "images" / "not_a_profile").mkdir()
    with pytest.raises(DataError, match=r"2 problem\(s\)") as exc:
        load_source(mask_tree)
    assert "mask6.jpg" in str(exc.value) and "not_a_profile" in str(exc.value)


def test_mask_two_images_of_one_stem(mask_tree):
    profile = next(p for p in (mask_tree / "images").iterdir() if p.name.startswith("000002_"))
    src = next(profile.glob("normal.*"))
    shutil.copy(src, profile / ("normal.png" if src.suffix != ".png" else "normal.jpg"))
    with pytest.raises(DataError, match=r"000002_male_Asian_45: two images for normal"):
        load_source(mask_tree)


def test_mask_eval(mask_eval):
    t = load_source(mask_eval)
    assert detect_source(str(mask_eval)) == "mask"
    assert not t.labeled and len(t) == 6
    info = pd.read_csv(mask_eval / "info.csv")
    assert t.ids.tolist() == info["ImageID"].tolist()  # info.csv order, for the submission
    assert t.source["info_csv"] == str(mask_eval / "info.csv") and t.source["layout"] == "eval"
    assert t.label_space.num_classes == 18
    assert t.paths[0] == str(mask_eval / "images" / info["ImageID"][0])
    # The info.csv itself works as a spec too.
    assert load_source(mask_eval / "info.csv").ids.tolist() == t.ids.tolist()
    # A model's label space (e.g. trained with 29,58) carries its age bands over.
    assert load_source(mask_eval, label_space=LabelSpace.mask((29, 58))).source["age_bands"] == [29, 58]


def test_mask_eval_missing_image_named(mask_eval):
    victim = sorted((mask_eval / "images").iterdir())[2]
    victim.unlink()
    with pytest.raises(DataError, match=rf"info\.csv: 1 image file\(s\) not found:\s+line 4: .*{victim.name}"):
        load_source(mask_eval)


def test_mask_eval_without_imageid_column(mask_eval):
    (mask_eval / "info.csv").write_text("name,ans\na.jpg,0\n")
    with pytest.raises(DataError, match=r"info\.csv: no 'ImageID' column; columns found: \['name', 'ans'\]"):
        load_source(mask_eval)


def test_forced_and_detected_kinds(tmp_path, mask_tree):
    _png(tmp_path / "pets" / "a" / "x.png")
    _png(tmp_path / "pets" / "b" / "y.png")
    assert detect_source(str(tmp_path / "pets")) == "folder"
    assert detect_source("digits") == "digits"
    with pytest.raises(DataError, match="not a mask-competition folder"):
        load_source(tmp_path / "pets", source="mask")
    # Forcing "folder" on a mask tree reads images/ as the single class.
    with pytest.raises(DataError, match="one class folder"):
        load_source(mask_tree, source="folder")
    with pytest.raises(DataError, match="no such file or folder"):
        load_source(tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"age_bands \(--age-bands\) applies to mask data only"):
        load_source(tmp_path / "pets", age_bands=(29, 58))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="not a .csv"):
        load_source(tmp_path / "x.txt")


# ---------------------------------------------------------------------------- decoding
def test_decode_missing_file_named(tmp_path):
    with pytest.raises(ImageDecodeError, match=r"gone\.jpg: file not found") as exc:
        decode_image(tmp_path / "gone.jpg")
    assert exc.value.path == str(tmp_path / "gone.jpg")


def test_decode_corrupt_jpeg_named(tmp_path):
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" + os.urandom(200))
    with pytest.raises(ImageDecodeError, match=r"corrupt\.jpg"):
        decode_image(bad)
    junk = tmp_path / "junk.png"
    junk.write_bytes(os.urandom(300))
    with pytest.raises(ImageDecodeError, match=r"junk\.png: not a recognised image"):
        decode_image(junk)


def test_decode_truncated_jpeg_named(tmp_path):
    data = _jpeg_bytes()
    cut = tmp_path / "truncated.jpg"
    cut.write_bytes(data[: len(data) // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.raises(ImageDecodeError, match=r"truncated\.jpg: truncated"):
        decode_image(cut)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_decode_directory_named(tmp_path):
    with pytest.raises(ImageDecodeError, match="is a directory"):
        decode_image(tmp_path)


def test_decode_decompression_bomb_refused(tmp_path, monkeypatch):
    path = _png(tmp_path / "bomb.png", size=(40, 40))
    default_limit = Image.MAX_IMAGE_PIXELS
    decode_image(path)
    assert Image.MAX_IMAGE_PIXELS == default_limit  # the guard is left as Pillow set it
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1600 px: Pillow only warns
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(ImageDecodeError, match=r"bomb\.png: .*decompression-bomb"):
            decode_image(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # a strict warning filter
        with pytest.raises(ImageDecodeError, match=r"bomb\.png: .*decompression-bomb"):
            decode_image(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # over twice the limit: Pillow raises
    with pytest.raises(ImageDecodeError, match=r"bomb\.png: .*decompression-bomb"):
        decode_image(path)


@pytest.mark.parametrize("mode,color", [
    ("L", 128), ("1", 1), ("P", 3), ("CMYK", (0, 255, 255, 0)), ("LA", (50, 255)),
    ("RGBA", (200, 100, 50, 255)), ("I;16", 65535), ("I", 40000), ("F", 0.5),
])
def test_decode_modes_become_rgb(tmp_path, mode, color):
    img = Image.new(mode, (7, 5), color)
    ext = {"CMYK": "jpg", "F": "tif", "I": "tif", "I;16": "png"}.get(mode, "png")
    path = tmp_path / f"im.{ext}"
    img.save(path)
    out = decode_image(path)
    assert out.mode == "RGB" and out.size == (7, 5)
    arr = np.asarray(out)
    if mode == "I;16":
        assert arr.max() == 255
    if mode == "RGBA":
        assert tuple(arr[0, 0]) == (200, 100, 50)
    if mode == "CMYK":
        assert tuple(arr[0, 0]) == (255, 0, 0)


def test_decode_transparency_composited_over_white(tmp_path):
    arr = np.zeros((4, 4, 4), dtype=np.uint8)
    arr[..., 0] = 255  # red
    arr[:2, :, 3] = 0  # top half fully transparent
    arr[2:, :, 3] = 255
    Image.fromarray(arr, "RGBA").save(tmp_path / "a.png")
    out = np.asarray(decode_image(tmp_path / "a.png"))
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[3, 0]) == (255, 0, 0)
    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    p.putpixel((0, 0), 1)
    p.save(tmp_path / "p.png", transparency=0)
    out = np.asarray(decode_image(tmp_path / "p.png"))
    assert tuple(out[0, 0]) == (0, 255, 0) and tuple(out[3, 3]) == (255, 255, 255)


def test_decode_applies_exif_orientation(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 10, 20))  # left quarter white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW when displayed
    img.save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    out = decode_image(tmp_path / "phone.jpg")
    assert out.size == (20, 40)  # upright: portrait
    arr = np.asarray(out).mean(axis=2)
    assert arr[:10].mean() > 200 and arr[30:].mean() < 50  # the white strip is now on top


def test_verify_images_lists_failures(tmp_path):
    good = _png(tmp_path / "good.png")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(_jpeg_bytes()[:300])
    failures = verify_images([str(good), str(bad), str(tmp_path / "missing.png")])
    assert [Path(p).name for p, _ in failures] == ["bad.jpg", "missing.png"]


# ---------------------------------------------------------------------------- SampleTable
def test_table_subset_and_fingerprint(tmp_path):
    csv = _manifest(tmp_path, "path,label\nimgs/im0.png,a\nimgs/im1.png,b\nimgs/im2.png,a\nimgs/im3.png,b\n")
    t = load_source(csv)
    fp = t.fingerprint()
    assert len(fp) == 64 and fp == load_source(csv).fingerprint()
    sub = t.subset(t.labels == 0)
    assert sub.ids.tolist() == ["imgs/im0.png", "imgs/im2.png"] and sub.label_space is t.label_space
    assert t.subset([3, 1]).ids.tolist() == ["imgs/im3.png", "imgs/im1.png"]
    assert sub.fingerprint() != fp and t.subset([1, 0, 2, 3]).fingerprint() != fp
    # The fingerprint follows content: touching a file (new mtime) keeps it, new bytes change it.
    st = os.stat(t.paths[0])
    os.utime(t.paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert t.fingerprint() == fp
    _png(Path(t.paths[1]), size=(30, 30))
    assert t.fingerprint() != fp
    os.unlink(t.paths[2])
    with pytest.raises(DataError, match=r"imgs/im2\.png.*is gone"):
        t.fingerprint()


def test_table_validates_its_frame():
    ls = LabelSpace(("a", "b"))
    frame = pd.DataFrame({"id": ["x", "x"], "path": ["/p", "/q"], "label": [0, 1], "group": ["g", "h"]})
    with pytest.raises(DataError, match="duplicate id 'x'"):
        SampleTable(frame, ls)
    frame["id"] = ["x", "y"]
    frame["label"] = [0, 5]
    with pytest.raises(DataError, match="label 5 of id 'y' is outside 0..1"):
        SampleTable(frame, ls)
    with pytest.raises(DataError, match=r"missing \['group'\]"):
        SampleTable(frame.drop(columns="group"), ls)
    frame["label"] = [0, 1]
    t = SampleTable(frame, ls)
    assert t.frame["label"].dtype == "Int64" and t.class_names().tolist() == ["a", "b"]
    with pytest.raises(DataError, match="no folds yet"):
        t.folds
