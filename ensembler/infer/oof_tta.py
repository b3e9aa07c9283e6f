"""Judge test-time augmentation on out-of-fold data, view by view, before submitting with it.

A TTA view that helps on one dataset hurts on another (colour jitter hurt while a centre
crop helped, on the mask task). :func:`tta_report` measures it honestly on a family's own
validation data: each fold checkpoint is run over **its own validation rows only** (the ids
whose OOF fold equals the checkpoint's fold, read from the family's ``oof.npz``, never by
re-splitting), with every view of the plan, through the engine
(:func:`~ensembler.infer.engine.checkpoint_view_logits`: one decode per image, the
checkpoint's own normalisation, views stacked in the batch, joint logits per view). From the per-view logits it scores, over all OOF rows:

- ``no TTA``: the identity view (run even when the plan has no identity view);
- each view of the plan alone;
- the plan merged with ``merge``, and optionally with every merge rule (no extra forward).

It also writes the merged TTA'd OOF logits as an OOF file next to ``oof.npz`` so that
``ensembler tune-weights --oof FILE`` tunes the blend on the same TTA used at test time.

Sanity check: the identity view's logits should equal ``oof.npz`` (the trainer validated
with the same eval preprocessing). When they do not, the report carries the max abs
difference and a note rather than failing: the trainer's eval transform (or precision)
differs from the engine's, and the ``no TTA`` row is the engine's, not the trainer's.

Per-view logits are cached in the :class:`~ensembler.infer.store.LogitStore` (key: weights
sha256 x plan x the fold's validation rows' fingerprint x backend x precision), so a re-run
with another merge rule does no forward pass.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..device import resolve_device
from ..errors import EnsemblerError, LogitError, RegistryError
from ..executors import workers_device
from ..logits import Logits, few, read_logits, write_logits
from ..metrics import classification_scores
from ..progress import Ticker
from .engine import check_run_args, checkpoint_view_logits, resolve_precision
from .store import LogitStore, check_weights, default_cache_dir
from .tta import MERGE_RULES, check_merge, merge_views
from .views import View, parse_tta

__all__ = ["TTAScore", "TTAReport", "tta_report", "oof_tta_filename", "IDENTITY_ROW"]

IDENTITY_ROW = "no TTA (identity)"
_CACHE_MERGE = "per-view"  # LogitStore merge field: views are cached unmerged, (N, V*C)


@dataclass(frozen=True)
class TTAScore:
    """Scores of one way of predicting the OOF rows, and their change against no TTA.

    Attributes
    ----------
    name : str
        ``"no TTA (identity)"``, a view name (``"hflip"``, ``"crop-center-24x24"``) or
        ``"merged <rule>"``.
    kind : {"baseline", "view", "merged"}
    f1, acc, logloss : float
        Macro-F1, accuracy and log-loss over every OOF row.
    delta_f1, delta_acc, delta_logloss : float
        This row minus the no-TTA row (higher F1/accuracy is better; lower log-loss is better).
    """

    name: str
    kind: str
    f1: float
    acc: float
    logloss: float
    delta_f1: float = 0.0
    delta_acc: float = 0.0
    delta_logloss: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class TTAReport:
    """What :func:`tta_report` measured for one family and one TTA plan.

    Attributes
    ----------
    family, tta, merge : str
        Family name, canonical plan string and the merge rule of the written OOF file.
    views : list of str
        View names in plan order (``view_logits`` axis 1).
    scores : list of TTAScore
        No TTA first, then each view, then each merged rule (``merge`` first).
    ids, labels, folds : ndarray (N,)
        The OOF rows, in ``oof.npz`` order.
    view_logits : ndarray (N, V, C) float32
        Per-view joint logits, each row from the checkpoint of its fold.
    identity_logits : ndarray (N, C) float32
        The identity view (the ``no TTA`` row).
    merged_logits : dict[str, ndarray (N, C)]
        Merged logits per rule scored.
    oof_logits : ndarray (N, C)
        The trainer's stored OOF logits.
    identity_max_abs_diff : float
        ``max |identity_logits - oof_logits|``.
    identity_matches : bool
        Whether they agree within ``identity_tolerance`` (``np.allclose`` atol = rtol).
    identity_note : str
        Empty when they match, else what the difference means.
    oof_scores : dict
        Scores of the stored ``oof.npz`` logits (equal to the no-TTA row when they match).
    source : Path
        The family's ``oof.npz``.
    output : Path
        The written OOF-TTA file (``ids``, ``logits`` merged with ``merge``, ``labels``, ``folds``).
    checkpoints : dict[int, str]
        Fold -> checkpoint id.
    meta : dict
        ``backend``, ``precision``, ``device``, ``cached_folds``, ``seconds``, ``rows_per_fold``.
    """

    family: str
    tta: str
    merge: str
    views: list[str]
    scores: list[TTAScore]
    ids: np.ndarray
    labels: np.ndarray
    folds: np.ndarray
    view_logits: np.ndarray
    identity_logits: np.ndarray
    merged_logits: dict[str, np.ndarray]
    oof_logits: np.ndarray
    identity_max_abs_diff: float
    identity_matches: bool
    identity_tolerance: float
    identity_note: str
    oof_scores: dict
    source: Path
    output: Path
    checkpoints: dict[int, str]
    meta: dict = field(default_factory=dict)

    def score(self, name: str) -> TTAScore:
        """The row called ``name`` (``"no TTA (identity)"``, a view name, ``"merged mean-probs"``)."""
        for s in self.scores:
            if s.name == name:
                return s
        raise KeyError(f"no row {name!r} in the TTA report; rows: {[s.name for s in self.scores]}")

    @property
    def baseline(self) -> TTAScore:
        return self.scores[0]

    @property
    def merged(self) -> TTAScore:
        """The row of the plan merged with :attr:`merge` (the one written to :attr:`output`)."""
        return self.score(f"merged {self.merge}")

    def to_dict(self) -> dict:
        """JSON-friendly summary (no arrays)."""
        return {
            "family": self.family, "tta": self.tta, "merge": self.merge, "views": list(self.views),
            "rows": int(len(self.ids)), "scores": [s.to_dict() for s in self.scores],
            "oof_scores": dict(self.oof_scores),
            "identity_check": {"max_abs_diff": self.identity_max_abs_diff, "matches": self.identity_matches,
                               "tolerance": self.identity_tolerance, "note": self.identity_note},
            "source": str(self.source), "output": str(self.output),
            "checkpoints": {str(k): v for k, v in self.checkpoints.items()}, **self.meta,
        }


def oof_tta_filename(family: str, tta: str, merge: str = "mean-logits") -> str:
    """File name of a family's OOF-TTA logits: ``<family>_oof_tta_<plan-slug>[_<merge>].npz``.

    The family is part of the name because ``tune-weights --oof`` names each member by its
    file stem: two families' ``hflip`` files must not share one. ``+`` (the member
    composition separator) and ``=``/``,`` never appear in the slug.

    Examples
    --------
    >>> oof_tta_filename("resnet-flat", "hflip+five-crop=24")
    'resnet-flat_oof_tta_hflip_five-crop_24x24.npz'
    >>> oof_tta_filename("resnet-flat", "flip", "mean-probs")
    'resnet-flat_oof_tta_flip_mean-probs.npz'
    """
    plan = parse_tta(tta)
    merge = check_merge(merge)
    slug = re.sub(r"[^A-Za-z0-9.-]+", "_", plan.spec).strip("_")
    tail = "" if merge == "mean-logits" else f"_{merge}"
    return f"{family}_oof_tta_{slug}{tail}.npz"


# ---------------------------------------------------------------------------- main entry
def tta_report(table, family: str, registry=None, *, tta="flip", merge: str = "mean-logits",
               all_merges: bool = False, backend: str = "torch", batch_size: int = 32, workers: int = 0,
               device=None, cache_dir=None, use_cache: bool = True, amp="auto", chunk_size: int | None = None,
               onnx_threads: int | None = None, progress: bool = True, executor=None) -> TTAReport:
    """Score a TTA plan on a family's out-of-fold rows, view by view, and write its OOF-TTA logits.

    Parameters
    ----------
    table : SampleTable
        The data the family was trained on (``--data`` of ``train-folds``): every id of the
        family's ``oof.npz`` must be in it (paths come from it; labels and folds from the OOF file).
    family : str
        A registry family (k fold checkpoints, each with its ``fold``).
    registry : Registry, optional
        Default ``Registry()``.
    tta : str or TTAPlan
        The plan to judge, e.g. ``"flip"``, ``"hflip+center-crop=28"`` (see :func:`parse_tta`).
    merge : str
        Merge rule of the written OOF-TTA file (``mean-logits``, ``mean-probs``,
        ``gmean-probs``, ``max-probs``).
    all_merges : bool
        Also score every other merge rule on the same per-view logits (no extra forward).
    backend : {"torch", "onnx"}
    batch_size, workers : int
        Images per decoded batch; DataLoader decode processes.
    device : str, optional
        Default CUDA when available.
    cache_dir : path, optional
        LogitStore folder for the per-view logits (default as :func:`predict_members`).
    use_cache : bool
        ``False`` forces the forward passes (results are still cached).
    amp : {"auto", "fp16", "bf16", False}
        Autocast precision on CUDA, as the engine (CPU runs fp32).
    chunk_size : int, optional
        Images per forward, halved on out-of-memory (default as the engine: all views at once
        on CUDA, 8 on a CPU).
    onnx_threads : int, optional
        onnxruntime intra-op threads.
    progress : bool
        Show a rich progress bar over images.
    executor : Executor, "local" or "ray", optional
        Where each fold checkpoint runs over its rows: this process (default), or Ray actors
        over shards of its rows (as :func:`~ensembler.infer.predict_members`).

    Returns
    -------
    TTAReport

    Raises
    ------
    RegistryError
        Unknown family, a checkpoint without a fold, two checkpoints for one fold.
    LogitError
        Naming the OOF file: missing or unreadable, OOF ids absent from ``table``, a fold
        with OOF rows but no checkpoint (or the reverse), a class count that differs.
    ImageDecodeError
        A corrupt image, named.

    Examples
    --------
    >>> rep = tta_report(table, "test_resnet-flat", registry, tta="hflip", progress=False)  # doctest: +SKIP
    >>> rep.baseline.f1, rep.merged.f1, rep.merged.delta_f1  # doctest: +SKIP
    (0.71, 0.73, 0.02)
    >>> rep.output.name  # doctest: +SKIP
    'test_resnet-flat_oof_tta_hflip.npz'
    """
    registry, plan, merge = check_run_args(registry, tta, merge, backend, batch_size, workers)
    by_fold = _fold_checkpoints(registry, family)
    source = registry.family_dir(family) / "oof.npz"
    oof = _family_oof(source, family, by_fold)
    position = _table_positions(table, oof, source, family)
    for e in by_fold.values():
        try:
            plan.check_input(e.pre.input_size)
        except EnsemblerError as exc:
            raise type(exc)(f"checkpoint {e.id!r} (input {e.pre.input_size[0]}x{e.pre.input_size[1]}): {exc}") from None

    identity_at = next((i for i, v in enumerate(plan.views) if v == View()), None)
    dev = resolve_device(device)
    run = _ViewRun(plan=plan, extra_identity=identity_at is None, backend=backend, batch_size=int(batch_size),
                   workers=int(workers), device=dev, precision=resolve_precision(amp, dev, backend),
                   chunk_size=chunk_size, onnx_threads=onnx_threads, executor=executor,
                   worker_device=workers_device(executor, device, dev))
    store = LogitStore(cache_dir if cache_dir is not None else default_cache_dir(registry.root))
    t0 = time.perf_counter()
    view_logits, cached_folds, rows_per_fold = _oof_view_logits(table, position, oof, by_fold, registry, family,
                                                                store, run, use_cache=use_cache, progress=progress)
    seconds = time.perf_counter() - t0

    plan_logits = view_logits[:, :len(plan.views)]
    identity = view_logits[:, -1 if run.extra_identity else identity_at]
    rules = [merge] + ([r for r in MERGE_RULES if r != merge] if all_merges else [])
    merged, scores = _score(oof.labels, identity, plan_logits, plan, rules)
    tol, diff, matches, note = _identity_check(identity, oof.logits, source, backend, run.precision)

    report = TTAReport(
        family=family, tta=plan.spec, merge=merge, views=[v.name for v in plan.views], scores=scores,
        ids=oof.ids, labels=oof.labels, folds=oof.folds, view_logits=plan_logits, identity_logits=identity,
        merged_logits=merged, oof_logits=oof.logits, identity_max_abs_diff=diff, identity_matches=matches,
        identity_tolerance=tol, identity_note=note, oof_scores=classification_scores(oof.labels, oof.logits),
        source=source, output=source.parent / oof_tta_filename(family, plan.spec, merge),
        checkpoints={f: e.id for f, e in by_fold.items()},
        meta={"backend": backend, "precision": run.precision, "device": str(dev), "cached_folds": cached_folds,
              "rows_per_fold": rows_per_fold, "seconds": round(seconds, 3),
              "sha256": {e.id: e.sha256 for e in by_fold.values()}},
    )
    label_space = next(iter(by_fold.values())).labels
    meta = {**report.to_dict(), "producer": family,
            "logits": f"OOF logits with TTA {plan.spec!r} merged by {merge} (joint logits)"}
    write_logits(report.output, Logits(oof.ids, merged[merge], label_space=label_space, labels=oof.labels,
                                       folds=oof.folds, meta=meta, name=family))
    return report


@dataclass(frozen=True)
class _ViewRun:
    """How each fold checkpoint is run: the plan (with the identity view appended when it has
    none, for the no-TTA row) and the engine settings."""

    plan: Any
    extra_identity: bool
    backend: str
    batch_size: int
    workers: int
    device: Any
    precision: str
    chunk_size: int | None
    onnx_threads: int | None
    executor: Any = None
    worker_device: Any = None

    @property
    def plans(self) -> list:
        return [self.plan, parse_tta("none")] if self.extra_identity else [self.plan]

    @property
    def views(self) -> int:
        return len(self.plan) + int(self.extra_identity)

    @property
    def cache_tta(self) -> str:
        return self.plan.spec + ("|identity" if self.extra_identity else "")


def _fold_checkpoints(registry, family: str) -> dict[int, Any]:
    """Fold -> checkpoint entry of a train-folds family (sorted by fold)."""
    by_fold: dict[int, Any] = {}
    for e in registry.family(family):  # RegistryError naming an unknown family
        if e.fold is None:
            raise RegistryError(f"checkpoint {e.id!r} of family {family!r} has no fold: a TTA report needs the "
                                f"k fold checkpoints of a train-folds family")
        if e.fold in by_fold:
            raise RegistryError(f"family {family!r} has two checkpoints for fold {e.fold}: "
                                f"{by_fold[e.fold].id!r} and {e.id!r}")
        by_fold[int(e.fold)] = e
    return dict(sorted(by_fold.items()))


def _family_oof(source: Path, family: str, by_fold: dict[int, Any]) -> Logits:
    """The family's OOF logits, checked against its checkpoints (classes, folds both ways)."""
    oof = read_logits(source, require=("labels", "folds"))  # LogitError naming the file
    for e in by_fold.values():
        if e.labels.num_classes != oof.num_classes:
            raise LogitError(f"OOF file {source} has {oof.num_classes} classes but checkpoint {e.id!r} predicts "
                             f"{e.labels.num_classes}: the OOF file is stale; retrain or re-assemble the family")
    oof_folds = sorted(set(oof.folds.tolist()))
    no_ckpt = [f for f in oof_folds if f not in by_fold]
    if no_ckpt:
        raise LogitError(f"OOF file {source} has rows of fold(s) {no_ckpt} but family {family!r} has no checkpoint "
                         f"for them (its folds: {sorted(by_fold)})")
    no_rows = [f for f in by_fold if f not in oof_folds]
    if no_rows:
        raise LogitError(f"family {family!r} has checkpoint(s) for fold(s) {no_rows} but OOF file {source} has no "
                         f"rows of those folds: the OOF file is stale; re-run train-folds to re-assemble it")
    return oof


def _table_positions(table, oof: Logits, source: Path, family: str) -> np.ndarray:
    """Row of each OOF id in ``table`` (LogitError naming the ids the table lacks)."""
    where = {i: n for n, i in enumerate(np.asarray(table.ids).astype(str).tolist())}
    missing = [i for i in oof.ids.tolist() if i not in where]
    if missing:
        raise LogitError(f"{len(missing)} id(s) of OOF file {source} are not in the data ({few(missing)}): "
                         f"--data must be the training data family {family!r} was trained on")
    return np.fromiter((where[i] for i in oof.ids.tolist()), dtype=np.int64, count=len(oof))


def _oof_view_logits(table, position, oof: Logits, by_fold, registry, family: str, store: LogitStore,
                     run: _ViewRun, *, use_cache: bool, progress: bool):
    """``(N, V, C)`` per-view logits of every OOF row, each from the checkpoint of its fold
    (cached per fold), the folds served from the cache, and the rows per fold."""
    c = oof.num_classes
    view_logits = np.empty((len(oof), run.views, c), dtype=np.float32)
    cached_folds, rows_per_fold, todo = [], {}, []
    for fold, e in by_fold.items():
        rows = np.flatnonzero(oof.folds == fold)  # positions in the OOF file
        sub = table.subset(position[rows])
        rows_per_fold[fold] = int(len(rows))
        fingerprint = sub.fingerprint(hashes=store.hashes)
        key = store.key(producer=e.id, sha256=e.sha256, tta=run.cache_tta, merge=_CACHE_MERGE,
                        fingerprint=fingerprint, backend=run.backend, precision=run.precision,
                        extra={"preprocess": e.pre.to_dict(), "head": e.head, "classes": list(e.labels.classes),
                               "views": run.views})
        hit = store.load(key, ids=oof.ids[rows]) if use_cache else None
        if hit is not None and hit[0].shape == (len(rows), run.views * c):
            check_weights(store.hashes, registry.path(e.weights), e)  # as a cold run loads them
            view_logits[rows] = hit[0].reshape(len(rows), run.views, c)
            cached_folds.append(fold)
        else:
            todo.append((fold, e, rows, sub, key, fingerprint))
    if not todo:
        store.save_hashes()
        return view_logits, cached_folds, rows_per_fold
    with Ticker("tta-report", total=sum(len(t[2]) for t in todo), unit="images", enabled=progress) as tick:
        advance = tick.advance
        for fold, e, rows, sub, key, fingerprint in todo:
            out = checkpoint_view_logits(sub, e, registry, run.plans, backend=run.backend, batch_size=run.batch_size,
                                         workers=run.workers, device=run.worker_device, precision=run.precision,
                                         chunk_size=run.chunk_size, onnx_threads=run.onnx_threads, advance=advance,
                                         executor=run.executor)
            if out.shape != (len(rows), run.views, c):
                raise LogitError(f"checkpoint {e.id!r} gave per-view logits of shape {out.shape}, expected "
                                 f"{(len(rows), run.views, c)}")
            if not np.isfinite(out).all():
                bad = np.flatnonzero(~np.isfinite(out).all(axis=(1, 2)))
                raise LogitError(f"checkpoint {e.id!r} produced non-finite logits for id {sub.ids[bad[0]]!r} "
                                 f"({len(bad)} rows); nothing was written")
            store.save(key, oof.ids[rows], out.reshape(len(rows), -1),
                       {"producer": e.id, "family": family, "sha256": e.sha256, "tta": run.cache_tta,
                        "merge": _CACHE_MERGE, "views": run.views, "backend": run.backend,
                        "precision": run.precision, "fingerprint": fingerprint,
                        "classes": list(e.labels.classes),
                        "layout": "per-view joint logits (N, V*C), views in plan order"
                                  + (", identity appended last" if run.extra_identity else "")})
            view_logits[rows] = out
    store.save_hashes()
    return view_logits, cached_folds, rows_per_fold


def _score(labels, identity, plan_logits, plan, rules) -> tuple[dict[str, np.ndarray], list[TTAScore]]:
    """Merged logits per rule, and the score rows: no TTA, each view, each merged rule."""
    import torch

    merged = {r: merge_views(torch.from_numpy(plan_logits), r).numpy().astype(np.float32) for r in rules}
    base = classification_scores(labels, identity)

    def row(name, kind, logits):
        s = classification_scores(labels, logits)
        return TTAScore(name, kind, s["f1"], s["acc"], s["logloss"], s["f1"] - base["f1"],
                        s["acc"] - base["acc"], s["logloss"] - base["logloss"])

    scores = [row(IDENTITY_ROW, "baseline", identity)]
    scores += [row(v.name, "view", plan_logits[:, j]) for j, v in enumerate(plan.views)]
    scores += [row(f"merged {r}", "merged", merged[r]) for r in rules]
    return merged, scores


def _identity_check(identity, oof_logits, source: Path, backend: str, precision: str):
    """``(tolerance, max abs diff, matches, note)`` of the identity view against the stored OOF logits.

    The trainer validated each fold with the same eval transform, so the identity view must
    reproduce ``oof.npz``; fp32 differences come from batch composition only (~1e-6).
    """
    tol = 1e-3 if precision == "fp32" and backend == "torch" else 5e-2
    diff = float(np.max(np.abs(identity.astype(np.float64) - oof_logits))) if len(identity) else 0.0
    matches = bool(np.allclose(identity, oof_logits, rtol=tol, atol=tol))
    note = "" if matches else (
        f"the identity view differs from {source} by up to {diff:.3g} (tolerance {tol:g}): the train-time eval "
        f"transform (or weights/precision) differs from the engine's ({backend} {precision}); the 'no TTA' row is "
        f"the engine's, so deltas compare like with like, but oof.npz does not match what predict will compute")
    return tol, diff, matches, note
