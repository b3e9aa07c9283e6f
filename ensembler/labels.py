"""LabelSpace: ordered class names, optionally a product of factors.

The mask task is mask(3) x gender(2) x age(3) = 18 classes with
``class = mask*6 + gender*3 + age``: the joint index is the row-major (C-order) index of
the factor indices, in factor order. A factored head outputs one block of logits per
factor; its joint log-probabilities are the sum of each block's log-softmax, so flat and
factored models (and per-factor models) meet in one joint space.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .errors import DataError, LogitError, ParameterError
from .metrics import log_softmax

MASK_FACTOR = ("wear", "incorrect", "not_wear")
GENDER_FACTOR = ("male", "female")
AGE_FACTOR = ("young", "middle", "old")
DEFAULT_AGE_BANDS = (30, 60)


@dataclass(frozen=True)
class Factor:
    """One factor of a factored LabelSpace, e.g. ``Factor("age", ("young", "middle", "old"))``."""

    name: str
    classes: tuple[str, ...]

    def __post_init__(self):
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        if len(self.classes) < 2:
            raise ParameterError("classes", f"factor {self.name!r} needs at least 2 classes, got {list(self.classes)}")
        if len(set(self.classes)) != len(self.classes):
            raise ParameterError("classes", f"factor {self.name!r} has duplicate class names: {list(self.classes)}")

    @property
    def size(self) -> int:
        return len(self.classes)


@dataclass(frozen=True)
class LabelSpace:
    """Ordered class names; ``factors`` non-empty when the classes are a product of factors.

    Parameters
    ----------
    classes : sequence of str
        Class names in index order.
    factors : sequence of Factor, optional
        When given, ``classes`` must be the C-order product of the factors' classes.
    meta : dict, optional
        Free-form facts about how labels were made (e.g. ``{"age_bands": [30, 60]}``).

    Examples
    --------
    >>> ls = LabelSpace.mask()
    >>> ls.num_classes, ls.factor_sizes
    (18, (3, 2, 3))
    >>> ls.joint_index((1, 0, 2))  # incorrect, male, old
    8
    """

    classes: tuple[str, ...]
    factors: tuple[Factor, ...] = ()
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        object.__setattr__(self, "factors", tuple(self.factors))
        if len(self.classes) < 2:
            raise ParameterError("classes", f"a LabelSpace needs at least 2 classes, got {list(self.classes)}")
        if len(set(self.classes)) != len(self.classes):
            dup = sorted({c for c in self.classes if self.classes.count(c) > 1})
            raise ParameterError("classes", f"duplicate class names in classes: {dup}")
        if self.factors:
            expected = int(np.prod([f.size for f in self.factors]))
            if expected != len(self.classes):
                raise ParameterError(
                    "factors", f"factors {[f.name for f in self.factors]} give {expected} classes, "
                    f"but {len(self.classes)} class names were given"
                )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_factors(cls, factors: Sequence[Factor], sep: str = "-", meta: dict | None = None) -> "LabelSpace":
        """Build the joint space of ``factors``; class names join factor names with ``sep``."""
        factors = tuple(factors)
        grids = np.meshgrid(*[np.arange(f.size) for f in factors], indexing="ij")
        flat = [g.ravel() for g in grids]
        names = [sep.join(f.classes[idx[i]] for i, f in enumerate(factors)) for idx in zip(*flat)]
        return cls(tuple(names), factors, dict(meta or {}))

    @classmethod
    def mask(cls, age_bands: Sequence[int] = DEFAULT_AGE_BANDS) -> "LabelSpace":
        """The 18-class mask-status space: mask x gender x age (thresholds in ``age_bands``)."""
        lo, hi = validate_age_bands(age_bands)
        return cls.from_factors(
            [Factor("mask", MASK_FACTOR), Factor("gender", GENDER_FACTOR), Factor("age", AGE_FACTOR)],
            meta={"task": "mask", "age_bands": [lo, hi]},
        )

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"classes": list(self.classes)}
        if self.factors:
            d["factors"] = [{"name": f.name, "classes": list(f.classes)} for f in self.factors]
        if self.meta:
            d["meta"] = dict(self.meta)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LabelSpace":
        factors = tuple(Factor(f["name"], tuple(f["classes"])) for f in d.get("factors", ()))
        return cls(tuple(d["classes"]), factors, dict(d.get("meta", {})))

    # ------------------------------------------------------------------ queries
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def is_factored(self) -> bool:
        return bool(self.factors)

    @property
    def factor_sizes(self) -> tuple[int, ...]:
        return tuple(f.size for f in self.factors)

    def factor(self, name: str) -> Factor:
        for f in self.factors:
            if f.name == name:
                return f
        raise ParameterError("name", f"no factor named {name!r}; factors are {[f.name for f in self.factors]}")

    def factor_space(self, name: str) -> "LabelSpace":
        """The flat LabelSpace of one factor (what a per-factor model such as an age-only model predicts)."""
        f = self.factor(name)
        return LabelSpace(f.classes, meta={"factor_of": self.to_dict(), "factor": name})

    def factors_space(self, names: Sequence[str]) -> "LabelSpace":
        """The space of several factors (a ``--target gender,age`` model), in this space's factor order.

        One name gives :meth:`factor_space`. Several give their joint product, factored, with
        meta ``factor_of`` (this space) and ``factor`` (the names joined by commas), so the
        model composes with the remaining factors' models into this space.

        >>> LabelSpace.mask().factors_space(["age", "gender"]).classes[:2]
        ('male-young', 'male-middle')
        """
        order = [f.name for f in self.factors]
        unknown = [n for n in names if n not in order]
        if unknown or not names:
            raise ParameterError("names", f"no factor(s) named {unknown or list(names)}; factors are {order}")
        if len(set(names)) != len(names):
            raise ParameterError("names", f"a factor is named twice in {list(names)}")
        ordered = sorted(names, key=order.index)
        if len(ordered) == 1:
            return self.factor_space(ordered[0])
        return LabelSpace.from_factors([self.factor(n) for n in ordered],
                                       meta={"factor_of": self.to_dict(), "factor": ",".join(ordered)})

    def index(self, label: Any) -> int:
        """Class index of a class name or an integer index (given as int or digit string)."""
        if isinstance(label, (int, np.integer)) and not isinstance(label, bool):
            idx = int(label)
        elif isinstance(label, str) and label in self.classes:
            return self.classes.index(label)
        elif isinstance(label, str) and label.strip().lstrip("-").isdigit():
            if self.integer_named:
                # Classes named by integers ("-1", "0", "1"): "2" is a name that is not there,
                # never the index 2 (which is the class "1").
                raise DataError(f"unknown class {label!r}; known classes: {list(self.classes)}")
            idx = int(label)
        else:
            raise DataError(f"unknown class {label!r}; known classes: {list(self.classes)}")
        if not 0 <= idx < self.num_classes:
            raise DataError(f"class index {idx} out of range 0..{self.num_classes - 1}")
        return idx

    def joint_index(self, factor_indices: Sequence[int]) -> int:
        return int(np.ravel_multi_index(tuple(int(i) for i in factor_indices), self.factor_sizes))

    def factor_indices(self, class_index: int | np.ndarray) -> tuple:
        return np.unravel_index(class_index, self.factor_sizes)

    @property
    def integer_named(self) -> bool:
        """True when every class name is an integer ("-1", "0", "7"): a CSV's integer label column."""
        return all(c.lstrip("-").isdigit() for c in self.classes)

    def same_classes(self, other: "LabelSpace") -> bool:
        return self.classes == other.classes


def age_bands_of(space: "LabelSpace | None") -> tuple[int, int] | None:
    """The age thresholds a space's labels depend on, or None when they do not depend on any.

    The mask space's ``meta["age_bands"]``; a per-factor model's (``--target``) only when it
    predicts age (a mask-only or gender-only model means the same whatever the bands).

    >>> age_bands_of(LabelSpace.mask((29, 58)))
    (29, 58)
    >>> age_bands_of(LabelSpace.mask((29, 58)).factor_space("gender")) is None
    True
    """
    if space is None:
        return None
    meta = space.meta or {}
    if "factor_of" in meta:
        if "age" not in str(meta.get("factor", "")).split(","):
            return None
        meta = meta["factor_of"].get("meta", {})
    bands = meta.get("age_bands")
    return (int(bands[0]), int(bands[1])) if bands else None


def validate_age_bands(age_bands: Sequence[int]) -> tuple[int, int]:
    bands = [int(a) for a in age_bands]
    if len(bands) != 2 or not 0 < bands[0] < bands[1]:
        raise DataError(f"--age-bands needs two increasing ages like 30,60 (got {list(age_bands)})")
    return bands[0], bands[1]


def age_band(age: int, age_bands: Sequence[int] = DEFAULT_AGE_BANDS) -> int:
    """0 (< lo), 1 (lo <= age < hi) or 2 (>= hi): ``age_band(59) == 1``, ``age_band(60) == 2``."""
    lo, hi = age_bands
    return 0 if age < lo else (1 if age < hi else 2)


def joint_from_factor_logprobs(factor_logprobs: Sequence):
    """Joint log-probs (N, prod k_i) from per-factor log-probs [(N, k_1), (N, k_2), ...].

    ``joint[:, ravel(i1, i2, ...)] = lp1[:, i1] + lp2[:, i2] + ...`` (C order). Works on numpy
    arrays and torch tensors.
    """
    out = factor_logprobs[0]
    for lp in factor_logprobs[1:]:
        out = (out[:, :, None] + lp[:, None, :]).reshape(out.shape[0], -1)
    return out


def factored_to_joint_logprobs(outputs, factor_sizes: Sequence[int]):
    """Joint log-probs from a factored head's concatenated logits (N, sum k_i)."""
    blocks, start = [], 0
    for k in factor_sizes:
        blocks.append(log_softmax(outputs[:, start:start + k], axis=-1))
        start += k
    if start != outputs.shape[1]:
        raise LogitError(f"factored head has {outputs.shape[1]} outputs, factor_sizes {list(factor_sizes)} need {start}")
    return joint_from_factor_logprobs(blocks)
