"""Where work runs: the executor protocol, one task's description, and the local executor.

An executor decides *where* a unit of work runs, never *what* runs: a training fold or an
inference shard is the same module-level function (or worker class) under every executor, so
a Ray run and a local run give the same numbers. Two shapes of work:

- **tasks** (:meth:`Executor.run_tasks`): independent calls ``fn(*args, report=...)`` that
  return a small picklable summary (a training fold writes its files and returns metrics);
  ``report(event)`` sends a progress event (a dict) to the driver as it happens;
- **shards** (:meth:`Executor.map_shards`): one worker object per process built once
  (``worker_cls(*init_args)``: it loads its checkpoints once), called on each shard of rows;
  results come back in shard order. :meth:`Executor.run_rows` cuts a table into such shards
  (locally: one shard, every row; on Ray: contiguous runs of whole batches) for inference.

The local executor runs everything in this process, one after the other. Ray lives in
:mod:`ensembler.executors.ray_executor` and is imported only when a Ray executor is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..names import EXECUTORS

__all__ = ["EXECUTORS", "Executor", "LocalExecutor", "Task", "no_report"]


@dataclass
class Task:
    """One independent unit of work.

    Parameters
    ----------
    key : str
        What the task is, for progress lines and errors (``"resnet18-flat fold 2"``).
    fn : callable
        A module-level function (picklable by reference) called as ``fn(*args, report=report)``;
        it returns a small picklable summary (no tensors).
    args : tuple
        Its arguments; values made by :meth:`Executor.share` are resolved before the call.
    """

    key: str
    fn: Callable[..., Any]
    args: tuple = ()
    meta: dict = field(default_factory=dict)  # the driver's bookkeeping (family, fold); not sent


def no_report(event: dict) -> None:
    """The ``report`` of a task nobody listens to."""


class Executor:
    """Runs :class:`Task` lists and shard maps; subclasses decide where."""

    name = "executor"

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def close(self) -> None:
        """Release what the executor started (a local Ray instance)."""

    def describe(self) -> str:
        return self.name

    def share(self, obj):
        """A handle to pass ``obj`` (a large table) to many tasks once; the object itself locally."""
        return obj

    def check_visible(self, paths: Sequence[str], what: str) -> None:
        """Every worker can read ``paths`` (local: trivially true)."""

    def run_tasks(self, tasks: Sequence[Task], *, on_result: Callable[[Task, Any], None],
                  on_event: Callable[[Task, dict], None] | None = None, on_start=None) -> None:
        """Run every task; ``on_result(task, result)`` on the driver as each one finishes.

        The first failure stops the run: tasks not yet finished are cancelled and the task's
        own error (an :class:`~ensembler.errors.EnsemblerError` naming its file or row) is
        raised. ``on_result`` is called in this process, so the driver alone writes shared
        state (the registry index).
        """
        raise NotImplementedError

    def map_shards(self, worker_cls, init_args: tuple, shards: Sequence[tuple], *,
                   on_done: Callable[[int, Any], None] | None = None) -> list:
        """``[worker.run(*shard) for shard in shards]`` with workers ``worker_cls(*init_args)``
        built once each; results in shard order. ``on_done(i, result)`` as each shard finishes."""
        raise NotImplementedError


class LocalExecutor(Executor):
    """Everything in this process, one task after the other (the default)."""

    name = "local"

    def run_tasks(self, tasks, *, on_result, on_event=None, on_start=None) -> None:
        for task in tasks:
            if on_start is not None:
                on_start(task)
            report = (lambda event, _t=task: on_event(_t, event)) if on_event is not None else no_report
            on_result(task, task.fn(*task.args, report=report))

    def map_shards(self, worker_cls, init_args, shards, *, on_done=None) -> list:
        worker = worker_cls(*init_args)
        out = []
        for i, shard in enumerate(shards):
            out.append(worker.run(*shard))
            if on_done is not None:
                on_done(i, out[-1])
        return out

    def run_rows(self, worker_cls, init_args: tuple, table, *, batch_size: int, advance=None) -> list:
        """``worker_cls(*init_args).run(rows, advance)`` over ``table``'s rows; the results of
        each shard of rows, in row order. Locally one shard: every row, in this process
        (``advance(n)`` after each batch)."""
        return [worker_cls(*init_args).run(table, advance)]
