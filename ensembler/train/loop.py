"""One fold's training loop: epochs, validation, best-by-monitor, early stopping, resume state.

:func:`run_fold` works on any ``nn.Module`` and any DataLoaders yielding ``(uint8 images,
int targets)``; it knows nothing about timm, the registry or folds on disk. Images are
normalised on the device (``normalize``), raw outputs are turned into joint logits for the
metrics by ``to_logits`` (identity for flat heads, joint log-probs for factored heads).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..errors import EnsemblerError
from ..metrics import accuracy, macro_f1
from .state import FoldState, capture_rng, load_state, restore_rng, save_state


@dataclass
class EpochRecord:
    """Metrics of one finished epoch (one row of ``metrics.csv``)."""

    epoch: int
    train_loss: float
    val_loss: float
    val_f1: float
    val_acc: float
    lr: float
    seconds: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class FoldOutcome:
    """What a finished fold leaves: the best epoch's weights, metrics and validation logits."""

    best_epoch: int
    best_score: float
    best_weights: dict[str, torch.Tensor]
    best_val_logits: np.ndarray
    history: list[EpochRecord]
    stopped_early: bool
    resumed_at: int = 0  # epochs already done when this call started (0 = fresh)

    @property
    def best_record(self) -> EpochRecord:
        return next(r for r in self.history if r.epoch == self.best_epoch)


class Callbacks:
    """Hooks the loop calls; the default does nothing (``progress=False``)."""

    def on_epoch_start(self, epoch: int, epochs: int, train_batches: int, val_batches: int) -> None: ...

    def on_train_batch(self, batch: int, running_loss: float) -> None: ...

    def on_val_batch(self, batch: int) -> None: ...

    def on_epoch_end(self, record: EpochRecord, is_best: bool) -> None: ...

    def on_state_saved(self, path: Path, epoch: int, history: list[EpochRecord], best_epoch: int) -> None: ...


@dataclass
class LoopSettings:
    """How :func:`run_fold` trains (everything that is not a model, data or optimiser).

    ``loader_seed``: the train loader's generator is re-seeded to ``loader_seed + epoch`` at
    each epoch, so the shuffle (and worker seeds) of epoch ``e`` does not depend on whether
    the run was interrupted before it.
    """

    epochs: int
    num_classes: int
    monitor: str = "f1"
    patience: int | None = None
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    loader_seed: int = 0
    state_path: Path | None = None
    resume: bool = False
    fold: int | None = None     # recorded in the resume state (FoldState.fold)
    config: dict[str, Any] = field(default_factory=dict)  # recorded in the resume state (the TrainConfig)


def _improved(score: float, best: float | None, monitor: str) -> bool:
    if best is None:
        return True
    return score < best if monitor == "loss" else score > best


def _monitored(record: EpochRecord, monitor: str) -> float:
    return {"f1": record.val_f1, "acc": record.val_acc, "loss": record.val_loss}[monitor]


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def run_fold(
    model: torch.nn.Module,
    train_loader,
    val_loader,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler=None,
    scaler=None,
    settings: LoopSettings,
    device: torch.device | str = "cpu",
    normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
    to_logits: Callable[[torch.Tensor], torch.Tensor] | None = None,
    train_generator: torch.Generator | None = None,
    callbacks: Callbacks | None = None,
) -> FoldOutcome:
    """Train one fold and return its best epoch.

    Parameters
    ----------
    model : nn.Module
        Already on ``device``.
    train_loader, val_loader : iterables of ``(images, targets)``
        Images as uint8 ``(B, 3, H, W)`` (normalised here by ``normalize``) or float.
        ``val_loader`` must not shuffle: the returned logits follow its order.
    loss_fn : callable
        ``loss_fn(outputs, targets) -> scalar``; also gives the validation loss (computed on
        the whole validation set at once, so it does not depend on the batch size).
    optimizer, scheduler, scaler
        ``scheduler`` is stepped once per batch; ``scaler`` is a GradScaler for fp16.
    settings : LoopSettings
    to_logits : callable, optional
        Raw outputs -> joint logits for the metrics (default identity).
    train_generator : torch.Generator, optional
        The train loader's sampler generator; re-seeded each epoch (see LoopSettings).
    callbacks : Callbacks, optional

    Returns
    -------
    FoldOutcome

    Notes
    -----
    After every epoch the full state (model, optimiser, scheduler, scaler, RNG states,
    best weights, history) is written atomically to ``settings.state_path``. With
    ``settings.resume`` and an existing state file, training continues from it; a state
    marked finished returns at once. Resuming gives the same weights as an uninterrupted run
    when the run is deterministic (CPU, ``torch.use_deterministic_algorithms``).
    """
    device = torch.device(device)
    cb = callbacks or Callbacks()
    normalize = normalize or (lambda x: x.float())
    to_logits = to_logits or (lambda x: x)
    s = settings

    run = _resume(s, model, optimizer, scheduler, scaler) if s.resume else _Run()
    resumed_at = run.epoch
    while not run.finished and run.epoch < s.epochs:
        run.epoch += 1
        epoch = run.epoch
        t0 = time.perf_counter()
        if train_generator is not None:
            train_generator.manual_seed(s.loader_seed + epoch)
        n_train = len(train_loader) if hasattr(train_loader, "__len__") else 0
        n_val = len(val_loader) if hasattr(val_loader, "__len__") else 0
        cb.on_epoch_start(epoch, s.epochs, n_train, n_val)

        train_loss = _train_epoch(model, train_loader, loss_fn, optimizer, scheduler, scaler, s, device,
                                  normalize, cb, epoch)
        record, logits = _validate(model, val_loader, loss_fn, s, device, normalize, to_logits, cb, epoch,
                                   train_loss, float(optimizer.param_groups[0]["lr"]), t0)
        is_best = run.record(record, logits, model, s)
        cb.on_epoch_end(record, is_best)
        if s.state_path is not None:
            _save(s, run, model, optimizer, scheduler, scaler)
            cb.on_state_saved(Path(s.state_path), epoch, list(run.history), run.best_epoch)

    if run.best_weights is None:
        raise EnsemblerError("no epoch was trained (epochs must be >= 1)")
    stopped_early = bool(run.history) and run.history[-1].epoch < s.epochs
    return FoldOutcome(run.best_epoch, float(run.best_score), run.best_weights, run.best_logits, run.history,
                       stopped_early, resumed_at)


@dataclass
class _Run:
    """Where one fold's training stands: what the resume state saves and restores."""

    history: list[EpochRecord] = field(default_factory=list)
    best_score: float | None = None
    best_epoch: int = 0
    best_weights: dict[str, torch.Tensor] | None = None
    best_logits: np.ndarray | None = None
    bad_epochs: int = 0
    epoch: int = 0
    finished: bool = False
    stopped_early: bool = False

    def record(self, record: EpochRecord, logits: np.ndarray, model, s: LoopSettings) -> bool:
        """Add one epoch; keep its weights and logits when it is the best so far; decide to stop."""
        self.history.append(record)
        score = _monitored(record, s.monitor)
        is_best = _improved(score, self.best_score, s.monitor)
        if is_best:
            self.best_score, self.best_epoch, self.bad_epochs = score, record.epoch, 0
            self.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            self.best_logits = logits.astype(np.float32)
        else:
            self.bad_epochs += 1
        stop_early = s.patience is not None and self.bad_epochs >= s.patience
        self.finished = stop_early or record.epoch >= s.epochs
        self.stopped_early = bool(stop_early and record.epoch < s.epochs)
        return is_best


def _resume(s: LoopSettings, model, optimizer, scheduler, scaler) -> _Run:
    """Restore model, optimiser, scheduler, scaler and RNG from ``s.state_path`` (fresh when absent)."""
    if s.state_path is None or not Path(s.state_path).exists():
        return _Run()
    state = load_state(s.state_path)
    model.load_state_dict(state.model)
    optimizer.load_state_dict(state.optimizer)
    if scheduler is not None and state.scheduler is not None:
        scheduler.load_state_dict(state.scheduler)
    if scaler is not None and state.scaler is not None:
        scaler.load_state_dict(state.scaler)
    restore_rng(state.rng)
    return _Run(history=[EpochRecord(**h) for h in state.history], best_score=state.best_score,
                best_epoch=state.best_epoch, best_weights=state.best_model, best_logits=state.best_val_logits,
                bad_epochs=state.bad_epochs, epoch=state.epoch, finished=state.finished)


def _save(s: LoopSettings, run: _Run, model, optimizer, scheduler, scaler) -> None:
    """Write the full state after an epoch (atomically, see :func:`save_state`)."""
    save_state(s.state_path, FoldState(
        epoch=run.epoch, finished=run.finished, stopped_early=run.stopped_early,
        model={k: v.detach().cpu() for k, v in model.state_dict().items()},
        optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict() if scheduler is not None else None,
        scaler=scaler.state_dict() if scaler is not None else None,
        rng=capture_rng(), best_score=run.best_score, best_epoch=run.best_epoch, bad_epochs=run.bad_epochs,
        best_model=run.best_weights, best_val_logits=run.best_logits,
        history=[r.to_dict() for r in run.history], fold=s.fold, config=s.config,
    ))


def _validate(model, val_loader, loss_fn, s: LoopSettings, device, normalize, to_logits, cb: Callbacks,
              epoch: int, train_loss: float, lr: float, t0: float) -> tuple[EpochRecord, np.ndarray]:
    """Score the validation fold; a diverged run (non-finite loss or logits) is refused here."""
    outputs, targets = _predict(model, val_loader, s, device, normalize, cb)
    with torch.no_grad():
        val_loss = float(loss_fn(outputs, targets))
        logits = to_logits(outputs).float().numpy()
    if not (math.isfinite(val_loss) and math.isfinite(train_loss) and np.isfinite(logits).all()):
        # Diverged weights (e.g. --lr 1e9): refused here, never recorded as NaN metrics.
        raise EnsemblerError(
            f"training diverged at epoch {epoch}: train loss {train_loss}, validation loss {val_loss}"
            + ("" if np.isfinite(logits).all() else ", non-finite validation logits")
            + "; lower --lr" + (" or drop --amp" if s.amp_dtype is not None else ""))
    pred = logits.argmax(1)
    y = targets.numpy()
    record = EpochRecord(epoch=epoch, train_loss=train_loss, val_loss=val_loss,
                         val_f1=macro_f1(y, pred, s.num_classes), val_acc=accuracy(y, pred), lr=lr,
                         seconds=time.perf_counter() - t0)
    return record, logits

def _train_epoch(model, loader, loss_fn, optimizer, scheduler, scaler, s: LoopSettings, device, normalize,
                 cb: Callbacks, epoch: int) -> float:
    model.train()
    total, count = 0.0, 0
    for i, (images, targets) in enumerate(loader):
        x = normalize(images.to(device, non_blocking=True))
        if s.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = targets.to(device, non_blocking=True)
        with _autocast(device, s.amp_dtype):
            outputs = model(x)
        loss = loss_fn(outputs.float(), y)
        if not torch.isfinite(loss):
            raise EnsemblerError(
                f"training loss became {loss.item()} at epoch {epoch}, batch {i + 1}: lower --lr"
                + (" or drop --amp" if s.amp_dtype is not None else "")
            )
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        n = len(y)
        total += loss.item() * n
        count += n
        cb.on_train_batch(i + 1, total / count)
    return total / max(count, 1) if count else math.nan


@torch.no_grad()
def _predict(model, loader, s: LoopSettings, device, normalize, cb: Callbacks):
    model.eval()
    outs, ys = [], []
    for i, (images, targets) in enumerate(loader):
        x = normalize(images.to(device, non_blocking=True))
        if s.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device, s.amp_dtype):
            outputs = model(x)
        outs.append(outputs.float().cpu())
        ys.append(targets.cpu())
        cb.on_val_batch(i + 1)
    if not outs:
        raise EnsemblerError("the validation fold is empty")
    return torch.cat(outs), torch.cat(ys)
