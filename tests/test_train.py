"""k-fold training: registered checkpoints, honest OOF logits, grouped folds, the loop itself."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from ensembler.data import load_source
from ensembler.errors import DataError, EnsemblerError
from ensembler.logits import read_logits
from ensembler.registry import Registry
from ensembler.train import Callbacks, LoopSettings, TrainConfig, run_fold, train_folds
from ensembler.train.curves import CSV_COLUMNS

from conftest import write_mask_tree


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory):
    """The digits PNGs, written once for this module."""
    from ensembler.data import digits_folder

    return digits_folder(tmp_path_factory.mktemp("cache") / "digits")


def digits_subset(cache_dir, n=450, seed=0):
    table = load_source("digits", cache_dir=cache_dir)
    rng = np.random.default_rng(seed)
    return table.subset(np.sort(rng.choice(len(table), n, replace=False)))


def tiny_config(**kw):
    base = dict(arch="test_resnet", k=3, epochs=1, img_size=32, pretrained=False, lr=1e-2, workers=0,
                batch_size=32, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


# ---------------------------------------------------------------------------- digits, k=3
@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, digits_cache):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("digits_run")
    table = digits_subset(digits_cache)
    registry = Registry(root / "registry")
    result = train_folds(table, tiny_config(epochs=2), registry, progress=False)
    return table, registry, result


def test_digits_registers_k_checkpoints_and_full_oof(digits_run):
    table, registry, result = digits_run
    entries = registry.family(result.family)
    assert [e.fold for e in entries] == [0, 1, 2]
    assert result.family == "test_resnet-flat"
    for e in entries:
        assert set(e.metrics) >= {"val_f1", "val_acc", "val_loss", "best_epoch"}
        assert e.oof == f"{result.family}/oof.npz"
        assert e.train_config["arch"] == "test_resnet"
        assert e.pre.input_size == (32, 32)
        assert registry.verify([e.id]) == []

    with np.load(result.oof_path, allow_pickle=False) as z:
        ids, logits, labels, folds = z["ids"], z["logits"], z["labels"], z["folds"]
    # Every training id exactly once, in SampleTable order, with its own label and fold.
    np.testing.assert_array_equal(ids, result.table.ids)
    assert len(set(ids.tolist())) == len(table)
    np.testing.assert_array_equal(labels, table.labels)
    np.testing.assert_array_equal(folds, result.table.folds)
    assert logits.dtype == np.float32 and logits.shape == (len(table), 10)
    assert np.isfinite(logits).all()
    assert result.oof_complete
    meta = read_logits(result.oof_path).meta  # the sidecar oof.json
    assert meta["complete"] is True and meta["rows"] == len(table)

    # Above chance (10 balanced classes: 0.1), computed independently from the file.
    from sklearn.metrics import f1_score

    f1 = f1_score(labels, logits.argmax(1), average="macro")
    assert f1 == pytest.approx(result.oof_f1)
    assert f1 > 0.2


def test_registered_checkpoint_reproduces_its_oof_logits(digits_run):
    # The registry's weights + preprocess, run through the eval transform, give the same
    # logits the trainer wrote for that fold: OOF logits are from the registered best epoch.
    _, registry, result = digits_run
    entry = registry.family(result.family)[1]
    model = registry.load_model(entry)
    rows = result.folds[1].val_index
    pre = entry.pre
    tf = pre.geometry_transform()
    from ensembler.data import decode_image

    images = torch.stack([tf(decode_image(p)) for p in result.table.paths[rows[:40]]])
    with torch.no_grad():
        out = model(pre.normalize(images)).numpy()
    with np.load(result.oof_path) as z:
        pos = np.flatnonzero(z["folds"] == 1)[:40]
        np.testing.assert_allclose(out, z["logits"][pos], rtol=1e-4, atol=1e-4)


def test_metrics_csv_and_curves(digits_run):
    _, _, result = digits_run
    lines = result.metrics_csv.read_text().splitlines()
    assert lines[0].split(",") == list(CSV_COLUMNS)
    rows = [dict(zip(CSV_COLUMNS, line.split(","))) for line in lines[1:]]
    assert sorted({(int(r["fold"]), int(r["epoch"])) for r in rows}) == [(f, e) for f in range(3) for e in (1, 2)]
    for f in result.folds:
        best = next(r for r in rows if int(r["fold"]) == f.fold and int(r["epoch"]) == f.best_epoch)
        assert float(best["val_f1"]) == pytest.approx(f.val_f1, abs=1e-5)
        # best by macro-F1 really is the max over that fold's epochs
        assert f.val_f1 >= max(float(r["val_f1"]) for r in rows if int(r["fold"]) == f.fold) - 1e-6
    png = result.curves_png.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # no resume state left behind once a fold is registered
    assert not list(result.oof_path.parent.glob("fold*/state.pt"))


def test_fold_rows_are_the_split(digits_run):
    _, _, result = digits_run
    n = len(result.table)
    val = np.concatenate([f.val_index for f in result.folds])
    assert sorted(val.tolist()) == list(range(n))
    for f in result.folds:
        assert len(np.intersect1d(f.train_index, f.val_index)) == 0
        assert len(f.train_index) + len(f.val_index) == n


# ---------------------------------------------------------------------------- grouped mask data
def test_mask_groups_never_straddle_train_and_validation(tmp_path):
    tree = write_mask_tree(tmp_path / "train", n_profiles=9, size=(16, 20))
    table = load_source(tree)
    registry = Registry(tmp_path / "registry")
    result = train_folds(table, tiny_config(head="factored", batch_size=16), registry, progress=False)
    groups = result.table.groups
    assert len(set(groups)) == 9 and len(result.table) == 63
    for f in result.folds:
        train_groups = set(groups[f.train_index])
        val_groups = set(groups[f.val_index])
        assert train_groups and val_groups
        assert not train_groups & val_groups, f"fold {f.fold}: groups in train and validation"
    with np.load(result.oof_path) as z:
        logits = z["logits"]
    # A factored head's OOF logits are joint log-probabilities over the 18 classes.
    assert logits.shape == (63, 18)
    np.testing.assert_allclose(np.log(np.exp(logits.astype(np.float64)).sum(1)), 0.0, atol=1e-4)
    assert registry.family(result.family)[0].head == "factored"


def test_target_trains_a_one_factor_model(tmp_path):
    tree = write_mask_tree(tmp_path / "train", n_profiles=6, size=(16, 20))
    table = load_source(tree)
    registry = Registry(tmp_path / "registry")
    result = train_folds(table, tiny_config(target="mask", k=2, batch_size=16), registry, progress=False)
    assert result.family == "test_resnet-flat-mask"
    entry = registry.family(result.family)[0]
    assert entry.target == "mask"
    assert entry.labels.classes == table.label_space.factor("mask").classes
    with np.load(result.oof_path) as z:
        assert z["logits"].shape == (42, 3)
        expected = table.label_space.factor_indices(table.labels)[0]
        pos = {i: n for n, i in enumerate(table.ids)}
        np.testing.assert_array_equal(z["labels"], expected[[pos[i] for i in z["ids"]]])


def test_target_on_flat_data_is_a_clear_error(tmp_path, digits_cache):
    table = digits_subset(digits_cache, n=60)
    with pytest.raises(DataError, match="--target age needs a factored label space"):
        train_folds(table, tiny_config(target="age"), Registry(tmp_path / "reg"), progress=False)
    assert not (tmp_path / "reg").exists()


def test_bad_config_names_the_field_and_the_cli_names_the_flag(capsys):
    from ensembler.cli import main
    from ensembler.errors import ParameterError

    with pytest.raises(ParameterError, match="^folds \\[5\\] out of range") as exc:
        tiny_config(folds=[5])
    assert exc.value.parameter == "folds"
    with pytest.raises(ParameterError, match="^loss_weights are needed by loss 'mix'") as exc:
        tiny_config(loss="mix")
    assert exc.value.parameter == "loss_weights"
    with pytest.raises(ParameterError, match="^weight_decay must be >= 0"):
        tiny_config(weight_decay=-1.0)
    assert main(["train-folds", "--data", "digits", "--arch", "test_resnet", "--weight-decay", "-1"]) == 2
    assert "--weight-decay must be >= 0, got -1" in capsys.readouterr().err
    with pytest.raises(EnsemblerError, match="^optimizer must be one of"):
        tiny_config(optimizer="lamb")
    with pytest.raises(EnsemblerError, match="is one factor: a factored head needs two or more"):
        tiny_config(head="factored", target="age")


def test_existing_family_needs_resume(digits_run, tmp_path):
    table, registry, result = digits_run
    with pytest.raises(EnsemblerError, match="--resume"):
        train_folds(table, tiny_config(family=result.family), registry, progress=False)


def test_cli_pretrained_offline_fails_before_training(digits_cache, tmp_path, monkeypatch, capsys):
    # No hub here: make timm's download fail at once (as it does offline, after retries).
    import timm

    real = timm.create_model

    def offline(name, pretrained=False, **kw):
        if pretrained and "pretrained_cfg_overlay" not in kw:
            raise OSError("Name or service not known (huggingface.co)")
        return real(name, pretrained=pretrained, **kw)

    monkeypatch.setattr(timm, "create_model", offline)
    monkeypatch.setenv("ENSEMBLER_CACHE", str(digits_cache.parent))
    from ensembler.cli import main

    reg = tmp_path / "reg"
    rc = main(["train-folds", "--data", "digits", "--arch", "test_resnet", "--img-size", "32", "--k", "2",
               "--epochs", "1", "--registry", str(reg), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "--no-pretrained" in err and "--pretrained-path" in err
    assert not list(reg.glob("**/run.json")) and not (reg / "registry.json").exists()


def test_cli_bad_flag_is_a_clean_error(capsys):
    from ensembler.cli import main

    rc = main(["train-folds", "--data", "digits", "--arch", "test_resnet", "--loss", "mix"])
    assert rc == 2
    assert "--loss-weights are needed by loss 'mix'" in capsys.readouterr().err


# ---------------------------------------------------------------------------- the loop on plain tensors
def _toy_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(96) % 3
    x = torch.randn(96, 4, generator=g) + 2.0 * torch.nn.functional.one_hot(y, 4)[:, :4].float()
    return x, y


def _toy_run(tmp_path, epochs, *, resume=False, crash_after=None, patience=None, lr=0.05, monitor="f1"):
    from ensembler.train.optim import build_optimizer, build_scheduler
    from ensembler.train.state import seed_everything

    x, y = _toy_problem()
    seed_everything(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 3))
    ds = torch.utils.data.TensorDataset(x, y)
    gen = torch.Generator()
    train = torch.utils.data.DataLoader(ds, batch_size=16, shuffle=True, generator=gen)
    val = torch.utils.data.DataLoader(ds, batch_size=32)
    opt = build_optimizer(model, "adamw", lr, 0.01)
    sched = build_scheduler(opt, "cosine", epochs=epochs, steps_per_epoch=len(train), warmup_epochs=1)

    class Crash(Callbacks):
        def on_state_saved(self, path, epoch, history, best_epoch):
            if crash_after is not None and epoch == crash_after:
                raise KeyboardInterrupt("simulated kill")

    settings = LoopSettings(epochs=epochs, num_classes=3, monitor=monitor, patience=patience,
                            state_path=tmp_path / "state.pt", resume=resume)
    out = run_fold(model, train, val, loss_fn=torch.nn.functional.cross_entropy, optimizer=opt, scheduler=sched,
                   settings=settings, train_generator=gen, callbacks=Crash())
    return model, out


def test_loop_resume_is_bit_identical(tmp_path):
    ref_model, ref = _toy_run(tmp_path / "a", 4)
    with pytest.raises(KeyboardInterrupt):
        _toy_run(tmp_path / "b", 4, crash_after=2)
    model, out = _toy_run(tmp_path / "b", 4, resume=True)
    assert out.resumed_at == 2
    for (k, a), b in zip(ref_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k
    assert [r.train_loss for r in out.history] == [r.train_loss for r in ref.history]
    np.testing.assert_array_equal(out.best_val_logits, ref.best_val_logits)


def test_loop_early_stops_and_keeps_best(tmp_path):
    # lr so high that validation loss gets worse after the first epoch(s).
    _, out = _toy_run(tmp_path, 30, patience=2, lr=5.0, monitor="loss")
    assert out.stopped_early and len(out.history) < 30
    assert len(out.history) - out.best_epoch == 2
    best = min(r.val_loss for r in out.history)
    assert out.best_record.val_loss == best


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_stops_training_and_names_the_file(tmp_path, workers, digits_cache):
    table = digits_subset(digits_cache, n=60)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    frame = table.frame.copy()
    frame.loc[5, "path"] = str(bad)
    from ensembler.data import SampleTable

    table = SampleTable(frame, table.label_space, table.source)
    with pytest.raises(DataError, match="broken.png") as info:
        train_folds(table, tiny_config(k=2, workers=workers), Registry(tmp_path / "reg"), progress=False)
    assert "Traceback" not in str(info.value)
    assert not (tmp_path / "reg" / "registry.json").exists()


def test_lr_schedules_have_their_documented_shape():
    from ensembler.train.optim import LRShape

    cos = LRShape("cosine", total_steps=100, warmup_steps=10, min_factor=0.01)
    warm = [cos(s) for s in range(10)]
    assert warm == sorted(warm) and warm[-1] < 1.0
    assert cos(10) == pytest.approx(1.0) and cos(99) == pytest.approx(0.01, abs=2e-3)
    assert all(cos(s) >= cos(s + 1) for s in range(10, 99))
    step = LRShape("step", total_steps=90)
    assert (step(0), step(30), step(60), step(89)) == (1.0, pytest.approx(0.1), pytest.approx(0.01), pytest.approx(0.01))
    restarts = LRShape("cosine-restarts", total_steps=90)
    assert restarts(0) == pytest.approx(1.0) and restarts(30) == pytest.approx(1.0) and restarts(29) < 0.1
    # warm-up is capped at a quarter of the run, so a 1-epoch run still reaches its LR
    assert LRShape("none", total_steps=8, warmup_steps=8)(2) == 1.0


@pytest.mark.slow
def test_full_digits_five_folds_reaches_high_oof_f1(tmp_path, digits_cache):
    # The whole bundled digits set, k=5, 3 epochs of test_resnet at 32 px.
    table = load_source("digits", cache_dir=digits_cache)
    registry = Registry(tmp_path / "reg")
    result = train_folds(table, tiny_config(k=5, epochs=3), registry, progress=False)
    assert result.oof_complete and result.oof_rows == len(table) == 1797
    assert result.oof_f1 > 0.9
    assert len(registry.family(result.family)) == 5
