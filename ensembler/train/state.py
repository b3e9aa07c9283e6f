"""The per-fold resume state: what is on disk while a fold trains, and how it is read back.

File: ``<registry>/<family>/fold<k>/state.pt``, rewritten atomically after every epoch
(temp file + fsync + rename, so a kill at any moment leaves the previous epoch's state or
the new one). It holds only tensors, numbers, strings, lists and dicts, so it loads with
``torch.load(..., weights_only=True)``: no pickled objects, no code runs on load. Keys:

``format``        state format version (1)
``fold``, ``epoch`` the fold and the number of finished epochs
``finished``      True once the fold stopped (last epoch or early stop)
``model``, ``optimizer``, ``scheduler``, ``scaler``  state dicts (scaler ``None`` without fp16)
``rng``           python / numpy / torch (and CUDA) generator states, as lists and tensors
``best_score``, ``best_epoch``, ``bad_epochs``  best-by-monitor bookkeeping
``best_model``    the best epoch's weights (CPU)
``best_val_logits`` joint logits of the validation rows at the best epoch (float32 tensor)
``history``       one dict of floats per finished epoch
``config``        the run's TrainConfig as a dict (checked on resume)

The file is deleted once the fold's checkpoint is registered; the registry entry and
``fold<k>/val_logits.npz`` are then the record of a finished fold.
"""

from __future__ import annotations

import random
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


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` atomically with ``torch.save``."""
    state = dict(state, format=STATE_FORMAT)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state(path: str | Path) -> dict[str, Any]:
    """Read a state written by :func:`save_state` with ``weights_only=True``.

    Raises
    ------
    EnsemblerError
        The file is unreadable or of another format; the message names the file.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        raise EnsemblerError(f"cannot read training state {path}: {exc}; delete it to restart that fold") from exc
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise EnsemblerError(f"{path} is not an ensembler training state (format {STATE_FORMAT})")
    return state
