"""k-fold training of one model family: split, train each fold, register, assemble OOF logits.

Files of a family ``F`` under the registry root::

    F/run.json                 the TrainConfig, split facts and data fingerprint (checked by resume)
    F/fold<k>/state.pt         resume state while fold k trains (see ensembler.train.state)
    F/fold<k>/val_logits.npz   ids, logits (joint), labels of fold k's validation rows (+ .json:
                               label space, best epoch); an ensembler.logits file
    F/fold<k>/history.json     per-epoch metrics of fold k
    F/fold<k>/weights.safetensors   (written by Registry.add)
    F/oof.npz, F/oof.json      out-of-fold logits of the family + its sidecar (label space,
                               complete, folds, rows, macro-F1); an ensembler.logits file
    F/metrics.csv, F/learning_curves.png

A fold is *finished* when its checkpoint is registered and its ``val_logits.npz`` exists;
``resume=True`` skips finished folds and continues an unfinished one from ``state.pt``.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._io import sha256_bytes, write_json_atomic
from ..errors import DataError, EnsemblerError, LogitError
from ..labels import LabelSpace
from ..logits import Logits, read_logits, write_logits
from ..metrics import accuracy, macro_f1
from .config import RESUME_FREE_KEYS, TrainConfig
from .curves import plot_learning_curves, write_metrics_csv
from .fold_runner import FoldRunner, FoldSummary
from .loop import Callbacks


@dataclass
class FamilyResult:
    """What :func:`train_folds` leaves behind."""

    family: str
    folds: list[FoldSummary]
    oof_path: Path
    oof_f1: float
    oof_acc: float
    oof_complete: bool       # every training id is covered (all k folds trained)
    oof_rows: int
    total_rows: int
    metrics_csv: Path
    curves_png: Path
    table: Any               # the split SampleTable (with its ``fold`` column)
    label_space: LabelSpace
    config: TrainConfig
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------- targets
def training_targets(table, target: str | None) -> tuple[LabelSpace, np.ndarray]:
    """The model's LabelSpace and per-row integer targets.

    ``target=None``: the table's space and labels. ``target="age"`` (etc.): the factor's flat
    space and each row's index in that factor.
    """
    labels = table.labels
    space = table.label_space
    if target is None:
        return space, labels
    if not space.is_factored:
        raise DataError(
            f"--target {target} needs a factored label space (e.g. the mask data), but {table.describe()} "
            f"has {space.num_classes} plain classes; drop --target"
        )
    names = [f.name for f in space.factors]
    if target not in names:
        raise DataError(f"--target {target}: {table.describe()} has factors {names}")
    idx = names.index(target)
    return space.factor_space(target), np.asarray(space.factor_indices(labels)[idx], dtype=np.int64)


# ---------------------------------------------------------------------------- family naming
def _family_root(registry) -> Path:
    return Path(registry.root)


def _existing_families(registry) -> set[str]:
    names = set()
    try:
        names.update(registry.families())
    except Exception:  # noqa: BLE001 - an empty registry may have no index yet
        pass
    root = _family_root(registry)
    if root.is_dir():
        names.update(p.name for p in root.iterdir() if p.is_dir())
    return names


def resolve_family(registry, config: TrainConfig, resume: bool) -> str:
    """The family name: ``config.family``, else ``<arch>-<head>[-<target>]`` made unique.

    With ``resume`` and no explicit family, the newest family of that default name with a
    ``run.json`` is continued.
    """
    existing = _existing_families(registry)
    if config.family:
        if config.family in existing and not resume:
            raise EnsemblerError(
                f"family {config.family!r} already exists in the registry: pass --resume to continue it, "
                f"or choose another --family"
            )
        return config.family
    base = config.default_family()
    pattern = re.compile(rf"^{re.escape(base)}(?:-(\d+))?$")
    taken = {name: int(m.group(1) or 1) for name in existing if (m := pattern.match(name))}
    if resume:
        runs = [n for n in taken if (Path(registry.family_dir(n)) / "run.json").is_file()]
        if not runs:
            raise EnsemblerError(f"--resume: no interrupted run of family {base!r} (or {base}-N) to continue; "
                                 f"name it with --family")
        return max(runs, key=lambda n: taken[n])
    if base not in taken:
        return base
    return f"{base}-{max(taken.values()) + 1}"


# ---------------------------------------------------------------------------- run.json
def _split_digest(table) -> str:
    rows = "\n".join(f"{i}\t{f}" for i, f in zip(table.ids, table.folds))
    return sha256_bytes(rows.encode("utf-8"))


def _check_or_write_run(path: Path, config: TrainConfig, table, label_space: LabelSpace, resume: bool) -> None:
    record = {
        "config": config.to_dict(),
        "label_space": label_space.to_dict(),
        "rows": len(table),
        "split_digest": _split_digest(table),
        "source": {k: v for k, v in table.source.items() if isinstance(v, (str, int, float, list, dict))},
    }
    if resume and path.is_file():
        old = json.loads(path.read_text())
        keys = sorted((set(old["config"]) | set(record["config"])) - set(RESUME_FREE_KEYS))
        diffs = [k for k in keys if old["config"].get(k) != record["config"].get(k)]
        if diffs:
            shown = ", ".join(f"{k}: {old['config'].get(k)!r} -> {record['config'].get(k)!r}" for k in diffs)
            raise EnsemblerError(f"--resume of {path.parent.name}: the run was started with other settings ({shown})")
        if old.get("split_digest") != record["split_digest"]:
            raise EnsemblerError(
                f"--resume of {path.parent.name}: the data or its fold split changed since the run started "
                f"({old.get('rows')} -> {record['rows']} rows); start a new family"
            )
    write_json_atomic(path, record)


# ---------------------------------------------------------------------------- main entry
def train_folds(table, config: TrainConfig, registry, progress: bool = True, *, resume: bool = False,
                console=None) -> FamilyResult:
    """Train ``config.arch`` on the folds of ``table``; register each fold; write OOF logits.

    Parameters
    ----------
    table : SampleTable
        Labeled training data. It is split with ``split_folds(table, config.k, config.seed)``
        (person-grouped, stratified); an existing ``fold`` column is replaced.
    config : TrainConfig
    registry : Registry
    progress : bool
        Show a rich progress bar and per-epoch lines (``False`` in tests and scripts).
    resume : bool
        Continue the family's interrupted run: finished folds are skipped, an unfinished fold
        continues from its last saved epoch.
    console : rich Console, optional
        Where progress goes (default stderr).

    Returns
    -------
    FamilyResult

    Examples
    --------
    >>> from ensembler.data import load_source
    >>> from ensembler.registry import Registry
    >>> table = load_source("digits")  # doctest: +SKIP
    >>> cfg = TrainConfig(arch="resnet18", k=5, epochs=5, img_size=32, pretrained=False)
    >>> result = train_folds(table, cfg, Registry("checkpoints"))  # doctest: +SKIP
    >>> result.oof_f1  # doctest: +SKIP
    """
    from ..data import split_folds

    config.validate()
    label_space, targets = training_targets(table, config.target)
    from ..models import check_arch, head_num_outputs

    check_arch(config.arch)
    head_num_outputs(label_space, config.head)  # a factored head on a flat space fails here, named
    split = split_folds(table, config.k, config.seed)
    family = resolve_family(registry, config, resume)
    fam_dir = Path(registry.family_dir(family))
    run_fold_ids = config.folds if config.folds is not None else list(range(config.k))
    runner = FoldRunner(split=split, targets=targets, label_space=label_space, config=config,
                        registry=registry, family=family, resume=resume)
    runner.prepare(run_fold_ids)  # pretrained weights missing -> clean error, nothing written yet
    fresh = not fam_dir.exists()
    with _family_lock(fam_dir, family):
        if not resume and (fam_dir / "run.json").is_file():  # another process started it meanwhile
            raise EnsemblerError(f"family {family!r} already exists in the registry: pass --resume to continue "
                                 "it, or choose another --family")
        try:
            return _train_family(split, targets, label_space, config, registry, family, fam_dir, run_fold_ids,
                                 runner, progress, resume, console)
        except EnsemblerError as exc:
            if fresh and not resume and _nothing_to_resume(registry, family, fam_dir):
                # A fresh run that failed before any fold finished or saved a resumable epoch (a full
                # disk, a diverged loss) leaves nothing behind: no run.json blocking the same command.
                shutil.rmtree(fam_dir, ignore_errors=True)
                exc.args = (f"{exc} (nothing of family {family!r} was kept)", *exc.args[1:])
            raise


def _family_lock(fam_dir: Path, family: str):
    """Held while a family trains: a second ``train-folds`` (or ``--resume``) of the same family
    is refused at once instead of training the same fold twice."""
    from filelock import FileLock, Timeout

    try:
        fam_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        from .._io import write_error

        raise write_error(fam_dir, exc, "create the family folder") from exc
    lock = FileLock(str(fam_dir / ".train.lock"), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise EnsemblerError(f"family {family!r} is being trained by another process right now (lock "
                             f"{fam_dir / '.train.lock'}); wait for it to finish, then --resume") from None
    return _Release(lock)


class _Release:
    def __init__(self, lock):
        self.lock = lock

    def __enter__(self):
        return self.lock

    def __exit__(self, *exc):
        self.lock.release()


def _nothing_to_resume(registry, family: str, fam_dir: Path) -> bool:
    """No registered fold and no saved epoch (``state.pt``): a failed run that can only restart."""
    from .state import STATE_NAME

    return not _family_entries(registry, family) and not any(fam_dir.glob(f"fold*/{STATE_NAME}"))


def _train_family(split, targets, label_space, config, registry, family, fam_dir, run_fold_ids, runner, progress,
                  resume, console) -> FamilyResult:
    import torch
    from rich.markup import escape

    _check_or_write_run(fam_dir / "run.json", config, split, label_space, resume)
    reporter = None
    if progress:
        from .progress import RichProgress

        reporter = RichProgress(console=console, total_folds=len(run_fold_ids))
    previous_det = torch.are_deterministic_algorithms_enabled()
    previous_bench = torch.backends.cudnn.benchmark
    summaries: list[FoldSummary] = []
    try:
        if config.deterministic:
            # Only for this run; restored below (no global flags at import or after return).
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        if reporter is not None:
            reporter.__enter__()
            reporter.note(f"[bold]train-folds {family}[/]: {escape(config.describe(runner.augment))}")
            for note in runner.notes:
                reporter.note(f"[yellow]note:[/] {note}")
        callbacks = _CurvesEveryEpoch(fam_dir, config, reporter)
        for number, fold in enumerate(run_fold_ids, 1):
            if reporter is not None:
                reporter.set_fold(fold, number)
            summaries.append(runner.run(fold, callbacks=callbacks))
            _write_curves(fam_dir, config)
    finally:
        if reporter is not None:
            reporter.__exit__(None, None, None)
        torch.use_deterministic_algorithms(previous_det)
        torch.backends.cudnn.benchmark = previous_bench

    oof = assemble_oof(split, targets, label_space, fam_dir, config.k, family=family)
    for entry in _family_entries(registry, family):
        registry.update(entry.id, oof=f"{family}/oof.npz")
    metrics_csv, curves_png = _write_curves(fam_dir, config)
    notes = list(runner.notes)
    if not oof["complete"]:
        notes.append(
            f"OOF is partial: folds {oof['folds']} of {config.k} are trained, covering {oof['rows']} of "
            f"{len(split)} training rows; train the rest with --folds and --resume --family {family}"
        )
    return FamilyResult(
        family=family, folds=summaries, oof_path=fam_dir / "oof.npz", oof_f1=oof["f1"], oof_acc=oof["acc"],
        oof_complete=oof["complete"], oof_rows=oof["rows"], total_rows=len(split), metrics_csv=metrics_csv,
        curves_png=curves_png, table=split, label_space=label_space, config=config, notes=notes,
    )


class _CurvesEveryEpoch(Callbacks):
    """Forwards to the progress reporter and rewrites metrics.csv + the PNG after every
    epoch, so a long run's curves can be watched while it trains."""

    def __init__(self, fam_dir: Path, config: TrainConfig, reporter: Callbacks | None):
        self.fam_dir, self.config, self.reporter = fam_dir, config, reporter

    def on_epoch_start(self, *args) -> None:
        if self.reporter is not None:
            self.reporter.on_epoch_start(*args)

    def on_train_batch(self, *args) -> None:
        if self.reporter is not None:
            self.reporter.on_train_batch(*args)

    def on_val_batch(self, *args) -> None:
        if self.reporter is not None:
            self.reporter.on_val_batch(*args)

    def on_epoch_end(self, *args) -> None:
        if self.reporter is not None:
            self.reporter.on_epoch_end(*args)

    def on_state_saved(self, path, epoch, history, best_epoch) -> None:
        fold = int(path.parent.name[len("fold"):])
        _write_curves(self.fam_dir, self.config, current=(fold, [r.to_dict() for r in history], best_epoch))

    def note(self, text: str) -> None:
        if self.reporter is not None:
            self.reporter.note(text)


def _family_entries(registry, family: str) -> list:
    try:
        return list(registry.family(family))
    except Exception:  # noqa: BLE001 - unknown family
        return []


def _fold_dirs(fam_dir: Path) -> dict[int, Path]:
    out = {}
    if fam_dir.is_dir():
        for p in fam_dir.iterdir():
            m = re.fullmatch(r"fold(\d+)", p.name)
            if m and p.is_dir():
                out[int(m.group(1))] = p
    return out


def load_histories(fam_dir: Path) -> tuple[dict[int, list[dict]], dict[int, int]]:
    """Per-fold epoch histories and best epochs of the family's finished folds (``history.json``)."""
    histories, best = {}, {}
    for fold, d in sorted(_fold_dirs(fam_dir).items()):
        if (d / "history.json").is_file():
            rec = json.loads((d / "history.json").read_text())
            histories[fold], best[fold] = rec["history"], rec["best_epoch"]
    return histories, best


def _write_curves(fam_dir: Path, config: TrainConfig, current=None) -> tuple[Path, Path]:
    """Rewrite metrics.csv and the PNG; ``current`` = (fold, history, best_epoch) of the fold in training."""
    histories, best = load_histories(fam_dir)
    if current is not None:
        fold, history, best_epoch = current
        histories[fold], best[fold] = history, best_epoch
    csv = write_metrics_csv(fam_dir / "metrics.csv", histories)
    png = plot_learning_curves(fam_dir / "learning_curves.png", histories, best, monitor=config.monitor,
                               title=f"{fam_dir.name} ({config.arch}, {config.head} head)")
    return csv, png


# ---------------------------------------------------------------------------- OOF
def assemble_oof(split, targets: np.ndarray, label_space: LabelSpace, fam_dir: Path, k: int,
                 family: str | None = None) -> dict[str, Any]:
    """Concatenate the folds' validation logits into ``oof.npz`` aligned to ``split``'s row order.

    Checks that each fold's logits cover exactly that fold's validation ids, and that every
    id appears once. With all ``k`` folds present the OOF covers every training row; with
    fewer it is written for the covered rows and marked partial (``meta["complete"]``, in
    ``oof.json``). Both files are :mod:`ensembler.logits` files.

    Returns a dict with ``f1``, ``acc``, ``rows``, ``complete``, ``folds``.
    """
    ids_all = split.ids
    folds_all = split.folds
    position = {i: n for n, i in enumerate(ids_all)}
    done: dict[int, Logits] = {}
    for fold, d in sorted(_fold_dirs(fam_dir).items()):
        f = d / "val_logits.npz"
        if f.is_file():
            done[fold] = read_logits(f)  # LogitError naming the file
    if not done:
        raise EnsemblerError(f"no finished fold in {fam_dir}: nothing to assemble into OOF logits")
    num_classes = label_space.num_classes
    logits = np.full((len(ids_all), num_classes), np.nan, dtype=np.float32)
    seen = np.zeros(len(ids_all), dtype=np.int64)
    for fold, z in done.items():
        expected = set(ids_all[folds_all == fold].tolist())
        got = z.ids
        if set(got.tolist()) != expected or len(got) != len(expected):
            raise LogitError(
                f"{fam_dir / f'fold{fold}' / 'val_logits.npz'} does not hold exactly fold {fold}'s validation ids "
                f"({len(got)} ids vs {len(expected)} expected): the data or split changed; retrain that fold"
            )
        if z.logits.shape != (len(got), num_classes):
            raise LogitError(f"fold {fold} logits have shape {z.logits.shape}, expected ({len(got)}, {num_classes})")
        pos = np.fromiter((position[i] for i in got), dtype=np.int64, count=len(got))
        logits[pos] = z.logits
        seen[pos] += 1
    if (seen > 1).any():
        raise LogitError(f"id {ids_all[int(np.argmax(seen > 1))]!r} appears in two folds' validation logits")
    covered = seen == 1
    complete = bool(covered.all()) and len(done) == k
    ids = ids_all[covered]
    out_logits = logits[covered]
    labels = np.asarray(targets, dtype=np.int64)[covered]
    out_folds = folds_all[covered].astype(np.int64)
    if complete and not (len(ids) == len(ids_all) and len(set(ids.tolist())) == len(ids_all)):
        raise LogitError("OOF check failed: not every training id is covered exactly once")
    pred = out_logits.argmax(1)
    f1 = macro_f1(labels, pred, num_classes)
    acc = accuracy(labels, pred)
    meta = {
        "producer": family or fam_dir.name,
        "complete": complete,
        "folds": sorted(done),
        "k": k,
        "rows": int(covered.sum()),
        "total_rows": len(ids_all),
        "num_classes": num_classes,
        "logits": "joint logits (raw for flat heads, joint log-probs for factored heads)",
        "macro_f1": f1,
        "accuracy": acc,
    }
    write_logits(fam_dir / "oof.npz", Logits(ids, out_logits, label_space=label_space, labels=labels, folds=out_folds,
                                            meta=meta, name=family or fam_dir.name))
    return {"f1": f1, "acc": acc, "rows": int(covered.sum()), "complete": complete, "folds": sorted(done)}
