"""PNG charts of a tuning: member weights, and per-class F1 of members vs the tuned blend.

matplotlib is imported inside the functions with the non-interactive Agg backend, so
importing :mod:`ensembler.ensemble` stays fast and needs no display. Files are written
atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .._io import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


def plot_weights(names: Sequence[str], weights, path, temperatures=None, title: str = "ensemble weights") -> Path:
    """Horizontal bar chart of member weights (temperatures in the labels when given)."""
    plt = _pyplot()
    weights = np.asarray(weights, dtype=float)
    labels = [f"{n} (T={t:.2f})" for n, t in zip(names, temperatures)] if temperatures is not None else list(names)
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(names) + 1.2))
    try:
        ypos = np.arange(len(names))
        ax.barh(ypos, weights, color=["tab:blue" if w > 0 else "lightgray" for w in weights])
        ax.set_yticks(ypos, labels)
        ax.invert_yaxis()
        ax.set_xlabel("weight")
        ax.set_xlim(0, max(1e-9, float(weights.max())) * 1.15)
        for y, w in zip(ypos, weights):
            ax.text(w, y, f" {w:.3f}", va="center", fontsize=8)
        ax.set_title(title)
        return _save(fig, Path(path))
    finally:
        plt.close(fig)


def plot_per_class_f1(per_class: Mapping[str, np.ndarray], classes: Sequence[str], path,
                      highlight: Sequence[str] = ("tuned", "tuned (honest)"), title: str = "per-class F1") -> Path:
    """Per-class F1 lines: members thin and grey-ish, the tuned blend(s) bold."""
    plt = _pyplot()
    classes = list(classes)
    fig, ax = plt.subplots(figsize=(max(7, 0.45 * len(classes) + 2), 4.5))
    try:
        x = np.arange(len(classes))
        for name, f1 in per_class.items():
            bold = name in highlight
            ax.plot(x, f1, marker="o" if bold else ".", linewidth=2.2 if bold else 0.9,
                    alpha=1.0 if bold else 0.6, label=name)
        ax.set_xticks(x, classes, rotation=60, ha="right", fontsize=8)
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("F1")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left", ncol=2)
        ax.set_title(title)
        return _save(fig, Path(path))
    finally:
        plt.close(fig)


#: The files :func:`write_tuning_plots` writes in its folder.
PLOT_NAMES = ("weights.png", "per_class_f1.png")


def write_tuning_plots(result, folder) -> dict[str, Path]:
    """``weights.png`` and ``per_class_f1.png`` of a :class:`~ensembler.ensemble.TuneResult` in ``folder``."""
    folder = Path(folder)
    r = result.tuned_recipe or result.recipe  # the tuned blend's weights, whether it ships or not
    ships = result.decision.name if result.decision is not None else None
    return {
        "weights": plot_weights(r.names, r.weights, folder / "weights.png", r.temperatures,
                                title=f"tuned {r.method} weights ({r.metric})" + (f"; ships: {ships}" if ships else "")),
        "per_class_f1": plot_per_class_f1(result.per_class_f1, r.classes, folder / "per_class_f1.png"),
    }
