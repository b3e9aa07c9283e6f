"""Engine benchmark: model-only vs engine end-to-end vs ttach vs the ONNX backend, side by side.

One command::

    python benchmarks/bench_engine.py [--quick] [--images 256] [--batch-size 16] [--tta flip]

Writes real JPEGs (256x256; 128 of them, 16 with --quick) to a temp folder, registers ``resnet18`` and ``efficientnet_b0``
(``pretrained=False``, 224 px, timm eval preprocessing) in a temp registry, then measures on
the same images, one after another in this process:

- ``model-only``: the model on random tensors already normalised, ``batch x views`` images
  run with the engine's own forward settings (channels-last; 8 images per forward on a CPU,
  all at once on CUDA; AMP on CUDA) with no decode, no views, no merge: the ceiling;
- ``engine``: ``predict_members`` end to end (decode in a DataLoader, normalise, views on the
  device, forward, merge; cache off);
- ``ttach``: ``ttach.ClassificationTTAWrapper`` with the same views and batch, fed by the
  same DataLoader (same decode and workers), one forward per view, the model as users
  usually hand it over (contiguous);
- ``ttach-cl``: the same with the model and input in channels-last, so the comparison is
  not only about memory format; ``engine_over_ttach`` uses the faster of the two;
- ``engine-onnx``: ``predict_members(backend="onnx")`` (export done before timing).

The four paths run interleaved for ``--rounds`` rounds and each keeps its fastest round, so
load from other processes does not land on one path only.

Prints a rich table, then one last line::

    RATIOS e2e_over_model=… engine_over_ttach=… onnx_over_torch=…

``e2e_over_model`` and ``engine_over_ttach`` are the lower of the two models (the worst
case); ``onnx_over_torch`` is engine-onnx / engine (torch) for efficientnet_b0.

``--ensemble`` runs the other section instead: the models as one weighted recipe (fold-less
families, temperatures, weights, class biases), ``predict(recipe=...)`` through the engine
(torch, cache off) against the same recipe exported by ``export-ensemble`` with the same TTA
views and run by ``predict_onnx`` (decode at the recorded geometry + one onnxruntime session),
interleaved for ``--rounds`` rounds, best kept; it checks that the two agree (max abs
difference of probabilities, argmax) and ends with::

    RATIOS ensemble_onnx_over_engine=…
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MODELS = ("resnet18", "efficientnet_b0")


def _write_jpegs(folder: Path, n: int, size: int = 256, seed: int = 0) -> list[str]:
    """Smooth colour fields plus noise: JPEG sizes like photos, unlike pure noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    paths = []
    for i in range(n):
        a, b, c = rng.uniform(0, 255, 3)
        base = np.stack([a * xx + (255 - a) * yy, b * yy, c * (1 - xx)], axis=-1)
        img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        path = folder / f"img{i:04d}.jpg"
        Image.fromarray(img).save(path, quality=90)
        paths.append(str(path))
    return paths


def _jpeg_table(folder: Path, n: int, labels):
    """A SampleTable of ``n`` fresh JPEGs (:func:`_write_jpegs`) in ``folder``, every row labelled 0."""
    import pandas as pd

    from ensembler.data import SampleTable

    paths = _write_jpegs(folder, n)
    return SampleTable(pd.DataFrame({"id": [f"i{i}" for i in range(n)], "path": paths, "label": [0] * n,
                                     "group": [str(i) for i in range(n)]}), labels)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="16 images, 1 round: a smoke run, noisy numbers")
    parser.add_argument("--images", type=int, default=None, help="images to write (default 128; --quick 16)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds over all paths, interleaved; each path keeps its fastest (default 3; --quick 1)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--tta", default="flip")
    parser.add_argument("--workers", type=int, default=None, help="decode processes (default: cores - 1, max 4)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--ensemble", action="store_true",
                        help="the exported ensemble (export-ensemble) against the engine running the same recipe")
    parser.add_argument("--inputs", choices=("one", "per-geometry"), default="per-geometry",
                        help="--ensemble: export-ensemble --inputs (default per-geometry: decoded as the engine does)")
    args = parser.parse_args(argv)
    if args.ensemble:
        return bench_ensemble(args)

    import torch
    import ttach
    from rich.console import Console
    from rich.table import Table

    from ensembler.infer import export_onnx, parse_tta, predict_members
    from ensembler.device import resolve_device
    from ensembler.infer.engine import TorchForward, make_decode_loader, resolve_precision
    from ensembler.infer.tta import default_chunk_size, forward_chunked
    from ensembler.labels import LabelSpace
    from ensembler.models import create_model
    from ensembler.preprocess import Preprocess
    from ensembler.registry import Registry

    n_images = args.images or (16 if args.quick else 128)
    rounds = args.rounds or (1 if args.quick else 3)
    workers = args.workers if args.workers is not None else max(0, min(4, (os.cpu_count() or 1) - 1))
    device = resolve_device(args.device)
    precision = resolve_precision("auto", device, "torch")
    plan = parse_tta(args.tta)
    views, bs = len(plan), args.batch_size
    ttach_transforms = {"none": ttach.Compose([]), "hflip": ttach.aliases.hflip_transform(),
                        "flip": ttach.aliases.flip_transform(), "d4": ttach.aliases.d4_transform()}
    if plan.spec not in ttach_transforms:
        parser.error(f"--tta must be one of {sorted(ttach_transforms)} (ttach needs the same views)")
    console = Console()
    labels = LabelSpace.mask()
    rows: list[tuple] = []
    ratios: dict[str, dict[str, float]] = {}

    with tempfile.TemporaryDirectory(prefix="bench_engine_") as tmp:
        tmp = Path(tmp)
        table = _jpeg_table(tmp / "images", n_images, labels)
        reg = Registry(tmp / "checkpoints")
        console.print(f"[bold]bench_engine[/] {n_images} JPEGs 256x256 · {rounds} rounds (best kept) · TTA {plan.spec} ({views} views) · "
                      f"batch {bs} · workers {workers} · device {device} ({precision}) · "
                      f"torch threads {torch.get_num_threads()}", highlight=False)
        for arch in [a.strip() for a in args.models.split(",") if a.strip()]:
            torch.manual_seed(0)
            pre = Preprocess.from_timm(arch, 224)
            entry = reg.add(create_model(arch, label_space=labels), family=arch, fold=None, arch=arch,
                            head="flat", label_space=labels, preprocess=pre)
            model = reg.load_model(entry, device=str(device))
            forward = TorchForward(model, device, precision)
            common = dict(tta=plan, batch_size=bs, workers=workers, device=device, use_cache=False,
                          progress=False, cache_dir=tmp / "cache")

            chunk = default_chunk_size(device)

            def model_only():
                x = torch.randn(bs * views, 3, *pre.input_size, device=device)
                with torch.inference_mode():
                    for _ in range(0, n_images, bs):
                        forward_chunked(forward, x, chunk)
                if device.type == "cuda":
                    torch.cuda.synchronize()

            def engine(backend="torch"):
                predict_members(table, arch, reg, backend=backend, **common)

            plain = reg.load_model(entry, device=str(device))
            wrapper = ttach.ClassificationTTAWrapper(plain, ttach_transforms[plan.spec], merge_mode="mean")
            wrapper_cl = ttach.ClassificationTTAWrapper(
                copy.deepcopy(plain).to(memory_format=torch.channels_last), ttach_transforms[plan.spec],
                merge_mode="mean")

            def ttach_run(w=wrapper, channels_last=False):
                loader = make_decode_loader(list(table.paths), pre, bs, workers, pin=device.type == "cuda")
                with torch.inference_mode():
                    for _, images, _ in loader:
                        x = pre.normalize(images.to(device, non_blocking=True))
                        if channels_last:
                            x = x.contiguous(memory_format=torch.channels_last)
                        w(x).cpu()

            # warm-up (allocator, oneDNN kernels, ORT session build is inside the engine run)
            with torch.inference_mode():
                forward(torch.randn(bs * views, 3, *pre.input_size, device=device))
            console.print(f"  {arch}: exporting ONNX (parity-checked) ...", highlight=False)
            exported = export_onnx(reg, entry.id)
            timings: dict[str, float] = {}
            # Paths interleave round by round and each keeps its fastest round: other load on the
            # machine then hits every path alike instead of whichever ran during a busy spell.
            for r in range(rounds):
                for name, fn in (("model-only", model_only), ("engine", engine), ("ttach", ttach_run),
                                 ("ttach-cl", lambda: ttach_run(wrapper_cl, True)),
                                 ("engine-onnx", lambda: engine("onnx"))):
                    seconds = _timed(fn)
                    timings[name] = min(timings.get(name, float("inf")), seconds)
                    console.print(f"  {arch} round {r + 1}/{rounds}: {name:<12} {n_images / seconds:7.1f} images/s",
                                  highlight=False)
            ips = {k: n_images / v for k, v in timings.items()}
            ratios[arch] = {"e2e_over_model": ips["engine"] / ips["model-only"],
                            "engine_over_ttach": ips["engine"] / max(ips["ttach"], ips["ttach-cl"]),
                            "onnx_over_torch": ips["engine-onnx"] / ips["engine"]}
            for name in ("model-only", "engine", "ttach", "ttach-cl", "engine-onnx"):
                rows.append((arch, name, ips[name], ips[name] / ips["model-only"]))
            console.print(f"  {arch}: onnx parity max abs diff {exported.max_abs_diff:.2e}", highlight=False)

    t = Table(title=f"engine throughput · {n_images} images · TTA {plan.spec} · batch {bs} · {device}")
    for col in ("model", "path", "images/s", "x model-only"):
        t.add_column(col, justify="left" if col in ("model", "path") else "right")
    for arch, name, ips, rel in rows:
        t.add_row(arch, name, f"{ips:.1f}", f"{rel:.2f}")
    console.print(t)
    for arch, r in ratios.items():
        console.print(f"{arch}: " + " ".join(f"{k}={v:.2f}" for k, v in r.items()), highlight=False)
    worst = {k: min(r[k] for r in ratios.values()) for k in ("e2e_over_model", "engine_over_ttach")}
    onnx_ratio = ratios.get("efficientnet_b0", next(iter(ratios.values())))["onnx_over_torch"]
    print(f"RATIOS e2e_over_model={worst['e2e_over_model']:.2f} engine_over_ttach={worst['engine_over_ttach']:.2f} "
          f"onnx_over_torch={onnx_ratio:.2f}")
    return 0


def bench_ensemble(args) -> int:
    """The models as one recipe: engine (torch) vs the exported ONNX ensemble at equal views."""
    import torch
    from rich.console import Console

    from ensembler.device import resolve_device
    from ensembler.ensemble import Recipe, RecipeMember
    from ensembler.export import export_ensemble, predict_onnx
    from ensembler.infer import parse_tta
    from ensembler.labels import LabelSpace
    from ensembler.models import create_model
    from ensembler.predict import predict
    from ensembler.preprocess import Preprocess
    from ensembler.registry import Registry

    n_images = args.images or (16 if args.quick else 64)
    rounds = args.rounds or (1 if args.quick else 2)
    workers = args.workers if args.workers is not None else max(0, min(4, (os.cpu_count() or 1) - 1))
    device = resolve_device(args.device)
    plan = parse_tta(args.tta)
    console = Console()
    labels = LabelSpace.mask()
    archs = [a.strip() for a in args.models.split(",") if a.strip()]
    with tempfile.TemporaryDirectory(prefix="bench_ensemble_") as tmp:
        tmp = Path(tmp)
        table = _jpeg_table(tmp / "images", n_images, labels)
        reg = Registry(tmp / "checkpoints")
        members = []
        for i, arch in enumerate(archs):
            torch.manual_seed(i)
            entry = reg.add(create_model(arch, label_space=labels), family=arch, fold=None, arch=arch, head="flat",
                            label_space=labels, preprocess=Preprocess.from_timm(arch, 224))
            members.append(RecipeMember(arch, "family", labels.classes, weight=1.0 + i, temperature=1.0 + 0.25 * i,
                                        sha256=(entry.sha256,)))
        recipe = Recipe(members=tuple(members), vote="weighted",
                        class_biases=tuple(np.linspace(-0.1, 0.1, labels.num_classes)))
        console.print(f"[bold]bench_engine --ensemble[/] {n_images} JPEGs 256x256 · {', '.join(archs)} as one "
                      f"weighted recipe · TTA {plan.spec} ({len(plan)} views) · batch {args.batch_size} · workers "
                      f"{workers} · {device} · torch threads {torch.get_num_threads()} · {rounds} rounds (best kept)",
                      highlight=False)
        t0 = time.perf_counter()
        exported = export_ensemble(recipe, reg, tmp / "ensemble.onnx", tta=plan, inputs=args.inputs)
        console.print(f"  exported {exported.checkpoints} checkpoints x {exported.views} views, "
                      f"{len(exported.meta['inputs'])} input(s) (--inputs {args.inputs}) in "
                      f"{time.perf_counter() - t0:.1f} s ({exported.path.stat().st_size / 1e6:.0f} MB)", highlight=False)
        common = dict(batch_size=args.batch_size, workers=workers, device=device, progress=False)
        results, timings = {}, {}
        runs = (("engine", lambda: predict(table, reg, recipe=recipe, tta=plan, use_cache=False,
                                           cache_dir=tmp / "cache", **common)),
                ("onnx-ensemble", lambda: predict_onnx(table, exported.path, **common)))
        for r in range(rounds):
            for name, fn in runs:
                t0 = time.perf_counter()
                results[name] = fn()
                seconds = time.perf_counter() - t0
                timings[name] = min(timings.get(name, float("inf")), seconds)
                console.print(f"  round {r + 1}/{rounds}: {name:<14} {n_images / seconds:6.2f} images/s", highlight=False)
        diff = float(np.abs(results["engine"].probs - results["onnx-ensemble"].probs).max())
        agree = float((results["engine"].pred == results["onnx-ensemble"].pred).mean())
        ratio = timings["engine"] / timings["onnx-ensemble"]
        for name in ("engine", "onnx-ensemble"):
            console.print(f"{name:<14} {n_images / timings[name]:6.2f} images/s", highlight=False)
        console.print(f"max abs diff of probabilities {diff:.2e}, argmax agreement {agree:.3f} (untrained weights: "
                      "near-uniform probabilities, so a tiny difference can flip a near-tie)", highlight=False)
    print(f"RATIOS ensemble_onnx_over_engine={ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
