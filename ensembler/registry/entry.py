"""A registry entry: what one checkpoint is, and the names and folders it lives under."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from ..errors import RegistryError
from ..labels import LabelSpace
from ..preprocess import Preprocess

INDEX_NAME = "registry.json"
INDEX_VERSION = 1
WEIGHTS_NAME = "weights.safetensors"
ENV_VAR = "ENSEMBLER_REGISTRY"
DEFAULT_ROOT = "checkpoints"

# Family names and ids become folder names: keep them to one portable path component.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
# Entry fields that identify the stored weights; update() refuses to change them.
FROZEN_FIELDS = ("id", "sha256", "weights", "created")


@dataclass
class Entry:
    """One checkpoint of the registry.

    Attributes
    ----------
    id : str
        Unique name, ``<family>-fold<k>`` by default (``<family>`` without a fold).
    family : str
        The training run; its fold checkpoints' validation folds cover the training set once.
    fold : int or None
    arch : str
        timm architecture.
    head : {"flat", "factored"}
    label_space : dict
        ``LabelSpace.to_dict()`` of what the model predicts (a factor's space for ``target``).
    preprocess : dict
        ``Preprocess.to_dict()``.
    sha256 : str
        Of the weights file.
    weights : str
        Weights path relative to the registry root.
    metrics : dict
        Validation metrics (e.g. ``{"val_macro_f1": 0.81}``).
    oof : str or None
        OOF logits path relative to the registry root.
    target : str or None
        Factor name for a per-factor model (e.g. ``"age"``).
    train_config : dict
        How it was trained (or where it was imported from, under ``"import"``).
    versions : dict
        torch, timm, ensembler versions that wrote it.
    created : str
        ISO 8601 time (UTC).
    model_kwargs : dict
        Extra ``timm.create_model`` arguments the weights need (e.g. ``img_size`` of a ViT).
    extra : dict
        Keys of the stored entry this version does not know; written back unchanged.
    """

    id: str
    family: str
    fold: int | None
    arch: str
    head: str
    label_space: dict
    preprocess: dict
    sha256: str
    weights: str
    metrics: dict = field(default_factory=dict)
    oof: str | None = None
    target: str | None = None
    train_config: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    created: str = ""
    model_kwargs: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict, repr=False)

    @property
    def labels(self) -> LabelSpace:
        return LabelSpace.from_dict(self.label_space)

    @property
    def pre(self) -> Preprocess:
        return Preprocess.from_dict(self.preprocess)

    @property
    def num_classes(self) -> int:
        return len(self.label_space["classes"])

    @property
    def num_outputs(self) -> int:
        from ..models import head_num_outputs

        return head_num_outputs(self.labels, self.head)

    @property
    def val_macro_f1(self) -> float | None:
        """The validation macro-F1 under whichever name the producer used, if any."""
        for key in ("val_macro_f1", "macro_f1", "val_f1", "f1"):
            value = self.metrics.get(key)
            if isinstance(value, (int, float)):
                return float(value)
        return None

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d.update({k: v for k, v in self.extra.items() if k not in d})
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Entry":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - set(d))
        if missing:
            raise RegistryError(f"registry entry {d.get('id', '?')!r} lacks fields {missing}")
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        return cls(**known, extra=extra)


def now_iso() -> str:
    """The current UTC time, ISO 8601 to the second (``created`` of entries)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def library_versions() -> dict[str, str]:
    """torch, timm, safetensors and ensembler versions (``versions`` of entries)."""
    import safetensors
    import timm
    import torch

    from .. import __version__

    return {"torch": torch.__version__, "timm": timm.__version__, "ensembler": __version__,
            "safetensors": safetensors.__version__}


def check_name(value: str, what: str) -> str:
    """``value`` when it is one portable path component (it becomes a folder/file name)."""
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise RegistryError(
            f"{what} {value!r} must start with a letter or digit and contain only letters, "
            f"digits, '.', '_', '+', '-' (it becomes a folder/file name)"
        )
    return value


def default_entry_id(family: str, fold: int | None) -> str:
    """``<family>-fold<k>``, or ``<family>`` for a checkpoint without a fold."""
    return family if fold is None else f"{family}-fold{fold}"


def resolve_root(root: str | os.PathLike | None = None) -> Path:
    """``root``, else ``$ENSEMBLER_REGISTRY``, else ``./checkpoints``."""
    if root is not None and str(root) != "":
        return Path(root)
    env = os.environ.get(ENV_VAR, "").strip()
    return Path(env) if env else Path(DEFAULT_ROOT)

