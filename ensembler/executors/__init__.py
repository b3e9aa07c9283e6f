"""Where folds and inference shards run: ``local`` (this process) or ``ray`` (a Ray cluster).

An executor decides where a unit of work runs, never what runs (see :mod:`.base`). Importing
this package does not import Ray; building a :class:`RayExecutor` does.
"""

from ..errors import EnsemblerError
from .base import EXECUTORS, Executor, LocalExecutor, Task, no_report
from .ray_executor import RayExecutor

__all__ = ["EXECUTORS", "Executor", "LocalExecutor", "RayExecutor", "Task", "make_executor", "no_report"]


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
