"""The checkpoint registry: round trips, integrity, safety, concurrency, crash safety."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from ensembler import IntegrityError, LabelSpace, Preprocess, RegistryError
from ensembler.logits import Logits, write_logits
from ensembler.models import joint_log_probs
from ensembler.registry import Entry, Registry

from conftest import RunsCode, tiny_model

ABC = LabelSpace(("a", "b", "c"))
X32 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _add(reg, family="r", fold=0, seed=0, **kw):
    kw.setdefault("label_space", ABC)
    return reg.add(tiny_model(seed=seed), family=family, fold=fold, arch="test_resnet", head="flat",
                   preprocess=Preprocess.from_timm("test_resnet", 32), **kw)


def _flip_byte(path: Path, offset: int = -20) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------------- round trip
def _write(path: Path, obj) -> None:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in obj.items()}, str(path))
    else:
        torch.save(obj, path)


PTH_STYLES = ["bare", "state_dict", "model", "state_dict_ema", "module.", "_orig_mod."]
ST_STYLES = ["bare", "module.", "_orig_mod."]  # safetensors holds a flat dict: no wrappers


@pytest.mark.parametrize("arch", ["test_resnet", "test_efficientnet"])
@pytest.mark.parametrize("suffix,style", [(".pth", s) for s in PTH_STYLES]
                         + [(".safetensors", s) for s in ST_STYLES])
def test_import_round_trip_is_bit_identical(tmp_path, arch, suffix, style):
    original = tiny_model(arch, seed=1)
    sd = original.state_dict()
    use_ema = None
    if style == "bare":
        obj = sd
    elif style in ("state_dict", "model"):
        obj = {style: sd, "epoch": 7}
    elif style == "state_dict_ema":
        # the EMA weights are the ones under test; the plain ones differ
        obj = {"state_dict": tiny_model(arch, seed=2).state_dict(), "state_dict_ema": sd}
        use_ema = True
    else:
        obj = {style + k: v for k, v in sd.items()}
        if suffix == ".pth":
            obj = {"state_dict": obj}
    path = tmp_path / f"best{suffix}"
    _write(path, obj)
    reg = Registry(tmp_path / "reg")
    entry = reg.import_checkpoint(path, arch=arch, num_classes=3, img_size=32, fold=0, use_ema=use_ema)
    assert entry.id == "best-fold0" and entry.family == "best"
    assert (reg.root / "best" / "fold0" / "weights.safetensors").is_file()
    assert entry.preprocess["input_size"] == [32, 32]
    assert entry.train_config["import"]["ema"] is (style == "state_dict_ema")
    loaded = reg.load_model(entry.id)
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(X32), original(X32))
    assert reg.verify() == []


def test_entry_fields_and_preprocess_stored(tmp_path):
    reg = Registry(tmp_path)
    pre = Preprocess.from_timm("test_efficientnet", 48, crop_pct=1.0)
    entry = reg.add(tiny_model("test_efficientnet"), family="eff", fold=2, arch="test_efficientnet",
                    head="flat", label_space=ABC, preprocess=pre, metrics={"val_macro_f1": 0.5},
                    oof="eff/oof.npz", train_config={"lr": 0.01})
    raw = json.loads((tmp_path / "registry.json").read_text())
    assert raw["version"] == 1 and len(raw["entries"]) == 1
    stored = raw["entries"][0]
    for key in ("id", "family", "fold", "arch", "head", "label_space", "preprocess", "sha256", "weights",
                "metrics", "oof", "target", "train_config", "versions", "created"):
        assert key in stored, key
    assert stored["weights"] == "eff/fold2/weights.safetensors"
    assert set(stored["versions"]) >= {"torch", "timm", "ensembler"}
    assert entry.pre == pre and entry.labels == ABC
    assert entry.val_macro_f1 == 0.5
    from ensembler._io import sha256_file

    assert stored["sha256"] == sha256_file(tmp_path / stored["weights"])
    single = _add(reg, family="solo", fold=None)
    assert single.id == "solo" and single.weights == "solo/single/weights.safetensors"


def test_factored_and_fixed_size_models_round_trip(tmp_path):
    reg = Registry(tmp_path)
    mask = LabelSpace.mask()
    torch.manual_seed(0)
    fact = timm.create_model("test_resnet", num_classes=8).eval()
    e = reg.add(fact, family="fact", fold=0, arch="test_resnet", head="factored", label_space=mask,
                preprocess=Preprocess.from_timm("test_resnet", 32))
    loaded = reg.load_model(e)
    with torch.no_grad():
        lp = joint_log_probs(loaded(X32), e.head, e.labels)
    torch.testing.assert_close(lp.exp().sum(1), torch.ones(2))
    # a ViT stored at 32px needs img_size=32 to rebuild: recorded as model_kwargs
    vit = tiny_model("test_vit", img_size=32)
    ev = reg.add(vit, family="vit", fold=0, arch="test_vit", head="flat", label_space=ABC,
                 preprocess=Preprocess.from_timm("test_vit", 32))
    assert ev.model_kwargs == {"img_size": [32, 32]}
    with torch.no_grad():
        assert torch.equal(reg.load_model(ev.id)(X32), vit(X32))


def test_queries_update_remove(tmp_path, monkeypatch):
    reg = Registry(tmp_path)
    for fold in (1, 0):
        _add(reg, family="r", fold=fold, seed=fold)
    _add(reg, family="s", fold=0)
    assert reg.families() == ["r", "s"]
    assert [e.id for e in reg.family("r")] == ["r-fold0", "r-fold1"]
    assert [e.id for e in reg.resolve("all")] == ["r-fold1", "r-fold0", "s-fold0"]
    assert [e.id for e in reg.resolve(["s-fold0", "r"])] == ["s-fold0", "r-fold0", "r-fold1"]
    assert [e.id for e in reg.resolve("r-fold1,s")] == ["r-fold1", "s-fold0"]
    with pytest.raises(RegistryError, match=r"no entry or family 'r-fold9'.*did you mean r-fold"):
        reg.resolve(["r-fold9"])
    with pytest.raises(RegistryError, match="no entry or family 'q'"):
        reg.get("q")
    updated = reg.update("r-fold0", metrics={"val_macro_f1": 0.9}, oof="r/oof.npz")
    assert reg.get("r-fold0").metrics == {"val_macro_f1": 0.9} and updated.oof == "r/oof.npz"
    assert reg.verify() == [("r-fold0", f"OOF logits file of 'r-fold0' is missing: {tmp_path / 'r/oof.npz'}")]
    (tmp_path / "r" / "oof.npz").write_bytes(b"")  # there, but not OOF logits: what tune-weights reads is checked
    [(_, problem)] = reg.verify()
    assert problem.startswith(f"OOF logits file of 'r-fold0': logits file {tmp_path / 'r/oof.npz'} is not a "
                              f"readable .npz file: it is empty, not an npz archive"), problem
    ids = np.array(["x", "y"])
    write_logits(tmp_path / "r" / "oof.npz", Logits(ids, np.zeros((2, 3)), label_space=ABC,
                                                   labels=np.array([0, 1]), folds=np.array([0, 1])))
    assert reg.verify() == []
    with pytest.raises(RegistryError, match=r"cannot update \['sha256'\]"):
        reg.update("r-fold0", sha256="0" * 64)
    # names that are not Entry fields are kept as extra keys (e.g. the ONNX exporter's record)
    reg.update("r-fold0", onnx={"file": "model.onnx", "opset": 18})
    assert reg.get("r-fold0").extra == {"onnx": {"file": "model.onnx", "opset": 18}}
    reg.update("r-fold0", metrics={"val_macro_f1": 0.9})
    assert reg.get("r-fold0").to_dict()["onnx"]["opset"] == 18
    with pytest.raises(RegistryError, match="cannot store bad="):
        reg.update("r-fold0", bad=object())
    weights = reg.path(reg.get("s-fold0").weights)
    reg.remove("s-fold0")
    assert "s-fold0" not in reg and not weights.exists() and not (tmp_path / "s").exists()
    with pytest.raises(RegistryError, match="no entry or family 's-fold0'"):
        reg.remove("s-fold0")
    # root: argument, else $ENSEMBLER_REGISTRY, else ./checkpoints
    monkeypatch.setenv("ENSEMBLER_REGISTRY", str(tmp_path))
    assert Registry().root == tmp_path and len(Registry()) == 2
    monkeypatch.delenv("ENSEMBLER_REGISTRY")
    monkeypatch.chdir(tmp_path)
    assert Registry().root == Path("checkpoints") and Registry().entries() == []


def test_duplicate_id_and_overwrite(tmp_path):
    reg = Registry(tmp_path)
    first = _add(reg, seed=0)
    with pytest.raises(RegistryError, match="already has an entry 'r-fold0'.*overwrite=True"):
        _add(reg, seed=1)
    assert reg.get("r-fold0").sha256 == first.sha256  # the failed add changed nothing
    second = _add(reg, seed=1, overwrite=True)
    assert second.sha256 != first.sha256 and len(reg) == 1
    assert reg.verify() == []
    # a second entry on the same family/fold never overwrites the first one's weights
    other = _add(reg, seed=2, entry_id="r-fold0-age", label_space=ABC, target="age")
    assert other.weights == "r/fold0/r-fold0-age.safetensors"
    assert reg.verify() == []


def test_unknown_entry_keys_are_kept(tmp_path):
    reg = Registry(tmp_path)
    _add(reg)
    raw = json.loads((tmp_path / "registry.json").read_text())
    raw["entries"][0]["calibration"] = {"temperature": 1.3}
    (tmp_path / "registry.json").write_text(json.dumps(raw))
    reg.update("r-fold0", metrics={"val_macro_f1": 0.7})
    _add(reg, fold=1)
    reg.remove("r-fold1")
    stored = json.loads((tmp_path / "registry.json").read_text())["entries"][0]
    assert stored["calibration"] == {"temperature": 1.3}
    assert Entry.from_dict(stored).extra == {"calibration": {"temperature": 1.3}}


# ---------------------------------------------------------------------------- integrity
def test_flipped_byte_fails_verify_and_every_load(tmp_path):
    reg = Registry(tmp_path)
    good = _add(reg, fold=0)
    bad = _add(reg, fold=1, seed=1)
    path = reg.path(bad.weights)
    _flip_byte(path)
    problems = reg.verify()
    assert [i for i, _ in problems] == ["r-fold1"]
    assert str(path) in problems[0][1] and bad.sha256 in problems[0][1]
    assert reg.verify([good.id]) == []
    for load in (reg.load_state_dict, reg.load_model):
        with pytest.raises(IntegrityError, match=rf"{path}.*sha256 [0-9a-f]{{64}} != recorded {bad.sha256}"):
            load(bad.id)
    path.unlink()
    with pytest.raises(IntegrityError, match=f"missing: {path}"):
        reg.load_model(bad.id)
    assert reg.verify()[0][0] == "r-fold1"


def test_verify_catches_shape_mismatch_and_nan_even_with_matching_hash(tmp_path):
    from ensembler._io import sha256_file

    reg = Registry(tmp_path)
    e = _add(reg)
    # rewrite the file with a NaN and "fix" the hash: the finiteness check still refuses it
    sd = tiny_model().state_dict()
    sd["fc.bias"][0] = float("nan")
    path = reg.path(e.weights)
    save_file(sd, str(path))
    raw = json.loads((tmp_path / "registry.json").read_text())
    raw["entries"][0]["sha256"] = sha256_file(path)
    (tmp_path / "registry.json").write_text(json.dumps(raw))
    with pytest.raises(IntegrityError, match=r"non-finite .*fc.bias"):
        reg.load_model(e.id)
    # wrong class count under a valid hash: verify names the keys and both shapes
    save_file(tiny_model(num_classes=4).state_dict(), str(path))
    raw["entries"][0]["sha256"] = sha256_file(path)
    (tmp_path / "registry.json").write_text(json.dumps(raw))
    (problem,) = reg.verify()
    assert "fc.weight checkpoint [4, 96] vs model [3, 96]" in problem[1] and str(path) in problem[1]


def test_add_refuses_non_finite_and_mismatched_weights(tmp_path):
    reg = Registry(tmp_path)
    sd = tiny_model().state_dict()
    sd["fc.weight"][0, 0] = float("inf")
    with pytest.raises(RegistryError, match="non-finite .*fc.weight"):
        reg.add(sd, family="r", fold=0, arch="test_resnet", head="flat", label_space=ABC)
    with pytest.raises(RegistryError, match="fc.weight checkpoint"):
        reg.add(tiny_model(num_classes=5), family="r", fold=0, arch="test_resnet", head="flat", label_space=ABC)
    assert reg.entries() == [] and not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------- import errors
def test_import_class_count_mismatch_lists_head_keys(tmp_path):
    torch.save(tiny_model(num_classes=10).state_dict(), tmp_path / "ten.pth")
    reg = Registry(tmp_path / "reg")
    with pytest.raises(RegistryError, match=(
            r"ten.pth does not match test_resnet with a flat head of 3 outputs: shape mismatch: "
            r"fc.weight checkpoint \[10, 96\] vs model \[3, 96\], fc.bias checkpoint \[10\] vs model \[3\]"
            r".*class-count mismatch")):
        reg.import_checkpoint(tmp_path / "ten.pth", arch="test_resnet", num_classes=3)
    # a factored head of 8 outputs against a flat 18-class checkpoint
    torch.save(tiny_model(num_classes=18).state_dict(), tmp_path / "flat18.pth")
    with pytest.raises(RegistryError, match=r"factored head of 8 outputs.*fc.weight checkpoint \[18, 96\]"):
        reg.import_checkpoint(tmp_path / "flat18.pth", arch="test_resnet", label_space=LabelSpace.mask(),
                              head="factored")
    # wrong arch entirely: missing and unexpected keys are listed
    with pytest.raises(RegistryError, match=r"does not match test_efficientnet.*missing: .*unexpected: "):
        reg.import_checkpoint(tmp_path / "ten.pth", arch="test_efficientnet", num_classes=10)
    with pytest.raises(Exception, match=r"unknown timm architecture 'test_resnt'.*test_resnet"):
        reg.import_checkpoint(tmp_path / "ten.pth", arch="test_resnt", num_classes=10)
    with pytest.raises(RegistryError, match="needs --num-classes N or --classes"):
        reg.import_checkpoint(tmp_path / "ten.pth", arch="test_resnet")
    assert reg.entries() == []


def test_import_refuses_code_running_pickle(tmp_path):
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": tiny_model().state_dict(), "hook": RunsCode(marker)}, evil)
    reg = Registry(tmp_path / "reg")
    with pytest.raises(RegistryError, match=r"refused to load .*evil.pth"):
        reg.import_checkpoint(evil, arch="test_resnet", num_classes=3)
    assert not marker.exists()
    assert reg.entries() == []


def test_import_lightning_module_keeps_only_the_network(tmp_path):
    original = tiny_model(seed=3)
    sd = {"model." + k: v for k, v in original.state_dict().items()}
    sd["criterion.weight"] = torch.ones(3)
    del sd["model.bn1.num_batches_tracked"]  # old checkpoints lack these counters
    torch.save({"state_dict": sd, "epoch": 9, "global_step": 90}, tmp_path / "epoch=9.ckpt")
    reg = Registry(tmp_path / "reg")
    e = reg.import_checkpoint(tmp_path / "epoch=9.ckpt", arch="test_resnet", num_classes=3)
    assert e.family == "epoch-9" and e.train_config["import"]["dropped_keys"] == ["criterion.weight"]
    with torch.no_grad():
        assert torch.equal(reg.load_model(e)(X32), original(X32))


def test_import_ema_needs_explicit_choice(tmp_path):
    torch.save({"state_dict": tiny_model(seed=0).state_dict(), "state_dict_ema": tiny_model(seed=1).state_dict()},
               tmp_path / "ema.pth.tar")
    reg = Registry(tmp_path / "reg")
    with pytest.raises(RegistryError, match="--ema or --no-ema"):
        reg.import_checkpoint(tmp_path / "ema.pth.tar", arch="test_resnet", num_classes=3)
    e = reg.import_checkpoint(tmp_path / "ema.pth.tar", arch="test_resnet", num_classes=3, use_ema=False)
    assert e.family == "ema" and e.train_config["import"]["key"] == "state_dict"


# ---------------------------------------------------------------------------- concurrency, crashes
def _writer(root, family: str, n: int, sd_path) -> None:
    """Add ``n`` entries (forever when n < 0) to the registry at ``root``: one writer process."""
    torch.set_num_threads(1)
    sd = torch.load(sd_path, weights_only=True)
    reg = Registry(root)
    pre = Preprocess.from_timm("test_resnet", 32)
    i = 0
    while n < 0 or i < n:
        reg.add(sd, family=family, fold=i, arch="test_resnet", head="flat", label_space=ABC,
                preprocess=pre, metrics={"i": i})
        i += 1


def _start_writer(root, family, n, sd_path):
    # fork: the child inherits the imported torch/timm, so the test costs the writes, not
    # two interpreter start-ups. Each child is still its own process with its own file lock.
    ctx = multiprocessing.get_context("fork")
    proc = ctx.Process(target=_writer, args=(str(root), family, n, str(sd_path)), daemon=True)
    proc.start()
    return proc


def test_two_processes_adding_50_entries_each_lose_nothing(tmp_path):
    sd_path = tmp_path / "sd.pt"
    torch.save(tiny_model().state_dict(), sd_path)
    root = tmp_path / "reg"
    procs = [_start_writer(root, fam, 50, sd_path) for fam in ("p0", "p1")]
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0, f"writer exited with {p.exitcode}"
    reg = Registry(root)
    entries = reg.entries()
    assert len(entries) == 100
    assert sorted(e.id for e in entries) == sorted(f"p{p}-fold{i}" for p in (0, 1) for i in range(50))
    assert reg.verify() == []


def test_writer_killed_mid_write_leaves_a_loadable_registry(tmp_path):
    sd_path = tmp_path / "sd.pt"
    torch.save(tiny_model().state_dict(), sd_path)
    root = tmp_path / "reg"
    rng = random.Random(0)
    count = 0
    for round_ in range(3):  # kill at a few different points of the write cycle
        proc = _start_writer(root, f"k{round_}", -1, sd_path)  # writes until killed
        try:
            deadline = time.monotonic() + 120
            while len(Registry(root)) < count + 3:
                assert proc.is_alive(), f"writer died with {proc.exitcode}"
                assert time.monotonic() < deadline, "writer made no progress"
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 0.03))
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.join()
        reg = Registry(root)
        entries = reg.entries()
        assert len(entries) >= count + 3
        count = len(entries)
        # every indexed entry is sound; at most a just-written weights file is not yet indexed
        assert reg.verify() == []
    # the lock died with the writer: a new writer gets it at once
    _add(reg, family="after", fold=0)
    assert len(reg) == count + 1


def test_exception_inside_index_write_keeps_previous_entries(tmp_path, monkeypatch):
    import ensembler._io as io_mod
    import ensembler.registry.index as registry_mod

    reg = Registry(tmp_path)
    _add(reg, fold=0)
    before = (tmp_path / "registry.json").read_bytes()

    def crash_half_way(path, obj, indent=2):
        with io_mod.atomic_write(path, "w") as fh:
            fh.write(json.dumps(obj)[:40])  # half the index ...
            raise KeyboardInterrupt("killed")  # ... then the process dies

    monkeypatch.setattr(registry_mod, "write_json_atomic", crash_half_way)
    with pytest.raises(KeyboardInterrupt):
        _add(reg, fold=1)
    monkeypatch.undo()
    assert (tmp_path / "registry.json").read_bytes() == before
    assert [e.id for e in Registry(tmp_path).entries()] == ["r-fold0"]
    assert not list(tmp_path.rglob("*.tmp"))
    assert Registry(tmp_path).verify() == []


def test_corrupt_index_is_named(tmp_path):
    (tmp_path / "registry.json").write_text("{not json")
    with pytest.raises(RegistryError, match=f"cannot read registry index {tmp_path / 'registry.json'}"):
        Registry(tmp_path).entries()
    (tmp_path / "registry.json").write_text(json.dumps({"version": 99, "entries": []}))
    with pytest.raises(RegistryError, match="version 99"):
        Registry(tmp_path).entries()
