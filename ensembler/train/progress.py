"""What a user sees while a family trains: a progress line per epoch and one summary line per epoch.

On a terminal the progress is a rich bar (fold, epoch, batches, ETA, running loss); in a log
file it is a plain line every few seconds (:class:`ensembler.progress.Ticker`), so a long
epoch shows it is alive and how far it got.
"""

from __future__ import annotations

from ..progress import Ticker, make_console
from .loop import Callbacks, EpochRecord


class RichProgress(Callbacks):
    """Per-epoch progress (a bar, or timed lines in a log file) and a summary line per epoch.

    Use as a context manager around the whole run; :meth:`set_fold` before each fold.
    """

    def __init__(self, console=None, total_folds: int = 1, interval: float | None = None):
        self.console = console or make_console(stderr=True)
        self.total_folds = total_folds
        self.interval = interval
        self.fold = 0
        self.fold_number = 0
        self._tick: Ticker | None = None
        self._train_batches = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._close(*exc)
        return False

    def _close(self, *exc) -> None:
        if self._tick is not None:
            self._tick.__exit__(*(exc or (None, None, None)))
            self._tick = None

    def set_fold(self, fold: int, number: int) -> None:
        self.fold, self.fold_number = fold, number

    def note(self, text: str) -> None:
        self.console.print(text, highlight=False)

    def on_epoch_start(self, epoch: int, epochs: int, train_batches: int, val_batches: int) -> None:
        self._close()
        desc = f"fold {self.fold} ({self.fold_number}/{self.total_folds}) epoch {epoch}/{epochs}"
        self._train_batches = train_batches
        self._tick = Ticker(desc, total=train_batches + val_batches, unit="batches", console=self.console,
                            interval=self.interval).__enter__()

    def on_train_batch(self, batch: int, running_loss: float) -> None:
        if self._tick is not None:
            self._tick.set_info(f"train loss {running_loss:.4f}")
            self._tick.update(batch)

    def on_val_batch(self, batch: int) -> None:
        if self._tick is not None:
            self._tick.set_info("validating")
            self._tick.update(self._train_batches + batch)

    def on_epoch_end(self, record: EpochRecord, is_best: bool) -> None:
        self._close()
        self.note(format_epoch(self.fold, record, is_best))


def format_epoch(fold: int, r: EpochRecord, is_best: bool) -> str:
    """One-line epoch summary, e.g. ``fold 0 epoch 3  train 0.41  val 0.52  F1 0.861 ...``."""
    star = "  [green]* best[/]" if is_best else ""
    return (f"fold {fold} epoch {r.epoch:>3}  train_loss {r.train_loss:.4f}  val_loss {r.val_loss:.4f}  "
            f"val_f1 {r.val_f1:.4f}  val_acc {r.val_acc:.4f}  lr {r.lr:.2e}  {r.seconds:.1f}s{star}")
