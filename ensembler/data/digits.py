"""The ``digits`` Source: scikit-learn's bundled 8x8 digits, cached once as 32x32 RGB PNGs.

No download: the images come with scikit-learn. :func:`digits_folder` writes them into a
cache folder (:func:`default_cache_root`) atomically on first use; :func:`load_digits_table`
reads them as a SampleTable (classes ``"0".."9"``, id ``digit_00042``, one group per image).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pandas as pd

from .._io import write_json_atomic
from ..errors import DataError
from ..labels import LabelSpace
from .table import SampleTable

DIGITS_VERSION = 1
DIGITS_SIZE = 32


def default_cache_root() -> Path:
    """``$ENSEMBLER_CACHE``, else ``$XDG_CACHE_HOME/ensembler``, else ``~/.cache/ensembler``."""
    env = os.environ.get("ENSEMBLER_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "ensembler"


def _digits_manifest_ok(folder: Path) -> bool:
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("version") != DIGITS_VERSION or manifest.get("size") != DIGITS_SIZE:
        return False
    labels = folder / "labels.csv"
    if not labels.is_file():
        return False
    n = manifest.get("count", -1)
    return all((folder / f"digit_{i:05d}.png").is_file() for i in range(n))


def _write_digits(folder: Path) -> None:
    from PIL import Image
    from sklearn.datasets import load_digits

    bunch = load_digits()
    imgs = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # (N, 8, 8), 0..16 -> 0..255
    scale = DIGITS_SIZE // imgs.shape[1]
    big = imgs.repeat(scale, axis=1).repeat(scale, axis=2)
    rgb = np.repeat(big[..., None], 3, axis=3)
    lines = ["id,file,label"]
    for i, (arr, y) in enumerate(zip(rgb, bunch.target)):
        name = f"digit_{i:05d}"
        Image.fromarray(arr, "RGB").save(folder / f"{name}.png", format="PNG")
        lines.append(f"{name},{name}.png,{int(y)}")
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    # The manifest is written last: a folder without it is not a finished cache.
    write_json_atomic(folder / "manifest.json", {
        "version": DIGITS_VERSION, "size": DIGITS_SIZE, "count": len(rgb),
        "source": "sklearn.datasets.load_digits", "upscale": f"nearest x{scale}",
    })


def digits_folder(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding scikit-learn's digits as 32x32 RGB PNGs, writing it on first use.

    ``cache_dir`` is that folder itself; default ``default_cache_root() / "digits"``. The PNGs,
    ``labels.csv`` and (last) ``manifest.json`` are written into a temp folder beside it that
    is renamed into place, so a crash never leaves a half-written cache and concurrent first
    calls are safe (the loser's copy is discarded). A folder that exists but holds no digits
    manifest and is not empty is never overwritten: that is an error.
    """
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root() / "digits"
    folder = Path(os.path.abspath(folder))
    if _digits_manifest_ok(folder):
        return folder
    if folder.exists():
        if not folder.is_dir():
            raise DataError(f"digits cache {folder} exists and is not a folder")
        ours = (folder / "manifest.json").is_file() or (folder / "labels.csv").is_file()
        if not ours and any(folder.iterdir()):
            raise DataError(f"digits cache {folder} exists, is not empty and is not a digits cache; "
                            "remove it or choose another cache folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        _write_digits(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:
            if _digits_manifest_ok(folder):  # another process finished first
                return folder
            # A stale cache (older version, or half-deleted by hand): move it aside, then swap in.
            trash = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(folder, trash)
            os.rename(tmp, folder)
            shutil.rmtree(trash, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_digits_table(*, cache_dir: str | os.PathLike | None = None,
                      label_space: LabelSpace | None = None) -> SampleTable:
    """The ``digits`` source: classes ``"0".."9"``, ids ``digit_00000``..., one group per image."""
    folder = digits_folder(cache_dir)
    space = LabelSpace(tuple(str(d) for d in range(10)))
    if label_space is not None and not label_space.same_classes(space):
        raise DataError(f"digits has classes 0..9, but the given label space has {list(label_space.classes)}")
    df = pd.read_csv(folder / "labels.csv", dtype={"id": str, "file": str, "label": np.int64})
    frame = pd.DataFrame({
        "id": df["id"], "path": [str(folder / f) for f in df["file"]],
        "label": df["label"].astype("Int64"), "group": df["id"],
    })
    return SampleTable(frame, space, {"kind": "digits", "path": str(folder)})
