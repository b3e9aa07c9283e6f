"""Builds what one fold needs (model, loaders, optimiser, schedule, AMP) and registers its result.

Kept apart from :mod:`.loop` (which trains any module on any loaders) and :mod:`.folds`
(which iterates over folds and assembles OOF logits).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .._io import write_json_atomic
from ..heads import head_blocks
from ..device import resolve_device
from ..errors import DataError, EnsemblerError
from ..labels import LabelSpace
from ..logits import Logits, write_logits
from ..preprocess import Preprocess
from .config import TrainConfig
from .datasets import ImageDataset, make_loader, resolve_augment, train_transform
from .loop import Callbacks, LoopSettings, run_fold
from .losses import TrainLoss
from .optim import build_optimizer, build_scheduler
from .state import STATE_NAME, seed_everything


def train_preprocess(config: TrainConfig) -> Preprocess:
    """The checkpoint's Preprocess: the architecture's, at ``img_size``, with ``config.crop``
    (``full``: the whole image resized to the input size, nothing cut)."""
    if config.crop == "full":
        return Preprocess.from_timm(config.arch, config.img_size, crop_pct=1.0, crop_mode="squash")
    return Preprocess.from_timm(config.arch, config.img_size)


def resolve_amp(amp: bool, device: torch.device) -> tuple[torch.dtype | None, bool, str | None]:
    """(autocast dtype, use GradScaler, note). bf16 where the GPU supports it, else fp16 + scaler."""
    if not amp:
        return None, False, None
    if device.type != "cuda":
        return None, False, "--amp is ignored on the CPU (mixed precision is a CUDA speed-up here)"
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, False, None
    return torch.float16, True, None


@dataclass
class FoldSummary:
    """One trained (or previously finished) fold."""

    fold: int
    entry_id: str
    best_epoch: int
    val_f1: float
    val_acc: float
    val_loss: float
    epochs_run: int
    stopped_early: bool
    train_index: np.ndarray  # row positions (in the split table) the fold trained on
    val_index: np.ndarray    # row positions it validated on (its OOF rows)
    skipped: bool = False    # finished by an earlier run (resume)


class FoldRunner:
    """Trains and registers single folds of one family (see :func:`ensembler.train.train_folds`)."""

    def __init__(self, *, split, targets: np.ndarray, label_space: LabelSpace, config: TrainConfig, registry,
                 family: str, resume: bool):
        self.split = split
        self.targets = np.asarray(targets, dtype=np.int64)
        self.label_space = label_space
        self.config = config
        self.registry = registry
        self.family = family
        self.fam_dir = Path(registry.family_dir(family))
        self.resume = resume
        self._prepared: dict[int, torch.nn.Module] = {}
        self.device = resolve_device(config.device)
        self.amp_dtype, use_scaler, amp_note = resolve_amp(config.amp, self.device)
        self.use_scaler = use_scaler
        self.notes: list[str] = [amp_note] if amp_note else []
        self.preprocess = train_preprocess(config)
        self.augment = resolve_augment(config.augment, split.source.get("kind"), config.regime)
        if self.device.type == "cuda" and config.deterministic:
            # cuBLAS needs this to be deterministic; set only for this process, only when asked.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

    # ------------------------------------------------------------------ helpers
    def fold_seed(self, fold: int) -> int:
        return int(self.config.seed) * 1000 + int(fold)

    def _finished_entry(self, fold: int):
        entries = []
        try:
            entries = [e for e in self.registry.family(self.family) if e.fold == fold]
        except Exception:  # noqa: BLE001 - family not registered yet
            pass
        done = entries and (self.fam_dir / f"fold{fold}" / "val_logits.npz").is_file()
        return entries[0] if done else None

    def _model(self):
        from ..models import create_model

        kwargs = {}
        if self.preprocess.fixed_input_size:
            kwargs["img_size"] = self.preprocess.input_size  # ViT/Swin take the size at construction
        return create_model(self.config.arch, label_space=self.label_space, head=self.config.head,
                            pretrained=self.config.pretrained, pretrained_path=self.config.pretrained_path,
                            **kwargs)

    def _seeded_model(self, fold: int):
        seed_everything(self.fold_seed(fold))
        return self._model()

    def prepare(self, folds) -> None:
        """Build the first unfinished fold's model now, so that a missing pretrained download
        (or any model error) fails before anything is written or trained."""
        for fold in folds:
            if self.resume and self._finished_entry(fold) is not None:
                continue
            self._prepared[fold] = self._seeded_model(fold)
            return

    def check_fresh(self, folds) -> None:
        """A fresh run never silently continues (or overwrites) someone's interrupted fold: fail
        before anything trains when one of ``folds`` has a resume state and ``resume`` is off."""
        if self.resume:
            return
        for fold in folds:
            state_path = self.fam_dir / f"fold{fold}" / STATE_NAME
            if state_path.exists():
                raise EnsemblerError(f"{state_path} exists from an interrupted run: pass --resume to continue it")

    # ------------------------------------------------------------------ one fold
    def run(self, fold: int, callbacks: Callbacks | None = None):
        """Train (or, resuming, skip a finished) fold in this process and register it."""
        summary = self.finished_summary(fold, callbacks) if self.resume else None
        if summary is not None:
            return summary
        self.check_fresh([fold])
        return self.register(self.train(fold, callbacks))

    def finished_summary(self, fold: int, callbacks: Callbacks | None = None):
        """The FoldSummary of a fold an earlier run finished (registered, logits on disk), else None."""
        entry = self._finished_entry(fold)
        if entry is None:
            return None
        fold_dir = self.fam_dir / f"fold{fold}"
        hist = json.loads((fold_dir / "history.json").read_text()) if (fold_dir / "history.json").is_file() else {}
        m = entry.metrics or {}
        if callbacks is not None and hasattr(callbacks, "note"):
            callbacks.note(f"fold {fold}: finished earlier ({entry.id}), skipped")
        train_idx, val_idx = self.fold_rows(fold)
        return FoldSummary(fold, entry.id, int(m.get("best_epoch", 0)), float(m.get("val_f1", np.nan)),
                           float(m.get("val_acc", np.nan)), float(m.get("val_loss", np.nan)),
                           len(hist.get("history", [])), bool(hist.get("stopped_early", False)),
                           train_idx, val_idx, skipped=True)

    def fold_rows(self, fold: int) -> tuple[np.ndarray, np.ndarray]:
        folds = self.split.folds
        return np.flatnonzero(folds != fold), np.flatnonzero(folds == fold)

    def train(self, fold: int, callbacks: Callbacks | None = None) -> "TrainedFold":
        """Train one fold and write its files: validation logits, staged weights, history.

        The one fold function of every executor (locally or on a Ray worker). It continues
        from the fold's ``state.pt`` when one is there (an earlier attempt of this run, or an
        interrupted run being resumed: :meth:`check_fresh` refused any other), and it does not
        touch the registry index: :meth:`register` records the result on the driver.
        """
        train_idx, val_idx = self.fold_rows(fold)
        model = self._fold_model(fold)
        train_loader, val_loader, generator = self._fold_loaders(train_idx, val_idx)
        outcome = self._run_loop(fold, model, train_loader, val_loader, generator, callbacks)
        # Crash safety: logits, weights and history are written here, then the driver records
        # the entry (what marks the fold finished) and deletes the resume state; a crash in
        # between leaves files no reader sees and a state that finishes at once on resume.
        return self._write_fold(fold, outcome, train_idx, val_idx)

    def _fold_model(self, fold: int):
        """The fold's model (the prepared one, else built with the fold's seed) on the device."""
        model = self._prepared.pop(fold, None)
        if model is None:
            model = self._seeded_model(fold)
        model = model.to(self.device)
        if self.config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def _fold_loaders(self, train_idx, val_idx):
        """(train loader, validation loader, the train loader's generator) over the fold's rows."""
        cfg, paths = self.config, self.split.paths
        train_ds = ImageDataset(paths[train_idx], self.targets[train_idx], train_transform(self.preprocess, self.augment))
        val_ds = ImageDataset(paths[val_idx], self.targets[val_idx], self.preprocess.geometry_transform())
        generator = torch.Generator()
        pin = self.device.type == "cuda"
        train_loader = make_loader(train_ds, batch_size=cfg.batch_size, shuffle=True, workers=cfg.workers,
                                   generator=generator, drop_last=len(train_ds) > cfg.batch_size, pin_memory=pin)
        val_loader = make_loader(val_ds, batch_size=cfg.batch_size, shuffle=False, workers=cfg.workers,
                                 pin_memory=pin)
        return train_loader, val_loader, generator

    def _run_loop(self, fold: int, model, train_loader, val_loader, generator, callbacks):
        """Run the training loop of one fold (optimiser, schedule, scaler, loss built here); errors name the fold."""
        from ..models import joint_logits

        cfg, head, space = self.config, self.config.head, self.label_space
        optimizer = build_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay)
        scheduler = None
        if cfg.scheduler != "none" or cfg.warmup_epochs > 0:
            scheduler = build_scheduler(optimizer, cfg.scheduler, epochs=cfg.epochs, steps_per_epoch=len(train_loader),
                                        warmup_epochs=cfg.warmup_epochs, min_factor=cfg.min_lr)
        scaler = torch.amp.GradScaler("cuda") if self.use_scaler else None
        loss_fn = TrainLoss(cfg.loss, factor_sizes=head_blocks(space, head), weights=cfg.loss_weights,
                            gamma=cfg.focal_gamma, smoothing=cfg.smoothing)  # factor sizes: None for a flat head
        settings = LoopSettings(
            epochs=cfg.epochs, num_classes=space.num_classes, monitor=cfg.monitor, patience=cfg.patience,
            amp_dtype=self.amp_dtype, channels_last=cfg.channels_last, loader_seed=self.fold_seed(fold) * 10007,
            state_path=self.fam_dir / f"fold{fold}" / STATE_NAME, resume=True, fold=int(fold), config=cfg.to_dict(),
        )
        try:
            with deterministic_mode(cfg.deterministic):
                return run_fold(
                    model, train_loader, val_loader, loss_fn=loss_fn, optimizer=optimizer, scheduler=scheduler,
                    scaler=scaler, settings=settings, device=self.device, normalize=self.preprocess.normalize,
                    to_logits=lambda out: joint_logits(out, head, space), train_generator=generator,
                    callbacks=callbacks,
                )
        except DataError as exc:
            raise DataError(f"{self.family} fold {fold}: {_worker_message(exc)}") from None
        except EnsemblerError as exc:
            exc.args = (f"{self.family} fold {fold}: {exc}",)  # same type, the fold named
            raise

    def _write_fold(self, fold: int, outcome, train_idx, val_idx) -> "TrainedFold":
        """Write the fold's validation logits, staged weights and history; the result for the driver."""
        cfg, best, fold_dir = self.config, outcome.best_record, self.fam_dir / f"fold{fold}"
        write_logits(fold_dir / "val_logits.npz", Logits(
            self.split.ids[val_idx], outcome.best_val_logits, label_space=self.label_space,
            labels=self.targets[val_idx], name=f"{self.family}-fold{fold}",
            meta={"producer": f"{self.family}-fold{fold}", "family": self.family, "fold": int(fold),
                  "best_epoch": int(outcome.best_epoch),
                  "logits": "joint logits of the fold's validation rows at its best epoch"}))
        metrics = {"val_f1": best.val_f1, "val_acc": best.val_acc, "val_loss": best.val_loss,
                   "best_epoch": outcome.best_epoch, "epochs_run": len(outcome.history),
                   "monitor": cfg.monitor, "train_rows": int(len(train_idx)), "val_rows": int(len(val_idx))}
        entry = self.registry.stage(
            outcome.best_weights, family=self.family, fold=int(fold), arch=cfg.arch, head=cfg.head,
            label_space=self.label_space, preprocess=self.preprocess, metrics=metrics, target=cfg.target,
            train_config=cfg.to_dict(),
        )
        write_json_atomic(fold_dir / "history.json", {
            "fold": int(fold), "best_epoch": outcome.best_epoch, "stopped_early": outcome.stopped_early,
            "history": [r.to_dict() for r in outcome.history],
        })
        record = entry.to_dict()
        # Where it trained (provenance; on Ray, CUDA_VISIBLE_DEVICES is the GPUs Ray gave the task).
        record["trained_on"] = {"host": socket.gethostname(), "device": str(self.device),
                                "visible_gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}
        summary = FoldSummary(int(fold), entry.id, int(outcome.best_epoch), float(best.val_f1), float(best.val_acc),
                              float(best.val_loss), len(outcome.history), bool(outcome.stopped_early),
                              train_idx, val_idx)
        return TrainedFold(summary, record, int(outcome.resumed_at))

    def register(self, trained: "TrainedFold"):
        """Record a trained fold in the registry (under its lock) and drop its resume state; on the driver."""
        from ..registry import Entry
        entry = self.registry.record(Entry.from_dict(trained.entry), overwrite=self.resume)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            (self.fam_dir / f"fold{trained.fold}" / STATE_NAME).unlink(missing_ok=True)
        return replace(trained.summary, entry_id=entry.id)


@dataclass
class TrainedFold:
    """What :meth:`FoldRunner.train` sends back to the driver: the fold's summary and the staged entry, no tensors."""

    summary: FoldSummary     # its entry_id the staged one until :meth:`FoldRunner.register` records it
    entry: dict              # the registry entry to record (weights written, sha256 set)
    resumed_at: int = 0      # epochs an earlier attempt had finished

    @property
    def fold(self) -> int:
        """The fold number."""
        return self.summary.fold


@contextlib.contextmanager
def deterministic_mode(on: bool):
    """Deterministic algorithms (and no cuDNN autotuning) for the block, restored after it."""
    previous_det = torch.are_deterministic_algorithms_enabled()
    previous_bench = torch.backends.cudnn.benchmark
    try:
        if on:
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        yield
    finally:
        torch.use_deterministic_algorithms(previous_det)
        torch.backends.cudnn.benchmark = previous_bench


def _worker_message(exc: Exception) -> str:
    """The original message of an error re-raised from a DataLoader worker (torch prefixes
    it with 'Caught ... in DataLoader worker' and the worker's traceback)."""
    text = str(exc)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.strip().splitlines() if line.strip()][-1]
    return last.split(": ", 1)[1] if last.startswith("ensembler.errors.") and ": " in last else last


# ---------------------------------------------------------------------------- the fold job
@dataclass
class FoldJob:
    """Everything a worker needs to train folds of one family (picklable; shared once per family)."""

    split: object            # the split SampleTable
    targets: np.ndarray
    label_space: LabelSpace
    config: TrainConfig
    registry_root: str
    family: str
    resume: bool = False

    def __post_init__(self):
        self._runner = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_runner"] = None  # a built runner (and its prepared model) stays in its process
        return state

    def runner(self) -> FoldRunner:
        """This process's FoldRunner of the family (built once)."""
        if self._runner is None:
            from ..registry import Registry

            self._runner = FoldRunner(split=self.split, targets=self.targets, label_space=self.label_space,
                                      config=self.config, registry=Registry(self.registry_root), family=self.family,
                                      resume=self.resume)
        return self._runner


def train_fold_job(job: FoldJob, fold: int, *, report=None) -> TrainedFold:
    """The task every executor runs for one fold: :meth:`FoldRunner.train`, its progress sent
    as events through ``report`` (see :class:`EventCallbacks`)."""
    root = Path(job.registry_root)
    if not root.is_dir():
        raise EnsemblerError(f"the registry folder {root} is not visible on {socket.gethostname()}: every "
                             f"worker must see it at the same path (a shared filesystem)")
    return job.runner().train(fold, callbacks=EventCallbacks(report) if report is not None else None)


class EventCallbacks(Callbacks):
    """Loop callbacks turned into small progress events (dicts) for the driver's display;
    batch events at most every ``interval`` seconds."""

    def __init__(self, report, interval: float = 1.0):
        self.report, self.interval = report, interval
        self._last = 0.0

    def _batch(self, event: dict) -> None:
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self.report(event)

    def on_epoch_start(self, epoch, epochs, train_batches, val_batches) -> None:
        self._last = 0.0
        self.report({"kind": "epoch_start", "epoch": epoch, "epochs": epochs, "train_batches": train_batches,
                     "val_batches": val_batches})

    def on_train_batch(self, batch, running_loss) -> None:
        self._batch({"kind": "batch", "phase": "train", "batch": batch, "loss": float(running_loss)})

    def on_val_batch(self, batch) -> None:
        self._batch({"kind": "batch", "phase": "val", "batch": batch})

    def on_epoch_end(self, record, is_best) -> None:
        self.report({"kind": "epoch", "record": record.to_dict(), "is_best": bool(is_best)})

    def on_state_saved(self, path, epoch, history, best_epoch) -> None:
        self.report({"kind": "saved", "epoch": epoch, "history": [r.to_dict() for r in history],
                     "best_epoch": int(best_epoch)})

    def note(self, text: str) -> None:
        self.report({"kind": "note", "text": text})
