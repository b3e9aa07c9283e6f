"""Age bands between data and members: checked before any forward, taken from the members when not given.

Members whose labels depend on age (the 18-class mask space, an age model) must share one
pair of age thresholds, and labeled data must have been labelled with them; ``predict`` and
``evaluate`` call :func:`check_age_bands`, the CLI labels mask data with
:func:`member_age_bands` when ``--age-bands`` is absent.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

from .errors import DataError, EnsemblerError
from .names import COMPOSE_SEP


def _entries_age_bands(resolved: Mapping[str, list]) -> dict[str, tuple[int, int]]:
    from .ensemble import entry_label_space
    from .labels import age_bands_of

    out = {}
    for name, entries in resolved.items():
        for e in entries:
            bands = age_bands_of(entry_label_space(e))
            if bands is not None:
                out.setdefault(name, bands)
                if out[name] != bands:
                    raise EnsemblerError(f"member {name!r}: its checkpoints were trained with different age bands "
                                         f"({out[name]} and {bands}, {e.id})")
    return out


def check_age_bands(table, resolved: Mapping[str, list]) -> tuple[int, int] | None:
    """The age bands the members were trained with; refuse members or labels that disagree.

    Members whose labels depend on age (the 18-class mask space, an age model) must share one
    pair of age thresholds, and labeled data must have been labelled with them: with
    ``--age-bands 30,60`` against a model trained with 29,58 the age classes mean different
    people, and every score would silently be wrong.

    Raises
    ------
    EnsemblerError
        Naming the members and their bands, or the data's bands and the flag to pass.
    """
    from .labels import age_bands_of

    bands = _entries_age_bands(resolved)
    distinct = sorted(set(bands.values()))
    if len(distinct) > 1:
        raise EnsemblerError(
            "members were trained with different age bands, so their age classes mean different ages: "
            + ", ".join(f"{n} {b[0]},{b[1]}" for n, b in bands.items()) + "; retrain them with one --age-bands")
    if not distinct:
        return None
    want = distinct[0]
    have = age_bands_of(getattr(table, "label_space", None))
    if have is not None and have != want and table.frame["label"].notna().any():
        who = next(n for n, b in bands.items() if b == want)
        raise DataError(
            f"{table.describe()} is labelled with age bands {have[0]},{have[1]} but member {who!r} was trained with "
            f"{want[0]},{want[1]}: pass --age-bands {want[0]},{want[1]} (or omit --age-bands to take the members')")
    return want


def member_age_bands(registry=None, members: str | Sequence[str] = "all", recipe=None) -> tuple[int, int] | None:
    """The age bands the members (or the recipe's members) were trained with, None when none depends on age.

    ``predict``/``evaluate`` load the data with them when ``--age-bands`` is not given.
    """
    from .registry import Registry

    if registry is None or isinstance(registry, (str, os.PathLike)):
        registry = Registry(registry)
    if recipe is not None:
        from .ensemble import Recipe

        if isinstance(recipe, (str, os.PathLike)):
            recipe = Recipe.load(recipe)
        names = [p for m in recipe.active_members if m.kind != "file" for p in (m.parts or (m.name,))]
    else:
        names = [a for s in registry.member_names(members) for a in s.split(COMPOSE_SEP)]
    try:
        resolved = dict(registry.members(list(dict.fromkeys(names))))
    except EnsemblerError:
        return None  # predict names the unknown member itself
    bands = sorted(set(_entries_age_bands(resolved).values()))
    return bands[0] if len(bands) == 1 else None
