"""Inference on Ray (a local 2-CPU cluster, 2 logical GPUs): rows sharded across two actors give the
local engine's logits and submission, a corrupt image is named, the cache is written only when
every shard is done; Ctrl-C on a train-folds driver cancels its tasks and registers nothing.
``python -m pytest -m ray``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ensembler.cli import main
from ensembler.data import SampleTable, load_source
from ensembler.errors import ImageDecodeError
from ensembler.infer import predict_members, tta_report
from ensembler.registry import Registry
from ensembler.train import TrainConfig, train_folds

from conftest import write_digits_manifest

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("one_torch_thread")]

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def digits_csv(tmp_path_factory) -> Path:
    """100 digits (10 per class) as a CSV manifest, so a CLI subprocess reads the same table."""
    return write_digits_manifest(tmp_path_factory.mktemp("digits"), 10)


def config(**kw) -> TrainConfig:
    base = dict(arch="test_resnet", k=2, epochs=1, img_size=32, pretrained=False, lr=1e-2, workers=0,
                batch_size=16, device="cpu", deterministic=True, family="fam")
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def trained(digits_csv, tmp_path_factory):
    """Two families (two geometry groups: 32 and 40 px), trained locally."""
    reg = Registry(tmp_path_factory.mktemp("reg") / "reg")
    table = load_source(digits_csv)
    train_folds(table, config(), reg, progress=False)
    train_folds(table, config(arch="test_efficientnet", family="eff", img_size=40), reg, progress=False)
    return table, reg


def two_workers():
    from ensembler.executors import RayExecutor

    return RayExecutor(gpus_per_task=1, cpus_per_task=1, workers=2, unit="worker")


def test_sharded_inference_equals_the_local_engine(ray_cluster, trained, tmp_path):
    table, reg = trained
    local = predict_members(table, "all", reg, tta="flip", batch_size=16, progress=False, cache_dir=tmp_path / "l")
    with two_workers() as ex:
        sharded = predict_members(table, "all", reg, tta="flip", batch_size=16, progress=False,
                                  cache_dir=tmp_path / "r", executor=ex)
    assert list(sharded) == list(local) == ["fam", "eff"]
    for name in local:
        np.testing.assert_array_equal(sharded[name].ids, local[name].ids)
        np.testing.assert_allclose(sharded[name].logits, local[name].logits, rtol=0, atol=1e-5)
        assert not sharded[name].meta["cached"]
    # The driver cached every checkpoint once all its shards were in: a rerun does no forward.
    again = predict_members(table, "all", reg, tta="flip", batch_size=16, progress=False, cache_dir=tmp_path / "r")
    assert all(m.meta["cached"] for m in again.values())
    np.testing.assert_array_equal(again["fam"].logits, sharded["fam"].logits)


def test_tta_report_on_ray_equals_local(ray_cluster, trained, tmp_path):
    table, reg = trained
    local = tta_report(table, "fam", reg, tta="hflip", batch_size=16, progress=False, cache_dir=tmp_path / "l")
    with two_workers() as ex:
        sharded = tta_report(table, "fam", reg, tta="hflip", batch_size=16, progress=False,
                             cache_dir=tmp_path / "r", executor=ex)
    np.testing.assert_allclose(sharded.view_logits, local.view_logits, rtol=0, atol=1e-5)
    assert sharded.merged.f1 == pytest.approx(local.merged.f1)


def test_predict_on_ray_writes_the_same_submission(ray_cluster, trained, digits_csv, tmp_path):
    _, reg = trained
    common = ["predict", "--data", str(digits_csv), "--registry", str(reg.root), "--members", "fam,eff", "--vote",
              "soft", "--tta", "hflip", "--device", "cpu", "--workers", "0", "--batch-size", "16"]
    assert main(common + ["--out", str(tmp_path / "local" / "sub.csv"), "--cache-dir", str(tmp_path / "cl")]) == 0
    assert main(common + ["--out", str(tmp_path / "ray" / "sub.csv"), "--cache-dir", str(tmp_path / "cr"),
                          "--executor", "ray", "--ray-workers", "2"]) == 0
    assert (tmp_path / "ray" / "sub.csv").read_bytes() == (tmp_path / "local" / "sub.csv").read_bytes()


def test_a_corrupt_image_on_a_worker_is_named_and_nothing_is_cached(ray_cluster, trained, tmp_path):
    table, reg = trained
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    frame = table.frame.copy()
    frame.loc[frame.index[90], "path"] = str(bad)  # in the last shard
    broken = SampleTable(frame, table.label_space, table.source)
    cache = tmp_path / "cache"
    with two_workers() as ex, pytest.raises(ImageDecodeError, match=r"cannot decode image .*broken\.png") as info:
        predict_members(broken, "fam", reg, batch_size=16, progress=False, cache_dir=cache, executor=ex)
    assert type(info.value) is ImageDecodeError  # the worker's own error, not a Ray wrapper
    assert "RayTaskError" not in str(info.value) and "Traceback" not in str(info.value)
    assert not cache.exists() or not any(cache.rglob("*.npz"))


def _ray_fold_pids(prefix: bytes = b"ray::fam_fold") -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "cmdline").read_bytes().startswith(prefix):
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


def test_ctrl_c_on_the_driver_cancels_every_task_and_registers_nothing(ray_cluster, digits_csv, tmp_path):
    reg = tmp_path / "reg"
    before = Registry(reg)
    train_folds(load_source(digits_csv), config(family="kept"), before, progress=False)
    index_before = (reg / "registry.json").read_bytes()
    address = ray_cluster.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "ensembler", "train-folds", "--data", str(digits_csv), "--arch", "test_resnet",
           "--no-pretrained", "--img-size", "32", "--k", "2", "--epochs", "6", "--batch-size", "16",
           "--lr", "0.01", "--workers", "0", "--device", "cpu", "--deterministic", "--family", "fam",
           "--registry", str(reg), "--no-progress", "--executor", "ray", "--ray-address", address,
           "--gpus-per-fold", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    states = [reg / "fam" / f"fold{f}" / "state.pt" for f in (0, 1)]
    deadline = time.monotonic() + 300
    while not any(s.exists() for s in states) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    assert _ray_fold_pids(), "no fold task was running"
    proc.send_signal(signal.SIGINT)
    stderr = proc.communicate(timeout=90)[1].decode()
    assert proc.returncode != 0
    assert "interrupted" in stderr and "Traceback" not in stderr and len(stderr.splitlines()) <= 5, stderr
    # Every task was cancelled before the driver exited: no fold process is left running.
    deadline = time.monotonic() + 10
    while _ray_fold_pids() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _ray_fold_pids()
    index = (reg / "registry.json").read_bytes()
    assert index == index_before or "fam" not in {e["family"] for e in json.loads(index).get("entries", [])}
    assert [e.family for e in Registry(reg).entries()] == ["kept", "kept"]


def test_a_modified_checkpoint_on_a_worker_is_named(ray_cluster, trained, tmp_path):
    import shutil

    from ensembler.errors import IntegrityError

    table, reg = trained
    copy = Registry(shutil.copytree(reg.root, tmp_path / "reg"))
    weights = copy.path(copy.family("fam")[0].weights)
    weights.write_bytes(weights.read_bytes()[:-8] + b"modified")
    with two_workers() as ex, pytest.raises(IntegrityError, match=r"weights file .*fold0.* was modified"):
        predict_members(table, "fam", copy, progress=False, cache_dir=tmp_path / "cache", executor=ex)


class _CountingWorker:
    """Runs a shard batch by batch, reporting each batch's rows (a stand-in for the engine's workers)."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size

    def run(self, table, advance=None):
        import time as _time

        for lo in range(0, len(table), self.batch_size):
            _time.sleep(0.05)
            if advance is not None:
                advance(min(self.batch_size, len(table) - lo))
        return list(table.ids)


def test_sharded_progress_moves_batch_by_batch_and_counts_every_row_once(ray_cluster, trained):
    """On Ray the driver's bar advances as each worker finishes a batch (not once per shard),
    and every row is counted exactly once; the rows come back in order."""
    from ray import cloudpickle

    table, _ = trained
    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)  # the workers cannot import this test module
    steps: list[int] = []
    try:
        with two_workers() as ex:
            out = ex.run_rows(_CountingWorker, (8,), table, batch_size=8, advance=steps.append)
    finally:
        cloudpickle.unregister_pickle_by_value(module)
    assert [i for shard in out for i in shard] == list(table.ids)
    assert sum(steps) == len(table)
    shards = len(out)
    assert len(steps) > shards, (steps, shards)  # finer than one step per shard
