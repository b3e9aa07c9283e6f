"""What a user sees while families train: one display on the driver, fed by progress events.

Every fold, local or on a Ray worker, sends small events (see
:class:`ensembler.train.fold_runner.EventCallbacks`); :class:`FoldBoard` shows them as they
arrive. Every finished epoch prints one line (fold, epoch, losses, validation macro-F1...). On a
terminal a live table below the lines shows each fold: queued, running where (host, GPU),
its epoch and batch, its last and best validation score, done. In a log file there is no live
table: a plain status line of the running folds every few seconds
(:func:`ensembler.progress.log_interval`) instead.
"""

from __future__ import annotations

import time

from ..progress import log_interval, make_console
from .loop import EpochRecord


class FoldBoard:
    """The driver's display of many folds at once (a context manager).

    Parameters
    ----------
    keys : list of str
        The folds to show, in order (``"resnet18-flat fold 0"``).
    console : rich Console, optional
        Default: stderr.
    interval : float, optional
        Seconds between status lines in a log file (default :func:`log_interval`).
    """

    def __init__(self, keys, console=None, interval: float | None = None):
        self.console = console or make_console(stderr=True)
        self.interval = log_interval() if interval is None else float(interval)
        self.rows = {k: {"status": "queued", "where": "", "epoch": "", "batch": "", "last": None, "best": None}
                     for k in keys}
        self._batches: dict[str, int] = {}
        self._live = None
        self._last_line = time.perf_counter()

    def __enter__(self):
        if self.console.is_terminal:
            from rich.live import Live

            self._live = Live(self._table(), console=self.console, refresh_per_second=4, transient=False)
            self._live.start()
        return self

    def __exit__(self, *exc) -> bool:
        if self._live is not None:
            self._live.update(self._table())
            self._live.stop()
            self._live = None
        return False

    # ------------------------------------------------------------------ events
    def note(self, text: str) -> None:
        self.console.print(text, highlight=False, soft_wrap=True)

    def started(self, key: str, where: str = "") -> None:
        row = self.rows[key]
        row["status"], row["where"] = "running", where
        self._changed()

    def event(self, key: str, event: dict) -> None:
        """One progress event of fold ``key`` (see EventCallbacks for the kinds)."""
        row = self.rows[key]
        kind = event.get("kind")
        if kind == "start":
            gpus = event.get("gpus") or []
            where = event.get("host", "") + (f" GPU {','.join(gpus)}" if gpus else "")
            if row["status"] == "running" and row["where"]:
                self.note(f"[yellow]{key}: started again on {where} (its worker died; resuming from its last epoch)[/]")
            self.started(key, where)
            return
        if kind == "epoch_start":
            row["epoch"] = f"{event['epoch']}/{event['epochs']}"
            self._batches[key] = int(event["train_batches"])
            row["batch"] = ""
        elif kind == "batch":
            if event.get("phase") == "val":
                row["batch"] = f"validating {event['batch']}"
            else:
                total = self._batches.get(key, 0)
                row["batch"] = f"{event['batch']}/{total}" + (f" loss {event['loss']:.4f}" if "loss" in event else "")
        elif kind == "epoch":
            record = EpochRecord(**event["record"])
            row["last"] = record.val_f1
            if event.get("is_best"):
                row["best"] = record.val_f1
            row["batch"] = ""
            self.note(format_epoch(key, record, bool(event.get("is_best"))))
        elif kind == "note":
            self.note(f"[yellow]note:[/] {key}: {event.get('text', '')}")
        self._changed()

    def finished(self, key: str, text: str, skipped: bool = False) -> None:
        row = self.rows[key]
        row["status"] = "earlier run" if skipped else "done"
        row["batch"] = ""
        self.note(f"{key}: {text}")
        self._changed()

    def failed(self, key: str) -> None:
        self.rows[key]["status"] = "failed"
        self._changed()

    # ------------------------------------------------------------------ drawing
    def _changed(self) -> None:
        if self._live is not None:
            self._live.update(self._table())
            return
        now = time.perf_counter()
        running = [k for k, r in self.rows.items() if r["status"] == "running"]
        if running and now - self._last_line >= self.interval:
            self._last_line = now
            parts = [f"{k} epoch {r['epoch'] or '-'} {r['batch']}".strip() for k, r in self.rows.items()
                     if r["status"] == "running"]
            done = sum(r["status"] in ("done", "earlier run") for r in self.rows.values())
            self.console.print(f"folds: {done}/{len(self.rows)} done; running: " + "; ".join(parts),
                               highlight=False, markup=False, soft_wrap=True)

    def _table(self):
        from rich.table import Table

        t = Table(box=None, pad_edge=False, show_edge=False)
        for col in ("fold", "status", "where", "epoch", "batch", "val F1", "best"):
            t.add_column(col, justify="right" if col in ("epoch", "val F1", "best") else "left")
        for key, r in self.rows.items():
            t.add_row(key, r["status"], r["where"], r["epoch"], r["batch"],
                      "" if r["last"] is None else f"{r['last']:.4f}",
                      "" if r["best"] is None else f"{r['best']:.4f}")
        return t


def format_epoch(fold, r: EpochRecord, is_best: bool) -> str:
    """One-line epoch summary, e.g. ``fold 0 epoch 3  train_loss 0.41  val_loss 0.52  val_f1 0.861 ...``.

    ``fold`` is a fold number or a fold's name (``"resnet18-flat fold 0"``).
    """
    star = "  [green]* best[/]" if is_best else ""
    name = f"fold {fold}" if isinstance(fold, int) else str(fold)
    return (f"{name} epoch {r.epoch:>3}  train_loss {r.train_loss:.4f}  val_loss {r.val_loss:.4f}  "
            f"val_f1 {r.val_f1:.4f}  val_acc {r.val_acc:.4f}  lr {r.lr:.2e}  {r.seconds:.1f}s{star}")
