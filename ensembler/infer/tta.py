"""Test-time augmentation: plans as data, views built on the device, merge rules.

A TTA plan is parsed from a short string (``"flip"``, ``"hflip+five-crop=224"``) into a
:class:`TTAPlan`: an ordered list of :class:`View`, each a tuple of primitive geometric ops
applied left to right. Views are built from one batch already on the device (flip =
``torch.flip``, rot90 = ``torch.rot90``, crop = slicing, scale = ``F.interpolate``), stacked
into the batch dimension and run through the model in as few forwards as the memory allows
(one forward for ``B x V`` images when it fits; the chunk is halved on out-of-memory). ttach
runs one forward per view in a Python loop; the views and their order here are ttach's, so
results agree with ``ttach.ClassificationTTAWrapper`` to float precision.

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

Crop sizes are input pixels and crops are not resized (ttach's semantics), except for
fixed-input-size models (Swin, ViT): ``resize_to`` resizes every view whose size differs back
to the model's input size.

Merge rules declare the space they average in, and every rule returns logits usable
downstream (``softmax`` of the result gives the merged probabilities):

================  ============================================================================
``mean-logits``   mean of raw logits over views (ttach's ``"mean"``; default)
``mean-probs``    log of the mean of softmax probabilities
``gmean-probs``   mean of log-softmax (log of the geometric mean of probabilities, unnormalised)
``max-probs``     log of the per-class max of softmax probabilities (unnormalised)
================  ============================================================================

ttach's ``gmean`` and ``tsharpen`` are refused: on raw logits (which can be negative) they take
roots of negative numbers (NaN) or multiply signs, flipping the winning class.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from typing import Callable, Sequence

from ..errors import EnsemblerError

__all__ = [
    "TTAError",
    "View",
    "TTAPlan",
    "MERGE_RULES",
    "parse_tta",
    "check_merge",
    "merge_views",
    "build_views",
    "apply_view",
    "predict_views",
    "predict_batch",
    "forward_chunked",
    "is_oom_error",
]


class TTAError(EnsemblerError, ValueError):
    """A TTA plan or merge rule that cannot be used (bad token, non-square d4, crop too big)."""


# ---------------------------------------------------------------------------------- views
# A primitive op is a tuple: ("hflip",), ("vflip",), ("rot90", k), ("crop", anchor, h, w),
# ("scale", factor). Ops are plain data so plans can be compared, hashed and printed.
_CROP_ANCHORS = ("lt", "lb", "rb", "rt", "center")  # ttach FiveCrops order


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

    @property
    def views(self) -> tuple[View, ...]:
        combos = itertools.product(*[t.options for t in self.tokens])
        return tuple(View(tuple(op for opts in combo for op in opts)) for combo in combos)

    def __len__(self) -> int:
        return math.prod(len(t.options) for t in self.tokens)

    def __str__(self) -> str:
        return self.spec

    @property
    def needs_square(self) -> bool:
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


_TOKEN_HELP = (
    "none, hflip, vflip, flip, d4, center-crop=S|HxW, five-crop=S|HxW, ten-crop=S|HxW, "
    "scales=F1,F2,... (combine with '+', e.g. 'hflip+five-crop=224')"
)


def _parse_size(name: str, arg: str | None, token: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*(?:[x,]\s*(\d+)\s*)?", arg or "")
    if not m or int(m.group(1)) < 1 or (m.group(2) is not None and int(m.group(2)) < 1):
        raise TTAError(f"bad TTA token {token!r}: {name} needs a size in pixels, e.g. {name}=224 or {name}=224x192")
    h = int(m.group(1))
    w = int(m.group(2)) if m.group(2) is not None else h
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
        if not factors or any(not math.isfinite(f) or f <= 0 for f in factors):
            raise TTAError(f"bad TTA token {token!r}: scales needs positive factors, e.g. scales=0.9,1.0,1.1")
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
    parts = [p for p in spec.split("+")]
    if any(not p.strip() for p in parts):
        raise TTAError(f"bad TTA plan {spec!r}: empty token around '+'; valid tokens: {_TOKEN_HELP}")
    tokens = tuple(_parse_token(p) for p in parts)
    names = [t.text.split("=")[0] for t in tokens]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise TTAError(f"bad TTA plan {spec!r}: token {dup[0]!r} given more than once")
    if len(tokens) > 1:  # 'none' is the identity of '+'
        tokens = tuple(t for t in tokens if t.text != "none") or tokens[:1]
    return TTAPlan("+".join(t.text for t in tokens), tokens)


# ---------------------------------------------------------------------------------- merges
@dataclass(frozen=True)
class _MergeRule:
    name: str
    space: str
    doc: str


MERGE_RULES = {
    "mean-logits": _MergeRule("mean-logits", "logits", "mean of raw logits over views (ttach 'mean')"),
    "mean-probs": _MergeRule("mean-probs", "probs", "log of the mean of softmax probabilities"),
    "gmean-probs": _MergeRule("gmean-probs", "log-probs", "mean of log-softmax (geometric mean of probabilities)"),
    "max-probs": _MergeRule("max-probs", "probs", "log of the per-class max of softmax probabilities"),
}

_REFUSED_MERGES = {
    "gmean": "a geometric mean of raw logits takes roots of negative numbers (NaN) and multiplies "
    "signs, flipping the winning class; use 'gmean-probs' (mean of log-probabilities)",
    "tsharpen": "tsharpen takes the square root of raw logits, which is NaN for negative logits; "
    "use 'mean-probs' or 'gmean-probs'",
    "max": "a max of raw logits compares un-normalised scores across views; use 'max-probs'",
    "min": "a min of raw logits compares un-normalised scores across views; use 'mean-probs'",
    "sum": "sum equals mean-logits up to a constant that changes temperatures; use 'mean-logits'",
    "mean": "say which space to average in: 'mean-logits' (ttach's 'mean') or 'mean-probs'",
}


def check_merge(merge: str) -> str:
    """Validate a merge rule name and return it; refused and unknown rules raise :class:`TTAError`."""
    if isinstance(merge, str):
        key = merge.strip().lower()
        if key in MERGE_RULES:
            return key
        base = key.removesuffix("-logits")
        if base in _REFUSED_MERGES:
            raise TTAError(f"merge rule {merge!r} is refused: {_REFUSED_MERGES[base]}")
    raise TTAError(f"unknown merge rule {merge!r}; valid rules: {', '.join(MERGE_RULES)}")


def merge_views(view_logits, merge: str = "mean-logits"):
    """Merge per-view logits ``(B, V, C)`` into logits ``(B, C)`` (float32).

    ``mean-logits`` returns the mean of logits. The probability rules return the *log* of
    the merged probabilities (``mean-probs``: log mean softmax; ``gmean-probs``: mean
    log-softmax; ``max-probs``: log max softmax), so every rule's output is logit-like:
    ``softmax`` gives the merged (renormalised) probabilities and ``argmax`` the winner.
    """
    import torch

    rule = check_merge(merge)
    x = view_logits.float()
    if x.ndim != 3:
        raise TTAError(f"merge_views expects (B, V, C) logits, got shape {tuple(x.shape)}")
    if rule == "mean-logits":
        return x.mean(dim=1)
    logp = torch.log_softmax(x, dim=-1)
    if rule == "mean-probs":
        return torch.logsumexp(logp, dim=1) - math.log(x.shape[1])
    if rule == "gmean-probs":
        return logp.mean(dim=1)
    return logp.amax(dim=1)  # max-probs


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


# ---------------------------------------------------------------------------------- forward
def is_oom_error(exc: BaseException) -> bool:
    """True for CUDA/CPU out-of-memory errors (the chunk should be halved and retried)."""
    import torch

    oom_cls = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    if oom_cls is not None and isinstance(exc, oom_cls):
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


# Images per forward on a CPU. Stacking every view into one big forward suits a GPU, but on
# a CPU per-image throughput falls as the batch grows (cache pressure): measured on 2 cores,
# channels-last, 224 px: efficientnet_b0 117/91/67/61 images/s at 4/8/16/32 per forward,
# resnet18 72/78/95/76, resnet50 31/35/36/23. Eight is near the best for all three.
CPU_CHUNK_SIZE = 8


def default_chunk_size(device) -> int | None:
    """Images per forward the engine uses when none is given: all views stacked at once on
    CUDA (``None``), :data:`CPU_CHUNK_SIZE` on a CPU."""
    import torch

    return None if torch.device(device).type == "cuda" else CPU_CHUNK_SIZE


def forward_chunked(forward: Callable, x, chunk_size: int | None = None):
    """Run ``forward`` over ``x`` in chunks along dim 0, halving the chunk on out-of-memory.

    Returns ``(outputs float32, chunk_size_that_worked)``; callers keep the returned chunk
    size so that later batches do not hit the same out-of-memory again.
    """
    import torch

    n = x.shape[0]
    chunk = n if chunk_size is None else max(1, min(int(chunk_size), n))
    outs, start = [], 0
    while start < n:
        try:
            y = forward(x[start:start + chunk])
        except Exception as exc:  # noqa: BLE001 - only OOM is retried, everything else re-raised
            if not is_oom_error(exc) or chunk == 1:
                raise
            chunk = max(1, chunk // 2)
            if x.is_cuda:
                torch.cuda.empty_cache()
            continue
        outs.append(y.float())
        start += chunk
    return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)), chunk


def predict_views(model: Callable, images, tta="flip", *, chunk_size: int | None = None,
                  resize_to: Sequence[int] | None = None):
    """Per-view logits ``(B, V, C)`` float32 for a batch ``(B, C, H, W)``.

    Views are stacked into the batch dimension and run in chunks of ``chunk_size`` images
    (default: all ``B x V`` at once), halving on out-of-memory. ``model`` is any callable
    mapping a float batch to logits (an ``nn.Module`` in eval mode, an ONNX session wrapper).
    """
    import torch

    plan = parse_tta(tta)
    b = images.shape[0]
    per_view = [None] * len(plan)
    chunk = chunk_size
    with torch.inference_mode():
        for idx, stacked in build_views(images, plan, resize_to):
            out, chunk = forward_chunked(model, stacked, chunk)
            for j, vi in enumerate(idx):
                per_view[vi] = out[j * b:(j + 1) * b]
    return torch.stack(per_view, dim=1)


def predict_batch(model: Callable, images, tta="flip", merge: str = "mean-logits", return_views: bool = False,
                  chunk_size: int | None = None, resize_to: Sequence[int] | None = None):
    """Merged TTA logits of one batch, with every view run in as few forwards as fit.

    Parameters
    ----------
    model : nn.Module or callable
        Maps a float batch ``(N, C, h, w)`` to logits ``(N, K)``; put it in eval mode first.
    images : torch.Tensor
        ``(B, C, H, W)`` float, already normalised, on the model's device. Views are built
        on that device.
    tta : str or TTAPlan
        Plan string, e.g. ``"flip"``, ``"d4"``, ``"hflip+five-crop=224"`` (see :func:`parse_tta`).
    merge : str
        ``mean-logits`` (default, ttach's mean), ``mean-probs``, ``gmean-probs`` or
        ``max-probs``. The probability rules return the **log** of the merged probabilities,
        so the result is always logit-like (softmax it for probabilities).
    return_views : bool
        Also return the per-view logits ``(B, V, K)`` in plan order.
    chunk_size : int, optional
        Images per forward (default: all ``B x V``); halved automatically on out-of-memory.
    resize_to : (int, int), optional
        For fixed-input-size models: views of another size are resized back to this.

    Returns
    -------
    torch.Tensor or (torch.Tensor, torch.Tensor)
        Merged logits ``(B, K)`` float32, and per-view logits if ``return_views``.

    Examples
    --------
    >>> import timm, torch
    >>> model = timm.create_model("test_resnet", pretrained=False, num_classes=3).eval()
    >>> x = torch.randn(2, 3, 32, 32)
    >>> merged, views = predict_batch(model, x, tta="flip", return_views=True)
    >>> tuple(merged.shape), tuple(views.shape)
    ((2, 3), (2, 4, 3))
    """
    merge = check_merge(merge)
    if images.ndim != 4:
        raise TTAError(f"predict_batch expects images (B, C, H, W), got shape {tuple(images.shape)}")
    views = predict_views(model, images, tta, chunk_size=chunk_size, resize_to=resize_to)
    merged = merge_views(views, merge)
    return (merged, views) if return_views else merged
