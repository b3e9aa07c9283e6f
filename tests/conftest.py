"""Shared test helpers: tiny synthetic datasets, a tiny model, a malicious pickle, a wide console.

Helpers are plain functions (import them: ``from conftest import write_image_table``) or
fixtures (``wide_console``, ``one_torch_thread``, ``mask_tree``, ``mask_eval``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# Tests run with small thread pools: the CI machine has 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "2")

MASK_STEMS = ("mask1", "mask2", "mask3", "mask4", "mask5", "incorrect_mask", "normal")


def write_mask_tree(root: Path, n_profiles: int = 12, size=(24, 32), seed: int = 0,
                    exts=("jpg", "jpeg", "png")) -> Path:
    """A mask-competition train folder: ``root/images/<id>_<gender>_Asian_<age>/<stem>.<ext>``
    plus ``root/train.csv``. Extensions rotate over ``exts``; ages cover the three bands.
    Image colour encodes the mask state so tiny models can learn something.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    ages = [20, 25, 45, 59, 60, 70]
    rows = ["id,gender,race,age,path"]
    for p in range(n_profiles):
        pid = f"{p:06d}"
        gender = "male" if p % 2 == 0 else "female"
        age = ages[p % len(ages)]
        folder = f"{pid}_{gender}_Asian_{age}"
        (images / folder).mkdir(exist_ok=True)
        rows.append(f"{pid},{gender},Asian,{age},{folder}")
        for j, stem in enumerate(MASK_STEMS):
            ext = exts[(p + j) % len(exts)]
            base = {"incorrect_mask": 120, "normal": 220}.get(stem, 30)
            arr = np.clip(rng.normal(base, 20, size=(size[1], size[0], 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(images / folder / f"{stem}.{ext}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    return root


def write_mask_eval(root: Path, n: int = 6, size=(24, 32), seed: int = 1) -> Path:
    """A mask-competition eval folder: ``root/info.csv`` (ImageID,ans) + ``root/images/<hash>.jpg``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = ["ImageID,ans"]
    for i in range(n):
        name = f"{i:040x}.jpg"
        arr = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / "images" / name)
        rows.append(f"{name},0")
    (root / "info.csv").write_text("\n".join(rows) + "\n")
    return root


def write_image_table(folder: Path, label_space, n: int = 7, *, size=(32, 32), ext="png", seed: int = 0,
                      name: str = "img{i}", id: str = "s{i}"):
    """``n`` random RGB images in ``folder`` and the labeled :class:`SampleTable` over them.

    ``size`` is ``(H, W)`` or a function ``i -> (H, W)``; ``ext`` a suffix or a function
    ``i -> suffix``; labels cycle ``i % num_classes``, one group per image.
    """
    import pandas as pd
    from PIL import Image

    from ensembler.data import SampleTable

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        h, w = size(i) if callable(size) else size
        path = folder / f"{name.format(i=i)}.{ext(i) if callable(ext) else ext}"
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(path)
        rows.append({"id": id.format(i=i), "path": str(path), "label": i % label_space.num_classes,
                     "group": f"g{i}"})
    return SampleTable(pd.DataFrame(rows), label_space, {"kind": "csv", "path": str(folder)})


def unlabeled_table(label_space, n: int = 5):
    """A :class:`SampleTable` of ``n`` unlabeled rows ``x0``, ``x1``... with no images (for submissions)."""
    import pandas as pd

    from ensembler.data import SampleTable

    frame = pd.DataFrame({"id": [f"x{i}" for i in range(n)], "path": [f"/nowhere/{i}.png" for i in range(n)],
                          "label": [pd.NA] * n, "group": [f"g{i}" for i in range(n)]})
    return SampleTable(frame, label_space, {"kind": "csv", "path": "/nowhere"})


def res_eff_registry(root: Path, label_space, res_pre, eff_pre=None, seed: int = 0):
    """A seeded registry: family 'res' (two test_resnet folds at ``res_pre``) and 'eff' (one
    test_efficientnet at ``eff_pre``, default ``res_pre``)."""
    import torch

    from ensembler.models import create_model
    from ensembler.registry import Registry

    torch.manual_seed(seed)
    reg = Registry(root)
    for fold in range(2):
        reg.add(create_model("test_resnet", label_space=label_space), family="res", fold=fold, arch="test_resnet",
                head="flat", label_space=label_space, preprocess=res_pre)
    reg.add(create_model("test_efficientnet", label_space=label_space), family="eff", fold=None,
            arch="test_efficientnet", head="flat", label_space=label_space, preprocess=eff_pre or res_pre)
    return reg


def write_digits_manifest(root: Path, per_class: int) -> Path:
    """``per_class`` digits of each class as a CSV manifest (one group per image), so a CLI
    subprocess reads the same table."""
    from ensembler.data import digits_folder, load_source

    table = load_source("digits", cache_dir=digits_folder(root / "digits"))
    labels = table.labels
    keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)]))
    lines = ["id,path,label,group"] + [f"{table.ids[i]},{table.paths[i]},{labels[i]},{table.ids[i]}" for i in keep]
    csv = root / f"digits{10 * per_class}.csv"
    csv.write_text("\n".join(lines) + "\n")
    return csv


def tiny_model(arch: str = "test_resnet", num_classes: int = 3, seed: int = 0, **kw):
    """A seeded timm test network in eval mode (no download)."""
    import timm
    import torch

    torch.manual_seed(seed)
    return timm.create_model(arch, num_classes=num_classes, **kw).eval()


class RunsCode:
    """A pickle payload that creates ``marker`` when unpickled: a loader that lets it run
    executes arbitrary code. Tests assert the marker never appears."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def wide_console(monkeypatch):
    """The CLI's cached rich consoles, rebuilt 200 columns wide (tables do not wrap ids and
    hashes), and dropped again after the test."""
    from ensembler.cli import _common

    monkeypatch.setenv("COLUMNS", "200")
    _common.console.cache_clear()
    _common.err_console.cache_clear()
    yield
    _common.console.cache_clear()
    _common.err_console.cache_clear()


@pytest.fixture
def one_torch_thread():
    """One torch intra-op thread for the test: the CI machine's 2 cores are shared by parallel
    runs, and one thread is several times faster than two under contention."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def mask_tree(tmp_path) -> Path:
    return write_mask_tree(tmp_path / "train")


@pytest.fixture
def mask_eval(tmp_path) -> Path:
    return write_mask_eval(tmp_path / "eval")


# ---------------------------------------------------------------------------- faults (reliability tests)
def _mount_tmpfs(folder: Path, options: str) -> bool:
    """Mount a tmpfs at ``folder`` (root only); False where this machine does not allow it."""
    import subprocess

    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False
    folder.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    return res.returncode == 0


def _umount(folder: Path) -> None:
    import subprocess

    subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 4 MiB tmpfs (a disk that fills up); skipped unless running as root with mount rights."""
    folder = tmp_path / "tmpfs"
    if not _mount_tmpfs(folder, "size=4m,mode=0777"):
        pytest.skip("a full-disk test needs root to mount a small tmpfs")
    yield folder
    _umount(folder)


def fill_disk(folder: Path, leave: int = 0) -> Path:
    """Write a filler file in ``folder`` until the file system is full (``leave`` bytes spared)."""
    filler = folder / "filler.bin"
    with open(filler, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError:
            pass
    if leave:
        os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


@pytest.fixture
def readonly_dir(tmp_path):
    """A folder nothing can be written to: a read-only tmpfs as root (root ignores mode bits),
    else a folder with mode 0555."""
    folder = tmp_path / "readonly"
    if _mount_tmpfs(folder, "size=64k,ro"):
        yield folder
        _umount(folder)
        return
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):
        pytest.skip("cannot make a read-only folder here")
    yield folder
    folder.chmod(0o755)


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray instance for the ``ray`` tests: 2 CPUs and 2 *logical* GPUs (placement only;
    no CUDA needed), workers with one torch thread, this checkout importable on them."""
    ray = pytest.importorskip("ray", reason='the ray tests need pip install -e ".[ray]"')
    import os

    repo = str(Path(__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH", "")) if p)
    for attempt in range(3):
        # Ray's raylet gives its agents a fixed 15 s to start (ray-project/ray#65983): on a
        # machine this loaded a start can time out, and the next one usually does not.
        try:
            ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
                     runtime_env={"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}})
            break
        except Exception:  # noqa: BLE001 - "The current node timed out during startup"
            ray.shutdown()
            if attempt == 2:
                raise
    yield ray
    ray.shutdown()
