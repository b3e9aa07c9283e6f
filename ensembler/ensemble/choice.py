"""What ships: the candidate the honest score supports, by a paired comparison over folds.

``tune-weights`` scores every candidate on the same held-out folds: each single member and the
untuned hard and uniform soft votes (nothing is fitted, so their fold scores are honest as
they are), the tuned blend, and the tuned blend with class biases (both re-tuned with each fold
held out). A tuned blend always looks better in-sample; on a small OOF set its honest gain is
often inside the fold-to-fold noise, and then the simpler, cheaper candidate is the better bet.

**The rule** (:func:`choose`). Candidates climb a ladder of cost: the best single member, then
the better of the two untuned votes, then the tuned blend, then the tuned blend with class
biases. At each rung, the rung's candidate replaces the current choice only when its paired gain
over it, fold by fold on the same rows, is positive and larger than one standard error of that
gain::

    d_f  = score_f(candidate) - score_f(current)      (sign flipped for log-loss)
    ship the candidate  iff  mean(d) > 0  and  mean(d) > sd(d) / sqrt(K)     (K folds, ddof=1)

i.e. the paired t statistic over folds exceeds 1. With fewer than two folds there is no honest
estimate: the most tuned candidate ships, marked *unchecked*. Within a rung the best mean fold
score wins; ties go to the earlier candidate (members in the order given, soft before hard).

Examples
--------
>>> a = Candidate("a", "member", {0: 0.80, 1: 0.82, 2: 0.78})
>>> t = Candidate("tuned", "tuned", {0: 0.81, 1: 0.81, 2: 0.79})
>>> d = choose([a], [t], metric="f1")
>>> d.name, d.kind
('a', 'member')
>>> t2 = Candidate("tuned", "tuned", {0: 0.85, 1: 0.86, 2: 0.84})
>>> choose([a], [t2], metric="f1").name
'tuned'
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..errors import ParameterError

#: Rungs of the ladder, cheapest first.
LADDER = ("member", "vote", "tuned", "tuned+bias")


@dataclass(frozen=True)
class Candidate:
    """One thing that could ship, with its honest score on each held-out fold.

    Attributes
    ----------
    name : str
        Table name (a member's name, ``"soft vote (uniform)"``, ...).
    kind : str
        ``member``, ``hard``, ``soft``, ``tuned`` or ``tuned+bias``.
    per_fold : dict fold -> float
        The metric on that fold's rows, the candidate fitted without them (when it is fitted).
    """

    name: str
    kind: str
    per_fold: dict = field(default_factory=dict)

    @property
    def rung(self) -> str:
        return {"hard": "vote", "soft": "vote"}.get(self.kind, self.kind)

    def mean(self) -> float:
        return float(np.mean(list(self.per_fold.values()))) if self.per_fold else math.nan


@dataclass(frozen=True)
class Decision:
    """What ships and why (one line: :attr:`reason`)."""

    name: str
    kind: str
    reason: str
    checked: bool = True
    steps: tuple = ()  # (candidate, against, mean gain, standard error, shipped?) for each rung climbed

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "reason": self.reason, "checked": self.checked,
                "steps": [{"candidate": c, "against": a, "gain": g, "se": s, "shipped": ok}
                          for c, a, g, s, ok in self.steps]}


def paired_gain(candidate: Candidate, current: Candidate, metric: str) -> tuple[float, float, int]:
    """Mean and standard error of the fold-by-fold gain of ``candidate`` over ``current``.

    Gains are oriented so that positive is better (log-loss differences are negated). Only
    folds both candidates were scored on count.
    """
    folds = sorted(set(candidate.per_fold) & set(current.per_fold))
    d = np.array([candidate.per_fold[f] - current.per_fold[f] for f in folds], dtype=np.float64)
    if metric == "logloss":
        d = -d
    if len(d) == 0:
        return math.nan, math.nan, 0
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.inf
    return float(d.mean()), se, len(d)


def _best(cands: Sequence[Candidate], metric: str) -> Candidate:
    sign = -1.0 if metric == "logloss" else 1.0
    scores = [sign * c.mean() for c in cands]
    return cands[int(np.argmax(scores))]  # first best: members in order, soft before hard


def choose(simple: Sequence[Candidate], tuned: Sequence[Candidate], metric: str) -> Decision:
    """Pick what ships (see the module docstring for the rule).

    Parameters
    ----------
    simple : candidates of kinds ``member``, ``soft``, ``hard`` (at least one member)
    tuned : candidates of kinds ``tuned`` and ``tuned+bias`` (climbed in that order)
    metric : {"f1", "acc", "logloss"}

    Returns
    -------
    Decision
    """
    rungs: dict[str, list[Candidate]] = {r: [] for r in LADDER}
    for c in list(simple) + list(tuned):
        if c.rung not in rungs:
            raise ParameterError("simple", f"candidate {c.name!r} has unknown kind {c.kind!r}")
        rungs[c.rung].append(c)
    if not rungs["member"]:
        raise ParameterError("simple", "choose() needs at least one single-member candidate in simple")
    if not all(c.per_fold for c in list(simple) + list(tuned)) or len(rungs["member"][0].per_fold) < 2:
        top = (rungs["tuned+bias"] or rungs["tuned"] or rungs["vote"] or rungs["member"])[0]
        return Decision(top.name, top.kind, "unchecked: no honest score (fewer than two OOF folds, or "
                        "honest scoring switched off), so nothing can show the tuned blend beats a simpler "
                        "candidate", checked=False)
    current = _best(rungs["member"], metric)
    steps = []
    for rung in LADDER[1:]:
        if not rungs[rung]:
            continue
        cand = _best(rungs[rung], metric)
        gain, se, k = paired_gain(cand, current, metric)
        ok = bool(gain > 0 and gain > se)
        steps.append((cand.name, current.name, gain, se, ok))
        if ok:
            current = cand
    return Decision(current.name, current.kind, _reason(current, steps, metric), True, tuple(steps))


def _reason(current: Candidate, steps, metric: str) -> str:
    k = len(current.per_fold)
    won = [s for s in steps if s[4] and s[0] == current.name]
    if won:
        _, against, gain, se, _ = won[-1]
        why = f"its honest {metric} gain over {against} is {gain:+.4f} (> one standard error {se:.4f})"
    else:
        why = f"the best single member on the honest {metric}"
    lost = [s for s in steps if not s[4] and s[1] == current.name]
    if lost:
        cand, _, gain, se, _ = lost[-1]
        why += f"; {cand}'s gain over it, {gain:+.4f} ± {se:.4f}, is within the fold-to-fold noise"
    return f"{current.name} ships: {why} (paired over {k} folds)"
