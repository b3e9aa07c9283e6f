"""Executors without Ray: the local executor runs the same fold task Ray runs; several families
in one call; the driver alone records entries (stage on the worker, record on the driver)."""

from __future__ import annotations

import numpy as np
import pytest

from ensembler.data import digits_folder, load_source
from ensembler.errors import EnsemblerError, IntegrityError, RegistryError
from ensembler.executors import LocalExecutor, Task, make_executor
from ensembler.labels import LabelSpace
from ensembler.logits import read_logits
from ensembler.registry import Registry
from ensembler.train import TrainConfig, train_families

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits60(tmp_path_factory):
    table = load_source("digits", cache_dir=digits_folder(tmp_path_factory.mktemp("d") / "digits"))
    keep = np.sort(np.concatenate([np.flatnonzero(table.labels == c)[:6] for c in range(10)]))
    return table.subset(keep)


def tiny(**kw):
    base = dict(arch="test_resnet", k=2, epochs=1, img_size=32, pretrained=False, lr=1e-2, workers=0,
                batch_size=16, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def test_two_families_in_one_call_locally(digits60, tmp_path):
    reg = Registry(tmp_path / "reg")
    results = train_families(digits60, [tiny(), tiny(arch="test_efficientnet")], reg, progress=False)
    assert [r.family for r in results] == ["test_resnet-flat", "test_efficientnet-flat"]
    for r in results:
        assert r.oof_complete and [e.fold for e in reg.family(r.family)] == [0, 1]
        assert read_logits(r.oof_path).logits.shape == (60, 10)
        assert all(e.extra["trained_on"]["device"] == "cpu" for e in reg.family(r.family))
    assert reg.verify() == []


def test_same_family_twice_is_refused_before_training(digits60, tmp_path):
    reg = Registry(tmp_path / "reg")
    with pytest.raises(EnsemblerError, match="both be family 'x'"):
        train_families(digits60, [tiny(family="x"), tiny(arch="test_efficientnet", family="x")], reg,
                       progress=False)
    assert len(reg) == 0 if reg.index_path.exists() else True


def test_local_executor_runs_tasks_in_order_and_reports_events():
    seen, events = [], []

    def work(x, *, report):
        report({"kind": "note", "text": f"got {x}"})
        return x * 2

    LocalExecutor().run_tasks([Task(f"t{i}", work, (i,)) for i in range(3)],
                              on_result=lambda t, r: seen.append((t.key, r)),
                              on_event=lambda t, e: events.append((t.key, e["text"])))
    assert seen == [("t0", 0), ("t1", 2), ("t2", 4)]
    assert events == [("t0", "got 0"), ("t1", "got 1"), ("t2", "got 2")]


def test_make_executor_names_the_choices():
    assert make_executor(None).name == "local"
    with pytest.raises(EnsemblerError, match="--executor 'dask': choose local or ray"):
        make_executor("dask")


# ---------------------------------------------------------------------------- stage / record
def _stage(reg, fold=0):
    import timm

    model = timm.create_model("test_resnet", num_classes=2)
    return reg.stage(model, family="f", fold=fold, arch="test_resnet", head="flat",
                     label_space=LabelSpace(("a", "b")))


def test_staged_weights_are_invisible_until_the_driver_records_them(tmp_path):
    reg = Registry(tmp_path / "reg")
    entry = _stage(reg)
    assert (reg.root / entry.weights).is_file() and len(reg) == 0
    reg.record(entry)
    assert reg.ids() == ["f-fold0"] and reg.verify() == []
    with pytest.raises(RegistryError, match="already has an entry 'f-fold0'"):
        reg.record(entry)


def test_record_refuses_weights_changed_after_staging(tmp_path):
    reg = Registry(tmp_path / "reg")
    entry = _stage(reg)
    path = reg.root / entry.weights
    path.write_bytes(path.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(IntegrityError, match="changed after it was written"):
        reg.record(entry)
    assert len(reg) == 0


# ---------------------------------------------------------------------------- CLI flags
def test_cli_ray_flags_need_the_ray_executor(capsys):
    from ensembler.cli import main

    rc = main(["train-folds", "--data", "digits", "--arch", "test_resnet", "--gpus-per-fold", "1"])
    assert rc == 2 and "--gpus-per-fold only apply with --executor ray" in capsys.readouterr().err


@pytest.mark.parametrize("archs, extra, message", [
    ("test_resnet,test_resnet", [], "listed twice"),
    ("test_resnet,test_efficientnet", ["--family", "x"], "--family names one family"),
])
def test_cli_several_archs(capsys, archs, extra, message):
    from ensembler.cli import main

    rc = main(["train-folds", "--data", "digits", "--arch", archs, *extra])
    assert rc == 2 and message in capsys.readouterr().err



def test_image_decode_error_survives_pickling():
    """A worker process (a DataLoader worker, a Ray task) sends it back whole, its file named."""
    import pickle

    from ensembler.errors import ImageDecodeError

    err = pickle.loads(pickle.dumps(ImageDecodeError("/x/y.png", "truncated")))
    assert (err.path, err.reason, str(err)) == ("/x/y.png", "truncated", "cannot decode image /x/y.png: truncated")
