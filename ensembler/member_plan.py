"""Which registry members a prediction runs, what each is made of, under which TTA plan.

A :class:`MemberPlan` is what :func:`ensembler.predict.predict` decides before any forward
pass: the member names (families, checkpoints, ``a+b+c`` compositions of per-factor
members, or a recipe's active members), each member's parts and registry source, the TTA
plan and merge rule each runs under, and the rule that combines them. Its checks (input
sizes the plans can run on, one class map for every member) run from the registry entries
alone, so a bad combination fails before an image is decoded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from .errors import EnsemblerError, LogitError
from .labels import LabelSpace
from .names import COMPOSE_SEP

__all__ = ["MemberPlan", "atoms_of", "composed_plan", "recipe_plan"]


@dataclass
class MemberPlan:
    """Which members run, what each is made of, under which TTA plan, and the rule combining them.

    Attributes
    ----------
    specs : list of str
        Member names, in order (a family, a checkpoint id, or ``a+b+c``).
    rule : str
        The vote rule combining them (a recipe's own rule for a recipe).
    plan, merge
        The TTA plan and merge rule of every member when ``runs`` is not given.
    parts_of : dict
        Member -> its factor parts (``[]`` when it is not a composition); default from the names.
    source_of : dict
        Member -> the registry name it runs (a recipe member may be named apart from its source).
    runs : dict
        Member -> ``(TTA plan, merge rule)``.
    """

    specs: list[str]
    rule: str
    plan: object = None  # the plan of every member when ``runs`` is not given
    merge: str = "mean-logits"
    parts_of: dict = None
    source_of: dict = None
    runs: dict = None  # name -> (TTA plan, merge rule)

    def __post_init__(self):
        if self.parts_of is None:
            self.parts_of = {s: s.split(COMPOSE_SEP) if COMPOSE_SEP in s else [] for s in self.specs}
        if self.source_of is None:
            self.source_of = {s: s for s in self.specs}
        if self.runs is None:
            self.runs = {s: (self.plan, self.merge) for s in self.specs}

    def key(self, s: str) -> tuple[str, str]:
        """The (plan spec, merge rule) member ``s`` runs under: its engine call."""
        return self.runs[s][0].spec, self.runs[s][1]

    def atoms(self, specs: Sequence[str] | None = None) -> list[str]:
        """The registry names behind ``specs`` (default every member), each once."""
        specs = self.specs if specs is None else specs
        return atoms_of([self.source_of[s] for s in specs], {self.source_of[s]: self.parts_of[s] for s in specs})

    def groups(self) -> dict[tuple[str, str], list[str]]:
        """Members by distinct (plan, merge): one engine call each."""
        groups: dict[tuple[str, str], list[str]] = {}
        for s in self.specs:
            groups.setdefault(self.key(s), []).append(s)
        return groups

    def check_input_sizes(self, resolved: Mapping[str, list]) -> None:
        """A plan that cannot run on a member's input size fails here, naming member and checkpoint."""
        for s in self.specs:
            for a in self.parts_of[s] or [self.source_of[s]]:
                for e in resolved[a]:
                    try:
                        self.runs[s][0].check_input(e.pre.input_size)
                    except EnsemblerError as exc:
                        raise type(exc)(f"member {s!r}, checkpoint {e.id!r}: {exc}") from None

    def label_space(self, resolved: Mapping[str, list]) -> LabelSpace:
        """The one label space every member predicts in, from the registry entries.

        Members that predict different classes (or checkpoints of one family that do) are a
        :class:`LogitError`; a composition's space is its parts' parent space.
        """
        by_atom = _entry_spaces(self.atoms(), resolved)
        spaces_of = {**by_atom, **{s: by_atom[self.source_of[s]] for s in self.specs if not self.parts_of[s]}}
        return _joint_space(self.specs, self.parts_of, spaces_of)


def recipe_plan(recipe, tta, merge) -> MemberPlan:
    """A recipe's active members; each runs the caller's plan when given, else the one it was tuned with."""
    from .infer import parse_tta
    from .infer.tta import check_merge

    active = recipe.active_members
    return MemberPlan([m.name for m in active], rule=recipe.vote,
                       parts_of={m.name: list(m.parts) for m in active},
                       source_of={m.name: m.source for m in active},
                       runs={m.name: (parse_tta(tta if tta is not None else (m.tta or "none")),
                                      check_merge(merge if merge is not None else (m.merge or "mean-logits")))
                             for m in active})

def composed_plan(registry, members, mp: MemberPlan, resolved) -> MemberPlan:
    """Per-factor families composed when 'all' covers each factor once, else refused here, before any forward."""
    from .ensemble import entry_label_space, plan_compositions

    asked = [x.strip() for x in members.split(",")] if isinstance(members, str) else [str(x) for x in members]
    families = [(f, entry_label_space(registry.family(f)[0])) for f in registry.families()]
    specs = plan_compositions([(s, None if mp.parts_of[s] else entry_label_space(resolved[s][0])) for s in mp.specs],
                              asked_all="all" in asked, available=families)
    return MemberPlan(specs, rule=mp.rule, plan=mp.plan, merge=mp.merge)

def atoms_of(specs: Sequence[str], parts_of: Mapping[str, list]) -> list[str]:
    """The registry names behind the members, each once, in order (a composition's parts)."""
    atoms: list[str] = []
    for s in specs:
        for a in parts_of.get(s) or [s]:
            if a not in atoms:
                atoms.append(a)
    return atoms

def _entry_spaces(atoms, resolved) -> dict[str, LabelSpace]:
    """Each member's label space from its registry entries (every checkpoint of a family must agree)."""
    out = {}
    for a in atoms:
        entries = resolved[a]
        first = entries[0].labels
        for e in entries[1:]:
            if e.labels.classes != first.classes:
                raise LogitError(f"member {a!r}: checkpoints {entries[0].id!r} and {e.id!r} predict different "
                                 f"classes ({list(first.classes)[:6]} vs {list(e.labels.classes)[:6]})")
        out[a] = first
    return out

def _joint_space(specs, parts_of, spaces_of: Mapping[str, LabelSpace]) -> LabelSpace:
    """The label space every member predicts in (a composition's is its parts' parent space)."""
    spaces = []
    for s in specs:
        parts = parts_of.get(s) or []
        if parts:
            meta = spaces_of[parts[0]].meta
            if "factor_of" not in meta:
                raise LogitError(f"member {s!r}: {parts[0]!r} is not a per-factor model (trained with --target), "
                                 "so it cannot be composed")
            spaces.append((s, LabelSpace.from_dict(meta["factor_of"])))
        else:
            spaces.append((s, spaces_of[s]))
    ref_name, ref = spaces[0]
    for name, sp in spaces[1:]:
        if sp.classes != ref.classes:
            diff = [(a, b) for a, b in zip(ref.classes, sp.classes) if a != b][:3]
            raise LogitError(
                f"class maps differ: member {ref_name!r} predicts {ref.num_classes} classes, member {name!r} "
                f"{sp.num_classes}" + (f" (e.g. {diff})" if diff else ""))
    return ref
