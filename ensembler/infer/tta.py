"""Test-time augmentation: views of one batch run in as few forwards as fit, and merged.

The plans and their views are data (:mod:`ensembler.infer.views`: :func:`parse_tta`,
:class:`TTAPlan`, :class:`View`, re-exported here). :func:`predict_batch` stacks every view
of a batch into the batch dimension and runs the model in as few forwards as the memory
allows (one forward for ``B x V`` images when it fits; the chunk is halved on out-of-memory);
ttach runs one forward per view in a Python loop, and the results agree with
``ttach.ClassificationTTAWrapper`` to float precision.

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

import math
from dataclasses import dataclass
from typing import Callable, Sequence

from .views import TTAError, TTAPlan, View, apply_view, build_views, parse_tta

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
