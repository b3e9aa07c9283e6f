"""ensembler.logits: the one Logits value, its file layout, reader and writer; 0.1.0 files still load."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from ensembler.errors import LogitError
from ensembler.labels import LabelSpace
from ensembler.logits import FORMAT_VERSION, Logits, read_logits, read_logits_set, sidecar_path, write_logits

V010 = Path(__file__).parent / "data" / "logits_v0_1_0"
SPACE = LabelSpace(("cat", "dog", "fox"))


def _oof(n=6, seed=0, **kw) -> Logits:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    return Logits([f"i{k}" for k in range(n)], np.eye(3)[y] * 2 + rng.normal(size=(n, 3)), label_space=SPACE,
                  labels=y, folds=np.arange(n) % 2, **kw)


# ---------------------------------------------------------------------------- the value
def test_logits_value_casts_and_checks_its_shapes():
    z = _oof(name="m", meta={"producer": "x"})
    assert z.logits.dtype == np.float32 and z.ids.dtype.kind == "U" and z.labels.dtype == np.int64
    assert (len(z), z.num_classes, z.kind, z.sha256, z.source) == (6, 3, "file", (), "")
    with pytest.raises(LogitError, match=r"logits of 'm': \(5,\) ids for 6 rows"):
        Logits(z.ids[:5], z.logits, name="m")
    with pytest.raises(LogitError, match=r"'labels' must be 6 integers"):
        Logits(z.ids, z.logits, labels=np.zeros(6, np.float32))
    with pytest.raises(LogitError, match=r"have 3 classes but the label space has 2"):
        Logits(z.ids, z.logits, label_space=LabelSpace(("a", "b")))
    sub = z.subset(np.array([True, False] * 3))
    assert sub.ids.tolist() == ["i0", "i2", "i4"] and sub.folds.tolist() == [0, 0, 0] and sub.meta == z.meta
    pos, missing = z.positions(["i3", "i0", "nope"])
    assert pos[:2].tolist() == [3, 0] and missing == ["nope"]
    assert Logits(["a"], [[0.0, 1.0]], meta={"sha256": {"c0": "ab", "c1": "cd"}}).sha256 == ("ab", "cd")


# ---------------------------------------------------------------------------- round trips
def test_one_member_round_trip_keeps_everything(tmp_path):
    z = _oof(name="resnet", meta={"producer": "resnet", "complete": True, "kind": "family"})
    path = write_logits(tmp_path / "oof.npz", z)
    assert sorted(os.listdir(tmp_path)) == ["oof.json", "oof.npz"]  # no temp files left behind
    back = read_logits(path, require=("labels", "folds"))
    np.testing.assert_array_equal(back.ids, z.ids)
    np.testing.assert_array_equal(back.logits, z.logits)
    np.testing.assert_array_equal(back.labels, z.labels)
    np.testing.assert_array_equal(back.folds, z.folds)
    assert back.label_space == SPACE and back.name == "resnet" and back.kind == "family"
    assert back.meta["complete"] is True and back.source == str(path)
    side = json.loads(sidecar_path(path).read_text())
    assert side["format"] == "ensembler-logits" and side["version"] == FORMAT_VERSION and side["rows"] == 6
    # the npz alone is a plain npz anyone can read
    with np.load(path) as npz:
        assert {"ids", "logits", "labels", "folds"} <= set(npz.files)


def test_several_members_share_the_rows_and_split_the_columns(tmp_path):
    a = _oof(name="a").replace(labels=None, folds=None)
    b = Logits(a.ids, np.ones((6, 2)), label_space=LabelSpace(("no", "yes")), meta={"tta": "hflip"})
    path = write_logits(tmp_path / "infer.npz", {"a": a, "b": b})
    got = read_logits_set(path)
    assert list(got) == ["a", "b"] and got["b"].num_classes == 2 and got["b"].meta["tta"] == "hflip"
    np.testing.assert_array_equal(got["a"].logits, a.logits)
    assert read_logits(path, member="b").label_space.classes == ("no", "yes")
    with pytest.raises(LogitError, match=r"infer.npz holds 2 members \['a', 'b'\]: name one"):
        read_logits(path)
    with pytest.raises(LogitError, match=r"infer.npz has no member 'c'"):
        read_logits(path, member="c")
    # without its sidecar the npz still says how its columns split (label spaces are in the sidecar)
    sidecar_path(path).unlink()
    bare = read_logits_set(path)
    assert list(bare) == ["a", "b"] and bare["b"].logits.shape == (6, 2) and bare["a"].label_space is None


def test_writer_refuses_what_it_cannot_write_and_keeps_the_old_file(tmp_path):
    path = write_logits(tmp_path / "m.npz", _oof(name="m"))
    before = (path.read_bytes(), sidecar_path(path).read_bytes())
    bad = _oof(name="m")
    bad.logits[2, 1] = np.nan
    with pytest.raises(LogitError, match=r"refusing to write .*m.npz: member 'm' has 1 row\(s\) of NaN or inf logits, "
                                         r"e.g. ids 'i2'"):
        write_logits(path, bad)
    other = Logits(["x"] * 1, [[0.0, 1.0, 2.0]], name="o")
    with pytest.raises(LogitError, match="member 'o' has ids that differ from member 'm'"):
        write_logits(path, [_oof(name="m"), other])
    with pytest.raises(LogitError, match="distinct names"):
        write_logits(path, [_oof(name="m"), _oof(name="m")])
    assert (path.read_bytes(), sidecar_path(path).read_bytes()) == before
    assert sorted(os.listdir(tmp_path)) == ["m.json", "m.npz"]


def test_reader_names_the_file_and_what_is_wrong(tmp_path):
    path = write_logits(tmp_path / "m.npz", _oof(name="m"))
    with pytest.raises(LogitError, match=r"nope.npz does not exist"):
        read_logits(tmp_path / "nope.npz")
    with pytest.raises(LogitError, match=r"is a folder"):
        read_logits(tmp_path)
    (tmp_path / "t.npz").write_text("not a zip")
    with pytest.raises(LogitError, match=r"t.npz is not a readable .npz file"):
        read_logits(tmp_path / "t.npz")
    np.savez(tmp_path / "m2.npz", logits=np.zeros((2, 3)))
    with pytest.raises(LogitError, match=r"m2.npz lacks array\(s\) \['ids'\]"):
        read_logits(tmp_path / "m2.npz")
    # an npz rewritten behind its sidecar's back (or a torn write) is refused, naming both
    with np.load(path) as npz:
        arrays = dict(npz)
    arrays["logits"] = arrays["logits"] + 1
    np.savez(path, **arrays)
    with pytest.raises(LogitError, match=r"m.npz does not match its sidecar .*m.json \(sha256"):
        read_logits(path)
    write_logits(path, _oof(name="m"))
    doc = json.loads(sidecar_path(path).read_text())
    doc["version"] = FORMAT_VERSION + 1
    sidecar_path(path).write_text(json.dumps(doc))
    with pytest.raises(LogitError, match=rf"format version {FORMAT_VERSION + 1}.*upgrade ensembler"):
        read_logits(path)
    sidecar_path(path).write_text("{broken")
    with pytest.raises(LogitError, match=r"sidecar .*m.json of logits file .*m.npz is not readable JSON"):
        read_logits(path)


# ---------------------------------------------------------------------------- files written by 0.1.0
def test_v010_family_files_load():
    """fold val_logits.npz (best_epoch inside), oof.npz + oof.json (label space in the sidecar)."""
    oof = read_logits(V010 / "family" / "oof.npz", require=("labels", "folds"))
    assert oof.label_space == SPACE and len(oof) == 6 and oof.meta["complete"] is True
    assert oof.meta["producer"] == "family" and oof.logits.dtype == np.float32
    for fold in (0, 1):
        val = read_logits(V010 / "family" / f"fold{fold}" / "val_logits.npz", require=("labels",))
        assert val.meta["best_epoch"] == 2 + fold and val.label_space is None
        rows = oof.folds == fold
        np.testing.assert_array_equal(val.ids, oof.ids[rows])
        np.testing.assert_array_equal(val.logits, oof.logits[rows])
        np.testing.assert_array_equal(val.labels, oof.labels[rows])


def test_v010_oof_tta_file_loads_as_a_member():
    from ensembler.ensemble import load_members

    tta = read_logits(V010 / "family" / "family_oof_tta_hflip.npz", require=("labels", "folds"))
    assert tta.label_space == SPACE and tta.meta["tta"] == "hflip"
    oof = read_logits(V010 / "family" / "oof.npz")
    np.testing.assert_allclose(tta.logits, oof.logits + 0.5, rtol=1e-6)
    (member,) = load_members(oof_files=[V010 / "family" / "family_oof_tta_hflip.npz"])
    assert member.name == "family_oof_tta_hflip" and member.kind == "file" and member.label_space == SPACE


def test_v010_cache_entry_reads_but_is_not_served_without_a_checksum():
    # The file still reads; the store serves only entries that carry their own checksum
    # (issue 11, BAD 5), so a 0.1.0 entry is a miss with a warning and gets recomputed.
    from ensembler.infer import CacheWarning, LogitStore

    store = LogitStore(V010 / "cache")
    (entry,) = store.entries()
    assert entry["producer"] == "family-fold0"
    npz = store.paths(entry["key"])[0]
    np.testing.assert_array_equal(read_logits(npz).logits, read_logits(V010 / "family" / "oof.npz").logits)
    with pytest.warns(CacheWarning, match=rf"ignoring cached logits {npz}: it has no checksum"):
        assert store.load(entry["key"], ids=[f"img{i}" for i in range(6)]) is None


def test_v010_infer_output_loads_with_its_members(tmp_path):
    from ensembler.evaluate import load_logits_file

    got = read_logits_set(V010 / "infer_out.npz")
    assert list(got) == ["family", "binary"]
    assert got["family"].label_space == SPACE and got["binary"].label_space.classes == ("no", "yes")
    assert got["family"].meta["checkpoints"] == ["family-fold0"]
    ids, logp, labels, info = load_logits_file(V010 / "infer_out.npz", members="family")
    assert ids.tolist() == [f"img{i}" for i in range(6)] and labels is None and info["classes"] == list(SPACE.classes)


def test_v010_files_rewritten_by_this_version_read_back_the_same(tmp_path):
    for rel in ("family/oof.npz", "family/fold0/val_logits.npz", "family/family_oof_tta_hflip.npz"):
        old = read_logits(V010 / rel)
        new = read_logits(write_logits(tmp_path / Path(rel).name, old))
        np.testing.assert_array_equal(new.logits, old.logits)
        assert new.label_space == old.label_space and new.meta == {**old.meta, "source": new.source}
