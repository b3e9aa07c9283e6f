"""``ensembler demo``: the whole pipeline on scikit-learn's bundled ``digits``, offline.

Steps (all artifacts under ``out_dir``, default ``./demo_out``):

1. ``digits`` (1,797 images, written once as 32x32 PNGs into ``out_dir/data/digits``) is
   split by :func:`~ensembler.data.split_folds` (grouped, stratified) into 5 parts; one part
   (~20%) is held out as the test set, the rest is the training set. Both are written as
   CSV manifests (``splits/train.csv``, ``splits/test.csv``), so every step can be repeated
   by hand with the CLI.
2. Two small timm architectures (:data:`ARCHS`; ``pretrained=False``, 32 px, a few epochs)
   are trained on k=3 grouped folds of the training set with
   :func:`~ensembler.train.train_folds`: a registry in ``checkpoints/``, OOF logits and
   learning curves per family.
3. :func:`~ensembler.ensemble.tune_weights` (Caruana on macro-F1, temperatures) runs on the
   families' OOF logits, with the honest nested-CV score; ``recipe.json`` and its plots.
4. The held-out part is predicted through the engine with TTA (:data:`TTA`): every member
   alone, the uniform soft vote, the hard vote and the tuned recipe, the latter written as
   ``submissions/tuned.csv`` with a ledger row; the soft and hard votes reuse the cached
   logits (no second forward pass). A confusion matrix of the tuned ensemble is drawn.

Re-running: a demo folder is recognised by its ``.ensembler-demo`` marker and its outputs
(registry, cache, recipe, plots, submissions, splits) are removed before a new run starts,
so every run starts clean; the digits PNG cache is kept. A folder that is not empty and has
no marker is never touched (an error).

Example
-------
>>> from ensembler.demo import run_demo
>>> result = run_demo("demo_out")  # doctest: +SKIP
>>> [(r["name"], round(r["test_f1"], 3)) for r in result.rows]  # doctest: +SKIP
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import EnsemblerError

__all__ = ["ARCHS", "TTA", "DemoResult", "run_demo"]

#: (family name, timm architecture): two small, structurally different networks.
ARCHS = (("resnet", "test_resnet"), ("effnet", "test_efficientnet"))
#: TTA plan for the held-out part. Digits must not be flipped (a flipped 2 is no 2), so the
#: views are rescalings.
TTA = "scales=0.875,1,1.125"
MARKER = ".ensembler-demo"
# What a demo run writes (removed before the next run); the digits cache under data/ stays.
OUTPUTS = ("checkpoints", ".ensembler_cache", "splits", "recipe.json", "recipe_plots", "plots", "submissions")


@dataclass
class DemoResult:
    """What :func:`run_demo` did.

    Attributes
    ----------
    out_dir : Path
    rows : list of dict
        The comparison table: ``name``, ``kind`` (member/hard/soft/tuned/recipe), ``oof_f1``,
        ``oof_acc`` (on the training set's OOF rows; for the tuned blend in-sample),
        ``honest_f1`` (nested CV for the tuned blend; the OOF score of untuned candidates),
        ``test_f1``, ``test_acc`` (held-out part), ``ships`` (the candidate the recipe ships;
        the ``recipe`` row is that recipe run through ``predict``).
    recipe : Recipe
    prediction : PredictionResult
        The tuned ensemble's prediction of the held-out part (with ``.submission``).
    artifacts : dict label -> Path
        Where everything went.
    timings : dict step -> seconds
    train_rows, test_rows : int
    tta : str
    notes : list of str
    """

    out_dir: Path
    rows: list[dict]
    recipe: object
    prediction: object
    artifacts: dict[str, Path]
    timings: dict[str, float]
    train_rows: int
    test_rows: int
    tta: str
    epochs: int
    notes: list[str] = field(default_factory=list)

    @property
    def tuned(self) -> dict:
        """The tuned blend's row (whether it ships or not)."""
        return next(r for r in self.rows if r["kind"] == "tuned")

    @property
    def shipped(self) -> dict:
        """The row of what the recipe ships: ``kind="recipe"``, scored through ``predict --recipe``."""
        return next(r for r in self.rows if r["kind"] == "recipe")


def _prepare_out_dir(out_dir: Path) -> None:
    """Make ``out_dir`` a clean demo folder; refuse to clear a folder that is not one."""
    if out_dir.exists() and not out_dir.is_dir():
        raise EnsemblerError(f"demo output {out_dir} exists and is not a folder")
    if out_dir.is_dir() and not (out_dir / MARKER).exists():
        if any(p.name not in ("data",) for p in out_dir.iterdir()):
            raise EnsemblerError(f"demo output {out_dir} is not empty and is not a demo folder (no {MARKER}); "
                                 "choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MARKER).write_text("written by `ensembler demo`; its outputs here are replaced on every run\n")
    for name in OUTPUTS:
        p = out_dir / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def run_demo(out_dir: str | os.PathLike = "demo_out", *, quick: bool = False, progress: bool = True,
             epochs: int | None = None, log: Callable[[str], None] | None = None) -> DemoResult:
    """Run the whole pipeline on ``digits`` and compare every member with the ensembles.

    Parameters
    ----------
    out_dir : path, default "demo_out"
        Where every artifact goes (see the module docstring; re-runs start clean).
    quick : bool
        A smoke run: a fifth of the images and one epoch (scores are then low; for tests).
    progress : bool
        Rich progress bars for training and inference.
    epochs : int, optional
        Training epochs per fold (default 3; 1 with ``quick``).
    log : callable, optional
        Called with a one-line message at the start of every step.

    Returns
    -------
    DemoResult
    """
    say = log or (lambda msg: None)
    epochs = (1 if quick else 3) if epochs is None else int(epochs)
    if epochs < 1:
        raise EnsemblerError(f"epochs must be >= 1, got {epochs}")
    out_dir = Path(out_dir).absolute()
    _prepare_out_dir(out_dir)
    timings: dict[str, float] = {}
    artifacts: dict[str, Path] = {}
    t_all = time.perf_counter()

    t0 = time.perf_counter()
    train, test = _data(out_dir, quick, say, artifacts)
    timings["data"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    registry, families = _train(out_dir, train, epochs, progress, say, artifacts)
    timings["train"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    tuned = _tune(out_dir, registry, say, artifacts)
    timings["tune"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    tuned_pred, soft, hard = _predict(out_dir, test, registry, progress, say, artifacts)
    timings["predict"] = time.perf_counter() - t0

    rows = _comparison_rows(test, tuned, tuned_pred, soft, hard)
    artifacts["confusion matrix"] = _confusion(out_dir, test, tuned_pred.pred, rows[-1]["test_f1"])
    timings["total"] = time.perf_counter() - t_all
    notes = [n for fam in families for n in fam.notes]
    return DemoResult(out_dir=out_dir, rows=rows, recipe=tuned.recipe, prediction=tuned_pred, artifacts=artifacts,
                      timings=timings, train_rows=len(train), test_rows=len(test), tta=TTA, epochs=epochs,
                      notes=notes)


def _data(out_dir: Path, quick: bool, say, artifacts: dict):
    """Step 1: digits as PNGs, a grouped ~20% held out; both parts written as CSV manifests."""
    from .data import load_digits_table, split_folds

    say("digits: writing/reading the PNG cache and holding out a grouped ~20% test part")
    table = load_digits_table(cache_dir=out_dir / "data" / "digits")
    if quick:  # every 5th image: all classes, ~360 images
        table = table.subset(np.arange(len(table)) % 5 == 0)
    parts = split_folds(table, k=5, seed=0)
    test = parts.subset(parts.folds == 0)
    train = parts.subset(parts.folds != 0)
    test = type(test)(test.frame.drop(columns=["fold"]), test.label_space, dict(table.source, part="held-out"))
    train = type(train)(train.frame.drop(columns=["fold"]), train.label_space, dict(table.source, part="train"))
    artifacts["train manifest"] = train.to_csv(out_dir / "splits" / "train.csv")
    artifacts["held-out manifest"] = test.to_csv(out_dir / "splits" / "test.csv")
    return train, test


def _train(out_dir: Path, train, epochs: int, progress: bool, say, artifacts: dict):
    """Step 2: the two families of :data:`ARCHS` on k=3 grouped folds."""
    import torch

    from .registry import Registry
    from .train import TrainConfig, train_folds

    registry = Registry(out_dir / "checkpoints")
    artifacts["registry"] = registry.root
    families = []
    for family, arch in ARCHS:
        say(f"training {family} ({arch}, 32 px, {epochs} epoch(s)) on 3 grouped folds of {len(train)} images")
        torch.manual_seed(0)
        cfg = TrainConfig(arch=arch, family=family, k=3, epochs=epochs, img_size=32, pretrained=False,
                          batch_size=64, lr=3e-3, warmup_epochs=0.5 if epochs > 1 else 0.0, patience=None,
                          workers=0, seed=0, augment="light")
        fam = train_folds(train, cfg, registry, progress=progress)
        families.append(fam)
        artifacts[f"{family} OOF logits"] = fam.oof_path
        artifacts[f"{family} learning curves"] = fam.curves_png
    return registry, families


def _tune(out_dir: Path, registry, say, artifacts: dict):
    """Step 3: Caruana on the families' OOF logits, the honest score, ``recipe.json`` and its charts."""
    from .ensemble import load_members, tune_weights
    from .ensemble.plots import write_tuning_plots

    say("tuning weights on the OOF logits (Caruana, macro-F1, temperatures, honest nested-CV score)")
    members = load_members([f for f, _ in ARCHS], registry=registry)
    tuned = tune_weights(members, method="caruana", metric="f1", rounds=50, temperature=True, honest=True)
    plots = write_tuning_plots(tuned, out_dir / "recipe_plots")
    artifacts["recipe"] = tuned.recipe.save(out_dir / "recipe.json")
    artifacts["weights chart"] = plots["weights"]
    artifacts["per-class F1 chart"] = plots["per_class_f1"]
    return tuned


def _predict(out_dir: Path, test, registry, progress: bool, say, artifacts: dict):
    """Step 4: the held-out part through the engine with TTA: the recipe, then soft and hard votes."""
    from .predict import predict

    say(f"predicting the {len(test)} held-out images with TTA {TTA!r}: members, votes and the recipe")
    cache = out_dir / ".ensembler_cache" / "logits"
    common = dict(tta=TTA, cache_dir=cache, workers=0, progress=progress)
    names = [f for f, _ in ARCHS]
    tuned_pred = predict(test, registry, recipe=artifacts["recipe"], out=out_dir / "submissions" / "tuned.csv",
                         **common)
    soft = predict(test, registry, members=names, vote="soft", **common)
    hard = predict(test, registry, members=names, vote="hard", **common)
    artifacts["submission"] = tuned_pred.submission.path
    artifacts["ledger"] = tuned_pred.submission.ledger
    artifacts["logit cache"] = cache
    return tuned_pred, soft, hard


def _comparison_rows(test, tuned, tuned_pred, soft, hard) -> list[dict]:
    """One row per member, vote, tuned blend and the shipped recipe: OOF, honest and held-out scores."""
    from .ensemble import vote
    from .metrics import accuracy, macro_f1

    y = test.labels
    c = test.label_space.num_classes

    def scores(pred):
        return macro_f1(y, pred, c), accuracy(y, pred)

    oof_rows = {r["name"]: r for r in tuned.rows}
    names = [f for f, _ in ARCHS]
    rows = []
    member_logits = dict(soft.member_logits)  # engine output over the held-out part (shared cache)
    ships = tuned.decision.name
    for name in names:
        f1, acc = scores(vote({name: member_logits[name].logits}, "soft").pred)
        r = oof_rows[name]
        rows.append({"name": name, "kind": "member", "oof_f1": r["f1"], "oof_acc": r["acc"], "honest_f1": r["f1"],
                     "test_f1": f1, "test_acc": acc, "weight": r["weight"], "note": dict(ARCHS)[name],
                     "ships": name == ships})
    for label, kind, res, key in (("hard vote", "hard", hard, "hard vote"),
                                  ("soft vote (uniform)", "soft", soft, "soft vote (uniform)")):
        f1, acc = scores(res.pred)
        note = f"ties {res.tie_rate:.1%} → smallest class" if res.tie_rate is not None else ""
        rows.append({"name": label, "kind": kind, "oof_f1": oof_rows[key]["f1"], "oof_acc": oof_rows[key]["acc"],
                     "honest_f1": oof_rows[key]["f1"], "test_f1": f1, "test_acc": acc, "weight": None, "note": note,
                     "ships": label == ships})
    # The tuned blend on the held-out part, whether it ships or not (from the cached member logits).
    blend = tuned.tuned_recipe
    f1, acc = scores(blend.apply({n: member_logits[n].logits for n in names})[0])
    honest = tuned.honest or {}
    rows.append({"name": f"tuned {blend.method} blend", "kind": "tuned", "oof_f1": tuned.in_sample["f1"],
                 "oof_acc": tuned.in_sample["acc"], "honest_f1": (honest.get("pooled") or {}).get("f1"),
                 "test_f1": f1, "test_acc": acc, "weight": None,
                 "note": "weights " + ", ".join(f"{m.name}={m.weight:.2f}" for m in blend.members),
                 "ships": tuned.decision.kind.startswith("tuned")})
    f1, acc = scores(tuned_pred.pred)
    rows.append({"name": "recipe (what ships)", "kind": "recipe", "oof_f1": tuned.recipe.scores["in_sample"]["f1"],
                 "oof_acc": tuned.recipe.scores["in_sample"]["acc"],
                 "honest_f1": ((tuned.recipe.scores.get("honest") or {}).get("pooled") or {}).get("f1"),
                 "test_f1": f1, "test_acc": acc, "weight": None, "note": tuned.decision.reason, "ships": False})

    return rows


def _confusion(out_dir: Path, test, pred, f1: float) -> Path:
    """The tuned ensemble's confusion matrix on the held-out part, as a PNG."""
    from .evaluate import per_class_table, plot_confusion_matrix

    _, cm = per_class_table(test.labels, pred, test.label_space.classes)
    return plot_confusion_matrix(cm, test.label_space.classes, out_dir / "plots" / "confusion_tuned.png",
                                 title=f"tuned ensemble on the held-out part (macro-F1 {f1:.3f})")
