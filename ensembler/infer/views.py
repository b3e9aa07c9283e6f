"""TTA plans as data and the views they build on the device.

A TTA plan is parsed from a short string (``"flip"``, ``"hflip+five-crop=224"``) into a
:class:`TTAPlan`: an ordered list of :class:`View`, each a tuple of primitive geometric ops
applied left to right. Views are built from one batch already on the device (flip =
``torch.flip``, rot90 = ``torch.rot90``, crop = slicing, scale = ``F.interpolate``) and
grouped by output size so each group stacks into one tensor (:func:`build_views`). The views
and their order are ttach's, so results agree with ``ttach.ClassificationTTAWrapper`` to
float precision.

Plan tokens (compose with ``+``; the views are the product, leftmost token outermost, and a
view applies the left token's op first, exactly like ``ttach.Compose``):

==================  =====  ===========================================================
token               views  order (ttach's)
==================  =====  ===========================================================
``none``            1      identity
``hflip``           2      identity, hflip
``vflip``           2      identity, vflip
``flip``            4      identity, vflip, hflip, hflip+vflip  (= ttach ``Compose([HorizontalFlip(), VerticalFlip()])``)
``d4``              8      rot 0/90/180/270, then hflip + rot 0/90/180/270 (square inputs only)
``center-crop=S``   1      centre crop S (or ``HxW``) pixels of the input
``five-crop=S``     5      left-top, left-bottom, right-bottom, right-top, centre (ttach ``FiveCrops``)
``ten-crop=S``      10     five-crop, then hflip + five-crop (= ``hflip+five-crop=S``)
``scales=a,b,...``  n      bilinear resize by each factor (``int(H*a)``), as given (= ttach ``Scale(..., 'bilinear')``)
==================  =====  ===========================================================

**A subset of a plan's views**: ``PLAN@VIEW,VIEW,...`` keeps only the named views of
``PLAN``, in the plan's order (``"flip@identity,hflip"``: 2 views, 2 forwards per image).
This is how a recipe tuned with ``tune-weights --tta`` records the views it chose;
:func:`select_views` builds one from a plan and view names.

Crop sizes are input pixels and crops are not resized (ttach's semantics), except for
fixed-input-size models (Swin, ViT): ``resize_to`` resizes every view whose size differs back
to the model's input size.

Merging the views' logits and running them through a model: :mod:`ensembler.infer.tta`.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from typing import Sequence

from ..errors import EnsemblerError
from ..names import TTA_TOKENS
from ..preprocess import MAX_INPUT_SIZE

__all__ = ["TTAError", "View", "TTAPlan", "parse_tta", "select_views", "apply_view", "build_views"]


class TTAError(EnsemblerError, ValueError):
    """A TTA plan or merge rule that cannot be used (bad token, non-square d4, crop too big)."""


# ---------------------------------------------------------------------------------- views
# A primitive op is a tuple: ("hflip",), ("vflip",), ("rot90", k), ("crop", anchor, h, w),
# ("scale", factor). Ops are plain data so plans can be compared, hashed and printed.
_CROP_ANCHORS = ("lt", "lb", "rb", "rt", "center")  # ttach FiveCrops order
MAX_SCALE = 4.0   # largest scales= factor; views stack in one batch, so 1000x is an OOM kill
MAX_VIEWS = 128   # views per plan (d4 + ten-crop is 80)


@dataclass(frozen=True)
class View:
    """One TTA view: primitive geometric ops applied left to right to the input batch."""

    ops: tuple[tuple, ...] = ()

    @property
    def name(self) -> str:
        if not self.ops:
            return "identity"
        return "+".join(_op_name(op) for op in self.ops)

    def output_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """Spatial (H, W) this view produces from an input of ``size`` (before any resize_to)."""
        h, w = size
        for op in self.ops:
            kind = op[0]
            if kind == "rot90" and op[1] % 2 == 1:
                h, w = w, h
            elif kind == "crop":
                h, w = op[2], op[3]
            elif kind == "scale":
                h, w = int(h * op[1]), int(w * op[1])
        return h, w


def _op_name(op: tuple) -> str:
    kind = op[0]
    if kind == "rot90":
        return f"rot{90 * op[1]}"
    if kind == "crop":
        return f"crop-{op[1]}-{op[2]}x{op[3]}"
    if kind == "scale":
        return f"scale{op[1]:g}"
    return kind


# ---------------------------------------------------------------------------------- plans
@dataclass(frozen=True)
class _Token:
    """One parsed plan token: its canonical text and its alternative op sequences."""

    text: str
    options: tuple[tuple[tuple, ...], ...]
    needs_square: bool = False


@dataclass(frozen=True)
class TTAPlan:
    """A parsed TTA plan: the views to run, in order.

    Build with :func:`parse_tta`. ``spec`` is the canonical string (``str(plan)``), stable
    across equivalent spellings, so it can key a cache.

    Examples
    --------
    >>> plan = parse_tta("hflip+five-crop=24")
    >>> len(plan), plan.spec
    (10, 'hflip+five-crop=24x24')
    >>> plan.views[1].name
    'crop-lb-24x24'
    """

    spec: str
    tokens: tuple[_Token, ...]
    subset: tuple[int, ...] = ()  # indices of the views kept (``PLAN@views``); empty: every view

    @property
    def all_views(self) -> tuple[View, ...]:
        """Every view of the tokens' product, whatever :attr:`subset` keeps."""
        combos = itertools.product(*[t.options for t in self.tokens])
        return tuple(View(tuple(op for opts in combo for op in opts)) for combo in combos)

    @property
    def views(self) -> tuple[View, ...]:
        views = self.all_views
        return tuple(views[i] for i in self.subset) if self.subset else views

    def __len__(self) -> int:
        return len(self.subset) if self.subset else math.prod(len(t.options) for t in self.tokens)

    def __str__(self) -> str:
        return self.spec

    @property
    def needs_square(self) -> bool:
        if self.subset:  # only a quarter turn swaps height and width
            return any(op[0] == "rot90" and op[1] % 2 for v in self.views for op in v.ops)
        return any(t.needs_square for t in self.tokens)

    def check_input(self, size: Sequence[int]) -> None:
        """Raise :class:`TTAError` if the plan cannot run on inputs of spatial ``size`` (H, W)."""
        h, w = int(size[0]), int(size[1])
        if self.needs_square and h != w:
            raise TTAError(
                f"TTA plan {self.spec!r}: d4 rotates by 90 degrees and needs square inputs, "
                f"got {h}x{w}; use 'flip' for non-square inputs"
            )
        for view in self.views:
            ch, cw = h, w
            for op in view.ops:
                if op[0] == "crop" and (op[2] > ch or op[3] > cw):
                    raise TTAError(
                        f"TTA plan {self.spec!r}: crop {op[2]}x{op[3]} is larger than the "
                        f"{ch}x{cw} input; crop sizes are input pixels"
                    )
                ch, cw = View((op,)).output_size((ch, cw))
            if min(ch, cw) < 1:
                raise TTAError(f"TTA plan {self.spec!r}: view {view.name} of a {h}x{w} input is empty")


_TOKEN_HELP = f"{', '.join(TTA_TOKENS)} (S: a size, S or HxW; combine with '+', e.g. 'hflip+five-crop=224')"


def _parse_size(name: str, arg: str | None, token: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*(?:[x,]\s*(\d+)\s*)?", arg or "")
    if not m or int(m.group(1)) < 1 or (m.group(2) is not None and int(m.group(2)) < 1):
        raise TTAError(f"bad TTA token {token!r}: {name} needs a size in pixels, e.g. {name}=224 or {name}=224x192")
    h = int(m.group(1))
    w = int(m.group(2)) if m.group(2) is not None else h
    if max(h, w) > MAX_INPUT_SIZE:
        raise TTAError(f"bad TTA token {token!r}: {name} is over the limit of {MAX_INPUT_SIZE} pixels per side")
    return h, w


def _parse_token(token: str) -> _Token:
    name, eq, arg = token.partition("=")
    name = name.strip().lower()
    arg = arg.strip() if eq else None
    no_arg = name in ("none", "hflip", "vflip", "flip", "d4")
    if no_arg and arg is not None:
        raise TTAError(f"bad TTA token {token!r}: {name} takes no '=' argument")
    if name == "none":
        return _Token("none", ((),))
    if name == "hflip":
        return _Token("hflip", ((), (("hflip",),)))
    if name == "vflip":
        return _Token("vflip", ((), (("vflip",),)))
    if name == "flip":
        # ttach flip_transform = Compose([HorizontalFlip(), VerticalFlip()]): h outer, v inner.
        return _Token("flip", ((), (("vflip",),), (("hflip",),), (("hflip",), ("vflip",))))
    if name == "d4":
        # ttach d4_transform = Compose([HorizontalFlip(), Rotate90([0, 90, 180, 270])]).
        rots = tuple(((("rot90", k),) if k else ()) for k in range(4))
        flipped = tuple((("hflip",),) + r for r in rots)
        return _Token("d4", rots + flipped, needs_square=True)
    if name in ("center-crop", "five-crop", "ten-crop"):
        h, w = _parse_size(name, arg, token)
        text = f"{name}={h}x{w}"
        if name == "center-crop":
            return _Token(text, ((("crop", "center", h, w),),))
        crops = tuple((("crop", a, h, w),) for a in _CROP_ANCHORS)
        if name == "five-crop":
            return _Token(text, crops)
        return _Token(text, crops + tuple((("hflip",),) + c for c in crops))
    if name == "scales":
        try:
            factors = [float(f) for f in (arg or "").split(",") if f.strip()]
        except ValueError:
            factors = []
        if not factors or any(not math.isfinite(f) or not 0 < f <= MAX_SCALE for f in factors):
            raise TTAError(f"bad TTA token {token!r}: scales needs positive factors up to {MAX_SCALE:g}, e.g. "
                           "scales=0.9,1.0,1.1 (a view larger than that asks for memory no GPU has)")
        if len(set(factors)) != len(factors):
            raise TTAError(f"bad TTA token {token!r}: a scale factor is repeated")
        opts = tuple(((("scale", f),) if f != 1.0 else ()) for f in factors)
        return _Token("scales=" + ",".join(f"{f:g}" for f in factors), opts)
    raise TTAError(f"unknown TTA token {token.strip()!r}; valid tokens: {_TOKEN_HELP}")


def parse_tta(spec: "str | TTAPlan | None") -> TTAPlan:
    """Parse a TTA plan string into a :class:`TTAPlan`.

    Parameters
    ----------
    spec : str, TTAPlan or None
        Tokens joined by ``+`` (see the module docstring); ``None`` or ``""`` means ``none``.

    Returns
    -------
    TTAPlan

    Raises
    ------
    TTAError
        Naming the bad token and listing the valid ones.

    Examples
    --------
    >>> len(parse_tta("flip")), len(parse_tta("d4")), len(parse_tta("ten-crop=56"))
    (4, 8, 10)
    >>> parse_tta("HFLIP + scales=1.1,0.9").spec
    'hflip+scales=1.1,0.9'
    """
    if isinstance(spec, TTAPlan):
        return spec
    if spec is None or not str(spec).strip():
        spec = "none"
    if not isinstance(spec, str):
        raise TTAError(f"TTA plan must be a string like 'flip', got {type(spec).__name__}")
    if "@" in spec:
        plan_text, _, views_text = spec.partition("@")
        names = [v.strip() for v in views_text.split(",") if v.strip()]
        if not names:
            raise TTAError(f"bad TTA plan {spec!r}: no view names after '@' (e.g. 'flip@identity,hflip')")
        return select_views(parse_tta(plan_text), names)
    parts = [p for p in spec.split("+")]
    if any(not p.strip() for p in parts):
        raise TTAError(f"bad TTA plan {spec!r}: empty token around '+'; valid tokens: {_TOKEN_HELP}")
    tokens = tuple(_parse_token(p) for p in parts)
    if math.prod(len(t.options) for t in tokens) > MAX_VIEWS:
        raise TTAError(f"bad TTA plan {spec!r}: {math.prod(len(t.options) for t in tokens)} views, more than "
                       f"the limit of {MAX_VIEWS}")
    names = [t.text.split("=")[0] for t in tokens]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise TTAError(f"bad TTA plan {spec!r}: token {dup[0]!r} given more than once")
    if len(tokens) > 1:  # 'none' is the identity of '+'
        tokens = tuple(t for t in tokens if t.text != "none") or tokens[:1]
    return TTAPlan("+".join(t.text for t in tokens), tokens)


def select_views(plan: "str | TTAPlan", names: Sequence[str]) -> TTAPlan:
    """The plan restricted to the views called ``names`` (kept in the plan's order).

    The result's spec is ``PLAN@VIEW,...`` (or ``PLAN`` itself when every view is kept), which
    :func:`parse_tta` reads back.

    Examples
    --------
    >>> sub = select_views("flip", ["hflip", "identity"])
    >>> sub.spec, len(sub), [v.name for v in sub.views]
    ('flip@identity,hflip', 2, ['identity', 'hflip'])
    >>> parse_tta(sub.spec) == sub
    True
    """
    plan = parse_tta(plan)
    if plan.subset:
        plan = TTAPlan(plan.spec.partition("@")[0], plan.tokens)
    views = [v.name for v in plan.all_views]
    unknown = [n for n in names if n not in views]
    if unknown:
        raise TTAError(f"TTA plan {plan.spec!r} has no view {unknown[0]!r}; its views: {', '.join(views)}")
    keep = tuple(i for i, v in enumerate(views) if v in set(names))
    if len(keep) == len(views):
        return plan
    return TTAPlan(f"{plan.spec}@{','.join(views[i] for i in keep)}", plan.tokens, keep)


# ---------------------------------------------------------------------------------- building views
def apply_view(images, view: View, resize_to: Sequence[int] | None = None):
    """Apply one view's ops to a batch ``(B, C, H, W)`` on its device; optionally resize the result.

    ``resize_to`` (H, W) is for fixed-input-size models: a view whose size differs is
    resized back with bilinear interpolation (antialiased when shrinking).
    """
    import torch
    import torch.nn.functional as F

    x = images
    for op in view.ops:
        kind = op[0]
        if kind == "hflip":
            x = torch.flip(x, dims=(3,))
        elif kind == "vflip":
            x = torch.flip(x, dims=(2,))
        elif kind == "rot90":
            x = torch.rot90(x, op[1], dims=(2, 3))
        elif kind == "crop":
            x = _crop(x, op[1], op[2], op[3])
        elif kind == "scale":
            h, w = x.shape[-2:]
            x = F.interpolate(x, size=(int(h * op[1]), int(w * op[1])), mode="bilinear",
                              align_corners=False)  # = ttach Scale(interpolation="bilinear")
        else:  # pragma: no cover - ops are produced by the parser only
            raise TTAError(f"unknown view op {op!r}")
    if resize_to is not None and tuple(x.shape[-2:]) != tuple(resize_to):
        shrink = x.shape[-2] > resize_to[0] or x.shape[-1] > resize_to[1]
        x = F.interpolate(x, size=tuple(int(s) for s in resize_to), mode="bilinear",
                          align_corners=False, antialias=shrink)
    return x


def _crop(x, anchor: str, ch: int, cw: int):
    h, w = x.shape[-2:]
    if ch > h or cw > w:
        raise TTAError(f"crop {ch}x{cw} is larger than the {h}x{w} input")
    if anchor == "lt":
        return x[..., :ch, :cw]
    if anchor == "lb":
        return x[..., h - ch:, :cw]
    if anchor == "rb":
        return x[..., h - ch:, w - cw:]
    if anchor == "rt":
        return x[..., :ch, w - cw:]
    # ttach's centre: start at H//2 - ch//2 (odd leftovers go to the bottom/right)
    top, left = h // 2 - ch // 2, w // 2 - cw // 2
    return x[..., top:top + ch, left:left + cw]


def build_views(images, plan: "str | TTAPlan", resize_to: Sequence[int] | None = None):
    """All views of a batch, grouped by output size so each group stacks into one tensor.

    Returns a list of ``(view_indices, stacked)`` where ``stacked`` is ``(len(view_indices) * B,
    C, h, w)``, view-major (the first ``B`` rows are the first view).
    """
    import torch

    plan = parse_tta(plan)
    plan.check_input(images.shape[-2:])
    groups: dict[tuple[int, int], list[int]] = {}
    views = plan.views
    for i, v in enumerate(views):
        size = tuple(resize_to) if resize_to is not None else v.output_size(tuple(images.shape[-2:]))
        groups.setdefault(size, []).append(i)
    out = []
    for idx in groups.values():
        tensors = [apply_view(images, views[i], resize_to) for i in idx]
        out.append((idx, tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)))
    return out


