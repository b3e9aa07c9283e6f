"""The per-fold resume state: what is on disk while a fold trains, and how it is read back.

File: ``<registry>/<family>/fold<k>/state.pt``, rewritten atomically after every epoch
(temp file + fsync + rename, so a kill at any moment leaves the previous epoch's state or
the new one). It holds only tensors, numbers, strings, lists and dicts, so it loads with
``torch.load(..., weights_only=True)``: no pickled objects, no code runs on load. One
:class:`FoldState` is one file; :func:`save_state` writes it and :func:`load_state` reads it
(the only writer and reader). Keys on disk, one per field of :class:`FoldState`, plus
``format`` (the state format version, 1).

The file is deleted once the fold's checkpoint is registered; the registry entry and
``fold<k>/val_logits.npz`` are then the record of a finished fold.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._io import atomic_path
from ..errors import EnsemblerError

STATE_FORMAT = 1
STATE_NAME = "state.pt"


def capture_rng() -> dict[str, Any]:
    """Generator states of python ``random``, numpy's global RNG and torch (CPU and CUDA)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [int(version), torch.tensor(internal, dtype=torch.int64), gauss],
        "numpy": [str(kind), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
    }
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal.tolist()), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch RNGs (called when a fold starts, never at import)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@dataclass
class FoldState:
    """Where one fold's training stands after a finished epoch (the ``state.pt`` file).

    Attributes
    ----------
    epoch : int
        Number of finished epochs.
    finished : bool
        True once the fold stopped (last epoch or early stop).
    stopped_early : bool
        Stopped by ``patience`` before the last epoch.
    model, optimizer : dict
        State dicts after ``epoch``.
    scheduler, scaler : dict or None
        State dicts (``None`` without a schedule / without fp16).
    rng : dict
        Python, numpy and torch (and CUDA) generator states (:func:`capture_rng`).
    best_score : float or None
        Best monitored score so far; ``best_epoch`` its epoch, ``bad_epochs`` the epochs since.
    best_model : dict
        The best epoch's weights (CPU tensors).
    best_val_logits : numpy.ndarray
        Joint logits (float32) of the validation rows at the best epoch.
    history : list of dict
        One dict of floats per finished epoch (``EpochRecord.to_dict()``).
    fold : int or None
        The fold this state belongs to.
    config : dict
        The run's TrainConfig as a dict (checked on resume).
    """

    epoch: int
    finished: bool
    stopped_early: bool
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any] | None
    scaler: dict[str, Any] | None
    rng: dict[str, Any]
    best_score: float | None
    best_epoch: int
    bad_epochs: int
    best_model: dict[str, torch.Tensor]
    best_val_logits: np.ndarray
    history: list[dict[str, float]] = field(default_factory=list)
    fold: int | None = None
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The on-disk form: plain containers and tensors only (``weights_only`` loads it)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["best_val_logits"] = torch.from_numpy(np.ascontiguousarray(self.best_val_logits, dtype=np.float32))
        return dict(out, format=STATE_FORMAT)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str | Path = "state") -> "FoldState":
        """Inverse of :meth:`to_dict`; an ``EnsemblerError`` naming ``source`` and the missing keys."""
        required = [f.name for f in fields(cls) if f.name not in ("history", "fold", "config")]
        missing = [k for k in required if k not in raw]
        if missing:
            raise EnsemblerError(f"{source} is not a complete training state (missing {missing}); "
                                 f"delete it to restart that fold")
        values = {f.name: raw[f.name] for f in fields(cls) if f.name in raw}
        logits = values["best_val_logits"]
        values["best_val_logits"] = logits.numpy() if isinstance(logits, torch.Tensor) else np.asarray(logits)
        values.update(epoch=int(values["epoch"]), finished=bool(values["finished"]),
                      stopped_early=bool(values["stopped_early"]), best_epoch=int(values["best_epoch"]),
                      bad_epochs=int(values["bad_epochs"]))
        return cls(**values)


def save_state(path: str | Path, state: FoldState) -> None:
    """Write ``state`` atomically with ``torch.save`` (the one writer of ``state.pt``)."""
    with atomic_path(path) as tmp:
        torch.save(state.to_dict(), tmp)


def load_state(path: str | Path) -> FoldState:
    """Read a state written by :func:`save_state` with ``weights_only=True`` (the one reader).

    Raises
    ------
    EnsemblerError
        The file is unreadable, of another format or incomplete; the message names the file.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        raise EnsemblerError(f"cannot read training state {path}: {exc}; delete it to restart that fold") from exc
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise EnsemblerError(f"{path} is not an ensembler training state (format {STATE_FORMAT})")
    return FoldState.from_dict(state, path)
