"""Recipe: what ``tune-weights`` decided, as JSON that ``predict`` applies to member logits.

A Recipe names its members (with the sha256 of their weights when known), each member's
temperature and weight, the vote rule, optional per-class biases on the blend's
log-probabilities, the metric it was tuned for, and its in-sample and honest
(cross-validated) OOF scores. It is written atomically; :meth:`Recipe.load` validates every
field and names the file and field it rejects; :meth:`Recipe.hash` is stable across runs
(the creation time is left out) so the submission ledger can tell identical recipes apart.

Applying a recipe (:meth:`Recipe.apply`)::

    scaled_m = logits_m / temperature_m                      # per member
    probs    = vote(scaled, rule, weights).probs              # e.g. weighted mean of softmax
    logp     = log(probs) + class_biases                      # when biases were tuned
    pred     = argmax(logp);  probs = softmax(logp)

A *stacked* recipe (``vote="stack"``, from ``tune-weights --method stack``) holds a
multinomial logistic regression instead of weights (``stack``: ``coef`` (C, M*C),
``intercept`` (C,), the ``classes`` it was fitted on, its ``C``); every member is used::

    logp = log_softmax(features(logits) @ coef.T + intercept) + class_biases
    # features: each member's log_softmax floored at log(1e-8), side by side (ensemble.stacking)
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .._io import write_json_atomic
from ..errors import EnsemblerError, LogitError
from ..labels import joint_from_factor_logprobs
from ..metrics import log_softmax
from .members import MEMBER_KINDS
from .stacking import stack_features, stack_log_proba
from .voting import VOTE_RULES, vote

RECIPE_VERSION = 1
# Temperatures a recipe may hold: the tuner searches (0.05, 20); outside this range a
# temperature is a typo or an attack (1e-300 turns every logit into +-inf).
TEMPERATURE_RANGE = (1e-3, 1e3)
# Members whose logits come from registry weights: their sha256 is what predict checks (a
# composed member records its parts'; composed from raw OOF files it has none, and predict
# refuses it).
_WEIGHTS_KINDS = ("family", "checkpoint")
#: What a recipe may combine its members with: the vote rules, or a fitted stack.
RECIPE_RULES = VOTE_RULES + ("stack",)


class RecipeError(EnsemblerError, ValueError):
    """A recipe file that cannot be read or used; the message names the file and field."""


@dataclass(frozen=True)
class RecipeMember:
    """One member of a Recipe.

    ``parts`` (composed members only) are the per-factor members in the joint space's factor
    order; :meth:`Recipe.apply` composes them when it is given the parts' logits.

    ``member`` is the registry member (family, checkpoint id or ``a+b+c``) whose models give
    this member's logits, when it differs from ``name`` (two views of one family are two
    recipe members of one registry member). ``tta``/``merge`` are the TTA plan (possibly a
    subset of a plan's views, ``PLAN@VIEW,...``) and merge rule the member was tuned with;
    ``predict`` runs them unless it is given a plan. ``None``: tuned without a recorded plan.
    """

    name: str
    kind: str
    classes: tuple[str, ...]
    weight: float = 1.0
    temperature: float = 1.0
    sha256: tuple[str, ...] = ()
    parts: tuple[str, ...] = ()
    member: str = ""
    tta: str | None = None
    merge: str | None = None

    @property
    def source(self) -> str:
        """The registry member to run: :attr:`member`, else :attr:`name`."""
        return self.member or self.name

    def __post_init__(self):
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        object.__setattr__(self, "sha256", tuple(self.sha256))
        object.__setattr__(self, "parts", tuple(self.parts))
        object.__setattr__(self, "weight", float(self.weight))
        object.__setattr__(self, "temperature", float(self.temperature))

    def to_dict(self) -> dict[str, Any]:
        d = {"name": self.name, "kind": self.kind, "weight": float(self.weight),
             "temperature": float(self.temperature), "sha256": list(self.sha256),
             "classes": list(self.classes)}
        if self.parts:
            d["parts"] = list(self.parts)
        for key in ("member", "tta", "merge"):
            if getattr(self, key):
                d[key] = getattr(self, key)
        return d


@dataclass(frozen=True)
class Recipe:
    """A tuned ensemble: members, temperatures, weights, vote rule, class biases, scores.

    Parameters
    ----------
    members : tuple of RecipeMember
    vote : str
        One of :data:`~ensembler.ensemble.voting.VOTE_RULES`; tuned recipes use ``weighted``.
    class_biases : tuple of float or None
        Added to the blend's log-probabilities (not allowed with ``hard``).
    metric : {"f1", "acc", "logloss"}
    method : str or None
        ``caruana``, ``scipy``, or ``None`` for a hand-made recipe.
    scores : dict
        ``{"in_sample": {"f1", "acc", "logloss"}, "honest": {"metric", "mean", "per_fold",
        "pooled": {...}} or None}``.
    stack : dict or None
        ``vote="stack"`` only: ``{"coef", "intercept", "classes", "C", ...}``
        (:meth:`ensembler.ensemble.stacking.StackFit.to_dict`).
    created : str
        ISO time (left out of :meth:`hash`).

    Examples
    --------
    >>> import numpy as np
    >>> r = Recipe(members=(RecipeMember("a", "file", ("x", "y"), weight=3),
    ...                     RecipeMember("b", "file", ("x", "y"), weight=1)))
    >>> pred, probs = r.apply({"a": np.log([[0.6, 0.4]]), "b": np.log([[0.1, 0.9]])})
    >>> pred.tolist(), probs.round(3).tolist()
    ([1], [[0.475, 0.525]])
    """

    members: tuple[RecipeMember, ...]
    vote: str = "weighted"
    class_biases: tuple[float, ...] | None = None
    metric: str = "f1"
    method: str | None = None
    scores: dict = field(default_factory=dict)
    created: str = ""
    version: int = RECIPE_VERSION
    stack: dict | None = None

    def __post_init__(self):
        object.__setattr__(self, "members", tuple(self.members))
        if self.class_biases is not None:
            object.__setattr__(self, "class_biases", tuple(float(b) for b in self.class_biases))
        _validate(self.to_dict(), "<recipe>")

    # ------------------------------------------------------------------ properties
    @property
    def names(self) -> list[str]:
        return [m.name for m in self.members]

    @property
    def classes(self) -> tuple[str, ...]:
        return self.members[0].classes

    @property
    def weights(self) -> np.ndarray:
        return np.array([m.weight for m in self.members], dtype=np.float64)

    @property
    def temperatures(self) -> np.ndarray:
        return np.array([m.temperature for m in self.members], dtype=np.float64)

    @property
    def tta_plans(self) -> dict[str, str | None]:
        """Each member's recorded TTA plan (``None``: none recorded)."""
        return {m.name: m.tta for m in self.members}

    @property
    def active_members(self) -> list[RecipeMember]:
        """Members whose logits the recipe needs: weight > 0 (all members for ``hard``/``soft``
        without weights it is the same; every member of a stack). ``predict`` runs only these models."""
        if self.vote == "stack":
            return list(self.members)
        return [m for m in self.members if m.weight > 0]

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        d = {
            "version": self.version,
            "vote": self.vote,
            "metric": self.metric,
            "method": self.method,
            "members": [m.to_dict() for m in self.members],
            "class_biases": None if self.class_biases is None else list(self.class_biases),
            "scores": self.scores,
            "created": self.created,
        }
        if self.stack is not None:
            d["stack"] = copy.deepcopy(dict(self.stack))  # a caller's edit must not reach the frozen recipe
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "<dict>") -> "Recipe":
        _validate(d, source)
        members = tuple(
            RecipeMember(name=m["name"], kind=m["kind"], classes=tuple(m["classes"]), weight=float(m["weight"]),
                         temperature=float(m["temperature"]), sha256=tuple(m.get("sha256", ())),
                         parts=tuple(m.get("parts", ())), member=m.get("member", ""), tta=m.get("tta"),
                         merge=m.get("merge"))
            for m in d["members"]
        )
        return cls(members=members, vote=d["vote"], class_biases=d.get("class_biases"), metric=d["metric"],
                   method=d.get("method"), scores=dict(d.get("scores") or {}), created=d.get("created", ""),
                   version=int(d["version"]), stack=d.get("stack"))

    def save(self, path) -> Path:
        """Write the recipe as JSON atomically (a crash leaves the old file or the new one)."""
        path = Path(path)
        recipe = self if self.created else replace(self, created=_now())
        write_json_atomic(path, recipe.to_dict())
        return path

    @classmethod
    def load(cls, path) -> "Recipe":
        """Read and validate a recipe file; :class:`RecipeError` names the file and field."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise RecipeError(f"recipe {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise RecipeError(f"recipe {path} cannot be read: {exc}") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RecipeError(f"recipe {path} is not valid JSON ({exc})") from None
        return cls.from_dict(d, source=str(path))

    def hash(self) -> str:
        """sha256 of the canonical JSON without the creation time (stable across runs)."""
        d = self.to_dict()
        d.pop("created", None)
        canon = json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
        return hashlib.sha256(canon.encode("ascii")).hexdigest()

    # ------------------------------------------------------------------ application
    def member_logits(self, logits: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """The active members' logits from ``logits`` (composing factor parts when needed)."""
        out = []
        for m in self.active_members:
            if m.name in logits:
                z = np.asarray(logits[m.name])
            elif m.parts and all(p in logits for p in m.parts):
                z = joint_from_factor_logprobs([log_softmax(np.asarray(logits[p])) for p in m.parts])
            else:
                need = f"{m.name!r}" + (f" (or its parts {list(m.parts)})" if m.parts else "")
                raise LogitError(f"recipe member {need} is missing from the given logits (have {sorted(logits)})")
            if z.ndim != 2 or z.shape[1] != len(m.classes):
                raise LogitError(
                    f"recipe member {m.name!r}: logits of shape {z.shape} given, the recipe expects "
                    f"{len(m.classes)} classes"
                )
            if not np.all(np.isfinite(z)):
                raise LogitError(f"recipe member {m.name!r}: logits contain NaN or inf")
            out.append(z)
        rows = {z.shape[0] for z in out}
        if len(rows) > 1:
            raise LogitError(f"recipe members have different row counts: {[z.shape[0] for z in out]}")
        return out

    def apply(self, logits: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Vote with this recipe.

        Parameters
        ----------
        logits : dict name -> array (N, C)
            Rows aligned across members. Members with weight 0 may be absent; a composed
            member may be given as its parts' factor logits instead.

        Returns
        -------
        pred : ndarray (N,) int64
        probs : ndarray (N, C) float64
        """
        active = self.active_members
        zs = [z / m.temperature for z, m in zip(self.member_logits(logits), active)]
        if self.vote == "stack":
            st = self.stack
            logp = stack_log_proba(stack_features(np.stack(zs)), st["coef"], st["intercept"], st["classes"])
            if self.class_biases is not None:
                logp = logp + np.asarray(self.class_biases)
            return logp.argmax(axis=1).astype(np.int64), np.exp(log_softmax(np.maximum(logp, -1e300)))
        weights = None if self.vote in ("soft",) else [m.weight for m in active]
        res = vote(zs, self.vote, weights=weights, names=[m.name for m in active])
        if self.class_biases is None:
            return res.pred, _checked_probs(res.probs, self)
        with np.errstate(divide="ignore"):
            logp = np.log(res.probs) + np.asarray(self.class_biases)
        return logp.argmax(axis=1).astype(np.int64), _checked_probs(np.exp(log_softmax(np.maximum(logp, -1e300))), self)


def _checked_probs(probs: np.ndarray, recipe: "Recipe") -> np.ndarray:
    """The blend's probabilities, refused when a row is not a distribution (NaN, all zero)."""
    sums = probs.sum(axis=1)
    bad = ~(np.isfinite(probs).all(axis=1) & (np.abs(sums - 1.0) < 1e-6))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise LogitError(
            f"recipe ({recipe.vote} vote over {recipe.names}) gives {int(bad.sum())} row(s) whose probabilities "
            f"are not a distribution (row {row}: {probs[row].tolist()[:6]}); check its weights and temperatures")
    return probs


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _validate(d: Any, source: str) -> None:
    def bad(field_: str, why: str):
        raise RecipeError(f"recipe {source}: field '{field_}' {why}")

    if not isinstance(d, Mapping):
        raise RecipeError(f"recipe {source}: expected a JSON object, got {type(d).__name__}")
    for key in ("version", "vote", "metric", "members"):
        if key not in d:
            bad(key, "is missing")
    if d["version"] != RECIPE_VERSION:
        bad("version", f"is {d['version']!r}; this ensembler reads version {RECIPE_VERSION}")
    if d["vote"] not in RECIPE_RULES:
        bad("vote", f"is {d['vote']!r}; expected one of {list(RECIPE_RULES)}")
    if d["metric"] not in ("f1", "acc", "logloss"):
        bad("metric", f"is {d['metric']!r}; expected f1, acc or logloss")
    members = d["members"]
    if not isinstance(members, list) or not members:
        bad("members", "must be a non-empty list")
    names = []
    for i, m in enumerate(members):
        where = f"members[{i}]"
        if not isinstance(m, Mapping):
            bad(where, "must be an object")
        get = m.__getitem__
        for key in ("name", "kind", "weight", "temperature", "classes"):
            if key not in m:
                bad(f"{where}.{key}", "is missing")
        if not isinstance(get("name"), str) or not get("name"):
            bad(f"{where}.name", "must be a non-empty string")
        names.append(get("name"))
        if get("kind") not in MEMBER_KINDS:
            bad(f"{where}.kind", f"is {get('kind')!r}; expected one of {list(MEMBER_KINDS)}")
        w, t = get("weight"), get("temperature")
        if not _is_number(w) or w < 0:
            bad(f"{where}.weight", f"must be a finite number >= 0, got {w!r}")
        if not _is_number(t) or t <= 0:
            bad(f"{where}.temperature", f"must be a finite number > 0, got {t!r}")
        if not TEMPERATURE_RANGE[0] <= t <= TEMPERATURE_RANGE[1]:
            bad(f"{where}.temperature", f"is {t!r}, outside [{TEMPERATURE_RANGE[0]:g}, {TEMPERATURE_RANGE[1]:g}] "
                                        f"(tune-weights fits temperatures in (0.05, 20))")
        classes = get("classes")
        if not isinstance(classes, (list, tuple)) or len(classes) < 2:
            bad(f"{where}.classes", "must list at least two class names")
        if list(classes) != list(members[0]["classes"]):
            bad(f"{where}.classes", f"differ from members[0] ({members[0]['name']!r}): class maps must agree")
        if "sha256" not in m and get("kind") in _WEIGHTS_KINDS:
            bad(f"{where}.sha256", f"is missing: a {get('kind')} member must record the sha256 of every weights "
                                   f"file behind it (predict checks them); re-run tune-weights")
        sha = m.get("sha256", [])  # a raw OOF file has no weights behind it
        if not isinstance(sha, (list, tuple)) or not all(isinstance(s, str) and _SHA256_RE.match(s) for s in sha):
            bad(f"{where}.sha256", f"must be a list of sha256 hex digests (64 hex characters), got {sha!r}")
        if not sha and get("kind") in _WEIGHTS_KINDS:
            bad(f"{where}.sha256", f"is empty: a {get('kind')} member must record the sha256 of every weights file "
                                   f"behind it (predict checks them); re-run tune-weights")
        for key in ("member", "tta", "merge"):
            if m.get(key) is not None and (not isinstance(m[key], str) or not m[key].strip()):
                bad(f"{where}.{key}", f"must be a non-empty string when given, got {m[key]!r}")
    if len(set(names)) != len(names):
        bad("members", f"lists a name twice: {names}")
    if not any(m["weight"] > 0 for m in members):
        bad("members", "has all weights zero")
    biases = d.get("class_biases")
    if biases is not None:
        if d["vote"] == "hard":
            bad("class_biases", "cannot be used with the hard vote (it has no probabilities)")
        if not isinstance(biases, (list, tuple)) or len(biases) != len(members[0]["classes"]) or not all(
            _is_number(b) for b in biases
        ):
            bad("class_biases", f"must be {len(members[0]['classes'])} finite numbers, got {biases!r}")
    if not isinstance(d.get("scores", {}), Mapping):
        bad("scores", "must be an object")
    _validate_stack(d, bad)


def _validate_stack(d: Mapping, bad) -> None:
    """A stack's shapes: coef (C, M*C), intercept (C,), classes a subset of 0..C-1, finite numbers."""
    st = d.get("stack")
    if d["vote"] != "stack":
        if st is not None:
            bad("stack", f"is given but the vote rule is {d['vote']!r}; a stack needs vote 'stack'")
        return
    if not isinstance(st, Mapping):
        bad("stack", "is missing: vote 'stack' needs the fitted regression (coef, intercept, classes)")
    c = len(d["members"][0]["classes"])
    m = len(d["members"])
    for key in ("coef", "intercept", "classes"):
        if key not in st:
            bad(f"stack.{key}", "is missing")
    try:
        coef = np.asarray(st["coef"], dtype=np.float64)
        intercept = np.asarray(st["intercept"], dtype=np.float64)
    except (TypeError, ValueError):
        bad("stack.coef", "must be numbers")
    if coef.shape != (c, m * c):
        bad("stack.coef", f"has shape {coef.shape}; {m} member(s) of {c} classes need ({c}, {m * c})")
    if intercept.shape != (c,):
        bad("stack.intercept", f"has shape {intercept.shape}; expected ({c},)")
    if not (np.all(np.isfinite(coef)) and np.all(np.isfinite(intercept))):
        bad("stack.coef", "must be finite numbers (NaN or inf found in coef or intercept)")
    classes = st["classes"]
    if (not isinstance(classes, (list, tuple)) or len(classes) < 2
            or not all(isinstance(k, int) and not isinstance(k, bool) and 0 <= k < c for k in classes)
            or len(set(classes)) != len(classes)):
        bad("stack.classes", f"must be at least two distinct class indices in 0..{c - 1}, got {classes!r}")


_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
