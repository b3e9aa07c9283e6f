"""Ensemble members: OOF logits loaded, validated, aligned by id, composed from factor models.

A member is one column of the ensemble, an :class:`ensembler.logits.Logits` (``Member`` is
the same class): a registry family (its folds' OOF logits concatenated by the trainer), a
single checkpoint, a raw ``.npz`` OOF file, or a *composed* member built from per-factor
models (``mask_fam+gender_fam+age_fam``): the sum of each factor model's log-softmax in the
parent LabelSpace's factor order, which is the joint log-probability a factored head would
give (:func:`ensembler.labels.joint_from_factor_logprobs`). Where a member came from is in
its ``meta``: ``kind`` (family, checkpoint, composed, file), ``sha256`` of the weights behind
it, ``source`` (its file) and ``parts`` (of a composition).

Every problem is a :class:`~ensembler.errors.LogitError` naming the file (and a few
offending ids): not an npz, a missing array, NaN/inf, a wrong class count, ids or labels
that disagree between members.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import LogitError
from ..labels import LabelSpace, joint_from_factor_logprobs
from ..logits import Logits, few, read_logits
from ..metrics import log_softmax
from ..names import ALL_MEMBERS, COMPOSE_SEP, member_names

MEMBER_KINDS = ("family", "checkpoint", "composed", "file")
OOF_ARRAYS = ("ids", "logits", "labels", "folds")

#: An ensemble member is a :class:`~ensembler.logits.Logits`; the name stays for readers of the ensemble code.
Member = Logits


def load_oof(path, *, name: str | None = None, label_space: LabelSpace | dict | None = None,
             kind: str = "file", sha256: Sequence[str] = (), require: Sequence[str] = OOF_ARRAYS) -> Logits:
    """Load and validate one OOF logits file (``ids``, ``logits``, ``labels``, ``folds``).

    Parameters
    ----------
    path : str or Path
        A logits file (:mod:`ensembler.logits`): the trainer's ``<registry>/<family>/oof.npz``,
        an OOF-TTA file of ``tta-report``, or an ``.npz`` made by hand.
    name : str, optional
        Member name (default: the file stem).
    label_space : LabelSpace or dict, optional
        The member's classes; when omitted, the file's own label space is used (its sidecar,
        or a ``label_space`` JSON string stored in the npz), else the member has none (only
        its class count is checked).
    kind : {"family", "checkpoint", "composed", "file"}
    sha256 : sequence of str
        sha256 of the weights behind the logits, recorded in the Recipe.
    require : sequence of str
        Arrays that must be present (test-time logits need only ``ids`` and ``logits``).

    Returns
    -------
    Logits
        With ``meta`` ``kind``, ``sha256`` and ``source`` set.

    Raises
    ------
    LogitError
        Naming ``path``: not a readable npz, a missing array, bad shapes, NaN/inf logits,
        duplicate ids, labels out of range, or a class count that disagrees with the label space.

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> d = tempfile.mkdtemp(); p = os.path.join(d, "effnet.npz")
    >>> np.savez(p, ids=np.array(["a", "b"]), logits=np.zeros((2, 3), np.float32),
    ...          labels=np.array([0, 2]), folds=np.array([0, 1]))
    >>> m = load_oof(p); (m.name, m.num_classes, len(m), m.kind)
    ('effnet', 3, 2, 'file')
    """
    if kind not in MEMBER_KINDS:
        raise LogitError(f"unknown member kind {kind!r}; choose one of {MEMBER_KINDS}")
    z = read_logits(path, require=[k for k in require if k in ("labels", "folds")])
    if label_space is not None:
        if isinstance(label_space, dict):
            try:
                label_space = LabelSpace.from_dict(label_space)
            except (KeyError, TypeError, ValueError) as exc:
                raise LogitError(f"OOF file {path}: bad label space ({exc})") from None
        if label_space.num_classes != z.num_classes:
            raise LogitError(
                f"OOF file {path}: logits have {z.num_classes} classes but the label space has "
                f"{label_space.num_classes} ({list(label_space.classes)[:6]}...)"
            )
    else:
        label_space = z.label_space
    update = {"kind": kind, "sha256": list(sha256)}
    if kind == "file" and not sha256:
        update.update(tta_report_origin(z.meta))
    return z.replace(name=str(name) if name is not None else Path(path).stem, label_space=label_space,
                     meta_update=update)


def tta_report_origin(meta: dict) -> dict:
    """What an OOF-TTA file of ``tta-report`` says about the models behind it, as member meta.

    Such a file holds a registry family's OOF logits under a TTA plan: ``kind`` becomes
    ``family``, ``member`` the family, ``sha256`` its fold checkpoints' weights (fold order),
    and ``tta``/``merge`` the plan, so a recipe tuned on it names the registry member and the
    plan ``predict`` must run. ``{}`` for any other file.
    """
    fam, tta, ckpts, shas = (meta.get(k) for k in ("family", "tta", "checkpoints", "sha256"))
    if not (isinstance(fam, str) and isinstance(tta, str) and meta.get("producer") == fam
            and isinstance(ckpts, dict) and isinstance(shas, dict)):
        return {}
    order = sorted(ckpts, key=lambda f: int(f) if str(f).lstrip("-").isdigit() else 0)
    return {"kind": "family", "member": fam, "tta": tta, "merge": str(meta.get("merge", "mean-logits")),
            "sha256": [shas[ckpts[f]] for f in order if ckpts[f] in shas]}


def _reorder_to(ref: Member, m: Member) -> Member:
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


def align_members(members: Sequence[Member]) -> list[Member]:
    """Reorder every member's rows to the first member's id order, after checking they agree.

    Raises
    ------
    LogitError
        Naming the file: ids that are missing or extra compared with the first member,
        labels that disagree for the same id, a class count or label space that differs.
    """
    members = list(members)
    if not members:
        raise LogitError("no ensemble members were given")
    check_label_spaces(members)
    ref = members[0]
    out = [ref]
    for m in members[1:]:
        m = _reorder_to(ref, m)
        if ref.labels is not None and m.labels is not None and not np.array_equal(m.labels, ref.labels):
            bad = m.labels != ref.labels
            raise LogitError(
                f"OOF file {m.source} (member {m.name!r}): labels disagree with {ref.name!r} "
                f"({ref.source}) on {int(bad.sum())} id(s), e.g. {few(ref.ids[bad])}"
            )
        check_same_split(ref, m)
        out.append(m)
    return out


def check_label_spaces(members: Sequence[Member]) -> None:
    """All members must predict the same classes in the same order (class count when unknown)."""
    ref = members[0]
    for m in members[1:]:
        if m.num_classes != ref.num_classes:
            raise LogitError(
                f"class-count mismatch: member {ref.name!r} ({ref.source}) has {ref.num_classes} classes, "
                f"member {m.name!r} ({m.source}) has {m.num_classes}"
            )
        if ref.label_space is not None and m.label_space is not None and not ref.label_space.same_classes(m.label_space):
            diff = [(a, b) for a, b in zip(ref.label_space.classes, m.label_space.classes) if a != b][:3]
            raise LogitError(
                f"class maps differ: member {ref.name!r} ({ref.source}) and member {m.name!r} ({m.source}) "
                f"disagree, e.g. {diff}"
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


def _parent_space(m: Member) -> tuple[LabelSpace, tuple[str, ...]]:
    got = factor_parent(m.label_space)
    if got is None:
        raise LogitError(
            f"member {m.name!r} ({m.source}) cannot be composed: its label space does not say which joint "
            f"space it is a factor of (meta 'factor_of'/'factor'); train it with --target <factor>"
        )
    return got


def check_same_split(ref: Member, m: Member, what: str = "blend") -> None:
    """Members blended or composed for an honest score must come from one split of the rows.

    Raises
    ------
    LogitError
        Naming both members, their ``k`` and split seed, when their OOF folds disagree on a
        shared id (families trained with a different ``--k`` or ``--seed``).
    """
    if ref.folds is None or m.folds is None:
        return
    if not np.array_equal(ref.ids, m.ids):
        m = _reorder_to(ref, m)
    a, b = np.asarray(ref.folds), np.asarray(m.folds)
    # Fold numbers may be permuted between two runs of the same split: compare the partitions.
    pairs = set(zip(a.tolist(), b.tolist()))
    if len(pairs) == len(set(a.tolist())) == len(set(b.tolist())):
        return

    def desc(x: Member) -> str:
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


def compose_members(parts: Sequence[Member], name: str | None = None) -> Member:
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
    owner: dict[str, Member] = {}
    covers: list[tuple[Member, tuple[str, ...]]] = []
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
        p = _reorder_to(ref, p)
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


def _composed_space(parent: LabelSpace, parts: Sequence[Member]) -> LabelSpace:
    """The parent space, with the age bands of the part that predicts age (a mask-only part's do not matter)."""
    for p in parts:
        got = factor_parent(p.label_space)
        if got and "age" in got[1] and "age_bands" in got[0].meta:
            return LabelSpace(parent.classes, parent.factors, {**parent.meta, "age_bands": got[0].meta["age_bands"]})
    return parent


def plan_compositions(named_spaces: Sequence[tuple[str, LabelSpace | None]], *, asked_all: bool,
                      available: Sequence[tuple[str, LabelSpace | None]] = ()) -> list[str]:
    """Member specs for members that may be per-factor models: compose them, or say how.

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
        Member specs, a composed one in place of its first part.

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


# ---------------------------------------------------------------------------- resolution
def _registry(registry):
    from ..registry import Registry

    return registry if hasattr(registry, "entries") else Registry(registry)


def entry_label_space(entry) -> LabelSpace | None:
    """The space a registry entry predicts in (a ``--target`` model: its factor space)."""
    d = getattr(entry, "label_space", None)
    if not d:
        return None
    space = LabelSpace.from_dict(d)
    target = getattr(entry, "target", None)
    if target and space.is_factored and "factor_of" not in space.meta:
        space = space.factor_space(target)
    return space


def registry_members(registry, names: Sequence[str] | str = "all") -> list[Member]:
    """Members from a registry: each family with OOF logits (``"all"``), or named families/entries.

    A family name gives one member (kind ``family``) from ``<registry>/<family>/oof.npz``
    with the sha256 of every fold's weights; an entry id gives a ``checkpoint`` member from
    that entry's ``oof`` file.
    """
    reg = _registry(registry)
    families = set(reg.families())
    if names == "all" or list(names) == ["all"]:
        wanted = sorted(families)
    else:
        wanted = list(names)
    out = []
    for name in wanted:
        if name in families:
            entries = sorted(reg.family(name), key=lambda e: (e.fold is None, e.fold if e.fold is not None else 0))
            oofs = sorted({e.oof for e in entries if e.oof})
            if not oofs:
                if names == "all" or list(names) == ["all"]:
                    continue  # families without OOF logits cannot be tuned; 'all' skips them
                raise LogitError(f"family {name!r} has no OOF logits in the registry (train it with train-folds)")
            if len(oofs) > 1:
                raise LogitError(f"family {name!r} lists several OOF files {oofs}; expected one per family")
            out.append(load_oof(reg.path(oofs[0]), name=name, label_space=entry_label_space(entries[0]),
                                kind="family", sha256=[e.sha256 for e in entries]))
        else:
            try:
                entry = reg.get(name)
            except Exception as exc:  # noqa: BLE001 - the registry names what it lacks
                raise LogitError(f"no family or checkpoint named {name!r} in the registry ({exc})") from None
            if not entry.oof:
                raise LogitError(f"checkpoint {name!r} has no OOF logits in the registry")
            out.append(load_oof(reg.path(entry.oof), name=name, label_space=entry_label_space(entry),
                                kind="checkpoint", sha256=[entry.sha256]))
    if not out:
        raise LogitError("the registry holds no family with OOF logits; train one with train-folds or pass --oof")
    return out


def load_members(specs: Sequence[str] | str | None = None, *, registry=None, oof_files: Sequence = ()) -> list[Member]:
    """Resolve member specs to validated, id-aligned members.

    Parameters
    ----------
    specs : "all", list of names, or None
        Family names, checkpoint ids, OOF file stems, or compositions ``a+b+c`` of per-factor
        members. ``None`` means every ``oof_files`` member when files are given, else ``"all"``.
        ``"all"`` is every file plus every registry family with OOF logits. Names follow
        :func:`ensembler.names.member_names` (a name given twice is a ``ParameterError``).
    registry : str, Path or Registry, optional
    oof_files : sequence of paths
        Raw OOF ``.npz`` files, each a member named by its file stem.

    Returns
    -------
    list of Member, rows aligned to the first member's ids.
    """
    files: dict[str, Member] = {}
    for f in oof_files:
        m = load_oof(f)
        if m.name in files:
            raise LogitError(f"two OOF files share the member name {m.name!r}: {files[m.name].source} and {f}")
        files[m.name] = m
    resolved: dict[str, Member] = dict(files)

    def every_member() -> list[str]:  # what "all" means here: the files, then every family with OOF logits
        families = [m for m in registry_members(registry, "all") if m.name not in files]
        for m in families:
            resolved.setdefault(m.name, m)
        return list(files) + [m.name for m in families]

    if specs is None:
        specs = list(files) if files else ALL_MEMBERS
    asked = [x.strip() for x in specs.split(",")] if isinstance(specs, str) else [str(x).strip() for x in specs]
    expanded: list[str] = []
    for spec in member_names(specs, all_names=every_member):  # the one rule: "all", commas, twice = error
        for atom in spec.split(COMPOSE_SEP):
            if atom not in resolved:
                resolved[atom] = registry_members(registry, [atom])[0]
        expanded.append(spec)
    # Per-factor members: composed when 'all' covers each factor once, else a message naming the composition.
    expanded = plan_compositions([(s, None if COMPOSE_SEP in s else resolved[s].label_space) for s in expanded],
                                 asked_all=ALL_MEMBERS in asked)
    members: list[Member] = []
    for spec in expanded:
        atoms = spec.split(COMPOSE_SEP)
        if len(atoms) == 1:
            members.append(resolved[atoms[0]])
        else:
            members.append(compose_members([resolved[a] for a in atoms]))
    seen = set()
    for m in members:
        if m.name in seen:
            raise LogitError(f"member {m.name!r} is listed twice")
        seen.add(m.name)
    return align_members(members)
