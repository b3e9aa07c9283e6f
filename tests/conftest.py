"""Shared fixtures: tiny synthetic datasets written to temp folders."""

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
