"""Weights I/O of the registry: safetensors written atomically, read back only after the sha256
and finite checks pass, and checked key by key against the entry's architecture and head.

These functions work on one entry and its file; :class:`~ensembler.registry.Registry` decides
where the file goes and records it in the index (under its lock).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping

from .._io import atomic_path, sha256_file
from ..errors import EnsemblerError, IntegrityError, RegistryError
from ..preprocess import Preprocess
from .checks import check_model_kwargs
from .entry import WEIGHTS_NAME, Entry, check_name, default_entry_id, library_versions, now_iso

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


def default_model_kwargs(arch: str, pre: Preprocess) -> dict:
    """``img_size`` for fixed-input-size archs (ViT, Swin) whose size differs from timm's default:
    their position embeddings are sized by it, so loading needs the same value."""
    if not pre.fixed_input_size:
        return {}
    default = Preprocess.from_timm(arch)
    if tuple(default.input_size) == tuple(pre.input_size):
        return {}
    return {"img_size": list(pre.input_size)}


def new_entry(model_or_state_dict, *, family: str, fold: int | None, arch: str, head: str, label_space,
              preprocess=None, metrics: dict | None = None, oof: str | None = None, target: str | None = None,
              train_config: dict | None = None, entry_id: str | None = None, model_kwargs: dict | None = None,
              check: bool = True) -> tuple[Entry, dict]:
    """The entry :meth:`Registry.add` will record (``sha256``/``weights`` still empty) and the
    checked CPU state dict to write; every argument is validated here, before anything is written."""
    import torch

    from ..models import as_label_space, check_arch, check_finite, check_head, check_state_dict

    check_name(family, "family")
    if fold is not None:
        if isinstance(fold, bool) or not isinstance(fold, int) or fold < 0:
            raise RegistryError(f"fold must be a non-negative int or None, got {fold!r}")
    entry_id = check_name(entry_id or default_entry_id(family, fold), "entry id")
    ls = as_label_space(label_space)
    check_head(head, ls)
    check_arch(arch)
    if preprocess is None:
        pre = Preprocess.from_timm(arch)
    elif isinstance(preprocess, Preprocess):
        pre = preprocess
    elif isinstance(preprocess, Mapping):
        pre = Preprocess.from_dict(dict(preprocess))
    else:
        raise RegistryError(f"preprocess must be a Preprocess or dict, got {type(preprocess).__name__}")
    if model_kwargs is None:
        model_kwargs = default_model_kwargs(arch, pre)
    check_model_kwargs(model_kwargs, f"entry {entry_id!r}")

    if isinstance(model_or_state_dict, torch.nn.Module):
        state = model_or_state_dict.state_dict()
    elif isinstance(model_or_state_dict, Mapping):
        state = dict(model_or_state_dict)
    else:
        raise RegistryError(
            f"add() takes a torch module or a state dict, got {type(model_or_state_dict).__name__}")
    bad = [k for k, v in state.items() if not torch.is_tensor(v)]
    if bad:
        raise RegistryError(f"state dict for {entry_id!r} has non-tensor values under {bad[:8]}")
    # Own, contiguous CPU copies: safetensors refuses shared storage (tied weights).
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}
    check_finite(state, f"weights of {entry_id!r}")
    if check:
        check_state_dict(state, arch, label_space=ls, head=head, source=f"weights of {entry_id!r}",
                         model_kwargs=model_kwargs)
    entry = Entry(
        id=entry_id, family=family, fold=fold, arch=arch, head=head, label_space=ls.to_dict(),
        preprocess=pre.to_dict(), sha256="", weights="", metrics=dict(metrics or {}), oof=oof,
        target=target, train_config=dict(train_config or {}), versions=library_versions(),
        created=now_iso(), model_kwargs=dict(model_kwargs),
    )
    return entry, state


def weights_rel(family: str, fold: int | None, entry_id: str, raw: list[dict]) -> str:
    """Where an entry's weights go, relative to the root: ``<family>/fold<k>/weights.safetensors``
    (``single/`` without a fold), or ``<entry id>.safetensors`` there when another entry owns it."""
    folder = f"{family}/{'single' if fold is None else f'fold{fold}'}"
    rel = f"{folder}/{WEIGHTS_NAME}"
    owners = {d.get("id") for d in raw if d.get("weights") == rel}
    if owners - {entry_id}:
        # Another entry (e.g. a per-factor model of the same family/fold) owns the default
        # file; never overwrite its weights.
        rel = f"{folder}/{entry_id}.safetensors"
    return rel


def write_weights(path: Path, state: dict, entry: Entry) -> str:
    """Write ``state`` as safetensors to ``path`` atomically; returns the file's sha256."""
    from safetensors.torch import save_file

    metadata = {"format": "pt", "ensembler_id": entry.id, "arch": entry.arch, "head": entry.head}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return sha256_file(path)


def check_weights_file(path: str | os.PathLike, entry: Entry, sha256: Callable[[Path], str] = sha256_file) -> None:
    """The weights file at ``path`` exists and its sha256 is the entry's recorded one.

    ``sha256`` computes a file's digest (default: read it; the logit cache passes its
    stat-remembered :meth:`~ensembler.filehash.FileHashes.sha256`, so a warm check reads nothing).

    Raises
    ------
    IntegrityError
        The file is missing, cannot be read, or its sha256 differs (file and both hashes named).
    """
    path = Path(path)
    if not path.is_file():
        raise IntegrityError(f"weights file of {entry.id!r} is missing: {path}")
    try:
        digest = sha256(path)
    except OSError as exc:
        raise IntegrityError(f"weights file {path} of {entry.id!r} cannot be read: {exc.strerror or exc}") from None
    if digest != entry.sha256:
        raise IntegrityError(f"weights file {path} of {entry.id!r} was modified: sha256 {digest} != recorded "
                             f"{entry.sha256}")


def read_weights(path: Path, entry: Entry) -> dict:
    """The weights in ``path`` after checking the entry's sha256 and that every tensor is finite.

    Raises
    ------
    IntegrityError
        Missing file, sha256 different from the entry's (both hashes named), an
        unparseable file or NaN/inf values; the message names the file.
    """
    from safetensors.torch import load_file

    from ..models import check_finite

    check_weights_file(path, entry)
    try:
        state = load_file(str(path), device="cpu")
    except Exception as exc:  # noqa: BLE001 - SafetensorError
        raise IntegrityError(f"weights file {path} of {entry.id!r} is not valid safetensors: {exc}") from exc
    check_finite(state, f"weights file {path} of {entry.id!r}", error=IntegrityError)
    return state


def build_model(entry: Entry) -> "nn.Module":
    """The entry's architecture with its head, randomly initialised (pretrained=False)."""
    from ..models import create_model

    kwargs = check_model_kwargs(entry.model_kwargs, f"entry {entry.id!r}")
    return create_model(entry.arch, label_space=entry.labels, head=entry.head, pretrained=False, **kwargs)


def model_with_weights(entry: Entry, path: Path, device="cpu") -> "nn.Module":
    """Build the entry's model, load its verified weights from ``path`` strictly, eval mode on ``device``."""
    from ..models import compare_state_dict

    state = read_weights(path, entry)
    model = build_model(entry)
    diff = compare_state_dict(state, {k: tuple(v.shape) for k, v in model.state_dict().items()})
    if not diff.ok:
        raise IntegrityError(
            f"weights file {path} of {entry.id!r} does not match {entry.arch} "
            f"with a {entry.head} head: {diff.describe()}")
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def weights_problems(entry: Entry, path: Path) -> list[str]:
    """What is wrong with an entry's weights file (each problem names it); [] when sound."""
    from ..models import compare_state_dict, expected_state_shapes

    try:
        state = read_weights(path, entry)
    except IntegrityError as exc:
        return [str(exc)]
    try:
        expected = expected_state_shapes(entry.arch, entry.labels, entry.head, entry.model_kwargs)
    except EnsemblerError as exc:
        return [f"{path} of {entry.id!r}: {exc}"]
    diff = compare_state_dict(state, expected)
    if not diff.ok:
        return [f"weights file {path} of {entry.id!r} does not match {entry.arch} with a {entry.head} head: "
                f"{diff.describe()}"]
    return []
