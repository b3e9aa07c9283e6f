"""k-fold training: ``train_folds(table, TrainConfig(...), registry)`` and its parts.

Modules, one job each: :mod:`.config` (TrainConfig), :mod:`.losses` (CE, focal, label
smoothing, soft macro-F1, mixes), :mod:`.loop` (one fold's epochs on any module),
:mod:`.state` (the resume state file), :mod:`.optim` (optimiser, LR schedule),
:mod:`.datasets` (datasets, augmentation), :mod:`.fold_runner` (one fold end to end),
:mod:`.folds` (a family's files: naming, run.json, OOF), :mod:`.families` (the driver: folds of
one or several families as tasks of an executor, registered as they finish), :mod:`.curves` (metrics.csv, PNG),
:mod:`.progress` (rich progress).

Importing this package imports torch.
"""

from .config import TrainConfig
from .curves import plot_learning_curves, write_metrics_csv
from .families import train_families, train_folds
from .fold_runner import FoldSummary
from .folds import FamilyResult, assemble_oof, training_targets
from .loop import Callbacks, EpochRecord, FoldOutcome, LoopSettings, run_fold
from .losses import TrainLoss, focal_loss, label_smoothing_loss, soft_f1_loss

__all__ = [
    "Callbacks",
    "EpochRecord",
    "FamilyResult",
    "FoldOutcome",
    "FoldSummary",
    "LoopSettings",
    "TrainConfig",
    "TrainLoss",
    "assemble_oof",
    "focal_loss",
    "label_smoothing_loss",
    "plot_learning_curves",
    "run_fold",
    "soft_f1_loss",
    "train_families",
    "train_folds",
    "training_targets",
    "write_metrics_csv",
]
