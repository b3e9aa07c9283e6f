"""Where folds and inference shards run: ``local`` (this process) or ``ray`` (a Ray cluster).

An executor decides where a unit of work runs, never what runs (see :mod:`.base`). Importing
this package does not import Ray; building a :class:`RayExecutor` does.
"""

from ..errors import EnsemblerError
from .base import EXECUTORS, Executor, LocalExecutor, Task, no_report
from .ray_executor import RayExecutor

__all__ = ["EXECUTORS", "Executor", "LocalExecutor", "RayExecutor", "Task", "make_executor", "no_report", "run_rows",
           "workers_device"]


def make_executor(name: str | Executor | None = "local", **options) -> Executor:
    """The executor called ``name`` (``"local"`` or ``"ray"``), or ``name`` itself when it
    already is one. ``options`` go to :class:`~ensembler.executors.RayExecutor`
    (``address``, ``gpus_per_task``, ``cpus_per_task``, ``max_retries``, ``workers``).

    Examples
    --------
    >>> make_executor("local").name
    'local'
    >>> make_executor("dask")
    Traceback (most recent call last):
    ...
    ensembler.errors.EnsemblerError: --executor 'dask': choose local or ray
    """
    if isinstance(name, Executor):
        return name
    if name in (None, "local"):
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(**options)
    raise EnsemblerError(f"--executor {name!r}: choose {' or '.join(EXECUTORS)}")


def run_rows(executor, worker_cls, init_args: tuple, table, *, batch_size: int, advance=None) -> list:
    """:meth:`Executor.run_rows` on ``executor`` (an Executor, ``"local"``/``None`` or ``"ray"``:
    a Ray executor built for this call and closed after it)."""
    if isinstance(executor, Executor):
        return executor.run_rows(worker_cls, init_args, table, batch_size=batch_size, advance=advance)
    with make_executor(executor, unit="worker") as ex:
        return ex.run_rows(worker_cls, init_args, table, batch_size=batch_size, advance=advance)


def workers_device(executor, asked, resolved):
    """The device a worker is told to use: on Ray what the user asked (``None``: each worker takes
    its own GPU when Ray gave it one, else its CPU), locally the device this process resolved."""
    ray = executor == "ray" or isinstance(executor, RayExecutor)
    return asked if ray else resolved
