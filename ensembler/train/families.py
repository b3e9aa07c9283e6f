"""Train families on an executor: ``train_folds`` (one family) and ``train_families`` (several).

The driver (this process) checks everything first, then hands each fold to the executor as one
task, :func:`~ensembler.train.fold_runner.train_fold_job`: the same function locally and on a
Ray worker. A worker writes its fold's files under the registry root and returns numbers; the
driver alone records registry entries (under the registry lock), rewrites the curves and, once
a family's folds are in, assembles its OOF logits. So ``k x archs`` folds share a cluster and the
numbers do not depend on where a fold ran.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Sequence

from ..errors import EnsemblerError
from ..executors import Executor, LocalExecutor, Task, make_executor
from .config import TrainConfig
from .folds import (FamilyResult, assemble_oof, check_or_write_run, family_entries, family_lock, nothing_to_resume,
                    resolve_family, training_targets, write_curves)
from .fold_runner import FoldJob, TrainedFold, train_fold_job


class _Family:
    """The driver's bookkeeping of one family in a run."""

    def __init__(self, job: FoldJob, folds: list[int]):
        self.job, self.folds = job, folds
        self.fam_dir = Path(job.runner().fam_dir)
        self.summaries: dict[int, object] = {}
        self.current: dict[int, tuple[list, int]] = {}  # histories of folds in training (curves)
        self.fresh = False                                # its folder did not exist before this run


def train_folds(table, config: TrainConfig, registry, progress: bool = True, *, resume: bool = False,
                console=None, executor: str | Executor | None = None) -> FamilyResult:
    """Train ``config.arch`` on the folds of ``table``; register each fold; write OOF logits.

    Parameters
    ----------
    table : SampleTable
        Labeled training data. It is split with ``split_folds(table, config.k, config.seed)``
        (person-grouped, stratified); an existing ``fold`` column is replaced.
    config : TrainConfig
    registry : Registry
    progress : bool
        Show the progress display (``False`` in tests and scripts).
    resume : bool
        Continue the family's interrupted run: finished folds are skipped, an unfinished fold
        continues from its last saved epoch (whichever executor ran it).
    console : rich Console, optional
        Where progress goes (default stderr).
    executor : "local", "ray" or an Executor, optional
        Where the folds run (default: this process, one after the other); see
        :func:`train_families`.

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
    return train_families(table, [config], registry, progress=progress, resume=resume, console=console,
                          executor=executor)[0]


def train_families(table, configs: Sequence[TrainConfig], registry, *, executor: str | Executor | None = None,
                   progress: bool = True, resume: bool = False, console=None) -> list[FamilyResult]:
    """Train several families (one per config, e.g. one per architecture) with their folds as
    tasks of one executor, so that ``k x len(configs)`` folds share the machines.

    Every config is validated, split, named and checked (pretrained weights, stale resume
    states, for Ray: the registry folder and the images visible on every node) before any fold
    trains. The first failing fold cancels the others and its error is raised, naming the
    family and fold; folds that finished before it stay registered (``resume=True`` continues).

    Returns
    -------
    list of FamilyResult
        In the order of ``configs``.
    """
    from rich.markup import escape

    from ..data import split_folds, warn_identical_images
    from ..models import check_arch, head_num_outputs

    if isinstance(configs, TrainConfig):
        configs = [configs]
    if not configs:
        raise EnsemblerError("no training configuration given")
    owned = not isinstance(executor, Executor)
    families: list[_Family] = []
    names: set[str] = set()
    explicit = [c.family for c in configs if c.family]
    for config in configs:
        config.validate()
        label_space, targets = training_targets(table, config.target)
        check_arch(config.arch)
        head_num_outputs(label_space, config.head)  # a factored head on a flat space fails here, named
        if explicit.count(config.family) > 1:
            raise EnsemblerError(f"two of the runs would both be family {config.family!r}: give each its own --family")
    warn_identical_images(table, stacklevel=3)  # byte-identical copies across groups would leak between folds
    ex = make_executor(executor or "local")
    try:
        for config in configs:
            label_space, targets = training_targets(table, config.target)
            split = split_folds(table, config.k, config.seed)
            family = resolve_family(registry, config, resume)
            while family in names:  # two default-named runs of one call (same arch, other settings)
                if config.family or resume:
                    raise EnsemblerError(f"two of the runs would both be family {family!r}: give each its own --family")
                base, _, n = family.rpartition("-")
                family = f"{base}-{int(n) + 1}" if n.isdigit() and base else f"{family}-2"
            names.add(family)
            job = FoldJob(split, targets, label_space, config, str(registry.root), family, resume)
            runner = job.runner()
            wanted = config.folds if config.folds is not None else list(range(config.k))
            fam = _Family(job, [])
            for fold in wanted:
                done = runner.finished_summary(fold) if resume else None
                if done is not None:
                    fam.summaries[fold] = done
                else:
                    fam.folds.append(fold)
            runner.check_fresh(fam.folds)
            runner.prepare(fam.folds)  # pretrained weights missing -> clean error, nothing written yet
            families.append(fam)
        with contextlib.ExitStack() as locks:
            for fam in families:  # one trainer per family, across processes
                fam.fresh = not fam.fam_dir.exists()
                locks.enter_context(family_lock(fam.fam_dir, fam.job.family))
                if not resume and (fam.fam_dir / "run.json").is_file():  # another process started it meanwhile
                    raise EnsemblerError(f"family {fam.job.family!r} already exists in the registry: pass --resume "
                                         "to continue it, or choose another --family")
            try:
                for fam in families:  # every run checked: now the families exist on disk
                    job = fam.job
                    check_or_write_run(fam.fam_dir / "run.json", job.config, job.split, job.label_space, resume)
                if not isinstance(ex, LocalExecutor):
                    ex.check_visible([str(registry.root)], f"the registry folder {registry.root}")
                    ex.check_visible([str(table.paths[0])], f"the images (e.g. {table.paths[0]})")
                _run(families, ex, progress=progress, console=console, escape=escape)
                return [_finish(fam, registry) for fam in families]
            except EnsemblerError as exc:
                _drop_empty(families, registry, resume, exc)
                raise
    finally:
        if owned:
            ex.close()


def _drop_empty(families: list[_Family], registry, resume: bool, exc: EnsemblerError) -> None:
    """A fresh family that failed before any fold finished or saved a resumable epoch (a full disk,
    a diverged loss) leaves nothing behind: no run.json blocking the same command."""
    dropped = []
    for fam in families:
        if fam.fresh and not resume and nothing_to_resume(registry, fam.job.family, fam.fam_dir):
            shutil.rmtree(fam.fam_dir, ignore_errors=True)
            dropped.append(fam.job.family)
    if dropped:
        names = ", ".join(repr(n) for n in dropped)
        exc.args = (f"{exc} (nothing of family {names} was kept)", *exc.args[1:])


def _run(families: list[_Family], ex: Executor, *, progress: bool, console, escape) -> None:
    from .progress import FoldBoard

    tasks = []
    for fam in families:
        shared = ex.share(fam.job) if fam.folds else None
        tasks += [Task(key=f"{fam.job.family} fold {f}", fn=train_fold_job, args=(shared, f), meta={"family": fam, "fold": f})
                  for f in fam.folds]
    keys = [f"{fam.job.family} fold {f}" for fam in families for f in sorted(set(fam.folds) | set(fam.summaries))]
    board = FoldBoard(keys, console=console) if progress else None

    def on_event(task: Task, event: dict) -> None:
        fam, fold = task.meta["family"], task.meta["fold"]
        if event.get("kind") == "saved":
            fam.current[fold] = (event["history"], event["best_epoch"])
            write_curves(fam.fam_dir, fam.job.config, current=fam.current)
        if board is not None:
            board.event(task.key, event)

    def on_start(task: Task) -> None:
        if board is not None and isinstance(ex, LocalExecutor):
            board.started(task.key, "this process")

    def on_result(task: Task, trained: TrainedFold) -> None:
        fam, fold = task.meta["family"], task.meta["fold"]
        summary = fam.job.runner().register(trained)  # the driver alone writes the index
        fam.summaries[fold] = summary
        fam.current.pop(fold, None)
        write_curves(fam.fam_dir, fam.job.config, current=fam.current)
        if board is not None:
            board.finished(task.key, f"best epoch {summary.best_epoch}, val macro-F1 {summary.val_f1:.4f}, "
                                     f"registered {summary.entry_id}")

    if board is not None:
        board.__enter__()
    try:
        if board is not None:
            board.note(f"[bold]train-folds[/] on {escape(ex.describe())}: {len(tasks)} fold(s) of "
                       f"{len(families)} famil{'y' if len(families) == 1 else 'ies'}")
            for fam in families:
                runner = fam.job.runner()
                board.note(f"[bold]{fam.job.family}[/]: {escape(fam.job.config.describe(runner.augment))}")
                for note in runner.notes:
                    board.note(f"[yellow]note:[/] {note}")
                for fold, s in sorted(fam.summaries.items()):
                    board.finished(f"{fam.job.family} fold {fold}", f"finished earlier ({s.entry_id}), skipped",
                                   skipped=True)
        ex.run_tasks(tasks, on_result=on_result, on_event=on_event, on_start=on_start)
    finally:
        if board is not None:
            board.__exit__(None, None, None)


def _finish(fam: _Family, registry) -> FamilyResult:
    job, config = fam.job, fam.job.config
    family, split = job.family, job.split
    oof = assemble_oof(split, job.targets, job.label_space, fam.fam_dir, config.k, family=family, split_seed=config.seed)
    for entry in family_entries(registry, family):
        registry.update(entry.id, oof=f"{family}/oof.npz")
    metrics_csv, curves_png = write_curves(fam.fam_dir, config)
    runner = job.runner()
    notes = list(runner.notes)
    if not oof["complete"]:
        notes.append(
            f"OOF is partial: folds {oof['folds']} of {config.k} are trained, covering {oof['rows']} of "
            f"{len(split)} training rows; train the rest with --folds and --resume --family {family}"
        )
    return FamilyResult(
        family=family, folds=[fam.summaries[f] for f in sorted(fam.summaries)], oof_path=fam.fam_dir / "oof.npz",
        oof_f1=oof["f1"], oof_acc=oof["acc"], oof_complete=oof["complete"], oof_rows=oof["rows"],
        total_rows=len(split), metrics_csv=metrics_csv, curves_png=curves_png, table=split,
        label_space=job.label_space, config=config, notes=notes,
    )
