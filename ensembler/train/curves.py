"""A family's ``metrics.csv`` and ``learning_curves.png``, so over-fitting is seen, not guessed.

Both are rewritten atomically after every epoch from the histories of all folds of the
family (finished folds and the one in progress).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping, Sequence

from .._io import write_bytes_atomic, write_text_atomic

CSV_COLUMNS = ("fold", "epoch", "train_loss", "val_loss", "val_f1", "val_acc", "lr")


def _get(record, key):
    return record[key] if isinstance(record, Mapping) else getattr(record, key)


def write_metrics_csv(path: str | Path, histories: Mapping[int, Sequence]) -> Path:
    """One row per (fold, epoch): ``fold,epoch,train_loss,val_loss,val_f1,val_acc,lr``.

    ``histories`` maps fold -> list of epoch records (``EpochRecord`` or dicts).
    """
    lines = [",".join(CSV_COLUMNS)]
    for fold in sorted(histories):
        for r in histories[fold]:
            lines.append(",".join([
                str(int(fold)), str(int(_get(r, "epoch"))),
                *(f"{float(_get(r, k)):.6g}" for k in ("train_loss", "val_loss", "val_f1", "val_acc", "lr")),
            ]))
    write_text_atomic(path, "\n".join(lines) + "\n")
    return Path(path)


def plot_learning_curves(path: str | Path, histories: Mapping[int, Sequence], best_epochs: Mapping[int, int],
                         monitor: str = "f1", title: str | None = None) -> Path:
    """Loss (train vs val) and validation macro-F1 / accuracy per epoch, one colour per fold.

    The best epoch of each fold (by ``monitor``) is marked with a star on both panels.
    Uses matplotlib's Agg backend through a private Figure (no pyplot global state).
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), dpi=100)
    ax_loss, ax_score = fig.subplots(1, 2)
    colors = [f"C{i % 10}" for i in range(max(len(histories), 1))]
    for color, fold in zip(colors, sorted(histories)):
        recs = list(histories[fold])
        if not recs:
            continue
        ep = [int(_get(r, "epoch")) for r in recs]
        ax_loss.plot(ep, [_get(r, "train_loss") for r in recs], "--", color=color, label=f"fold {fold} train")
        ax_loss.plot(ep, [_get(r, "val_loss") for r in recs], "-", color=color, label=f"fold {fold} val")
        ax_score.plot(ep, [_get(r, "val_f1") for r in recs], "-", color=color, label=f"fold {fold} val F1")
        ax_score.plot(ep, [_get(r, "val_acc") for r in recs], ":", color=color, label=f"fold {fold} val acc")
        best = best_epochs.get(fold)
        if best is not None and best in ep:
            r = recs[ep.index(best)]
            ax_loss.plot([best], [_get(r, "val_loss")], "*", color=color, markersize=13, markeredgecolor="k")
            ax_score.plot([best], [_get(r, "val_f1")], "*", color=color, markersize=13, markeredgecolor="k")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("train (dashed) vs validation loss")
    ax_score.set_xlabel("epoch")
    ax_score.set_ylabel("score")
    ax_score.set_title(f"validation macro-F1 / accuracy (star: best by {monitor})")
    for ax in (ax_loss, ax_score):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    write_bytes_atomic(path, buf.getvalue())
    return Path(path)
