"""Multi-member batched inference: decode once per geometry, views on the device, cached logits.

:func:`predict_members` runs registry members (checkpoints, or whole families) over a
SampleTable:

1. members are resolved (``"all"``, family names, checkpoint ids) and every checkpoint whose
   logits are already in the :class:`~ensembler.infer.store.LogitStore` is served from it,
   with no model loaded and no forward pass, once its weights file's sha256 is the registry's
   (:func:`~ensembler.infer.store.check_weights`; the data fingerprint hashes the images'
   bytes; both remembered by stat, so a warm run reads neither);
2. the remaining checkpoints are grouped by :attr:`Preprocess.geometry_key`; for each group a
   DataLoader decodes every image **once** in worker processes (``decode_image`` + the
   group's resize/centre-crop, giving uint8), pinned on CUDA;
3. on the device each batch is normalised per checkpoint (mean/std differ between members
   that share a geometry), its TTA views are built and stacked into the batch dimension, run
   in chunks that fit (halved on out-of-memory; AMP fp16/bf16 and channels-last on CUDA,
   optional ``torch.compile``), turned into joint logits (``models.joint_logits``) per view
   and merged;
4. each checkpoint's logits are cached only once the whole table has gone through it
   (atomic writes), so a run stopped by a corrupt image leaves no partial cache file;
5. a family's logits are the mean over its folds' logits.

For factored heads, views are merged in the joint space (each view's factor logits become
joint log-probabilities first), so ``mean-logits`` there averages joint log-probabilities.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..device import resolve_device
from ..errors import DataError, EnsemblerError, LogitError
from ..executors import run_rows, workers_device
from ..logits import Logits
from ..names import BACKENDS
from ..progress import Ticker
from .decode import make_decode_loader, raise_decode_errors
from .store import LogitStore, check_weights, default_cache_dir
from .tta import check_merge, default_chunk_size, forward_chunked, merge_views
from .views import build_views, parse_tta

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["BACKENDS", "GroupWorker", "TorchForward", "ViewWorker", "check_run_args", "checkpoint_view_logits",
           "load_forward", "make_decode_loader", "predict_members", "raise_decode_errors", "resolve_precision"]


# ---------------------------------------------------------------------------- forwards
def resolve_precision(amp, device, backend: str) -> str:
    """The precision a run uses: ``fp32`` on the CPU and for ONNX; on CUDA ``amp`` ("auto":
    bf16 where supported, else fp16; "fp16"/"bf16"; False/"off" for fp32)."""
    import torch

    if backend == "onnx" or device.type != "cuda" or amp in (False, None, "off", "fp32", "none"):
        return "fp32"
    if amp in (True, "auto"):
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if amp in ("fp16", "bf16"):
        return amp
    raise EnsemblerError(f"amp must be 'auto', 'fp16', 'bf16' or False, got {amp!r}")


def check_run_args(registry, tta, merge, backend, batch_size, workers):
    """Validate what every engine run takes; returns ``(registry, plan, merge)``.

    ``registry=None`` means the default registry; ``tta`` and ``merge`` are parsed.
    """
    if registry is None:
        from ..registry import Registry

        registry = Registry()
    plan = parse_tta(tta)
    merge = check_merge(merge)
    if backend not in BACKENDS:
        raise EnsemblerError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if int(batch_size) < 1:
        raise EnsemblerError(f"batch_size must be >= 1, got {batch_size}")
    if int(workers) < 0:
        raise EnsemblerError(f"workers must be >= 0, got {workers}")
    return registry, plan, merge


class TorchForward:
    """Callable running a model on a float batch: channels-last, and autocast on CUDA.

    Channels-last is on by default on CUDA and on the CPU alike: oneDNN's convolutions are
    faster in it too (measured on 2 cores at 16 images: efficientnet_b0 115 vs 56 images/s,
    resnet18 68 vs 57).
    """

    def __init__(self, model, device, precision: str = "fp32", channels_last: bool | None = None):
        import torch

        self.device = torch.device(device)
        self.channels_last = True if channels_last is None else channels_last
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)

    def __call__(self, x):
        import torch

        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.dtype is None:
            return self.model(x)
        with torch.autocast(device_type=self.device.type, dtype=self.dtype):
            return self.model(x)


def _views_joint(forward, x, plan, entry, label_space, resize_to, chunk):
    """(B, V, C) per-view joint logits of one checkpoint for one normalised batch; returns the chunk used.

    Every view is turned into joint logits before any merge (factored heads: joint
    log-probabilities per view). Used by :func:`_views_joint_merged` and by
    :func:`checkpoint_view_logits`, which keeps the views apart.
    """
    import torch

    from ..models import joint_logits

    b, v = x.shape[0], len(plan)
    per_view: list = [None] * v
    for idx, stacked in build_views(x, plan, resize_to):
        out, chunk = forward_chunked(forward, stacked, chunk)
        for j, vi in enumerate(idx):
            per_view[vi] = out[j * b:(j + 1) * b]
    views = torch.stack(per_view, dim=1)
    return joint_logits(views.reshape(b * v, -1), entry.head, label_space).reshape(b, v, -1), chunk


def _views_joint_merged(forward, x, plan, merge, entry, label_space, resize_to, chunk):
    """(B, C) merged joint logits of one checkpoint for one normalised batch; returns the chunk used."""
    joint, chunk = _views_joint(forward, x, plan, entry, label_space, resize_to, chunk)
    return merge_views(joint, merge), chunk


# ---------------------------------------------------------------------------- main entry
def predict_members(table, entries_or_names="all", registry=None, *, tta="none", merge: str = "mean-logits",
                    backend: str = "torch", batch_size: int = 32, workers: int = 0, device=None,
                    cache_dir=None, use_cache: bool = True, amp="auto", compile: bool = False,
                    progress: bool = True, chunk_size: int | None = None, onnx_threads: int | None = None,
                    executor=None) -> dict[str, Logits]:  # noqa: A002 - compile
    """Logits of registry members over a SampleTable, with TTA, per-member preprocessing and caching.

    Parameters
    ----------
    table : SampleTable
        Images to run (labels not needed).
    entries_or_names : str, Entry or list
        ``"all"`` (every family), family names (mean over the family's folds), checkpoint
        ids, or :class:`Entry` objects; a string may list several, comma-separated.
    registry : Registry
        Where the checkpoints live (default: ``Registry()``).
    tta : str
        TTA plan (see :func:`ensembler.infer.parse_tta`), e.g. ``"flip"``.
    merge : str
        Merge rule over views: ``mean-logits``, ``mean-probs``, ``gmean-probs``, ``max-probs``.
    backend : {"torch", "onnx"}
        ``onnx`` runs each checkpoint's ``model.onnx`` through onnxruntime, exporting it
        (with a parity check) on first use; the recorded onnx sha256 is verified before use.
    batch_size : int
        Images per decoded batch (each becomes ``batch_size x views`` model inputs).
    workers : int
        DataLoader decode processes (0 decodes in this process).
    device : str, optional
        ``"cuda"``, ``"cpu"``...; default CUDA when available.
    cache_dir : path, optional
        LogitStore folder (default ``$ENSEMBLER_CACHE/logits`` or
        ``<registry>/../.ensembler_cache/logits``).
    use_cache : bool
        Read cached logits when the key matches; ``False`` forces a forward pass (results are
        still written to the cache).
    amp : {"auto", "fp16", "bf16", False}
        Autocast precision on CUDA (``auto``: bf16 where supported, else fp16); CPU runs fp32.
    compile : bool
        ``torch.compile`` each model (CUDA: worth it for long runs only).
    progress : bool
        Show a rich progress bar over images.
    chunk_size : int, optional
        Images per forward, halved on out-of-memory. Default: ``batch_size x views`` (every
        view in one forward) on CUDA; 8 on a CPU, where smaller forwards are faster per image
        (see :func:`ensembler.infer.tta.default_chunk_size`).
    onnx_threads : int, optional
        onnxruntime intra-op threads (default ``torch.get_num_threads()``).
    executor : Executor, "local" or "ray", optional
        Where each geometry group runs (:class:`GroupWorker`): this process (default), or Ray
        actors that each load the group's checkpoints once and run shards of rows, gathered
        in row order (see :meth:`ensembler.executors.RayExecutor.run_rows`). The cache is
        written here, once every shard is done.

    Returns
    -------
    dict[str, Logits]
        Keyed by member name, in the order asked, each named so, over the table's ids in
        its row order. ``meta``: ``checkpoints``, ``sha256`` (checkpoint id -> weights sha256),
        ``tta``, ``views``, ``merge``, ``backend``, ``precision``, ``fingerprint``, ``cached``
        (True when every checkpoint of the member came from the cache: no forward pass),
        ``cached_checkpoints``, ``cache_files``, ``seconds``, ``device``.

    Raises
    ------
    ImageDecodeError
        A corrupt image, named; nothing partial is written to the cache.

    Examples
    --------
    >>> out = predict_members(table, "all", registry, tta="flip", progress=False)  # doctest: +SKIP
    >>> out["resnet18"].logits.shape  # doctest: +SKIP
    (1200, 18)
    """
    registry, plan, merge = check_run_args(registry, tta, merge, backend, batch_size, workers)
    if len(table) == 0:
        raise DataError("the data has no images: nothing to predict")

    members = registry.members(entries_or_names)
    checkpoints = _checkpoints_of(members, plan)

    dev = resolve_device(device)
    precision = resolve_precision(amp, dev, backend)
    store = LogitStore(cache_dir if cache_dir is not None else default_cache_dir(registry.root))
    fingerprint = table.fingerprint(hashes=store.hashes)
    ids = np.asarray(table.ids).astype(str)

    run = {"tta": plan.spec, "merge": merge, "backend": backend, "precision": precision, "fingerprint": fingerprint}
    keys, results = _cache_hits(store, registry, checkpoints, ids, run, use_cache=use_cache)
    from_cache = set(results)

    todo = [e for cid, e in checkpoints.items() if cid not in results]
    groups: dict[tuple, list] = {}
    for e in todo:
        groups.setdefault(e.pre.geometry_key, []).append(e)

    timings: dict[str, float] = {}
    vouch = backend == "torch" and (executor in (None, "local") or getattr(executor, "name", None) == "local")
    if groups:
        with Ticker("inference", total=len(ids) * len(groups), unit="images", enabled=progress) as tick:
            advance = tick.advance
            for group in groups.values():
                # The registry checks each weights file's sha256 as it loads it (here, torch): remember that.
                watched = {e.id: store.hashes.watch(registry.path(e.weights)) for e in group} if vouch else {}
                computed = _run_group(table, group, registry, executor, plan=plan, merge=merge, backend=backend,
                                      batch_size=int(batch_size), workers=int(workers),
                                      device=workers_device(executor, device, dev),
                                      precision=precision, compile=compile, chunk_size=chunk_size,
                                      onnx_threads=onnx_threads, advance=advance, timings=timings)
                # Cache only now: every checkpoint of the group has seen every image.
                for e in group:
                    logits = computed[e.id]
                    meta = {"producer": e.id, "family": e.family, "sha256": e.sha256, "tta": plan.spec,
                            "merge": merge, "backend": backend, "precision": precision,
                            "fingerprint": fingerprint, "classes": list(e.labels.classes)}
                    store.save(keys[e.id], ids, logits, meta)
                    results[e.id] = logits
                    store.hashes.vouch(watched.get(e.id), e.sha256)
    store.save_hashes()  # only after a run that went through: a failed run leaves the cache as it was

    shared = {**run, "views": len(plan), "device": str(dev)}
    return {name: _member_logits(name, entries, ids, results, shared, from_cache=from_cache, timings=timings,
                                 cache_files={e.id: str(store.paths(keys[e.id])[0]) for e in entries})
            for name, entries in members}


def _checkpoints_of(members, plan) -> dict[str, Any]:
    """Every checkpoint of the members once, by id; each checked to take the plan's views."""
    checkpoints: dict[str, Any] = {}
    for _, entries in members:
        for e in entries:
            checkpoints.setdefault(e.id, e)
    for e in checkpoints.values():
        try:
            plan.check_input(e.pre.input_size)
        except EnsemblerError as exc:
            raise type(exc)(f"checkpoint {e.id!r} (input {e.pre.input_size[0]}x{e.pre.input_size[1]}): {exc}") from None
    return checkpoints


def _cache_hits(store, registry, checkpoints, ids, run: dict, *, use_cache: bool) -> tuple[dict, dict]:
    """Each checkpoint's cache key, and the logits the cache holds for it (with ``use_cache``)."""
    keys, results = {}, {}
    for cid, e in checkpoints.items():
        keys[cid] = store.key(producer=cid, sha256=e.sha256, **run,
                              extra={"preprocess": e.pre.to_dict(), "head": e.head,
                                     "classes": list(e.labels.classes)})
        hit = store.load(keys[cid], ids=ids) if use_cache else None
        if hit is not None:
            # A hit is served only from the weights the registry recorded (as a cold run loads them).
            check_weights(store.hashes, registry.path(e.weights), e)
            results[cid] = hit[0]
    return keys, results


def _member_logits(name, entries, ids, results, run: dict, *, from_cache, timings, cache_files) -> Logits:
    """A member's logits: the mean over its checkpoints' (which must share classes and shape), with its meta."""
    spaces = {tuple(e.labels.classes) for e in entries}
    if len(spaces) != 1:
        raise LogitError(f"member {name!r}: its checkpoints predict different classes; "
                         f"they cannot be averaged ({[e.id for e in entries]})")
    shapes = {results[e.id].shape for e in entries}
    if len(shapes) != 1:
        raise LogitError(f"member {name!r}: checkpoint logits have different shapes {sorted(shapes)}")
    logits = np.mean([results[e.id] for e in entries], axis=0, dtype=np.float64).astype(np.float32)
    meta = {
        "checkpoints": [e.id for e in entries], "sha256": {e.id: e.sha256 for e in entries},
        "tta": run["tta"], "views": run["views"], "merge": run["merge"], "backend": run["backend"],
        "precision": run["precision"], "fingerprint": run["fingerprint"],
        "cached": all(e.id in from_cache for e in entries),
        "cached_checkpoints": [e.id for e in entries if e.id in from_cache],
        "cache_files": [cache_files[e.id] for e in entries],
        "seconds": round(sum(timings.get(e.id, 0.0) for e in entries), 3),
        "device": run["device"],
    }
    return Logits(ids, logits, label_space=entries[0].labels, meta=meta, name=name)


def load_forward(registry, entry, *, backend, device, precision="fp32", compile=False, onnx_threads=None):
    """The callable that runs one checkpoint on a normalised batch: onnxruntime (its sha256
    checked) or the torch model in eval mode, channels-last, with autocast on CUDA."""
    if backend == "onnx":
        from .onnx import load_onnx_forward

        return load_onnx_forward(registry, entry, device=device, threads=onnx_threads)
    import torch

    model = registry.load_model(entry, device=str(device))
    model.eval()
    if compile:
        model = torch.compile(model)
    return TorchForward(model, device, precision)


def checkpoint_view_logits(table, entry, registry, plans: Sequence, *, backend: str = "torch",
                           batch_size: int = 32, workers: int = 0, device=None, precision: str = "fp32",
                           chunk_size: int | None = None, onnx_threads: int | None = None,
                           advance=None, executor=None) -> np.ndarray:
    """Per-view joint logits ``(N, V, C)`` of one checkpoint over ``table``'s rows, views unmerged.

    The engine's path for one checkpoint: one decode per image (over the checkpoint's
    geometry), its normalisation on the device, each plan's views stacked into the batch,
    joint logits per view (factored heads: joint log-probabilities). ``plans`` are run one
    after the other on each batch, and their views concatenated in order along axis 1 (the
    OOF TTA report appends an identity plan when the judged plan has no identity view).
    ``advance(n)`` is called as ``n`` more images are done. ``executor`` (an
    :class:`~ensembler.executors.Executor`, ``"local"`` or ``"ray"``) decides where
    :class:`ViewWorker` runs: in this process over every row, or on Ray workers over shards of rows.

    Raises
    ------
    ImageDecodeError
        A corrupt image, named.
    """
    settings = dict(plans=[parse_tta(p) for p in plans], backend=backend, batch_size=int(batch_size),
                    workers=int(workers), device=device, precision=precision, chunk_size=chunk_size,
                    onnx_threads=onnx_threads)
    parts = run_rows(executor, ViewWorker, (registry, entry, settings), table, batch_size=int(batch_size),
                     advance=advance)
    return np.concatenate(parts, axis=0).astype(np.float32, copy=False)


class ViewWorker:
    """One checkpoint loaded once, run over some rows with every view of some plans (unmerged).

    What :func:`checkpoint_view_logits` runs under every executor: the local engine builds one
    and runs it over every row; on Ray each actor builds one and runs it over its shards.
    ``settings`` as :func:`checkpoint_view_logits`'s (``plans`` parsed).
    """

    def __init__(self, registry, entry, settings: dict):
        self.entry, self.s = entry, settings
        self.device = resolve_device(settings["device"])
        self.forward = load_forward(registry, entry, backend=settings["backend"], device=self.device,
                                    precision=settings["precision"], onnx_threads=settings["onnx_threads"])
        self.chunks = [settings["chunk_size"] or default_chunk_size(self.device)] * len(settings["plans"])

    def run(self, table, advance=None) -> np.ndarray:
        """``(rows, V, C)`` per-view joint logits over ``table``'s rows, in row order."""
        import torch

        e, dev = self.entry, self.device
        resize_to = e.pre.input_size if e.pre.fixed_input_size else None
        loader = make_decode_loader(list(table.paths), e.pre, self.s["batch_size"], self.s["workers"],
                                    pin=dev.type == "cuda")
        outs = []
        with torch.inference_mode():
            for _, images, errors in loader:
                raise_decode_errors(errors)
                x = e.pre.normalize(images.to(dev, non_blocking=True))
                joint = []
                for i, plan in enumerate(self.s["plans"]):
                    views, self.chunks[i] = _views_joint(self.forward, x, plan, e, e.labels, resize_to, self.chunks[i])
                    joint.append(views)
                outs.append(torch.cat(joint, dim=1).float().cpu().numpy())
                if advance is not None:
                    advance(len(images))
        return np.concatenate(outs, axis=0).astype(np.float32, copy=False)


class GroupWorker:
    """The checkpoints of one geometry group, loaded once, run over some rows: one decode per
    image, each checkpoint's views merged.

    What :func:`predict_members` runs under every executor: the local engine builds one per
    group and runs it over every row; on Ray each actor builds one and runs it over its shards.
    ``settings``: ``plan``, ``merge``, ``backend``, ``batch_size``, ``workers``, ``device``,
    ``precision``, ``compile``, ``chunk_size``, ``onnx_threads``.
    """

    def __init__(self, registry, group, settings: dict):
        self.group, self.s = list(group), settings
        self.device = resolve_device(settings["device"])
        self.forwards = []
        for e in self.group:
            fwd = load_forward(registry, e, backend=settings["backend"], device=self.device,
                               precision=settings["precision"], compile=settings["compile"],
                               onnx_threads=settings["onnx_threads"])
            resize_to = e.pre.input_size if e.pre.fixed_input_size else None
            self.forwards.append([e, fwd, resize_to, settings["chunk_size"] or default_chunk_size(self.device)])

    def run(self, table, advance=None) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """``({checkpoint id: (rows, C) merged logits}, {checkpoint id: forward seconds})`` over ``table``."""
        import torch

        s, device = self.s, self.device
        loader = make_decode_loader(list(table.paths), self.group[0].pre, s["batch_size"], s["workers"],
                                    pin=device.type == "cuda")
        outs: dict[str, list] = {e.id: [] for e in self.group}
        timings = {e.id: 0.0 for e in self.group}
        with torch.inference_mode():
            for _, images, errors in loader:
                raise_decode_errors(errors)
                x = images.to(device, non_blocking=True)
                for slot in self.forwards:
                    e, fwd, resize_to, chunk = slot
                    t0 = time.perf_counter()
                    merged, slot[3] = _views_joint_merged(fwd, e.pre.normalize(x), s["plan"], s["merge"], e,
                                                          e.labels, resize_to, chunk)
                    outs[e.id].append(merged.cpu().numpy())
                    timings[e.id] += time.perf_counter() - t0
                if advance is not None:
                    advance(len(images))
        return {k: np.concatenate(v, axis=0).astype(np.float32, copy=False) for k, v in outs.items()}, timings


def _run_group(table, group, registry, executor, *, advance, timings, **settings) -> dict[str, np.ndarray]:
    """One decode pass over the table for checkpoints sharing a geometry (a :class:`GroupWorker`
    per executor worker, over shards of rows gathered in row order); logits per checkpoint."""
    parts = run_rows(executor, GroupWorker, (registry, group, settings), table, batch_size=settings["batch_size"],
                     advance=advance)
    result = {}
    for e in group:
        logits = np.concatenate([p[0][e.id] for p in parts], axis=0)
        if not np.isfinite(logits).all():
            rows = np.flatnonzero(~np.isfinite(logits).all(axis=1))
            raise LogitError(f"checkpoint {e.id!r} produced non-finite logits for id "
                             f"{table.ids[rows[0]]!r} ({len(rows)} rows); nothing was cached")
        result[e.id] = logits
        timings[e.id] = timings.get(e.id, 0.0) + sum(p[1][e.id] for p in parts)
    return result
