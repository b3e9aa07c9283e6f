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
from .fold_runner import FoldSummary


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
    space and each row's index in that factor. ``target="gender,age"``: the product of those
    factors (factored, :meth:`LabelSpace.factors_space`) and each row's index in it.
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
    wanted = [t.strip() for t in str(target).split(",")]
    unknown = [t for t in wanted if t not in names]
    if unknown:
        raise DataError(f"--target {target}: {table.describe()} has factors {names}")
    sub = space.factors_space(wanted)
    if len(wanted) == 1:
        return sub, np.asarray(space.factor_indices(labels)[names.index(wanted[0])], dtype=np.int64)
    per = space.factor_indices(labels)
    chosen = [f.name for f in sub.factors]
    idx = tuple(np.asarray(per[names.index(f)]) for f in chosen)
    return sub, np.ravel_multi_index(idx, sub.factor_sizes).astype(np.int64)


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


def check_or_write_run(path: Path, config: TrainConfig, table, label_space: LabelSpace, resume: bool) -> None:
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


# ---------------------------------------------------------------------------- one trainer per family
def family_lock(fam_dir: Path, family: str):
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


def nothing_to_resume(registry, family: str, fam_dir: Path) -> bool:
    """No registered fold and no saved epoch (``state.pt``): a failed run that can only restart."""
    from .state import STATE_NAME

    return not family_entries(registry, family) and not any(fam_dir.glob(f"fold*/{STATE_NAME}"))


def family_entries(registry, family: str) -> list:
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


def write_curves(fam_dir: Path, config: TrainConfig, current: dict | None = None) -> tuple[Path, Path]:
    """Rewrite metrics.csv and the PNG; ``current`` = {fold: (history, best_epoch)} of folds in training."""
    histories, best = load_histories(fam_dir)
    for fold, (history, best_epoch) in (current or {}).items():
        histories[fold], best[fold] = history, best_epoch
    csv = write_metrics_csv(fam_dir / "metrics.csv", histories)
    png = plot_learning_curves(fam_dir / "learning_curves.png", histories, best, monitor=config.monitor,
                               title=f"{fam_dir.name} ({config.arch}, {config.head} head)")
    return csv, png


# ---------------------------------------------------------------------------- OOF
def assemble_oof(split, targets: np.ndarray, label_space: LabelSpace, fam_dir: Path, k: int,
                 family: str | None = None, split_seed: int | None = None) -> dict[str, Any]:
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
        "split_seed": split_seed,
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
