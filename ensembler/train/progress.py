"""What a user sees while a family trains: a rich progress bar and one line per epoch."""

from __future__ import annotations

from .loop import Callbacks, EpochRecord


class RichProgress(Callbacks):
    """Progress bar (fold, epoch, batches, ETA, running loss) and a summary line per epoch.

    Use as a context manager around the whole run; :meth:`set_fold` before each fold.
    """

    def __init__(self, console=None, total_folds: int = 1):
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("batches"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[loss]}"),
            console=self.console,
            transient=False,
        )
        self.total_folds = total_folds
        self.fold = 0
        self.fold_number = 0
        self._task = None
        self._phase_total = 0

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()
        return False

    def set_fold(self, fold: int, number: int) -> None:
        self.fold, self.fold_number = fold, number

    def note(self, text: str) -> None:
        self.progress.console.print(text, highlight=False)

    def on_epoch_start(self, epoch: int, epochs: int, train_batches: int, val_batches: int) -> None:
        desc = f"fold {self.fold} ({self.fold_number}/{self.total_folds}) epoch {epoch}/{epochs}"
        if self._task is not None:
            self.progress.remove_task(self._task)
        self._train_batches = train_batches
        self._task = self.progress.add_task(desc, total=train_batches + val_batches, loss="")

    def on_train_batch(self, batch: int, running_loss: float) -> None:
        self.progress.update(self._task, completed=batch, loss=f"loss {running_loss:.4f}")

    def on_val_batch(self, batch: int) -> None:
        self.progress.update(self._task, completed=self._train_batches + batch)

    def on_epoch_end(self, record: EpochRecord, is_best: bool) -> None:
        if self._task is not None:
            self.progress.remove_task(self._task)
            self._task = None
        self.note(format_epoch(self.fold, record, is_best))


def format_epoch(fold: int, r: EpochRecord, is_best: bool) -> str:
    """One-line epoch summary, e.g. ``fold 0 epoch 3  train 0.41  val 0.52  F1 0.861 ...``."""
    star = "  [green]* best[/]" if is_best else ""
    return (f"fold {fold} epoch {r.epoch:>3}  train_loss {r.train_loss:.4f}  val_loss {r.val_loss:.4f}  "
            f"val_f1 {r.val_f1:.4f}  val_acc {r.val_acc:.4f}  lr {r.lr:.2e}  {r.seconds:.1f}s{star}")
