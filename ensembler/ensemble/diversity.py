"""Diversity of ensemble members on OOF rows: what makes a blend worth its cost.

Two members that make the same mistakes add nothing to a vote; a blend gains where one is
right and the other wrong. For every pair of members, over the same OOF rows:

- **disagreement**: the fraction of rows whose predicted classes (argmax) differ;
- **error correlation**: the Pearson correlation of their 0/1 error indicators
  (``1[pred != y]``; the phi coefficient). 1: they fail on the same rows; 0: independently;
  undefined (``nan``) when a member is always right or always wrong;
- **both wrong**: the fraction of rows both get wrong (a blend of the two cannot fix those
  by voting between them alone).

Examples
--------
>>> import numpy as np
>>> y = np.array([0, 1, 1, 0])
>>> a = np.eye(2)[[0, 1, 0, 0]]; b = np.eye(2)[[0, 1, 0, 1]]
>>> r = pairwise_diversity(np.stack([a, b]), y, ["a", "b"])[0]
>>> r["a"], r["b"], r["disagreement"], r["both_wrong"]
('a', 'b', 0.25, 0.25)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def pairwise_diversity(logits, labels, names: Sequence[str]) -> list[dict]:
    """One row per pair of members: ``a``, ``b``, ``disagreement``, ``error_corr``, ``both_wrong``,
    ``err_a``, ``err_b`` (each member's error rate), in member order (``a`` before ``b``).

    Parameters
    ----------
    logits : array (M, N, C)
    labels : array (N,)
    names : sequence of M str
    """
    z = np.asarray(logits)
    y = np.asarray(labels, dtype=np.int64)
    if z.ndim != 3 or len(names) != z.shape[0] or z.shape[1] != len(y):
        raise ValueError(f"diversity needs (M, N, C) logits, M names and N labels; got {z.shape}, "
                         f"{len(names)} names, {len(y)} labels")
    pred = z.argmax(axis=2)
    wrong = (pred != y[None, :]).astype(np.float64)
    rates = wrong.mean(axis=1)
    rows = []
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            sd = wrong[i].std() * wrong[j].std()
            cov = ((wrong[i] - rates[i]) * (wrong[j] - rates[j])).mean()
            rows.append({"a": names[i], "b": names[j], "disagreement": float((pred[i] != pred[j]).mean()),
                         "error_corr": float(cov / sd) if sd > 0 else float("nan"),
                         "both_wrong": float((wrong[i] * wrong[j]).mean()),
                         "err_a": float(rates[i]), "err_b": float(rates[j])})
    return rows
