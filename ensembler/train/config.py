"""TrainConfig: every knob of a k-fold training run, validated in one place.

The config is stored with every registered checkpoint (``train_config``) and in the
family's ``run.json``, so a run can be resumed and audited. Defaults are what a competition
user would start from: pretrained weights, AdamW, cosine schedule after a linear warm-up,
cross-entropy, best epoch chosen by validation macro-F1.

Four defaults depend on the **regime** (:data:`REGIME_DEFAULTS`), because what is right for
fine-tuning ImageNet weights for a few epochs is wrong for a network trained from scratch:

============  =======================================  ==========================================
field         ``fine-tune`` (``pretrained=True``)       ``from-scratch`` (``pretrained=False``)
============  =======================================  ==========================================
lr            3e-4 (the strongest teams: AdamW          3e-3
              1e-4..3e-4 for 3-5 epochs)
warmup        1 epoch                                   0.3 epoch
augment       ``standard``: random-resized-crop,        ``flip``: the eval geometry + a horizontal
(photos)      flip, colour jitter                       flip
crop          ``timm``: the architecture's eval         ``full``: the whole image resized to the
              crop (what its weights were trained on)   input size, nothing cut
============  =======================================  ==========================================

(warm-up is capped at a quarter of the run; the schedule after it is cosine in both.)
Measured on real face photos (``benchmarks/bench_quality.py`` settings: faces-utk, 64 px,
4 epochs, 3 folds, from scratch; OOF / held-out macro-F1; a plain timm + Adam 1e-3 loop on the
same folds: resnet18 0.478 / 0.526, efficientnet_b0 0.257 / 0.247):

- the fine-tune defaults from scratch: resnet18 0.242 / 0.232;
- resnet18, one change at a time: lr 1e-3 0.359 / 0.344; flip-only augmentation 0.381 / 0.409;
  both 0.504 / 0.505; both + the full-image crop 0.533 / 0.539;
- efficientnet_b0 with lr 1e-3, flip, full crop: cosine 0.209 / 0.208, constant LR after a
  warm-up 0.234 / 0.253, constant without warm-up 0.254 / 0.248: at 1e-3 the cosine decay
  starves a network that is still under-fitted;
- lr 3e-3, 0.3 warm-up epoch, cosine: efficientnet_b0 0.264 / 0.266, resnet18 0.521 / 0.538 —
  above the plain loop for both, so that is the from-scratch default.

On a short from-scratch run the random-resized crop and the colour jitter leave the network
under-fitted, 3e-4 is far too slow, and the 0.875 centre crop cuts the face at 64 px. Runs of
the same settings differ by about ±0.02 here (a weight decay of 1e-5 per step moved
efficientnet_b0 by that much). A value given explicitly always wins; :attr:`TrainConfig.defaulted`
lists the fields filled from the regime, and the run header prints them.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from ..errors import ParameterError
from ..names import AUGMENTS, CROPS, HEADS, MONITORS, OPTIMIZERS, REGIMES, SCHEDULERS, TARGETS
from .losses import LOSS_NAMES, parse_loss_weights

#: Defaults that depend on whether training starts from pretrained weights (see the module docstring).
REGIME_DEFAULTS = {
    "fine-tune": {"lr": 3e-4, "warmup_epochs": 1.0, "augment": "standard", "crop": "timm"},
    "from-scratch": {"lr": 3e-3, "warmup_epochs": 0.3, "augment": "flip", "crop": "full"},
}

# Fields that may differ between an interrupted run and its --resume (which folds to run
# now, where, how fast). Every other field must match: --resume continues the same run, and
# a changed learning rate, loss or epoch count would silently make a different one.
RESUME_FREE_KEYS = ("folds", "family", "workers", "device", "amp", "channels_last", "extra", "defaulted")


@dataclass
class TrainConfig:
    """Configuration of :func:`ensembler.train.train_folds`.

    Parameters
    ----------
    arch : str
        timm architecture name, e.g. ``"resnet18"``, ``"efficientnet_b3"``.
    k : int
        Number of folds of the grouped stratified split.
    folds : list of int, optional
        Train only these folds (default: all ``k``). The OOF file is then partial.
    family : str, optional
        Registry family name; default ``<arch>-<head>[-<target>]`` made unique.
    epochs, batch_size, weight_decay : training basics.
    lr : float, optional
        Peak learning rate; default by regime: 3e-4 fine-tuning, 3e-3 from scratch.
    optimizer : {"adamw", "adam", "sgd"}
        SGD uses Nesterov momentum 0.9.
    scheduler : {"cosine", "cosine-restarts", "step", "none"}
        Stepped per batch after ``warmup_epochs`` of linear warm-up. ``cosine-restarts``
        restarts three times over the run; ``step`` divides the LR by 10 at 1/3 and 2/3.
    warmup_epochs : float, optional
        Linear warm-up length in epochs (fractions allowed; capped at a quarter of the run);
        default by regime: 1 fine-tuning, 0.3 from scratch.
    img_size : int, optional
        Input size; default the architecture's own.
    head : {"flat", "factored", "multilabel"}
        ``factored``: one block of logits per factor (needs a factored label space, or a
        multi-factor ``target``); ``multilabel``: the same outputs as independent sigmoids
        trained with binary cross-entropy (``loss`` must be ``bce``; the default ``ce``
        becomes ``bce``), see :mod:`ensembler.heads`.
    loss : {"ce", "focal", "label-smoothing", "f1", "bce", "mix"}
    loss_weights : dict or str, optional
        For ``mix``: ``{"ce": 0.3, "f1": 0.7}`` or ``"ce=0.3,f1=0.7"``.
    focal_gamma, smoothing : float
        Focal-loss gamma; label-smoothing factor.
    augment : {"auto", "standard", "light", "flip", "none"}
        ``standard``: random-resized-crop (scale 0.35-1), horizontal flip, mild colour
        jitter (photos, faces). ``light``: small random-resized-crop (scale 0.7-1) and a
        small rotation, no flip (digits, text: flipping changes the class). ``flip``: the
        eval transform and a random horizontal flip. ``none``: the eval transform.
        ``auto``: by regime, ``standard`` fine-tuning and ``flip`` from scratch; for the
        ``digits`` source (never flipped) ``light`` fine-tuning and ``none`` from scratch.
    crop : {"timm", "full"}, optional
        Eval geometry (stored with each checkpoint): ``timm`` resizes and centre-crops by
        the architecture's ``crop_pct``; ``full`` resizes the whole image to the input size.
        Default by regime: ``timm`` fine-tuning, ``full`` from scratch.
    amp : bool
        Mixed precision on CUDA (bf16 when supported, else fp16 with a GradScaler); ignored
        on the CPU with a note.
    seed : int
        Seeds the split, model init, shuffling and augmentation.
    workers : int
        DataLoader worker processes.
    pretrained : bool
        Start from timm's pretrained weights (needs hub access, or ``pretrained_path``).
    pretrained_path : str, optional
        Local backbone weights (a timm ``.safetensors``/``.pth`` file) instead of a download.
    monitor : {"f1", "acc", "loss"}
        Validation metric that picks the best epoch (macro-F1 by default).
    patience : int, optional
        Stop a fold after this many epochs without improvement; ``None`` never stops early.
    device : str, optional
        ``"cuda"``, ``"cuda:1"``, ``"cpu"``; default CUDA when available.
    target : str, optional
        Train a per-factor model: one factor (``"age"``) or several (``"gender,age"``, kept
        in the label space's factor order) of a factored label space. It composes with
        models of the other factors into the joint space (``--members mask-fam+ga-fam``).
    deterministic : bool
        ``torch.use_deterministic_algorithms(True)`` for the run (restored afterwards).
    channels_last : bool
        Use channels-last memory format (faster on recent GPUs).
    min_lr : float
        Floor of the cosine schedules, as a fraction of ``lr``.

    Examples
    --------
    >>> cfg = TrainConfig(arch="resnet18", k=5, epochs=3, loss="mix", loss_weights="ce=0.3,f1=0.7")
    >>> cfg.loss_weights
    {'ce': 0.3, 'f1': 0.7}
    """

    arch: str
    k: int = 5
    folds: list[int] | None = None
    family: str | None = None
    epochs: int = 10
    batch_size: int = 32
    lr: float | None = None
    weight_decay: float = 0.01
    optimizer: str = "adamw"
    scheduler: str = "cosine"
    warmup_epochs: float | None = None
    img_size: int | None = None
    head: str = "flat"
    loss: str = "ce"
    loss_weights: dict[str, float] | None = None
    focal_gamma: float = 2.0
    smoothing: float = 0.1
    augment: str = "auto"
    amp: bool = False
    seed: int = 0
    workers: int = 2
    pretrained: bool = True
    pretrained_path: str | None = None
    monitor: str = "f1"
    patience: int | None = 5
    device: str | None = None
    target: str | None = None
    deterministic: bool = False
    channels_last: bool = False
    min_lr: float = 0.01
    crop: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    defaulted: list[str] = field(default_factory=list)  # fields filled from REGIME_DEFAULTS

    def __post_init__(self):
        self.validate()

    def validate(self) -> "TrainConfig":
        """Check every field; raise :class:`ParameterError` naming the field (the CLI names its flag)."""
        if not isinstance(self.arch, str) or not self.arch:
            raise ParameterError("arch", "arch is required (a timm architecture name, e.g. resnet18)")
        _check_int(self.k, "k", 2)
        if self.folds is not None:
            folds = [int(f) for f in self.folds]
            if not folds:
                raise ParameterError("folds", "folds is empty; give fold numbers like 0,3")
            bad = [f for f in folds if not 0 <= f < self.k]
            if bad:
                raise ParameterError("folds", f"folds {bad} out of range 0..{self.k - 1} for k={self.k}")
            if len(set(folds)) != len(folds):
                raise ParameterError("folds", f"folds lists a fold twice: {folds}")
            self.folds = sorted(folds)
        if self.family is not None and (not self.family or "/" in self.family or self.family.startswith(".")):
            raise ParameterError("family", f"family must be a plain folder name, got {self.family!r}")
        self._fill_regime_defaults()
        _check_int(self.epochs, "epochs", 1)
        _check_int(self.batch_size, "batch_size", 1)
        _check_int(self.workers, "workers", 0)
        if not self.lr > 0:
            raise ParameterError("lr", f"lr must be > 0, got {self.lr}")
        if not self.weight_decay >= 0:
            raise ParameterError("weight_decay", f"weight_decay must be >= 0, got {self.weight_decay}")
        if not self.warmup_epochs >= 0:
            raise ParameterError("warmup_epochs", f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if not 0 <= self.min_lr <= 1:
            raise ParameterError("min_lr", f"min_lr is a fraction of lr in [0, 1], got {self.min_lr}")
        _check_choice(self.optimizer, OPTIMIZERS, "optimizer")
        _check_choice(self.scheduler, SCHEDULERS, "scheduler")
        _check_choice(self.head, HEADS, "head")
        _check_choice(self.loss, LOSS_NAMES, "loss")
        _check_choice(self.monitor, MONITORS, "monitor")
        _check_choice(self.augment, AUGMENTS, "augment")
        _check_choice(self.crop, CROPS, "crop")
        if self.target is not None:
            parts = [t.strip() for t in str(self.target).split(",") if t.strip()]
            for t in parts:
                _check_choice(t, TARGETS, "target")
            if not parts or len(set(parts)) != len(parts):
                raise ParameterError("target", f"target names each factor once, e.g. gender,age (got {self.target!r})")
            self.target = ",".join(sorted(parts, key=TARGETS.index))
            if self.head == "factored" and len(parts) == 1:
                raise ParameterError("target", f"target {self.target} is one factor: a factored head needs two or "
                                     "more (gender,age), or use a flat head")
        if self.head == "multilabel":
            if self.loss == "ce":
                self.loss = "bce"  # the head's own loss; the run header prints it
            elif self.loss != "bce":
                raise ParameterError("loss", f"loss {self.loss!r} is a softmax loss; head 'multilabel' trains sigmoids "
                                     "with loss 'bce' (use head 'factored' for it)")
        if self.pretrained_path is not None:
            self.pretrained_path = str(self.pretrained_path)
            if not os.path.isfile(self.pretrained_path):
                raise ParameterError("pretrained_path", f"pretrained_path {self.pretrained_path}: no such file")
        if self.img_size is not None:
            from ..preprocess import check_input_size

            check_input_size(self.img_size, "--img-size")
        if self.patience is not None:
            _check_int(self.patience, "patience", 1)
        self.loss_weights = parse_loss_weights(self.loss_weights) or None
        if self.loss == "mix" and not self.loss_weights:
            raise ParameterError("loss_weights", "loss_weights are needed by loss 'mix', e.g. ce=0.3,f1=0.7")
        if self.loss != "mix" and self.loss_weights:
            raise ParameterError("loss_weights", f"loss_weights only apply to loss 'mix' (got loss {self.loss!r})")
        if not self.focal_gamma >= 0:
            raise ParameterError("focal_gamma", f"focal_gamma must be >= 0, got {self.focal_gamma}")
        if not 0 <= self.smoothing < 1:
            raise ParameterError("smoothing", f"smoothing must be in [0, 1), got {self.smoothing}")
        return self

    @property
    def regime(self) -> str:
        """``fine-tune`` when starting from pretrained weights, else ``from-scratch``."""
        return "fine-tune" if self.pretrained or self.pretrained_path else "from-scratch"

    def _fill_regime_defaults(self) -> None:
        filled = []
        for key, value in REGIME_DEFAULTS[self.regime].items():
            if key == "augment":
                continue  # "auto" is resolved with the data source (digits: never flipped), see resolve_augment
            if getattr(self, key) is None:
                setattr(self, key, value)
                filled.append(key)
        self.defaulted = sorted(set(self.defaulted) | set(filled))

    def describe(self, augment: str | None = None) -> str:
        """One line for the run header: regime, optimiser, schedule, augmentation, crop, defaults."""
        aug = augment or self.augment
        warm = f", {self.warmup_epochs:g} warm-up epoch(s)" if self.warmup_epochs else ""
        fields = list(self.defaulted) + (["augment"] if self.augment == "auto" else [])
        return (f"{self.arch}: {self.regime} ({'pretrained weights' if self.regime == 'fine-tune' else 'no pretrained weights'}), "
                f"{self.epochs} epochs, {self.optimizer} lr {self.lr:g} {self.scheduler}{warm}, batch {self.batch_size}, "
                f"augment {aug}, eval crop {self.crop}, loss {self.loss}, best epoch by val {self.monitor}"
                + (f"; {', '.join(fields)} from the {self.regime} defaults" if fields else ""))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (what the registry stores as ``train_config``)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def default_family(self) -> str:
        """``<arch>-<head>[-<target>]`` (the registry makes it unique)."""
        name = f"{self.arch}-{self.head}"
        return f"{name}-{self.target.replace(',', '-')}" if self.target else name


def _check_int(value, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ParameterError(name, f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_choice(value, choices, name: str) -> None:
    if value not in choices:
        raise ParameterError(name, f"{name} must be one of {list(choices)}, got {value!r}")
