"""Checks of what ``registry.json`` says, before anything acts on it.

``registry.json`` may be edited by hand or come from someone else, so every entry read from
it is checked here: each field has the type and form the code that uses it needs; every
path it names (``weights``, ``oof``) resolves, symlinks followed, inside the registry root
(so ``registry remove`` can never delete a file outside it); ``model_kwargs`` holds only
loader arguments on an allowlist (an entry cannot hand ``checkpoint_path`` or
``pretrained_cfg_overlay`` to timm); no value is NaN or infinite. Every problem names the
index file, the entry (id, family, fold) and the field.

:func:`entry_problems` lists the problems of one stored entry; :func:`check_entry` raises
the first ones as a :class:`~ensembler.errors.RegistryError`; :func:`inside_root` is the
path rule itself, :func:`check_model_kwargs` the loader allowlist.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any, Iterator, Mapping

from ..errors import EnsemblerError, RegistryError
from ..labels import LabelSpace
from ..names import HEADS
from ..preprocess import MAX_INPUT_SIZE, Preprocess
from .entry import Entry, check_name

#: Entry fields that name a file relative to the registry root.
PATH_FIELDS = ("weights", "oof")

#: ``timm.create_model`` arguments an entry's ``model_kwargs`` may carry, and what each must be.
#: train-folds and ``registry import`` record only ``img_size`` (fixed-input-size archs at a
#: non-default size); the drop rates are accepted from the Python API and do nothing in eval.
#: Anything else (``checkpoint_path``, ``pretrained_cfg_overlay``, ``pretrained_cfg``,
#: ``features_only``, ...) could load files or change the network behind the recorded sha256.
LOADER_KWARGS = {
    "img_size": f"an integer or [H, W] of integers from 8 to {MAX_INPUT_SIZE}",
    "drop_rate": "a number in [0, 1)",
    "drop_path_rate": "a number in [0, 1)",
}

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_DICT_FIELDS = ("label_space", "preprocess", "metrics", "train_config", "versions", "model_kwargs")
_OPTIONAL_STR = ("target", "created")


def entry_name(d: Any, position: int | None = None) -> str:
    """``entry 'r-fold0' (family 'r', fold 0)``, or ``entries[3]`` for an entry without a usable id."""
    where = f"entries[{position}]" if position is not None else "entry"
    if not isinstance(d, Mapping):
        return where
    eid, family, fold = d.get("id"), d.get("family"), d.get("fold")
    label = f"entry {eid!r}" if isinstance(eid, str) else where
    parts = []
    if isinstance(family, str):
        parts.append(f"family {family!r}")
    if fold is None or isinstance(fold, int):
        parts.append(f"fold {fold}")
    return f"{label} ({', '.join(parts)})" if parts else label


def inside_root(root: str | os.PathLike, rel: Any) -> Path:
    """The real path of ``rel`` (relative to ``root``) when it lies inside ``root``.

    Raises
    ------
    ValueError
        ``rel`` is not a non-empty relative path string, or it resolves (``..``, symlinks
        followed) to the root itself or outside it; the message says where it leads.
    """
    if not isinstance(rel, str) or not rel.strip():
        raise ValueError(f"must be a non-empty path relative to the registry root, got {rel!r}")
    if os.path.isabs(rel) or "\x00" in rel:
        raise ValueError(f"{rel!r} is not relative to the registry root (absolute paths are refused)")
    real_root = Path(os.path.realpath(root))
    real = Path(os.path.realpath(os.path.join(real_root, rel)))
    if real_root not in real.parents:
        raise ValueError(f"{rel!r} resolves to {real}, outside the registry root {real_root}")
    return real


def check_model_kwargs(kwargs: Any, where: str) -> dict:
    """``kwargs`` when every key is on :data:`LOADER_KWARGS` with a value of the right form.

    Raises
    ------
    RegistryError
        Naming ``where`` (the entry), the key and the allowed keys.
    """
    problems = list(_kwargs_problems(kwargs))
    if problems:
        raise RegistryError(f"{where}: {problems[0]}")
    return dict(kwargs)


def _kwargs_problems(kwargs: Any) -> Iterator[str]:
    if not isinstance(kwargs, Mapping):
        yield f"field 'model_kwargs' must be an object, got {type(kwargs).__name__}"
        return
    allowed = ", ".join(sorted(LOADER_KWARGS))
    for key, value in kwargs.items():
        if key not in LOADER_KWARGS:
            yield (f"field 'model_kwargs' key {key!r} is not a loader argument ensembler passes to timm "
                   f"(allowed: {allowed}); refused")
        elif not _kwarg_ok(key, value):
            yield f"field 'model_kwargs' key {key!r} must be {LOADER_KWARGS[key]}, got {value!r}"


def _kwarg_ok(key: str, value: Any) -> bool:
    def side(v):
        return isinstance(v, int) and not isinstance(v, bool) and 8 <= v <= MAX_INPUT_SIZE

    if key == "img_size":
        return side(value) or (isinstance(value, (list, tuple)) and len(value) == 2 and all(map(side, value)))
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1


def check_storable(fields: Mapping[str, Any], entry_id: str) -> None:
    """RegistryError naming the field unless every value can be stored in ``registry.json``
    (what :func:`ensembler._io.write_json_atomic` accepts: JSON, numpy scalars and arrays, paths)."""
    import json

    import numpy as np

    def value(obj):
        if isinstance(obj, (np.integer, np.floating, np.ndarray, Path)):
            return str(obj)
        raise TypeError(f"{type(obj).__name__} is not JSON serialisable")

    for name, v in fields.items():
        try:
            json.dumps(v, default=value)
        except TypeError as exc:
            raise RegistryError(f"cannot store {name}={v!r} in entry {entry_id!r}: {exc}") from exc


def _non_finite(value: Any, key: str) -> Iterator[str]:
    if isinstance(value, float) and not math.isfinite(value):
        yield key
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from _non_finite(v, f"{key}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _non_finite(v, f"{key}[{i}]")


def field_problems(d: Any, finite: bool = True) -> list[str]:
    """What is wrong with the fields of one stored entry (each problem names its field); no file is read.
    ``finite``: NaN/inf values are problems too (an entry to be written leaves them to the JSON writer)."""
    if not isinstance(d, Mapping):
        return [f"is a {type(d).__name__} ({d!r:.60}), not an entry object"]
    required = [f.name for f in dataclasses.fields(Entry)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    problems = [f"lacks field {name!r}" for name in required if name not in d]
    for name in ("id", "family"):
        if name in d:
            try:
                check_name(d[name], f"field {name!r}")
            except RegistryError as exc:
                problems.append(str(exc))
    fold = d.get("fold")
    if fold is not None and (isinstance(fold, bool) or not isinstance(fold, int) or fold < 0):
        problems.append(f"field 'fold' must be a non-negative integer or null, got {fold!r}")
    if "arch" in d and not (isinstance(d["arch"], str) and d["arch"]):
        problems.append(f"field 'arch' must be a timm architecture name, got {d['arch']!r}")
    if "head" in d and d["head"] not in HEADS:
        problems.append(f"field 'head' must be one of {', '.join(HEADS)}, got {d['head']!r}")
    if "sha256" in d and not (isinstance(d["sha256"], str) and _SHA256_RE.match(d["sha256"])):
        problems.append(f"field 'sha256' must be 64 lower-case hex digits, got {d['sha256']!r}")
    for name in _DICT_FIELDS:
        if name in d and not isinstance(d[name], Mapping):
            problems.append(f"field {name!r} must be an object, got {type(d[name]).__name__} {d[name]!r:.60}")
    for name in _OPTIONAL_STR:
        if d.get(name) is not None and not isinstance(d[name], str):
            problems.append(f"field {name!r} must be a string or null, got {d[name]!r}")
    problems += _space_problems(d)
    if isinstance(d.get("model_kwargs"), Mapping):
        problems += list(_kwargs_problems(d["model_kwargs"]))
    if finite:
        problems += [f"field {key!r} is not finite (NaN/inf); refused" for key in _non_finite_keys(d)]
    return problems


def _non_finite_keys(d: Mapping) -> list[str]:
    return [key for name, value in d.items() for key in _non_finite(value, str(name))]


def _space_problems(d: Mapping) -> list[str]:
    """The label space and preprocess parse as the code that uses them parses them."""
    problems = []
    ls = d.get("label_space")
    if isinstance(ls, Mapping):
        classes, factors = ls.get("classes"), ls.get("factors", [])
        if not isinstance(classes, list) or not all(isinstance(c, (str, int)) and not isinstance(c, bool)
                                                    for c in classes):
            problems.append(f"field 'label_space' must hold 'classes': a list of class names, got {classes!r:.80}")
        elif not isinstance(factors, list) or not all(
                isinstance(f, Mapping) and isinstance(f.get("name"), str) and isinstance(f.get("classes"), list)
                for f in factors):
            problems.append("field 'label_space' 'factors' must be a list of {\"name\", \"classes\"} objects")
        elif not isinstance(ls.get("meta", {}), Mapping):
            problems.append("field 'label_space' 'meta' must be an object")
        else:
            try:
                space = LabelSpace.from_dict(dict(ls))
            except (EnsemblerError, ValueError, TypeError, KeyError) as exc:
                problems.append(f"field 'label_space' is not a valid label space ({exc})")
            else:
                problems += _target_problems(d, space)
    pre = d.get("preprocess")
    if isinstance(pre, Mapping):
        try:
            Preprocess.from_dict(dict(pre))
        except (EnsemblerError, ValueError, TypeError, KeyError) as exc:
            problems.append(f"field 'preprocess' is not a valid preprocess ({exc})")
    return problems


def _target_problems(d: Mapping, space: LabelSpace) -> list[str]:
    target = d.get("target")
    if not isinstance(target, str) or not target or not space.is_factored or "factor_of" in space.meta:
        return []
    factors = {f.name for f in space.factors}
    unknown = [t.strip() for t in target.split(",") if t.strip() not in factors]
    if unknown:
        return [f"field 'target' names {unknown}, not factors of its label space ({sorted(factors)})"]
    return []


def path_problems(d: Any, root: str | os.PathLike) -> list[str]:
    """Paths of one stored entry that do not resolve inside ``root`` (each names its field)."""
    if not isinstance(d, Mapping):
        return []
    problems = []
    for name in PATH_FIELDS:
        value = d.get(name)
        if value is None and name != "weights":
            continue
        try:
            inside_root(root, value)
        except ValueError as exc:
            problems.append(f"field {name!r}: {exc}; refused")
    return problems


def entry_problems(d: Any, root: str | os.PathLike, index_path, position: int | None = None) -> list[str]:
    """Every field and path problem of one stored entry, each message naming the index, entry and field."""
    where = f"{index_path}: {entry_name(d, position)}"
    return [f"{where}{_sep(p)}{p}" for p in field_problems(d) + path_problems(d, root)]


def _sep(problem: str) -> str:
    return " " if problem.startswith(("is a", "lacks")) else ": "


def check_entry(d: Any, root: str | os.PathLike, index_path, position: int | None = None, *,
                finite: bool = True) -> None:
    """Raise a :class:`RegistryError` naming the index, the entry and the field when ``d`` has problems."""
    problems = field_problems(d, finite) + path_problems(d, root)
    if problems:
        more = f" (and {len(problems) - 3} more; see `ensembler registry verify`)" if len(problems) > 3 else ""
        raise RegistryError(f"{index_path}: {entry_name(d, position)}{_sep(problems[0])}" + "; ".join(problems[:3])
                            + more)
