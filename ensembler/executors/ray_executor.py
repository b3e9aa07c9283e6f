"""The Ray executor: tasks (training folds) and actor-held shards (inference) on a Ray cluster.

``ray`` is imported inside these functions only, when a :class:`RayExecutor` is built: nothing
else in ensembler imports it (``pip install "ensembler[ray]"``).

- Each task is one Ray task with ``max_calls=1`` (its worker process exits afterwards, so a GPU
  and its memory are released), ``num_gpus``/``num_cpus`` per task, ``max_retries`` for a
  worker that dies (killed, out of memory, node lost) and no retry of an error the task raised
  itself (a corrupt image fails the same way twice).
- Progress events travel through one small actor the driver drains while it waits.
- The first failure cancels every other task (``ray.cancel(force=True)``) and waits for them
  to stop before the task's own error is raised, unwrapped from ``RayTaskError``: the user
  reads the :class:`~ensembler.errors.EnsemblerError` naming the file or row, not a wall of
  Ray traceback. Ctrl-C cancels the same way.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

from ..errors import EnsemblerError
from .base import Executor, Task

# How long the driver waits for cancelled tasks to stop before it raises.
CANCEL_WAIT_S = 30.0


def import_ray():
    """``ray``, or an EnsemblerError saying how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise EnsemblerError('--executor ray needs Ray: pip install "ensembler[ray]" (or pip install ray)') from exc
    return ray


def _check_count(value, flag: str, minimum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        raise EnsemblerError(f"{flag} must be a number >= {minimum:g}, got {value!r}")
    return value


class RayExecutor(Executor):
    """Runs tasks and shards on a Ray cluster.

    Parameters
    ----------
    address : str, optional
        ``None``: the cluster named by ``$RAY_ADDRESS``, else a Ray instance started on this
        machine for the run (and stopped after it); ``"auto"``: the running cluster of this
        machine (``ray start --head``); ``"HOST:PORT"``: that cluster's head.
    gpus_per_task : float
        GPUs each fold or inference worker holds (``--gpus-per-fold``; fractions share a GPU).
    cpus_per_task : float
        CPUs each holds (``--cpus-per-fold``); a worker computes with that many torch threads
        (at least one), whatever ``OMP_NUM_THREADS`` the cluster's environment passed down.
    max_retries : int
        Times a task whose worker died is run again (it resumes from its last saved epoch).
    workers : int, optional
        Inference actors (default: as many as the cluster's GPUs, or CPUs, allow).
    init_options : dict, optional
        Extra ``ray.init`` arguments when the instance is started here (``num_cpus``...).
    """

    name = "ray"

    def __init__(self, address: str | None = None, *, gpus_per_task: float | None = None, cpus_per_task: float = 1,
                 max_retries: int = 1, workers: int | None = None, init_options: dict | None = None,
                 unit: str = "fold"):
        self.unit = unit
        if gpus_per_task is not None:
            _check_count(gpus_per_task, f"--gpus-per-{unit}", 0)
        self.cpus = _check_count(cpus_per_task, f"--cpus-per-{unit}", 0)
        self.max_retries = int(_check_count(max_retries, "--max-retries", 0))
        self.workers = None if workers is None else int(_check_count(workers, "--ray-workers", 1))
        if self.max_retries != max_retries:
            raise EnsemblerError(f"--max-retries must be a whole number, got {max_retries!r}")
        ray = import_ray()
        self._owns = False
        if not ray.is_initialized():
            opts = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
            opts.update(init_options or {})
            try:
                ray.init(address=address, **opts)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                raise EnsemblerError(f"--ray-address {address or '(none)'}: cannot reach a Ray cluster: {exc}") from exc
            self._owns = True
        resources = ray.cluster_resources()
        self.cluster_gpus = float(resources.get("GPU", 0))
        self.cluster_cpus = float(resources.get("CPU", 0))
        # Default: one GPU per task when the cluster has GPUs (what a fold wants), else none.
        self.gpus = float(gpus_per_task) if gpus_per_task is not None else (1.0 if self.cluster_gpus >= 1 else 0.0)
        if self.gpus > self.cluster_gpus:
            self.close()
            raise EnsemblerError(f"--gpus-per-{unit} {self.gpus:g}: the Ray cluster has {self.cluster_gpus:g} GPUs")
        if self.cpus > self.cluster_cpus:
            self.close()
            raise EnsemblerError(f"--cpus-per-{unit} {self.cpus:g}: the Ray cluster has {self.cluster_cpus:g} CPUs")

    @property
    def threads(self) -> int:
        """Torch threads of each task or inference worker: its CPUs, at least one."""
        return max(1, int(self.cpus))

    def close(self) -> None:
        if self._owns:
            import ray

            ray.shutdown()
            self._owns = False

    def describe(self) -> str:
        return (f"ray ({self.cluster_cpus:g} CPUs, {self.cluster_gpus:g} GPUs; per task {self.cpus:g} CPU, "
                f"{self.gpus:g} GPU, max_retries {self.max_retries})")

    def share(self, obj):
        import ray

        return ray.put(obj)

    # ------------------------------------------------------------------ visibility
    def check_visible(self, paths: Sequence[str], what: str) -> None:
        """Every alive node sees ``paths`` (folders get a probe file with a fresh token, so a
        same-named local folder on a worker is not mistaken for the shared one)."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        probes: dict[str, str | None] = {}
        written = []
        for p in paths:
            p = Path(p)
            if p.is_dir():
                token = uuid.uuid4().hex
                probe = p / f".ensembler-probe-{token}"
                probe.write_text(token)
                written.append(probe)
                probes[str(probe)] = token
            else:
                probes[str(p)] = None
        try:
            probe_fn = ray.remote(num_cpus=0, max_calls=1)(probe_paths)
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            refs = {probe_fn.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                    .remote(probes): n for n in nodes}
            for ref, node in refs.items():
                host, problems = ray.get(ref)
                if problems:
                    raise EnsemblerError(
                        f"{what} is not visible on Ray node {node.get('NodeManagerAddress', host)} ({host}): "
                        f"{problems[0]}; every node must see the same files at the same path (a shared "
                        f"filesystem: NFS, a mounted bucket)")
        finally:
            for probe in written:
                probe.unlink(missing_ok=True)

    # ------------------------------------------------------------------ tasks
    def run_tasks(self, tasks, *, on_result, on_event=None, on_start=None) -> None:
        import ray

        tasks = list(tasks)
        if not tasks:
            return
        sink = ray.remote(num_cpus=0)(EventSink).remote()
        # max_calls=1: the worker process exits after its fold, so its GPU memory is released.
        remote = ray.remote(max_calls=1)(remote_call)
        refs: dict[Any, Task] = {}
        try:
            for i, task in enumerate(tasks):
                opts = dict(num_cpus=self.cpus, num_gpus=self.gpus, max_retries=self.max_retries,
                            retry_exceptions=False, name=task.key.replace(" ", "_"))
                refs[remote.options(**opts).remote(task.fn, *task.args, report=SinkReport(sink, i),
                                                   threads=self.threads)] = task
            pending = list(refs)
            while pending:
                done, pending = ray.wait(pending, num_returns=1, timeout=0.25)
                self._drain(sink, tasks, on_event, on_start)
                for ref in done:
                    task = refs[ref]
                    try:
                        result = ray.get(ref)
                    except Exception as exc:  # noqa: BLE001 - unwrapped below
                        raise unwrap_error(exc, task, self.max_retries) from None
                    on_result(task, result)
        except BaseException:
            self._cancel([r for r in refs])
            raise
        finally:
            ray.kill(sink)

    def _drain(self, sink, tasks, on_event, on_start) -> None:
        import ray

        for index, event in ray.get(sink.drain.remote()):
            task = tasks[index]
            if event.get("kind") == "start" and on_start is not None:
                on_start(task)
            if on_event is not None:
                on_event(task, event)

    def _cancel(self, refs) -> None:
        import ray

        for ref in refs:
            try:
                ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - already finished
                pass
        # Wait until they are gone: nothing keeps writing files after the driver reports.
        ray.wait(list(refs), num_returns=len(refs), timeout=CANCEL_WAIT_S)

    # ------------------------------------------------------------------ shards
    def actor_count(self, shards: int) -> int:
        if self.workers is not None:
            n = self.workers
        elif self.gpus > 0:
            n = int(self.cluster_gpus // self.gpus)
        else:
            n = int(self.cluster_cpus // max(self.cpus, 1))
        return max(1, min(n, shards))

    def run_rows(self, worker_cls, init_args, table, *, batch_size: int, advance=None) -> list:
        """``table``'s rows cut into contiguous shards of whole batches (each shard's batches are
        the local run's, so the numbers are too), run by actors that each build
        ``worker_cls(*init_args)`` once; shard results in row order. ``advance(n)`` as each
        shard of ``n`` rows is done."""
        shards = row_shards(len(table), batch_size, self.actor_count(-(-len(table) // max(batch_size, 1))))
        subs = [table.subset(rows) for rows in shards]
        if advance is None:
            return self.map_shards(worker_cls, init_args, [(sub,) for sub in subs])
        import ray

        # Each worker reports its batches to one sink the driver drains while it waits, so the
        # progress bar moves batch by batch; a finished shard counts whatever did not arrive.
        sink = ray.remote(num_cpus=0)(EventSink).remote()
        counted, closed = [0] * len(subs), set()

        def drain() -> None:
            for i, n in ray.get(sink.drain.remote()):
                if i not in closed:
                    counted[i] += n
                    advance(n)

        def done(i, _result) -> None:
            drain()
            closed.add(i)
            if len(subs[i]) > counted[i]:
                advance(len(subs[i]) - counted[i])

        try:
            return self.map_shards(worker_cls, init_args, [(sub, RowsReport(sink, i)) for i, sub in enumerate(subs)],
                                   on_done=done, on_wait=drain)
        finally:
            ray.kill(sink)

    def map_shards(self, worker_cls, init_args, shards, *, on_done=None, on_wait=None) -> list:
        """See :meth:`Executor.map_shards`; ``on_wait()`` is called about every 0.25 s while shards run."""
        import ray

        shards = list(shards)
        if not shards:
            return []
        actor_cls = ray.remote(num_cpus=self.cpus, num_gpus=self.gpus, max_restarts=self.max_retries,
                               max_task_retries=self.max_retries)(ShardActor)
        actors = [actor_cls.remote(worker_cls, init_args, self.threads) for _ in range(self.actor_count(len(shards)))]
        results: list = [None] * len(shards)
        todo = list(range(len(shards)))
        running: dict[Any, tuple[int, Any]] = {}
        key = Task(key=f"inference ({worker_cls.__name__})", fn=worker_cls)
        try:
            for actor in actors:
                if todo:
                    i = todo.pop(0)
                    running[actor.run.remote(*shards[i])] = (i, actor)
            while running:
                done, _ = ray.wait(list(running), num_returns=1, timeout=None if on_wait is None else 0.25)
                if on_wait is not None:
                    on_wait()
                for ref in done:
                    i, actor = running.pop(ref)
                    try:
                        results[i] = ray.get(ref)
                    except Exception as exc:  # noqa: BLE001 - unwrapped below
                        raise unwrap_error(exc, key, self.max_retries) from None
                    if on_done is not None:
                        on_done(i, results[i])
                    if todo:
                        j = todo.pop(0)
                        running[actor.run.remote(*shards[j])] = (j, actor)
        except BaseException:
            self._cancel(list(running))
            raise
        finally:
            for actor in actors:
                ray.kill(actor)
        return results


def row_shards(rows: int, batch_size: int, workers: int, per_worker: int = 2) -> list[range]:
    """Contiguous row ranges of whole batches: about ``per_worker`` shards per worker (a worker
    that finishes early takes the next), never more shards than batches.

    Examples
    --------
    >>> row_shards(10, 4, 2)
    [range(0, 4), range(4, 8), range(8, 10)]
    >>> row_shards(100, 32, 1, per_worker=1)
    [range(0, 100)]
    """
    batch_size = max(int(batch_size), 1)
    batches = -(-rows // batch_size)
    pieces = max(1, min(batches, workers * per_worker))
    cuts = [round(i * batches / pieces) * batch_size for i in range(pieces + 1)]
    return [range(lo, min(hi, rows)) for lo, hi in zip(cuts, cuts[1:]) if lo < min(hi, rows)]


# ---------------------------------------------------------------------------- worker side
class ShardActor:
    """Ray actor holding one ``worker_cls(*init_args)``, built on its first shard: an error while
    it loads (a modified checkpoint) then reaches the driver whole, as a task error, where Ray
    would turn an error of the actor's own creation into an ``ActorDiedError`` string."""

    def __init__(self, worker_cls, init_args: tuple, threads: int = 1):
        self.make, self.worker, self.threads = (worker_cls, tuple(init_args)), None, threads

    def run(self, *shard):
        if self.worker is None:
            use_threads(self.threads)
            self.worker = self.make[0](*self.make[1])
        return self.worker.run(*shard)


class EventSink:
    """Ray actor: progress events of every task, drained by the driver."""

    def __init__(self):
        self.events: list = []

    def put(self, index: int, event: dict) -> None:
        self.events.append((index, event))

    def drain(self) -> list:
        out, self.events = self.events, []
        return out

    def ping(self) -> bool:
        return True


class SinkReport:
    """The ``report`` callable a task gets on a worker: events go to the driver's sink."""

    def __init__(self, sink, index: int):
        self.sink, self.index = sink, index

    def __call__(self, event: dict) -> None:
        self.sink.put.remote(self.index, event)

    def flush(self) -> None:
        import ray

        ray.get(self.sink.ping.remote())  # calls from one caller run in order: every event is in


def use_threads(threads: int) -> None:
    """Compute with the CPUs the task holds: Ray sets ``OMP_NUM_THREADS`` only where the
    environment has none, so a worker could otherwise inherit another count (and a
    ``--deterministic`` run would then differ from a local one at the same thread count)."""
    import torch

    torch.set_num_threads(max(1, int(threads)))


class RowsReport:
    """The ``advance(n)`` an inference worker gets on its shard: rows done go to the driver's sink."""

    def __init__(self, sink, index: int):
        self.sink, self.index = sink, index

    def __call__(self, n: int) -> None:
        self.sink.put.remote(self.index, int(n))


def remote_call(fn, *args, report: SinkReport, threads: int = 1):
    """What a Ray task runs: a start event (host, pid, GPUs), ``fn``, every event delivered."""
    import ray

    use_threads(threads)

    report({"kind": "start", "host": socket.gethostname(), "pid": os.getpid(),
            "gpus": [str(g) for g in ray.get_gpu_ids()], "time": time.time()})
    result = fn(*args, report=report)
    report.flush()
    return result


def probe_paths(probes: dict[str, str | None]) -> tuple[str, list[str]]:
    """(host, problems) for the paths this node must see (a token: the probe file's content)."""
    problems = []
    for path, token in probes.items():
        p = Path(path)
        try:
            if token is not None and p.read_text() != token:
                problems.append(f"{p.parent} is another folder here (its probe file differs)")
            elif token is None and not p.exists():
                problems.append(f"{p} does not exist here")
        except OSError as exc:
            problems.append(f"{p.parent if token else p} cannot be read here ({exc.strerror or exc})")
    return socket.gethostname(), problems


def unwrap_error(exc: BaseException, task: Task, max_retries: int) -> BaseException:
    """The error a user should read for a failed task: the task's own EnsemblerError (its file
    or row message intact), or an EnsemblerError naming the task and what killed its worker."""
    from ray import exceptions as rx

    if isinstance(exc, rx.RayTaskError):
        cause = getattr(exc, "cause", None)
        if isinstance(cause, EnsemblerError):
            return cause
        if isinstance(cause, KeyboardInterrupt):
            return cause
        lines = [ln for ln in str(exc).splitlines() if ln.strip()]
        tail = "\n".join(lines[-12:])
        return EnsemblerError(f"{task.key} failed on its Ray worker with {type(cause).__name__}: {cause}\n"
                              f"worker traceback (end):\n{tail}")
    if isinstance(exc, rx.TaskCancelledError):
        return EnsemblerError(f"{task.key} was cancelled")
    if isinstance(exc, rx.RayError):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return EnsemblerError(
            f"{task.key}: its Ray worker died ({type(exc).__name__}: {first}) and was retried "
            f"{max_retries} time(s) (--max-retries {max_retries}); what it saved is kept: rerun with --resume")
    return exc
