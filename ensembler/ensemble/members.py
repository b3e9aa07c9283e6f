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
from ..labels import LabelSpace
from ..logits import Logits, few, read_logits
from ..names import ALL_MEMBERS, member_names
from .compose import (COMPOSE_SEP, check_same_split, compose_members, factor_parent,  # noqa: F401
                      plan_compositions, reorder_to)

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
        m = reorder_to(ref, m)
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
        space = space.factors_space([t.strip() for t in str(target).split(",")])
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
