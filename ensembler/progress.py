"""Progress and tables that read well in a terminal *and* in a log file.

A rich live bar is right for a terminal and useless in a file (``nohup``, CI, ``> log.txt``):
rich draws nothing until the end there, and a console that believes it is 80 columns wide
squeezes table columns to nothing. So:

- :func:`make_console` gives a console that, when its stream is not a terminal, is
  :data:`LOG_WIDTH` columns wide (a file has no width to fit), so no column is cut;
- :class:`Ticker` is one progress line source for both: a rich bar on a terminal; on anything
  else a plain line every :func:`log_interval` seconds (``ENSEMBLER_PROGRESS_INTERVAL``,
  default 30) and one when the work is done.

Examples
--------
>>> import io
>>> from rich.console import Console
>>> con = Console(file=io.StringIO(), width=80)          # not a terminal
>>> with Ticker("inference", total=4, unit="images", console=con, interval=0) as tick:
...     tick.advance(2); tick.advance(2)
>>> print(con.file.getvalue().splitlines()[-1].split(",")[0])
inference: 4/4 images (100%)
"""

from __future__ import annotations

import os
import time

#: Width of a console whose output is not a terminal (a file has no width to fit).
LOG_WIDTH = 200


def log_interval() -> float:
    """Seconds between progress lines in a log file (``ENSEMBLER_PROGRESS_INTERVAL``, default 30)."""
    try:
        return max(0.0, float(os.environ.get("ENSEMBLER_PROGRESS_INTERVAL", "30")))
    except ValueError:
        return 30.0


def make_console(stderr: bool = False):
    """A rich Console for stdout (or stderr); :data:`LOG_WIDTH` wide when not a terminal."""
    from rich.console import Console

    con = Console(stderr=stderr)
    if not con.is_terminal:
        con = Console(stderr=stderr, width=max(LOG_WIDTH, con.width))
    return con


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}" if seconds >= 60 else f"{seconds} s"


class Ticker:
    """Progress over ``total`` units: a rich bar on a terminal, timed plain lines elsewhere.

    Parameters
    ----------
    description : str
        What is running (``"fold 0 (1/3) epoch 2/4"``, ``"inference"``).
    total : int
    unit : str
        Shown after the counts in plain lines (``"batches"``, ``"images"``).
    console : rich Console, optional
        Default: stderr.
    interval : float, optional
        Seconds between plain lines (default :func:`log_interval`).
    enabled : bool
        ``False``: a no-op (``progress=False`` in the API).

    Use as a context manager; :meth:`advance` or :meth:`update` as work completes,
    :meth:`set_info` for a short trailing text (a running loss).
    """

    def __init__(self, description: str, total: int, *, unit: str = "", console=None, interval: float | None = None,
                 enabled: bool = True):
        self.description, self.total, self.unit = description, int(total), unit
        self.enabled = enabled
        self.interval = log_interval() if interval is None else float(interval)
        self.console = console
        self.completed = 0
        self.info = ""
        self._bar = self._task = None
        self._start = self._last_line = 0.0

    def __enter__(self) -> "Ticker":
        if not self.enabled:
            return self
        if self.console is None:
            self.console = make_console(stderr=True)
        self._start = self._last_line = time.perf_counter()
        if self.console.is_terminal:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn(self.unit), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                 TextColumn("{task.fields[info]}"), console=self.console, transient=True)
            self._bar.start()
            self._task = self._bar.add_task(self.description, total=self.total, info="")
        return self

    def __exit__(self, *exc) -> bool:
        if not self.enabled:
            return False
        if self._bar is not None:
            self._bar.stop()
        elif exc[0] is None and self.completed and self.completed < self.total:
            self._line()
        return False

    def set_info(self, info: str) -> None:
        self.info = info

    def advance(self, n: int = 1) -> None:
        self.update(self.completed + n)

    def update(self, completed: int) -> None:
        if not self.enabled:
            return
        self.completed = int(completed)
        if self._bar is not None:
            self._bar.update(self._task, completed=self.completed, info=self.info)
            return
        now = time.perf_counter()
        if self.completed >= self.total or now - self._last_line >= self.interval:
            self._line(now)

    def _line(self, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        self._last_line = now
        elapsed = now - self._start
        done = min(self.completed, self.total)
        pct = 100.0 * done / self.total if self.total else 100.0
        text = f"{self.description}: {done}/{self.total} {self.unit} ({pct:.0f}%)".replace("  ", " ")
        text += f", {_clock(elapsed)} elapsed"
        if 0 < done < self.total:
            text += f", ETA {_clock(elapsed * (self.total - done) / done)}"
        if self.info:
            text += f", {self.info}"
        self.console.print(text, highlight=False, markup=False, soft_wrap=True)
