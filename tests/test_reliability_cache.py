"""Reliability of the logit cache (issue 11, cache part): a cached result is served only while the
weights behind it, its own bytes and the images it was computed from are what they were; a
warm cache still runs no forward and reads no image or weights file; nothing already written
changes when a run is refused."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

import ensembler.filehash as filehash
from ensembler.cli import main
from ensembler.errors import IntegrityError
from ensembler.filehash import FileHashes
from ensembler.infer import CacheWarning, predict_members
from ensembler.labels import LabelSpace
from ensembler.logits import Logits, read_logits, write_logits
from ensembler.preprocess import Preprocess
from ensembler.registry import Registry

from conftest import res_eff_registry, write_image_table

LABELS = LabelSpace(("cat", "dog", "fox"))
PRE = Preprocess(input_size=(24, 24), crop_pct=1.0, interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3)


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """Two families (res: 2 folds, eff: 1), 6 BMP images (same size each: content can change
    in place with the same size), and counters of forwards and of files read to hash."""
    table = write_image_table(tmp_path / "images", LABELS, 6, size=(24, 24), ext="bmp")
    reg = res_eff_registry(tmp_path / "checkpoints", LABELS, PRE)
    counts = {"forward": 0, "hashed": []}
    real_load, real_hash = Registry.load_model, filehash._hash_bytes

    def counting_load(self, entry, device="cpu"):
        model = real_load(self, entry, device)
        model.register_forward_hook(lambda m, i, o: counts.__setitem__("forward", counts["forward"] + 1))
        return model

    def counting_hash(path):
        counts["hashed"].append(os.path.basename(path))
        return real_hash(path)

    monkeypatch.setattr(Registry, "load_model", counting_load)
    monkeypatch.setattr(filehash, "_hash_bytes", counting_hash)
    # Files were written a moment ago: trust their stamps at once (the racy rule has its own test).
    monkeypatch.setattr(FileHashes, "RACY_NS", 0)
    return table, reg, tmp_path / "cache", counts


def run(table, reg, cache, members="all", **kw):
    return predict_members(table, members, reg, tta="hflip", cache_dir=cache, progress=False, **kw)


def snapshot(*folders):
    return {p: p.read_bytes() for f in folders for p in sorted(f.rglob("*")) if p.is_file()}


def test_a_warm_cache_runs_no_forward_and_reads_no_image_or_weights_file(setup):
    table, reg, cache, counts = setup
    first = run(table, reg, cache)
    assert counts["forward"] > 0 and not any(m.meta["cached"] for m in first.values())
    assert (cache / "file_hashes.json").is_file()
    counts["forward"], counts["hashed"] = 0, []
    second = run(table, reg, cache)
    assert all(m.meta["cached"] for m in second.values())
    assert counts["forward"] == 0 and counts["hashed"] == []  # one stat per image and weights file
    for name in first:
        np.testing.assert_array_equal(first[name].logits, second[name].logits)


# ---------------------------------------------------------------------------- BAD 4: weights
def test_a_warm_cache_refuses_deleted_weights_as_a_cold_run_does(setup):
    # BAD 4: with a warm cache predict served a family whose weights file was deleted.
    table, reg, cache, counts = setup
    run(table, reg, cache)
    weights = reg.path(reg.get("res-fold1").weights)
    weights.unlink()
    before = snapshot(cache, reg.root)
    with pytest.raises(IntegrityError) as warm:
        run(table, reg, cache)
    with pytest.raises(IntegrityError) as cold:
        run(table, reg, cache, use_cache=False)
    assert str(warm.value) == str(cold.value) == f"weights file of 'res-fold1' is missing: {weights}"
    assert snapshot(cache, reg.root) == before


def test_a_warm_cache_refuses_altered_weights_naming_the_file(setup):
    # BAD 4: ... or altered: here one byte, same size, the mtime put back.
    table, reg, cache, counts = setup
    first = run(table, reg, cache)
    weights = reg.path(reg.get("eff").weights)
    good, st = weights.read_bytes(), weights.stat()
    bad = bytearray(good)
    bad[-1] ^= 0xFF
    with open(weights, "r+b") as fh:
        fh.write(bad)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    before = snapshot(cache)
    with pytest.raises(IntegrityError, match=rf"weights file {weights} of 'eff' was modified: sha256 \w+ != "
                                             rf"recorded {reg.get('eff').sha256}"):
        run(table, reg, cache)
    assert snapshot(cache) == before
    # the right bytes back: served from the cache again, no forward
    weights.write_bytes(good)
    counts["forward"] = 0
    again = run(table, reg, cache)
    assert counts["forward"] == 0 and again["eff"].meta["cached"]
    np.testing.assert_array_equal(again["eff"].logits, first["eff"].logits)


def test_predict_cli_with_a_warm_cache_stops_on_deleted_weights(setup, tmp_path, capsys):
    table, reg, cache, _ = setup
    csv = tmp_path / "test.csv"
    table.frame[["id", "path"]].to_csv(csv, index=False)
    argv = ["predict", "--data", str(csv), "--registry", str(reg.root), "--workers", "0", "--tta", "hflip",
            "--cache-dir", str(cache), "--out"]
    assert main([*argv, str(tmp_path / "subs" / "a.csv")]) == 0
    weights = reg.path(reg.get("eff").weights)
    weights.unlink()
    earlier = snapshot(tmp_path / "subs")
    capsys.readouterr()
    assert main([*argv, str(tmp_path / "subs" / "b.csv")]) == 2
    err = capsys.readouterr().err.replace("\n", "")
    assert f"weights file of 'eff' is missing: {weights}" in err and "Traceback" not in err
    assert snapshot(tmp_path / "subs") == earlier


# ---------------------------------------------------------------------------- BAD 5: checksum
def test_an_edited_cache_file_is_a_miss_with_a_warning_and_is_rewritten(setup):
    # BAD 5: a cached logits file edited on disk (every row class 2, its file pair consistent)
    # was served as is, with no warning.
    table, reg, cache, counts = setup
    first = run(table, reg, cache, members="eff")
    npz = first["eff"].meta["cache_files"][0]
    cached = read_logits(npz)
    edited = np.zeros_like(cached.logits)
    edited[:, 2] = 10.0
    write_logits(npz, Logits(cached.ids, edited, meta=cached.meta, name=cached.name))
    others = {p: b for p, b in snapshot(cache).items() if p.stem != cached.meta["key"]
              and p.name != "file_hashes.json"}
    counts["forward"] = 0
    with pytest.warns(CacheWarning, match=rf"ignoring cached logits {npz}: its logits or ids do not match its "
                                          "checksum"):
        again = run(table, reg, cache, members="eff")
    assert counts["forward"] > 0 and not again["eff"].meta["cached"]
    np.testing.assert_array_equal(again["eff"].logits, first["eff"].logits)
    np.testing.assert_array_equal(read_logits(npz).logits, first["eff"].logits)  # rewritten
    assert {p: b for p, b in snapshot(cache).items() if p in others} == others
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert run(table, reg, cache, members="eff")["eff"].meta["cached"]


def test_a_cache_entry_without_a_checksum_is_recomputed(setup):
    table, reg, cache, _ = setup
    first = run(table, reg, cache, members="eff")
    npz = first["eff"].meta["cache_files"][0]
    cached = read_logits(npz)
    meta = {k: v for k, v in cached.meta.items() if k != "checksum"}
    write_logits(npz, Logits(cached.ids, cached.logits, meta=meta, name=cached.name))
    with pytest.warns(CacheWarning, match=rf"ignoring cached logits {npz}: it has no checksum"):
        assert not run(table, reg, cache, members="eff")["eff"].meta["cached"]
    assert "checksum" in read_logits(npz).meta


# ---------------------------------------------------------------------------- BAD 6: content
def test_an_image_changed_with_the_same_size_and_mtime_is_new_data(setup):
    # BAD 6: content changed in place, same size, mtime put back: the old logits were served.
    table, reg, cache, counts = setup
    first = run(table, reg, cache, members="eff")
    target, donor = table.paths[0], table.paths[1]
    st = os.stat(target)
    data = open(donor, "rb").read()
    assert len(data) == st.st_size
    with open(target, "r+b") as fh:
        fh.write(data)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = os.stat(target)
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)
    counts["forward"], counts["hashed"] = 0, []
    again = run(table, reg, cache, members="eff")
    assert not again["eff"].meta["cached"] and counts["forward"] > 0
    assert counts["hashed"] == [os.path.basename(target)]  # only the changed file was read again
    assert again["eff"].meta["fingerprint"] != first["eff"].meta["fingerprint"]
    np.testing.assert_allclose(again["eff"].logits[0], first["eff"].logits[1], atol=1e-5)  # the new content's logits
    np.testing.assert_array_equal(again["eff"].logits[1:], first["eff"].logits[1:])


def test_the_data_fingerprint_follows_content_not_timestamps(tmp_path):
    table = write_image_table(tmp_path / "images", LABELS, 3, size=(8, 8), ext="bmp")
    fp = table.fingerprint()
    st = os.stat(table.paths[0])
    os.utime(table.paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a touch: same data
    assert table.fingerprint() == fp
    hashes = FileHashes(tmp_path / "file_hashes.json")
    assert table.fingerprint(hashes=hashes) == fp  # the stamp cache changes the cost, not the value


def test_a_stamp_counts_only_for_a_file_that_changed_before_it_was_hashed(tmp_path):
    # A file rewritten within the timestamp tick it was hashed in could keep the same stat:
    # its stamp is not trusted until the file is older than RACY_NS ("racily clean" in git).
    path = tmp_path / "a.bin"
    path.write_bytes(b"one")
    stamps = tmp_path / "file_hashes.json"
    first = FileHashes(stamps)
    digest = first.sha256(path)
    first.save()
    fresh = FileHashes(stamps)
    assert fresh.sha256(path) == digest and fresh.hashed == 1  # written just now: read again
    st = path.stat()
    old = FileHashes(stamps)
    old.RACY_NS = 0
    assert old.sha256(path) == digest and old.hashed == 0
    assert (st.st_size, st.st_mtime_ns) == (path.stat().st_size, path.stat().st_mtime_ns)


def test_an_unreadable_stamp_file_only_costs_hashing_again(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"data")
    stamps = tmp_path / "file_hashes.json"
    stamps.write_text("{not json")
    hashes = FileHashes(stamps)
    assert hashes.sha256(path) == FileHashes().sha256(path) and hashes.hashed == 1
    hashes.save()
    assert str(path) in stamps.read_text()


def test_tta_report_with_a_warm_cache_refuses_altered_weights(setup):
    # The per-view cache of tta-report follows the same rule as the engine's.
    from ensembler.infer import tta_report

    table, reg, cache, counts = setup
    table = table.subset(np.arange(len(table)))
    folds = np.arange(len(table)) % 2
    oof = Logits(table.ids, np.zeros((len(table), 3), np.float32), label_space=LABELS,
                 labels=np.asarray(table.labels), folds=folds, name="res")
    write_logits(reg.family_dir("res") / "oof.npz", oof)
    for e in reg.family("res"):
        reg.update(e.id, oof="res/oof.npz")
    tta_report(table, "res", reg, tta="hflip", cache_dir=cache, progress=False)
    counts["forward"] = 0
    assert tta_report(table, "res", reg, tta="hflip", cache_dir=cache, progress=False).meta["cached_folds"] == [0, 1]
    assert counts["forward"] == 0
    weights = reg.path(reg.get("res-fold0").weights)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=rf"weights file {weights} of 'res-fold0' was modified"):
        tta_report(table, "res", reg, tta="hflip", cache_dir=cache, progress=False)
