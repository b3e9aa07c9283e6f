"""Quality on real photos: ensembler's trainer and tuner side by side with a plain timm loop.

    python benchmarks/bench_quality.py            # faces-utk + digits, resnet18 + efficientnet_b0
    python benchmarks/bench_quality.py --quick    # a third of the images, 2 epochs (a smoke run)
    python benchmarks/bench_quality.py --pretrained   # the fine-tune regime (needs ImageNet weights)

For every data set, one seeded, person-grouped, class-stratified 20% of the groups is held
out (``split_folds(table, k=5, seed)``, fold 0), and the other 80% is split into the same
``k`` training folds for every path (``split_folds(train, k, seed)``, exactly what
``train_folds`` does with ``seed``). Then, per architecture:

(a) **plain reference loop** (the 40-line script a user would write, kept here on purpose):
    ``timm.create_model(arch, pretrained=False)``, Adam lr 1e-3 constant, resize straight to
    ``img x img`` + random horizontal flip (no flip on digits: a mirrored digit is another
    class), ImageNet mean/std, cross-entropy, batch 32, the last epoch kept; OOF = each fold
    model on its validation fold; held-out logits = mean over the fold models.
(b) **ensembler train-folds with its defaults** (``TrainConfig(arch, k, epochs, img_size,
    pretrained=False, seed)``, nothing else set); held-out logits through the engine
    (``predict_members``: mean over the family's folds).
(c) **tune-weights + predict** over the two architectures' families: the recipe that
    ``tune_weights`` ships, applied to the held-out part by ``predict(recipe=...)``.

Printed per data set: OOF and held-out macro-F1 and wall time of every path. The last line:

    RATIOS trainer_over_plain_oof=... trainer_over_plain_holdout=... blend_minus_best_single_holdout=...
           honest_minus_holdout=...

each the worst over architectures and data sets (for ``honest_minus_holdout``, the value of
largest magnitude: how far the recipe's honest score is from what the held-out part gave).
Data: ``../shared/data/faces-utk/manifest.csv`` (3,000 real UTKFace crops, 6 classes; skipped
with a note when absent) and ``digits``. ``--json FILE`` keeps every number.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

FACES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "faces-utk" / "manifest.csv"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------- (a) the plain loop
def plain_loop(train, test, arch: str, *, epochs: int, img: int, seed: int, flip: bool, workers: int,
               pretrained: bool = False, log=print) -> dict:
    """The reference: one timm model per fold, Adam 1e-3, resize + flip, CE, last epoch."""
    import timm
    import torch
    from PIL import Image
    from torchvision import transforms as T

    norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = T.Compose([T.Resize((img, img))] + ([T.RandomHorizontalFlip()] if flip else [])
                         + [T.ToTensor(), norm])
    eval_tf = T.Compose([T.Resize((img, img)), T.ToTensor(), norm])

    class Images(torch.utils.data.Dataset):
        def __init__(self, paths, labels, tf):
            self.paths, self.labels, self.tf = list(paths), np.asarray(labels), tf

        def __len__(self):
            return len(self.paths)

        def __getitem__(self, i):
            with Image.open(self.paths[i]) as im:
                return self.tf(im.convert("RGB")), int(self.labels[i])

    def logits_of(model, paths):
        loader = torch.utils.data.DataLoader(Images(paths, np.zeros(len(paths)), eval_tf), batch_size=64,
                                             num_workers=workers)
        model.eval()
        with torch.no_grad():
            return torch.cat([model(x) for x, _ in loader]).numpy()

    c = train.label_space.num_classes
    y, folds, paths = train.labels, train.folds, train.paths
    oof = np.zeros((len(train), c), dtype=np.float32)
    held = np.zeros((len(test), c), dtype=np.float64)
    t0 = time.perf_counter()
    for fold in np.unique(folds):
        torch.manual_seed(seed * 1000 + int(fold))
        model = timm.create_model(arch, pretrained=pretrained, num_classes=c)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        tr = folds != fold
        loader = torch.utils.data.DataLoader(Images(paths[tr], y[tr], train_tf), batch_size=32, shuffle=True,
                                             num_workers=workers)
        for epoch in range(epochs):
            model.train()
            for x, t in loader:
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), t).backward()
                opt.step()
            log(f"    plain {arch} fold {fold} epoch {epoch + 1}/{epochs} ({time.perf_counter() - t0:.0f} s)")
        oof[folds == fold] = logits_of(model, paths[folds == fold])
        held += logits_of(model, test.paths) / len(np.unique(folds))
    return {"oof_logits": oof, "holdout_logits": held.astype(np.float32), "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------------- (b) + (c) ensembler
def ensembler_paths(train, test, archs, *, k: int, epochs: int, img: int, seed: int, registry_dir: Path,
                    overrides: dict, pretrained: bool = False, log=print) -> dict:
    from ensembler.ensemble import load_members, tune_weights
    from ensembler.infer import predict_members
    from ensembler.predict import predict
    from ensembler.registry import Registry
    from ensembler.train import TrainConfig, train_folds

    registry = Registry(registry_dir)
    out = {"members": {}}
    for arch in archs:
        cfg = TrainConfig(arch=arch, k=k, epochs=epochs, img_size=img, pretrained=pretrained, seed=seed, **overrides)
        log(f"  train-folds {arch} ({json.dumps(overrides) if overrides else 'defaults'})")
        t0 = time.perf_counter()
        fam = train_folds(train, cfg, registry, progress=False)
        seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        held = predict_members(test, [fam.family], registry, tta="none", progress=False, workers=0)
        out["members"][arch] = {
            "family": fam.family, "oof_f1": fam.oof_f1, "holdout_logits": held[fam.family].logits,
            "seconds": seconds, "predict_seconds": time.perf_counter() - t0,
            "best_epochs": [f.best_epoch for f in fam.folds],
        }
    t0 = time.perf_counter()
    families = [out["members"][a]["family"] for a in archs]
    tuned = tune_weights(load_members(families, registry=registry), method="caruana", metric="f1")
    recipe_path = tuned.recipe.save(registry_dir.parent / "recipe.json")
    pred = predict(test, registry, recipe=recipe_path, progress=False)
    out["blend"] = {"recipe": tuned.recipe, "pred": pred.pred, "seconds": time.perf_counter() - t0,
                    "rows": tuned.rows}
    return out


# ---------------------------------------------------------------------------- one data set
def holdout_split(table, seed: int):
    """(train, test): fold 0 of a grouped, stratified 5-fold split is the held-out 20%."""
    from ensembler.data import split_folds

    parts = split_folds(table, k=5, seed=seed)
    strip = lambda t, part: type(t)(t.frame.drop(columns=["fold"]), t.label_space, dict(t.source, part=part))  # noqa: E731
    return strip(parts.subset(parts.folds != 0), "train"), strip(parts.subset(parts.folds == 0), "held-out")


def run_dataset(name: str, table, args, overrides: dict, log=print) -> dict:
    from ensembler.data import split_folds
    from ensembler.metrics import macro_f1

    train, test = holdout_split(table, args.seed)
    split = split_folds(train, k=args.k, seed=args.seed)  # the folds train_folds makes with this seed
    c = table.label_space.num_classes
    y_tr, y_te = split.labels, test.labels
    log(f"{name}: {len(train)} training images in {args.k} folds, {len(test)} held out, {c} classes")
    f1 = lambda y, logits: float(macro_f1(y, np.asarray(logits).argmax(1), c))  # noqa: E731
    res = {"data": name, "train_rows": len(train), "test_rows": len(test), "archs": {}}
    plain = {}
    if not args.skip_plain:
        for arch in args.archs:
            log(f"  plain loop {arch}")
            p = plain_loop(split, test, arch, epochs=args.epochs, img=args.img_size, seed=args.seed,
                           flip=name != "digits", workers=args.workers, pretrained=args.pretrained, log=log if args.verbose else (lambda m: None))
            plain[arch] = p
    with tempfile.TemporaryDirectory(prefix="bench_quality_") as tmp:
        ens = ensembler_paths(train, test, args.archs, k=args.k, epochs=args.epochs, img=args.img_size,
                              seed=args.seed, registry_dir=Path(tmp) / "checkpoints", overrides=overrides,
                              pretrained=args.pretrained, log=log)
    for arch in args.archs:
        m = ens["members"][arch]
        row = {"trainer_oof": m["oof_f1"], "trainer_holdout": f1(y_te, m["holdout_logits"]),
               "trainer_s": m["seconds"], "best_epochs": m["best_epochs"]}
        if arch in plain:
            row.update(plain_oof=f1(y_tr, plain[arch]["oof_logits"]),
                       plain_holdout=f1(y_te, plain[arch]["holdout_logits"]), plain_s=plain[arch]["seconds"])
        res["archs"][arch] = row
    recipe = ens["blend"]["recipe"]
    honest = (recipe.scores.get("honest") or {})
    res["blend"] = {
        "holdout": float(macro_f1(y_te, ens["blend"]["pred"], c)),
        "honest": honest.get("pooled", {}).get("f1"),
        "in_sample": recipe.scores.get("in_sample", {}).get("f1"),
        "weights": {m.name: m.weight for m in recipe.members},
        "ships": recipe.scores.get("ships"),
        "seconds": ens["blend"]["seconds"],
    }
    return res


def print_dataset(res: dict, log=print) -> None:
    fmt = lambda x: "    -" if x is None else f"{x:.3f}"  # noqa: E731
    log(f"\n{res['data']}: {res['train_rows']} train (OOF) / {res['test_rows']} held-out images")
    log(f"{'path':<34} {'OOF F1':>7} {'held-out':>9} {'wall s':>8}")
    for arch, r in res["archs"].items():
        if "plain_oof" in r:
            log(f"{'plain loop ' + arch:<34} {fmt(r['plain_oof']):>7} {fmt(r['plain_holdout']):>9} "
                f"{r['plain_s']:>8.0f}")
        log(f"{'train-folds ' + arch:<34} {fmt(r['trainer_oof']):>7} {fmt(r['trainer_holdout']):>9} "
            f"{r['trainer_s']:>8.0f}   best epochs {r['best_epochs']}")
    b = res["blend"]
    w = ", ".join(f"{k}={v:.2f}" for k, v in b["weights"].items())
    log(f"{'tune-weights + predict (recipe)':<34} {fmt(b['honest']):>7} {fmt(b['holdout']):>9} {b['seconds']:>8.0f}"
        f"   honest OOF; weights {w} (held-out logits from the engine cache)")
    ships = b["ships"] or {}
    log(f"  ships: {ships.get('reason', 'the tuned blend') if isinstance(ships, dict) else ships}")


def ratios(results: list[dict]) -> dict:
    out = {}
    rows = [r for res in results for r in res["archs"].values()]
    if all("plain_oof" in r for r in rows) and rows:
        out["trainer_over_plain_oof"] = min(r["trainer_oof"] / r["plain_oof"] for r in rows)
        out["trainer_over_plain_holdout"] = min(r["trainer_holdout"] / r["plain_holdout"] for r in rows)
    out["blend_minus_best_single_holdout"] = min(
        res["blend"]["holdout"] - max(r["trainer_holdout"] for r in res["archs"].values()) for res in results)
    gaps = [res["blend"]["honest"] - res["blend"]["holdout"] for res in results if res["blend"]["honest"] is not None]
    if gaps:
        out["honest_minus_holdout"] = max(gaps, key=abs)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a third of the images and 2 epochs (smoke run)")
    ap.add_argument("--data", default="faces,digits", help="comma-separated: faces, digits (default both)")
    ap.add_argument("--archs", default="resnet18,efficientnet_b0")
    ap.add_argument("--epochs", type=int, default=None, help="default 4 (2 with --quick)")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers of both loops (default 2)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a TrainConfig field of the ensembler path (experiments), e.g. --set lr=1e-3")
    ap.add_argument("--pretrained", action="store_true",
                    help="both loops start from ImageNet weights (the fine-tune regime; needs hub access)")
    ap.add_argument("--skip-plain", action="store_true", help="ensembler paths only (experiments)")
    ap.add_argument("--json", default=None, metavar="FILE", help="write every number here")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    args.archs = [a for a in args.archs.split(",") if a]
    args.epochs = args.epochs or (2 if args.quick else 4)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:  # numbers, true/false, lists; anything else (augment=none) is a string
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    from ensembler.data import load_source

    if args.pretrained:  # fail before any training when the weights cannot be had
        import timm

        for arch in args.archs:
            try:
                timm.create_model(arch, pretrained=True)
            except Exception as exc:  # noqa: BLE001 - any download/cache failure
                raise SystemExit(f"--pretrained: ImageNet weights of {arch} could not be loaded "
                                 f"(no hub access or cache?): {exc}") from None
    results = []
    t_all = time.perf_counter()
    for name in [d for d in args.data.split(",") if d]:
        if name == "faces":
            if not FACES.is_file():
                print(f"faces: {FACES} not found, skipped (the data lives outside the repo)")
                continue
            table = load_source(str(FACES))
        elif name == "digits":
            table = load_source("digits")
        else:
            raise SystemExit(f"--data: unknown data set {name!r} (faces, digits)")
        if args.quick:
            table = table.subset(np.arange(len(table)) % 3 == 0)
        res = run_dataset(name, table, args, overrides)
        print_dataset(res)
        results.append(res)
        sys.stdout.flush()
    if not results:
        print("no data set ran")
        return 1
    r = ratios(results)
    print(f"\nsettings: {args.img_size} px, {args.epochs} epochs, k={args.k}, seed {args.seed}, "
          f"{'--pretrained' if args.pretrained else '--no-pretrained'}; total {time.perf_counter() - t_all:.0f} s"
          + (f"; ensembler overrides {overrides}" if overrides else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "overrides": overrides, "results": results,
                                               "ratios": r}, indent=1, default=str))
    print("RATIOS " + " ".join(f"{k}={v:.3f}" for k, v in r.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
