"""``ensembler report``: one self-contained HTML page that shows why this blend.

:func:`build_report` reads what the pipeline already wrote -- the registry (entries, OOF
logits, each family's ``metrics.csv``), a recipe, ``tta-report`` OOF-TTA files and the
submission ledger -- optionally runs the recipe over labeled held-out data through
:func:`ensembler.predict.predict` (cached logits are reused), and writes one HTML file with:

- a leaderboard: family, arch, head/target, k, OOF macro-F1 / accuracy / log-loss, the
  fold-to-fold spread, weight and temperature in the recipe, held-out scores and inference
  time per image where known (from the held-out run or a tta-report), and the blend's
  in-sample and honest (nested-CV) scores;
- member x fold macro-F1 heatmap; members' disagreement and error-correlation heatmaps;
- per-class F1 of members vs the blend, the blend's confusion matrix (held-out data when
  labeled data is given, else OOF rows);
- a reliability diagram of the blend before/after the recipe's temperatures;
- TTA per-view deltas from tta-report files; learning curves per family; the ledger.

Each chart is drawn once (:mod:`ensembler.report.figures`); the page is assembled by
:class:`ensembler.report.page.Page` (inline CSS, images as data URIs, no script).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np

from .._io import refuse_existing, write_text_atomic
from ..errors import EnsemblerError
from ..metrics import accuracy, classification_scores, confusion_matrix, log_loss, macro_f1, per_class_f1, softmax
from . import figures
from .page import Page

__all__ = ["ReportError", "ReportResult", "build_report"]


class ReportError(EnsemblerError, ValueError):
    """An input of the report that cannot be used; the message names the file."""


@dataclass(frozen=True)
class ReportResult:
    """What :func:`build_report` wrote: the file, its section titles, figure count and time taken."""

    path: Path
    sections: list[str]
    figures: int
    seconds: float
    notes: list[str]


def _f(x, digits: int = 4) -> str:
    return "–" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{digits}f}"


def _fold_scores(y, pred, folds, num_classes) -> dict[int, float]:
    return {int(f): macro_f1(y[folds == f], pred[folds == f], num_classes) for f in np.unique(folds)}


def _reliability(y, probs, n_bins: int = 15):
    conf, hit = probs.max(axis=1), (probs.argmax(axis=1) == y).astype(float)
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        mc = np.bincount(bins, weights=conf, minlength=n_bins) / counts
        ma = np.bincount(bins, weights=hit, minlength=n_bins) / counts
    keep = counts > 0
    ece = float((counts[keep] / len(y) * np.abs(ma[keep] - mc[keep])).sum())
    return mc, ma, counts, ece


def _pairs(preds: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    m = len(preds)
    dis = np.array([[np.mean(preds[i] != preds[j]) for j in range(m)] for i in range(m)])
    err = (preds != y[None, :]).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.corrcoef(err) if m > 1 else np.ones((1, 1))
    return dis, np.atleast_2d(corr)


def _tta_file(path) -> dict:
    from ..logits import read_logits

    meta = read_logits(path).meta or {}
    if not isinstance(meta.get("scores"), list) or not meta.get("family"):
        raise ReportError(f"--tta-report {path} is not an OOF-TTA file of `ensembler tta-report` (no per-view scores)")
    return meta


def _metrics_csv(path: Path) -> dict[int, dict[str, np.ndarray]]:
    import pandas as pd

    try:
        frame = pd.read_csv(path)
    except Exception as exc:  # noqa: BLE001 - pandas raises several types on a broken CSV
        raise ReportError(f"{path} cannot be read as the trainer's metrics.csv ({exc})") from None
    need = {"fold", "epoch", "train_loss", "val_loss", "val_f1"}
    if not need <= set(frame.columns):
        raise ReportError(f"{path}: metrics.csv lacks columns {sorted(need - set(frame.columns))}")
    return {int(f): {c: g[c].to_numpy(float) for c in need} for f, g in frame.groupby("fold")}


def build_report(registry=None, *, recipe=None, tta_reports: Sequence = (), data=None, ledger=None,
                 out="report.html", tta: str = "none", merge: str = "mean-logits", backend: str = "torch",
                 batch_size: int = 32, workers: int = 0, device=None, cache_dir=None, overwrite: bool = False,
                 progress: bool = True) -> ReportResult:
    """Write the report page.

    Parameters
    ----------
    registry : Registry, str or Path, optional
    recipe : Recipe, str or Path, optional
        The blend to explain; without it the blend is the uniform soft vote of every family
        with OOF logits.
    tta_reports : sequence of paths
        OOF-TTA files written by ``ensembler tta-report`` (their per-view scores).
    data : SampleTable, optional
        Held-out images: the recipe (or soft vote) is run over them with ``tta``/``merge``;
        when they are labeled, per-class F1 and the confusion matrix use them.
    ledger : path, optional
        Default ``<registry>/../submissions/ledger.jsonl`` when it exists.
    out : path
        The HTML file (written atomically); an existing one is replaced only with ``overwrite``.

    Returns
    -------
    ReportResult

    Examples
    --------
    >>> build_report("demo_out/checkpoints", recipe="demo_out/recipe.json", out="report.html")  # doctest: +SKIP
    """
    from ..ensemble import Recipe
    from ..progress import Ticker
    from ..registry import Registry

    t0 = time.perf_counter()
    reg = registry if hasattr(registry, "family") else Registry(registry)
    recipe = Recipe.load(recipe) if isinstance(recipe, (str, os.PathLike)) else recipe
    out = Path(out)
    refuse_existing(out, overwrite=overwrite)  # before any work
    d = _gather(reg, recipe, [(Path(p), _tta_file(p)) for p in tta_reports])
    if data is not None:
        from ..predict import predict

        d.held = predict(data, reg, recipe=recipe, members=d.names, vote="soft", tta=tta, merge=merge,
                         backend=backend, batch_size=batch_size, workers=workers, device=device,
                         cache_dir=cache_dir, progress=progress)
        if d.held.table is not None and d.held.table.frame["label"].notna().all():
            d.held_y = d.held.table.labels
        else:
            d.notes.append(f"{data.describe()} has no labels for every row: held-out scores are not shown")
    ledger = Path(ledger) if ledger is not None else reg.root.parent / "submissions" / "ledger.jsonl"
    page = Page("ensembler report")
    with Ticker("report", total=8, unit="parts", enabled=progress) as tick:
        preds, fold_ids, fold_grid = _leaderboard(page, d)
        tick.advance(1)
        _pair_sections(page, d, preds, fold_ids, fold_grid)
        tick.advance(2)
        _class_sections(page, d, preds)
        tick.advance(2)
        _reliability_section(page, d)
        tick.advance(1)
        _tta_section(page, d.tta_meta)
        _curves_section(page, d)
        tick.advance(1)
        _ledger_section(page, d, ledger)
        tick.advance(1)

    for n in d.notes:
        page.text(n, note=True)
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    held = d.held
    subtitle = (f"registry {reg.root} · {len(d.names)} members · {d.c} classes · {len(d.y)} OOF rows"
                + (f" · recipe {recipe.hash()[:12]}" if recipe is not None else " · uniform soft vote")
                + (f" · held-out {len(held.ids)} rows (TTA {held.inputs['tta']})" if held is not None else "")
                + f" · written {when}")
    write_text_atomic(out, page.render(subtitle))
    return ReportResult(out, list(page.sections), page.images, round(time.perf_counter() - t0, 2), d.notes)


@dataclass
class _Inputs:
    """What every section reads: members' OOF logits, the blend on them, the held-out run."""

    reg: object
    recipe: object
    members: list
    names: list[str]
    y: np.ndarray
    folds: np.ndarray
    classes: list[str]
    logits: dict[str, np.ndarray]
    blend: str
    bpred: np.ndarray
    bprobs: np.ndarray
    bprobs_raw: np.ndarray | None
    tta_meta: list
    held: object = None
    held_y: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def c(self) -> int:
        return len(self.classes)

    @property
    def honest(self) -> dict:
        return (self.recipe.scores.get("honest") or {}) if self.recipe is not None else {}


def _gather(reg, recipe, tta_meta) -> _Inputs:
    """The members of the recipe (or every family), their labels and folds, and the blend's OOF output."""
    from ..ensemble import load_members, vote

    members = load_members(recipe.names if recipe is not None else "all", registry=reg)
    names = [m.name for m in members]
    y, folds = members[0].labels, members[0].folds
    if y is None or folds is None:
        raise ReportError(f"member {names[0]!r} has OOF logits without labels or folds; the report needs both")
    space = members[0].label_space
    classes = list(recipe.classes) if recipe is not None else (
        list(space.classes) if space is not None else [str(i) for i in range(members[0].num_classes)])
    logits = {m.name: np.asarray(m.logits, dtype=np.float64) for m in members}
    if recipe is not None:
        bpred, bprobs = recipe.apply(logits)
        raw = replace(recipe, members=tuple(replace(m, temperature=1.0) for m in recipe.members))
        _, bprobs_raw = raw.apply(logits)
    else:
        res = vote(logits, "soft")
        bpred, bprobs, bprobs_raw = res.pred, res.probs, None
    return _Inputs(reg, recipe, members, names, y, folds, classes, logits,
                   "recipe" if recipe is not None else "soft vote", bpred, bprobs, bprobs_raw, tta_meta)


def _timing(d: _Inputs) -> dict[str, tuple[float, str]]:
    """Milliseconds per image of each family, where a tta-report or the held-out run measured it."""
    timing = {}
    for _path, meta in d.tta_meta:
        if meta.get("seconds") and meta.get("rows"):
            timing[meta["family"]] = (1e3 * meta["seconds"] / meta["rows"], f"tta-report {meta['tta']}")
    if d.held is not None:
        for name, ml in d.held.member_logits.items():
            if not ml.meta.get("cached") and ml.meta.get("seconds"):
                timing[name] = (1e3 * ml.meta["seconds"] / len(d.held.ids), f"held-out, TTA {d.held.inputs['tta']}")
    return timing


def _leaderboard(page: Page, d: _Inputs):
    """Members, the blend in-sample and honest; returns the members' OOF predictions and fold grid."""
    y, folds, c, held, held_y, reg = d.y, d.folds, d.c, d.held, d.held_y, d.reg
    timing = _timing(d)
    by_rec = {m.name: m for m in d.recipe.members} if d.recipe is not None else {}
    page.section("Leaderboard")
    cols = ["member", "arch", "head / target", "k", "OOF macro-F1", "OOF acc", "OOF log-loss",
            "fold F1 mean ± sd", "weight", "temperature"]
    if held_y is not None:
        cols += ["held-out F1", "held-out acc"]
    cols += ["ms / image"]
    rows, emph, preds, fold_grid = [], [], [], []
    fold_ids = [int(f) for f in np.unique(folds)]
    for m in d.members:
        parts = m.name.split("+")
        entries = [e for p in parts for e in (reg.family(p) if p in reg.families() else [reg.get(p)])]
        s = classification_scores(y, d.logits[m.name])
        pred = d.logits[m.name].argmax(axis=1)
        preds.append(pred)
        fs = _fold_scores(y, pred, folds, c)
        fold_grid.append([fs[f] for f in fold_ids])
        rec = by_rec.get(m.name)
        row = [m.name, " / ".join(sorted({e.arch for e in entries})),
               " / ".join(sorted({e.head + (f" ({e.target})" if e.target else "") for e in entries})),
               len({e.fold for e in entries if e.fold is not None}) // max(1, len(parts)) or 1,
               _f(s["f1"]), _f(s["acc"]), _f(s["logloss"]),
               f"{np.mean(list(fs.values())):.4f} ± {np.std(list(fs.values())):.4f}",
               _f(rec.weight, 3) if rec else "–", _f(rec.temperature, 3) if rec else "–"]
        if held_y is not None:
            if m.name in held.member_parts or m.name in held.member_logits:
                hz = held.member_joint_logits(m.name).argmax(axis=1)
                row += [_f(macro_f1(held_y, hz, c)), _f(accuracy(held_y, hz))]
            else:
                row += ["– (weight 0: not run)", "–"]
        ms = [timing[p] for p in parts if p in timing]
        row += [f"{sum(t for t, _ in ms):.2f} ({ms[0][1]})" if len(ms) == len(parts) else "–"]
        rows.append(row)
        emph.append(False)
    blog = np.log(np.maximum(d.bprobs, 1e-300))
    bs = {"f1": macro_f1(y, d.bpred, c), "acc": accuracy(y, d.bpred), "logloss": log_loss(y, blog)}
    bfs = _fold_scores(y, d.bpred, folds, c)
    fold_grid.append([bfs[f] for f in fold_ids])
    row = [f"{d.blend} (in-sample)", "", "", len(fold_ids), _f(bs["f1"]), _f(bs["acc"]), _f(bs["logloss"]),
           f"{np.mean(list(bfs.values())):.4f} ± {np.std(list(bfs.values())):.4f}", "", ""]
    if held_y is not None:
        row += [_f(macro_f1(held_y, held.pred, c)), _f(accuracy(held_y, held.pred))]
    rows.append(row + [""])
    emph.append(True)
    honest = d.honest
    if honest.get("per_fold"):
        per = [float(v) for v in honest["per_fold"].values()]
        pooled = honest.get("pooled") or {}
        row = [f"{d.blend} (honest, nested CV)", "", "", len(per), _f(pooled.get("f1")), _f(pooled.get("acc")),
               _f(pooled.get("logloss")), f"{np.mean(per):.4f} ± {np.std(per):.4f}", "", ""]
        rows.append(row + ([""] * 2 if held_y is not None else []) + [""])
        emph.append(True)
    page.table(cols, rows, left=3, emphasis=emph)
    recipe = d.recipe
    page.text("OOF scores are over every training row, each predicted by the fold model that did not see it. "
              "The fold spread is the standard deviation of macro-F1 over folds; the honest row re-tunes the "
              "blend inside each fold and scores it on the fold left out"
              + (f" (the recipe: {recipe.method or 'a simple vote, no tuned weights'}, chosen on {recipe.metric})."
                 if recipe is not None else "."), note=True)
    return preds, fold_ids, fold_grid


def _pair_sections(page: Page, d: _Inputs, preds, fold_ids, fold_grid) -> None:
    """The member x fold heatmap; members' disagreement and error correlation."""
    page.section("Members by fold")
    page.image(figures.fold_heatmap(d.names + [d.blend], fold_ids, np.array(fold_grid)), "member x fold macro-F1")
    page.section("Disagreement and error correlation")
    dis, corr = _pairs(np.array(preds), d.y)
    page.image(figures.pair_heatmaps(d.names, dis, corr), "disagreement and error correlation")
    page.text("Members that disagree often and whose errors are weakly correlated are the ones a blend gains from.",
              note=True)


def _class_sections(page: Page, d: _Inputs, preds) -> None:
    """Per-class F1 of members and the blend, and the blend's confusion matrix (held-out when labeled)."""
    c, held = d.c, d.held
    if d.held_y is not None:
        where, ty, tpred = f"held-out, {len(d.held_y)} rows", d.held_y, held.pred
        per = {n: per_class_f1(d.held_y, held.member_joint_logits(n).argmax(axis=1), c)
               for n in d.names if n in held.member_logits or n in held.member_parts}
    else:
        where, ty, tpred = f"OOF, {len(d.y)} rows", d.y, d.bpred
        per = {n: per_class_f1(d.y, p, c) for n, p in zip(d.names, preds)}
    per[d.blend] = per_class_f1(ty, tpred, c)
    page.section("Per-class F1")
    page.image(figures.per_class_f1(d.classes, per, d.blend, where), "per-class F1 of members and the blend")
    page.section("Confusion matrix")
    page.image(figures.confusion(d.classes, confusion_matrix(ty, tpred, c), f"{d.blend} ({where})"),
               "confusion matrix of the blend")


def _reliability_section(page: Page, d: _Inputs) -> None:
    """The blend's reliability diagram, before and after the recipe's temperatures."""
    page.section("Reliability")
    curves = {f"{d.blend}" + (" with its temperatures" if d.bprobs_raw is not None else ""):
              _reliability(d.y, d.bprobs)}
    if d.bprobs_raw is not None:
        curves = {f"{d.blend} with every temperature 1": _reliability(d.y, d.bprobs_raw), **curves}
    page.image(figures.reliability(curves), "reliability diagram")


def _tta_section(page: Page, tta_meta) -> None:
    """Per-view deltas of every tta-report file given, and a table of their merged scores."""
    page.section("TTA per view")
    if not tta_meta:
        page.text("No tta-report files given (run `ensembler tta-report --family F --tta PLAN` and pass "
                  "its output with --tta-report).", note=True)
        return
    panels = []
    for _path, meta in tta_meta:
        rows_ = [s for s in meta["scores"] if s.get("kind") != "baseline"]
        panels.append((f"{meta['family']} · {meta['tta']}", [s["name"] for s in rows_],
                       np.array([s["delta_f1"] for s in rows_], float),
                       np.array([s["delta_logloss"] for s in rows_], float)))
    page.image(figures.tta_deltas(panels), "TTA per-view deltas")
    page.table(["file", "family", "plan", "rows", "no-TTA F1", "merged F1", "Δ F1", "s"],
               [[p.name, m["family"], m["tta"], m.get("rows"), _f(m["scores"][0]["f1"]),
                 _f(next((s["f1"] for s in m["scores"] if s["name"] == f"merged {m['merge']}"), None)),
                 _f(next((s["delta_f1"] for s in m["scores"] if s["name"] == f"merged {m['merge']}"), None)),
                 _f(m.get("seconds"), 1)] for p, m in tta_meta], left=3)


def _curves_section(page: Page, d: _Inputs) -> None:
    """Learning curves of every family behind the members (from its metrics.csv)."""
    page.section("Learning curves")
    fams = []
    for fam in dict.fromkeys(p for n in d.names for p in n.split("+")):
        path = d.reg.root / fam / "metrics.csv"
        if fam in d.reg.families() and path.is_file():
            fams.append((fam, _metrics_csv(path)))
    if fams:
        page.image(figures.learning_curves(fams), "learning curves per family")
    else:
        page.text("No metrics.csv in the members' family folders (families imported from outside checkpoints "
                  "have none).", note=True)


def _ledger_section(page: Page, d: _Inputs, ledger: Path) -> None:
    """Every submission of the ledger, the ones of this recipe marked."""
    from ..submit import read_ledger

    page.section("Ledger")
    lrows = read_ledger(ledger)
    if not lrows:
        page.text(f"No submissions recorded ({ledger} is missing or empty).", note=True)
        return
    this = d.recipe.hash() if d.recipe is not None else None
    table_rows = []
    for r in lrows:
        h = r.get("recipe_hash")
        scores = r.get("scores") or ({"honest F1": d.honest.get("mean")} if h and h == this else {})
        table_rows.append([r.get("time", ""), Path(str(r.get("output", ""))).name, r.get("rows", ""),
                           (h[:12] + (" (this recipe)" if h == this else "")) if h else "– (no recipe)",
                           r.get("vote", ""), r.get("tta", ""), r.get("backend", ""),
                           ", ".join(m.get("name", "") for m in r.get("members") or []),
                           "; ".join(f"{k} {_f(v) if isinstance(v, float) else v}" for k, v in scores.items())
                           or "–", str(r.get("output_sha256", ""))[:12]])
    page.table(["time", "file", "rows", "recipe", "vote", "TTA", "backend", "members", "scores", "sha256"],
               table_rows, left=2)
    page.text(f"{len(lrows)} submissions from {ledger}.", note=True)
