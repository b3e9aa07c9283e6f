"""Logit-cache benchmark: what the content-based data fingerprint and the weights check cost.

One command::

    python benchmarks/bench_cache.py [--images 300] [--size 384] [--rounds 5]

Writes ``--images`` photo-like JPEGs (``--size`` px square) to a temp folder and registers
three ``test_resnet`` checkpoints in a temp registry, then measures, best of ``--rounds``:

- ``stat-fingerprint``: the old fingerprint (sha256 over id, path, size and mtime of each
  file): one ``stat`` per file, blind to content;
- ``content-cold``: :meth:`SampleTable.fingerprint` with no stamps: every file's bytes read
  and hashed (the first run over new data);
- ``content-warm``: the same with the stamps of ``<cache>/file_hashes.json`` loaded from disk
  (a warm run: one ``stat`` per file, no bytes read);
- ``predict-warm``: ``predict_members`` over all three checkpoints with every result served
  from the logit cache (fingerprint, weights check of each checkpoint, checksum of each
  cached entry; no forward).

Prints one line per case and ends with::

    RATIOS warm_over_stat=… cold_over_warm=… warm_ms_per_1000_images=…
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import _write_jpegs  # noqa: E402


def _stat_fingerprint(table) -> str:
    h = hashlib.sha256()
    for i, p in zip(table.ids, table.paths):
        st = os.stat(p)
        h.update(f"{i}\0{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _best(fn, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--size", type=int, default=384)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)

    import pandas as pd
    import torch

    from ensembler.data import SampleTable
    from ensembler.filehash import FileHashes
    from ensembler.infer import predict_members
    from ensembler.labels import LabelSpace
    from ensembler.models import create_model
    from ensembler.preprocess import Preprocess
    from ensembler.registry import Registry

    FileHashes.RACY_NS = 0  # the images were written a moment ago; trust their stamps at once
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="bench_cache_"))
    paths = _write_jpegs(tmp / "images", args.images, size=args.size)
    mb = sum(os.path.getsize(p) for p in paths) / 1e6
    space = LabelSpace(("a", "b", "c"))
    table = SampleTable(pd.DataFrame({"id": [f"s{i}" for i in range(len(paths))], "path": paths,
                                      "label": [i % 3 for i in range(len(paths))],
                                      "group": [f"g{i}" for i in range(len(paths))]}), space)
    reg = Registry(tmp / "checkpoints")
    pre = Preprocess(input_size=(32, 32), crop_pct=1.0, interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3)
    for fold in range(3):
        reg.add(create_model("test_resnet", label_space=space), family="res", fold=fold, arch="test_resnet",
                head="flat", label_space=space, preprocess=pre)
    cache = tmp / "cache"
    run = lambda: predict_members(table, "res", reg, cache_dir=cache, progress=False)  # noqa: E731
    first = run()["res"]
    assert not first.meta["cached"]
    assert run()["res"].meta["cached"]  # warm from here on
    stamps = cache / "file_hashes.json"

    times = {
        "stat-fingerprint": _best(lambda: _stat_fingerprint(table), args.rounds),
        "content-cold": _best(lambda: table.fingerprint(), args.rounds),
        "content-warm": _best(lambda: table.fingerprint(hashes=FileHashes(stamps)), args.rounds),
        "predict-warm": _best(lambda: np.testing.assert_array_equal(run()["res"].logits, first.logits), args.rounds),
    }
    print(f"{args.images} JPEGs of {args.size}x{args.size} px ({mb:.1f} MB), 3 cached checkpoints, "
          f"stamp file {stamps.stat().st_size / 1e3:.0f} kB, best of {args.rounds}")
    for name, t in times.items():
        print(f"  {name:18s} {t * 1e3:8.2f} ms  ({t * 1e6 / args.images:7.1f} us/image)")
    warm = times["content-warm"]
    print(f"RATIOS warm_over_stat={warm / times['stat-fingerprint']:.2f} "
          f"cold_over_warm={times['content-cold'] / warm:.1f} "
          f"warm_ms_per_1000_images={warm * 1e3 * 1000 / args.images:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
