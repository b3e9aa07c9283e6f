"""train-folds on Ray (a local 2-CPU cluster, 2 logical GPUs): the same numbers as the local
executor, several families in one call, a killed worker retried, a failing fold named, a killed
driver resumed. Tiny models, 120 images, 2 epochs: ``python -m pytest -m ray``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ensembler.data import SampleTable, load_source
from ensembler.errors import DataError
from ensembler.logits import read_logits
from ensembler.registry import Registry
from ensembler.train import TrainConfig, train_families, train_folds

from conftest import write_digits_manifest

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("one_torch_thread")]

EPOCHS = 2


@pytest.fixture(scope="module")
def digits_csv(tmp_path_factory) -> Path:
    """120 digits (12 per class) as a CSV manifest, so a CLI subprocess reads the same table."""
    return write_digits_manifest(tmp_path_factory.mktemp("digits"), 12)


def config(**kw) -> TrainConfig:
    base = dict(arch="test_resnet", k=2, epochs=EPOCHS, img_size=32, pretrained=False, lr=1e-2, workers=0,
                batch_size=16, device="cpu", deterministic=True, family="fam")
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def local_reference(digits_csv, tmp_path_factory):
    """The same run on the local executor: the numbers every Ray run must reproduce."""
    import torch

    torch.set_num_threads(1)
    reg = Registry(tmp_path_factory.mktemp("local") / "reg")
    train_folds(load_source(digits_csv), config(), reg, progress=False)
    return read_logits(reg.root / "fam" / "oof.npz")


def ray_executor(**kw):
    from ensembler.executors import RayExecutor

    return RayExecutor(**{"gpus_per_task": 1, "cpus_per_task": 1, **kw})


@pytest.fixture(scope="module")
def two_families(ray_cluster, digits_csv, tmp_path_factory):
    reg = Registry(tmp_path_factory.mktemp("ray2") / "reg")
    results = train_families(load_source(digits_csv), [config(), config(arch="test_efficientnet", family="eff")],
                             reg, executor=ray_executor(), progress=False)
    return reg, results


def test_ray_oof_is_bit_identical_to_local(two_families, local_reference):
    reg, results = two_families
    oof = read_logits(reg.root / "fam" / "oof.npz")
    np.testing.assert_array_equal(oof.ids, local_reference.ids)
    assert np.array_equal(oof.logits, local_reference.logits), "Ray OOF logits differ from the local executor's"
    assert results[0].oof_complete and results[0].oof_f1 == pytest.approx(local_reference.meta["macro_f1"])


def test_two_families_in_one_call_share_the_cluster(two_families):
    reg, results = two_families
    assert [r.family for r in results] == ["fam", "eff"]
    for r in results:
        entries = reg.family(r.family)
        assert [e.fold for e in entries] == [0, 1] and r.oof_complete
        assert all(e.oof == f"{r.family}/oof.npz" for e in entries)
        assert not any((reg.root / r.family / f"fold{f}" / "state.pt").exists() for f in (0, 1))
        # --gpus-per-fold 1 on a 2-GPU cluster: each fold held exactly one of the two GPUs.
        for e in entries:
            assert e.extra["trained_on"]["visible_gpus"] in ("0", "1")
    assert reg.verify() == []


def test_failing_fold_names_itself_and_registers_nothing(ray_cluster, digits_csv, tmp_path):
    table = load_source(digits_csv)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    frame = table.frame.copy()
    frame.loc[3, "path"] = str(bad)
    table = SampleTable(frame, table.label_space, table.source)
    reg = Registry(tmp_path / "reg")
    with pytest.raises(DataError, match=r"fam fold \d: cannot decode image .*broken.png") as info:
        train_folds(table, config(epochs=1), reg, executor=ray_executor(), progress=False)
    assert "RayTaskError" not in str(info.value) and "Traceback" not in str(info.value)
    assert type(info.value) is DataError  # the worker's own error, not a Ray wrapper
    assert not (reg.root / "registry.json").exists() or len(reg) == 0


def _ray_fold_pids(prefix: bytes = b"ray::fam_fold_0") -> list[int]:
    """Processes of running fold tasks (Ray titles them ``ray::<task name>``)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes()
            except OSError:
                continue
            if cmd.startswith(prefix):
                pids.append(int(d.name))
    return pids


def test_killed_worker_is_retried_and_resumes_to_the_same_numbers(ray_cluster, digits_csv, tmp_path,
                                                                  local_reference):
    reg = Registry(tmp_path / "reg")
    state = reg.root / "fam" / "fold0" / "state.pt"
    killed = []

    def kill_after_first_epoch():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            pids = _ray_fold_pids() if state.exists() else []
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.01)

    watcher = threading.Thread(target=kill_after_first_epoch, daemon=True)
    watcher.start()
    result = train_folds(load_source(digits_csv), config(), reg, executor=ray_executor(max_retries=1),
                         progress=False)
    watcher.join(timeout=5)
    assert killed, "fold 0 finished before its worker could be killed"
    assert result.oof_complete
    assert np.array_equal(read_logits(reg.root / "fam" / "oof.npz").logits, local_reference.logits)


def test_killed_worker_without_retries_stops_the_run_naming_the_fold(ray_cluster, digits_csv, tmp_path):
    from ensembler.errors import EnsemblerError

    reg = Registry(tmp_path / "reg")
    killed = []

    def kill_fold0():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            for pid in _ray_fold_pids():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.01)

    threading.Thread(target=kill_fold0, daemon=True).start()
    with pytest.raises(EnsemblerError, match="fam fold 0: its Ray worker died .*--max-retries 0.*--resume"):
        train_folds(load_source(digits_csv), config(), reg, executor=ray_executor(max_retries=0), progress=False)
    assert not any(e.fold == 0 for e in (reg.entries() if reg.index_path.exists() else []))


def test_driver_killed_mid_run_resumes_locally(ray_cluster, digits_csv, tmp_path, local_reference):
    """A CLI driver on the cluster is SIGKILLed after fold states are on disk; --resume on the
    local executor finishes the run with the numbers of an uninterrupted one."""
    reg = tmp_path / "reg"
    address = ray_cluster.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "ensembler", "train-folds", "--data", str(digits_csv), "--arch", "test_resnet",
           "--no-pretrained", "--img-size", "32", "--k", "2", "--epochs", str(EPOCHS), "--batch-size", "16",
           "--lr", "0.01", "--workers", "0", "--device", "cpu", "--deterministic", "--family", "fam",
           "--registry", str(reg), "--no-progress", "--executor", "ray", "--ray-address", address,
           "--gpus-per-fold", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    states = [reg / "fam" / f"fold{f}" / "state.pt" for f in (0, 1)]
    deadline = time.monotonic() + 300
    while not any(s.exists() for s in states) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    registry = Registry(reg)
    assert not (reg / "fam" / "oof.npz").exists()
    deadline = time.monotonic() + 60  # Ray kills the tasks of a dead driver: let them go first
    while _ray_fold_pids(b"ray::fam_fold") and time.monotonic() < deadline:
        time.sleep(0.1)

    result = train_folds(load_source(digits_csv), config(), registry, resume=True, progress=False)
    assert result.oof_complete and [e.fold for e in registry.family("fam")] == [0, 1]
    assert np.array_equal(read_logits(reg / "fam" / "oof.npz").logits, local_reference.logits)


def test_the_driver_shows_each_folds_epochs_and_scores_as_they_arrive(ray_cluster, digits_csv, tmp_path):
    """One display on the driver, readable in a log file: every fold's epoch lines (with its
    validation score) arrive from the workers, and a status line says where each fold runs."""
    import io

    from rich.console import Console

    buf = io.StringIO()
    console = Console(file=buf, width=200, force_terminal=False, color_system=None)
    reg = Registry(tmp_path / "reg")
    train_folds(load_source(digits_csv), config(), reg, executor=ray_executor(), progress=True, console=console)
    text = buf.getvalue()
    for fold in (0, 1):
        for epoch in range(1, EPOCHS + 1):
            lines = [ln for ln in text.splitlines() if f"fold {fold} epoch {epoch:>3}" in ln]
            assert lines and "val_f1 " in lines[0] and "val_loss " in lines[0], text[-3000:]
    assert "Traceback" not in text


def _torch_threads(report=None) -> int:
    import torch

    return torch.get_num_threads()


@pytest.mark.parametrize("cpus", [1, 2])
def test_a_task_computes_with_the_cpus_it_holds(ray_cluster, cpus):
    """--cpus-per-fold N gives a fold N torch threads, whatever OMP_NUM_THREADS the cluster
    passed down (the test cluster passes 1): a --deterministic run on Ray then matches a local
    run at the same thread count."""
    from ray import cloudpickle

    from ensembler.executors import RayExecutor, Task

    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)  # the workers cannot import this test module
    try:
        got = []
        with RayExecutor(cpus_per_task=cpus, gpus_per_task=0) as ex:
            ex.run_tasks([Task(key="threads", fn=_torch_threads)], on_result=lambda task, r: got.append(r))
    finally:
        cloudpickle.unregister_pickle_by_value(module)
    assert got == [cpus]
