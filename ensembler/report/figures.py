"""The report's charts, each drawn once into PNG bytes (matplotlib's Agg canvas, no pyplot state).

Every function takes plain arrays and returns ``bytes``; :mod:`ensembler.report.page`
embeds them as data URIs. Figures are small (about 7 inches wide at 90 dpi) so the page
stays light and readable on a phone once scaled to the screen's width.
"""

from __future__ import annotations

import io
from typing import Mapping, Sequence

import numpy as np

DPI = 90


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _annotate(ax, values: np.ndarray, fmt: str, threshold: float | None = None, fontsize: int = 8) -> None:
    if values.size > 400:
        return
    hi = np.nanmax(values) if threshold is None else threshold
    lo = np.nanmin(values)
    mid = (hi + lo) / 2
    for (i, j), v in np.ndenumerate(values):
        if np.isfinite(v):
            ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=fontsize,
                    color="white" if v < mid else "black")


def fold_heatmap(names: Sequence[str], folds: Sequence[int], scores: np.ndarray, metric: str = "macro-F1") -> bytes:
    """Members (rows) x folds (columns) heatmap of a score, each cell annotated."""
    scores = np.asarray(scores, dtype=float)
    fig = _figure(min(9.0, 2.5 + 0.9 * len(folds)), 1.2 + 0.45 * len(names))
    ax = fig.add_subplot()
    im = ax.imshow(scores, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(folds)), [f"fold {f}" for f in folds])
    ax.set_yticks(range(len(names)), names)
    _annotate(ax, scores, ".3f")
    fig.colorbar(im, ax=ax, label=f"OOF {metric}")
    ax.set_title(f"OOF {metric} of each member on each fold")
    return _png(fig)


def pair_heatmaps(names: Sequence[str], disagreement: np.ndarray, error_corr: np.ndarray) -> bytes:
    """Two M x M panels: how often two members' argmax differ, and the correlation of their errors."""
    m = len(names)
    fig = _figure(min(11.0, 3.0 + 1.4 * m), 1.6 + 0.55 * m)
    for k, (mat, title, cmap, vmin, vmax) in enumerate((
            (disagreement, "disagreement (share of rows)", "magma", 0.0, None),
            (error_corr, "error correlation (Pearson)", "coolwarm", -1.0, 1.0))):
        ax = fig.add_subplot(1, 2, k + 1)
        im = ax.imshow(mat, cmap=cmap, vmin=vmin, vmax=vmax)
        ax.set_xticks(range(m), names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(m), names if k == 0 else [""] * m, fontsize=8)
        _annotate(ax, np.asarray(mat, dtype=float), ".2f", fontsize=7)
        ax.set_title(title, fontsize=10)
        fig.colorbar(im, ax=ax, shrink=0.8)
    return _png(fig)


def per_class_f1(classes: Sequence[str], rows: Mapping[str, np.ndarray], blend: str, where: str) -> bytes:
    """Per-class F1 of each member (thin) and the blend (bold)."""
    fig = _figure(min(11.0, max(6.5, 0.38 * len(classes) + 2.5)), 3.6)
    ax = fig.add_subplot()
    x = np.arange(len(classes))
    for name, f1 in rows.items():
        bold = name == blend
        ax.plot(x, f1, marker="o" if bold else ".", linewidth=2.4 if bold else 1.0, alpha=1.0 if bold else 0.7,
                color="black" if bold else None, label=name, zorder=3 if bold else 2)
    ax.set_xticks(x, classes, rotation=60 if len(classes) > 10 else 0, ha="right" if len(classes) > 10 else "center",
                  fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("F1")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left", ncol=3)
    ax.set_title(f"per-class F1 ({where}): members vs {blend}")
    return _png(fig)


def confusion(classes: Sequence[str], cm: np.ndarray, title: str) -> bytes:
    """Row-normalised confusion matrix (true class rows), counts annotated when it is small."""
    cm = np.asarray(cm, dtype=float)
    share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    c = len(classes)
    side = min(8.0, 2.5 + 0.35 * c)
    fig = _figure(side + 1.0, side)
    ax = fig.add_subplot()
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(c), classes, rotation=60 if c > 10 else 0, fontsize=7 if c > 10 else 8)
    ax.set_yticks(range(c), classes, fontsize=7 if c > 10 else 8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if c <= 20:
        for (i, j), v in np.ndenumerate(cm):
            if v:
                ax.text(j, i, f"{int(v)}", ha="center", va="center", fontsize=6 if c > 10 else 8,
                        color="white" if share[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, shrink=0.8, label="share of the true class")
    ax.set_title(title)
    return _png(fig)


def reliability(curves: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray, float]]) -> bytes:
    """Reliability diagram: per curve (bin confidence, bin accuracy, bin counts, ECE)."""
    fig = _figure(6.5, 4.2)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
    for name, (conf, acc, counts, ece) in curves.items():
        keep = counts > 0
        ax.plot(conf[keep], acc[keep], marker="o", label=f"{name} (ECE {ece:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title("reliability of the blend on OOF rows")
    return _png(fig)


def tta_deltas(reports: Sequence[tuple[str, Sequence[str], np.ndarray, np.ndarray]]) -> bytes:
    """Per family: each view's and each merged rule's change in macro-F1 and log-loss against no TTA."""
    n = len(reports)
    rows = max(len(r[1]) for r in reports)
    fig = _figure(8.0, (0.9 + 0.28 * rows) * n + 0.4)
    for k, (title, labels, d_f1, d_ll) in enumerate(reports):
        y = np.arange(len(labels))
        for col, (vals, what) in enumerate(((d_f1, "Δ macro-F1 (higher is better)"),
                                            (d_ll, "Δ log-loss (lower is better)"))):
            ax = fig.add_subplot(n, 2, 2 * k + col + 1)
            good = vals >= 0 if col == 0 else vals <= 0
            ax.barh(y, vals, color=np.where(good, "tab:green", "tab:red"))
            ax.axvline(0, color="black", linewidth=0.8)
            ax.set_yticks(y, labels if col == 0 else [""] * len(labels), fontsize=7)
            ax.invert_yaxis()
            ax.tick_params(axis="x", labelsize=7)
            ax.set_title(f"{title}: {what}", fontsize=8)
    return _png(fig)


def learning_curves(families: Sequence[tuple[str, Mapping[int, Mapping[str, np.ndarray]]]]) -> bytes:
    """Per family (one row of panels): train/val loss and validation macro-F1 per epoch, one colour per fold."""
    n = len(families)
    fig = _figure(8.0, 2.6 * n + 0.3)
    for k, (family, folds) in enumerate(families):
        ax_loss, ax_f1 = fig.add_subplot(n, 2, 2 * k + 1), fig.add_subplot(n, 2, 2 * k + 2)
        for i, (fold, h) in enumerate(sorted(folds.items())):
            color = f"C{i % 10}"
            ax_loss.plot(h["epoch"], h["train_loss"], "--", color=color, linewidth=1, marker=".")
            ax_loss.plot(h["epoch"], h["val_loss"], "-", color=color, linewidth=1.4, marker=".", label=f"fold {fold}")
            ax_f1.plot(h["epoch"], h["val_f1"], "-", color=color, marker=".", label=f"fold {fold}")
        ax_loss.set_title(f"{family}: loss (dashed train, solid val)", fontsize=9)
        ax_f1.set_title(f"{family}: validation macro-F1", fontsize=9)
        for ax in (ax_loss, ax_f1):
            ax.set_xlabel("epoch", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        ax_f1.legend(fontsize=7)
    return _png(fig)
