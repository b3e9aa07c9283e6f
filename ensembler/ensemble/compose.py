"""Composed members: per-factor models (``--target mask``, ``--target gender,age``) in the joint space.

A per-factor model's LabelSpace says, in its meta, which joint space it is a factor of
(``factor_of``) and which factors it covers (``factor``: ``"age"``, or ``"gender,age"`` for a
multi-factor target). :func:`compose_members` sums the parts' log-softmax, each broadcast over
the factors it covers, which is the joint log-probability a factored head would give;
:func:`plan_compositions` decides, before any model runs, whether ``--members all`` can compose
the registry's per-factor families by itself (they cover each factor exactly once) or which
composition to type.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import LogitError
from ..labels import LabelSpace
from ..logits import Logits, few
from ..metrics import log_softmax
from ..names import COMPOSE_SEP


def reorder_to(ref: Logits, m: Logits) -> Logits:
    """``m`` with its rows in ``ref``'s id order; LogitError naming m's file if the id sets differ."""
    if np.array_equal(m.ids, ref.ids):
        return m
    missing = np.setdiff1d(ref.ids, m.ids)
    extra = np.setdiff1d(m.ids, ref.ids)
    if len(missing) or len(extra) or len(m.ids) != len(ref.ids):
        parts = []
        if len(missing):
            parts.append(f"{len(missing)} id(s) of {ref.name!r} missing, e.g. {few(missing)}")
        if len(extra):
            parts.append(f"{len(extra)} id(s) not in {ref.name!r}, e.g. {few(extra)}")
        raise LogitError(f"OOF file {m.source} (member {m.name!r}) ids do not match: " + "; ".join(parts))
    ref_order = np.argsort(ref.ids, kind="stable")
    m_order = np.argsort(m.ids, kind="stable")
    # m_order[k] is m's row holding the k-th smallest id; ref keeps that id at ref_order[k].
    take = np.empty(len(m_order), dtype=np.int64)
    take[ref_order] = m_order
    return m.subset(take)


def check_same_split(ref: Logits, m: Logits, what: str = "blend") -> None:
    """Logitss blended or composed for an honest score must come from one split of the rows.

    Raises
    ------
    LogitError
        Naming both members, their ``k`` and split seed, when their OOF folds disagree on a
        shared id (families trained with a different ``--k`` or ``--seed``).
    """
    if ref.folds is None or m.folds is None:
        return
    if not np.array_equal(ref.ids, m.ids):
        m = reorder_to(ref, m)
    a, b = np.asarray(ref.folds), np.asarray(m.folds)
    # Fold numbers may be permuted between two runs of the same split: compare the partitions.
    pairs = set(zip(a.tolist(), b.tolist()))
    if len(pairs) == len(set(a.tolist())) == len(set(b.tolist())):
        return

    def desc(x: Logits) -> str:
        k = x.meta.get("k", len(np.unique(np.asarray(x.folds))))
        seed = x.meta.get("split_seed")
        return f"{x.name!r} (k={k}" + (f", split seed {seed}" if seed is not None else "") + ")"

    bad = np.flatnonzero(a != b)
    i = int(bad[0]) if len(bad) else 0
    raise LogitError(
        f"OOF file {m.source} (member {m.name!r}): folds disagree with {ref.name!r} ({ref.source}) on "
        f"{len(bad)} id(s); the first is {str(ref.ids[i])!r}: fold {int(b[i])} in {m.name!r}, fold {int(a[i])} in "
        f"{ref.name!r}. Members {desc(ref)} and {desc(m)} were trained on different splits, so no honest nested "
        f"score of their {what} exists (a fold's rows were training rows of the other member): retrain them "
        "with the same --k and --seed (or one folds.csv)"
    )


def factor_parent(space: LabelSpace | None) -> tuple[LabelSpace, tuple[str, ...]] | None:
    """``(parent joint space, factors covered)`` of a per-factor model's space, else None.

    A ``--target age`` model covers ``("age",)``; a ``--target gender,age`` model covers
    ``("gender", "age")`` (its meta ``factor`` is the comma-joined names, in the parent's order).
    """
    meta = space.meta if space is not None else {}
    if "factor_of" not in meta or "factor" not in meta:
        return None
    return LabelSpace.from_dict(meta["factor_of"]), tuple(str(meta["factor"]).split(","))


def _parent_space(m: Logits) -> tuple[LabelSpace, tuple[str, ...]]:
    got = factor_parent(m.label_space)
    if got is None:
        raise LogitError(
            f"member {m.name!r} ({m.source}) cannot be composed: its label space does not say which joint "
            f"space it is a factor of (meta 'factor_of'/'factor'); train it with --target <factor>"
        )
    return got


def compose_members(parts: Sequence[Logits], name: str | None = None) -> Logits:
    """A joint-space member from per-factor members (e.g. mask-only, gender-only, age-only).

    ``joint[:, ravel(i_mask, i_gender, i_age)] = log_softmax(mask)[i_mask] + ...``, in the
    parent LabelSpace's factor order whatever order ``parts`` come in. A part may cover
    several factors (a ``--target gender,age`` model): its log-softmax over its own joint
    classes is broadcast over the factors it covers. Rows are aligned by id; the joint label
    is recomputed from the parts' factor labels.

    Raises
    ------
    LogitError
        A part that is not a factor model, parts of different joint spaces, a factor given
        twice or missing, parts from different splits, or ids that do not match.
    """
    parts = list(parts)
    if len(parts) < 2:
        raise LogitError(f"a composed member needs at least two factor members, got {[p.name for p in parts]}")
    parent, _ = _parent_space(parts[0])
    names = [f.name for f in parent.factors]
    owner: dict[str, Logits] = {}
    covers: list[tuple[Logits, tuple[str, ...]]] = []
    for p in parts:
        space, factors = _parent_space(p)
        if not space.same_classes(parent):
            raise LogitError(f"members {parts[0].name!r} and {p.name!r} are factors of different joint label spaces")
        for f in factors:
            if f in owner:
                raise LogitError(f"factor {f!r} given twice: members {owner[f].name!r} and {p.name!r}")
            owner[f] = p
        covers.append((p, tuple(sorted(factors, key=names.index))))
    if sorted(owner) != sorted(names):
        raise LogitError(
            f"composed member {'+'.join(p.name for p in parts)!r} covers factors {sorted(owner)}, "
            f"the joint space needs {names}"
        )
    covers.sort(key=lambda pc: names.index(pc[1][0]))
    ref = covers[0][0]
    sizes = parent.factor_sizes
    n = len(ref.ids)
    joint = np.zeros((n,) + sizes, dtype=np.float64)
    factor_labels: dict[str, np.ndarray] = {}
    for p, factors in covers:
        p = reorder_to(ref, p)
        check_same_split(ref, p, "composition")
        axes = [names.index(f) for f in factors]
        lp = log_softmax(p.logits).reshape((n,) + tuple(sizes[a] for a in axes))
        shape = [n] + [sizes[a] if a in axes else 1 for a in range(len(names))]
        joint += lp.reshape(shape)
        if p.labels is not None:
            for f, lab in zip(factors, np.unravel_index(p.labels, tuple(sizes[a] for a in axes))):
                factor_labels[f] = np.asarray(lab)
    labels = None
    if len(factor_labels) == len(names):
        labels = np.ravel_multi_index(tuple(factor_labels[f] for f in names), sizes).astype(np.int64)
    ordered = [p for p, _ in covers]
    return Logits(
        ref.ids, joint.reshape(n, -1), labels=labels, folds=ref.folds, label_space=_composed_space(parent, ordered),
        name=name or COMPOSE_SEP.join(p.name for p in ordered),
        meta={"kind": "composed", "sha256": [s for p in ordered for s in p.sha256],
              "source": "+".join(p.source for p in ordered), "parts": [p.name for p in ordered],
              **({"k": ref.meta["k"]} if "k" in ref.meta else {})},
    )


def _composed_space(parent: LabelSpace, parts: Sequence[Logits]) -> LabelSpace:
    """The parent space, with the age bands of the part that predicts age (a mask-only part's do not matter)."""
    for p in parts:
        got = factor_parent(p.label_space)
        if got and "age" in got[1] and "age_bands" in got[0].meta:
            return LabelSpace(parent.classes, parent.factors, {**parent.meta, "age_bands": got[0].meta["age_bands"]})
    return parent


def plan_compositions(named_spaces: Sequence[tuple[str, LabelSpace | None]], *, asked_all: bool,
                      available: Sequence[tuple[str, LabelSpace | None]] = ()) -> list[str]:
    """Logits specs for members that may be per-factor models: compose them, or say how.

    Parameters
    ----------
    named_spaces : sequence of (name, LabelSpace or None)
        The members asked for (compositions ``a+b`` are passed through untouched).
    asked_all : bool
        ``--members all``: per-factor families that cover their joint space's factors exactly
        once are composed into one member ``a+b+c`` (in the joint space's factor order).
    available : sequence of (name, LabelSpace or None), optional
        Every member that could be asked for (the registry's families): the error's
        suggested composition may use them.

    Returns
    -------
    list of str
        Logits specs, a composed one in place of its first part.

    Raises
    ------
    LogitError
        Before any model runs: per-factor members that cannot be voted with the others as
        they are (not composed, and not all of one space), naming the composition to type,
        e.g. ``--members mask_fam+gender_fam+age_fam``.
    """
    factor = {n: factor_parent(sp) for n, sp in named_spaces if COMPOSE_SEP not in n}
    factor = {n: v for n, v in factor.items() if v is not None}
    if not factor:
        return [n for n, _ in named_spaces]
    spaces = {n: sp for n, sp in named_spaces}
    distinct = {tuple(spaces[n].classes) if spaces[n] is not None else None for n, _ in named_spaces}
    if not asked_all and len(distinct) == 1:
        return [n for n, _ in named_spaces]  # e.g. two age-only families voted in the age space

    def hint() -> str:
        lines = [f"{n} predicts {', '.join(fs)}" for n, (_, fs) in factor.items()]
        return "; ".join(lines)

    by_parent: dict[tuple, list[str]] = {}
    for n, (parent, _) in factor.items():
        by_parent.setdefault(tuple(parent.classes), []).append(n)
    composed: dict[str, str] = {}
    for parent_classes, group in by_parent.items():
        parent = factor[group[0]][0]
        order = [f.name for f in parent.factors]
        covered = [f for n in group for f in factor[n][1]]
        pool = {n: factor_parent(sp) for n, sp in available if COMPOSE_SEP not in n}
        pool = {n: v for n, v in pool.items() if v is not None and tuple(v[0].classes) == parent_classes}
        pool.update({n: factor[n] for n in group})
        suggestion = _suggest(list(group) + [n for n in pool if n not in group], pool, order)
        if not asked_all or sorted(covered) != sorted(order):
            missing = sorted(set(order) - {f for v in pool.values() for f in v[1]})
            how = (f"--members {suggestion}" if suggestion else
                   f"--members a+b+c after training the missing factor(s) {missing} with --target")
            raise LogitError(
                f"members {group} are per-factor models ({hint()}); they vote in the joint {parent.num_classes}-class "
                f"space only once composed: pass {how}")
        spec = COMPOSE_SEP.join(sorted(group, key=lambda n: order.index(factor[n][1][0])))
        for n in group:
            composed[n] = spec
    out: list[str] = []
    for n, _ in named_spaces:
        s = composed.get(n, n)
        if s not in out:
            out.append(s)
    return out


def _suggest(group: Sequence[str], factor: dict, order: Sequence[str]) -> str | None:
    """One composition of members in ``group`` covering ``order`` exactly once, or None."""
    def search(i_need: list[str], used: list[str]) -> list[str] | None:
        if not i_need:
            return used
        f = i_need[0]
        for n in group:
            fs = factor[n][1]
            if n not in used and f in fs and set(fs) <= set(i_need):
                got = search([x for x in i_need if x not in fs], used + [n])
                if got:
                    return got
        return None

    found = search(list(order), [])
    return COMPOSE_SEP.join(found) if found else None


