"""Training losses: cross-entropy, focal, label smoothing, soft macro-F1, BCE and weighted mixes.

All losses take a model's raw outputs ``(N, C)`` and integer targets ``(N,)`` and return a
scalar. :func:`build_loss` wraps them for a head:

* flat head: the loss is applied to the ``C`` logits directly;
* factored head (one block of logits per factor, e.g. 3 + 2 + 3 for mask x gender x age):
  the loss is applied **per factor block** with that factor's targets, and the blocks'
  losses are summed;
* multilabel head (the factored head's outputs as independent sigmoids): ``bce`` per block,
  one sigmoid per factor level against the one-hot factor target.

Why per block and not on the joint log-probs: for cross-entropy the two are the *same
number* (the joint log-prob of the true class is the sum of the factors' log-probs, so
``CE_joint = sum_f CE_f``), so nothing is lost. For the other losses per block is what the
field used (focal loss on the age factor, soft-F1 per factor) and it behaves better: a soft
macro-F1 over 18 joint classes in a batch of 32 is dominated by classes that are absent from
the batch, whereas each factor has only 2-3 classes that are almost always present. The
model is still evaluated and selected on the joint space (validation macro-F1 of the joint
log-probs), which is what the competition scores.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import EnsemblerError, ParameterError
from ..names import LOSS_NAMES


# ---------------------------------------------------------------------------- functional
def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Mean focal loss ``-(1 - p_t)**gamma * log p_t`` (Lin et al. 2017).

    ``gamma=0`` is exactly cross-entropy.

    Examples
    --------
    >>> import torch
    >>> x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    >>> bool(torch.allclose(focal_loss(x, y, gamma=0.0), torch.nn.functional.cross_entropy(x, y)))
    True
    """
    logp_t = F.log_softmax(logits.float(), dim=1).gather(1, target.view(-1, 1)).squeeze(1)
    if gamma == 0:
        return -logp_t.mean()
    p_t = logp_t.exp()
    # clamp: (1 - p)**gamma with p rounding to 1.0 would give 0**gamma (NaN grad for gamma < 1).
    return (-(1.0 - p_t).clamp_min(0.0).pow(gamma) * logp_t).mean()


def label_smoothing_loss(logits: torch.Tensor, target: torch.Tensor, smoothing: float = 0.1) -> torch.Tensor:
    """Cross-entropy against ``(1 - smoothing) * onehot + smoothing / C``.

    Identical to ``torch.nn.functional.cross_entropy(logits, target, label_smoothing=smoothing)``.
    """
    logp = F.log_softmax(logits.float(), dim=1)
    nll = -logp.gather(1, target.view(-1, 1)).squeeze(1)
    uniform = -logp.mean(dim=1)
    return ((1.0 - smoothing) * nll + smoothing * uniform).mean()


def soft_f1_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """``1 - mean_c F1_c`` where F1 is computed on softmax probabilities (soft counts).

    ``tp_c = sum_i p_ic * y_ic``, ``fp_c = sum_i p_ic * (1 - y_ic)``, ``fn_c = sum_i (1 - p_ic) * y_ic``,
    ``F1_c = 2 tp_c / (2 tp_c + fp_c + fn_c)``. Differentiable everywhere; the batch is the
    population, so larger batches estimate macro-F1 better. The winning mask-task team
    trained with it.
    """
    probs = F.softmax(logits.float(), dim=1)
    onehot = F.one_hot(target, probs.shape[1]).to(probs.dtype)
    tp = (probs * onehot).sum(0)
    fp = (probs * (1 - onehot)).sum(0)
    fn = ((1 - probs) * onehot).sum(0)
    f1 = 2 * tp / (2 * tp + fp + fn + eps)
    return 1.0 - f1.clamp(eps, 1 - eps).mean()


# ---------------------------------------------------------------------------- modules
def bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """One-vs-rest binary cross-entropy: a sigmoid per class against the one-hot target.

    Summed over the classes, averaged over the batch (so its scale is comparable to
    cross-entropy): ``mean_n sum_c BCE(sigmoid(z_nc), onehot_nc)``. The loss of a
    ``--head multilabel`` model, per factor block.

    >>> import torch
    >>> z = torch.tensor([[2.0, -1.0, 0.0]]); y = torch.tensor([0])
    >>> ref = torch.nn.functional.binary_cross_entropy_with_logits(z, torch.tensor([[1.0, 0.0, 0.0]]), reduction="sum")
    >>> bool(torch.isclose(bce_loss(z, y), ref))
    True
    """
    z = logits.float()
    onehot = F.one_hot(target, z.shape[1]).to(z.dtype)
    return F.binary_cross_entropy_with_logits(z, onehot, reduction="none").sum(1).mean()


def _single(name: str, *, gamma: float, smoothing: float):
    if name == "ce":
        return lambda x, y: F.cross_entropy(x.float(), y)
    if name == "focal":
        return lambda x, y: focal_loss(x, y, gamma)
    if name == "label-smoothing":
        return lambda x, y: label_smoothing_loss(x, y, smoothing)
    if name == "f1":
        return soft_f1_loss
    if name == "bce":
        return bce_loss
    raise EnsemblerError(f"unknown loss {name!r}; choose one of {list(LOSS_NAMES)}")


def parse_loss_weights(text: str | Mapping[str, float] | None) -> dict[str, float]:
    """``"ce=0.3,f1=0.7"`` -> ``{"ce": 0.3, "f1": 0.7}`` (validated; for ``--loss mix``)."""
    if text is None:
        return {}
    if isinstance(text, Mapping):
        items = list(text.items())
    else:
        items = []
        for part in str(text).split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise ParameterError("loss_weights",
                                     f"loss_weights expects NAME=WEIGHT pairs like ce=0.3,f1=0.7, got {part!r}")
            name, value = part.split("=", 1)
            try:
                items.append((name.strip(), float(value)))
            except ValueError:
                raise ParameterError("loss_weights", f"loss_weights: weight of {name.strip()!r} is not a number: {value!r}") from None
    weights: dict[str, float] = {}
    for name, w in items:
        if name not in LOSS_NAMES or name == "mix":
            raise EnsemblerError(
                f"--loss-weights: unknown loss {name!r}; components are {[n for n in LOSS_NAMES if n != 'mix']}"
            )
        if not w >= 0:
            raise ParameterError("loss_weights", f"loss_weights: weight of {name!r} must be >= 0, got {w}")
        weights[name] = float(w)
    if weights and sum(weights.values()) <= 0:
        raise ParameterError("loss_weights", "loss_weights: at least one weight must be positive")
    return weights


class TrainLoss(nn.Module):
    """A loss for a flat or factored head.

    Parameters
    ----------
    name : {"ce", "focal", "label-smoothing", "f1", "bce", "mix"}
    factor_sizes : sequence of int, optional
        Sizes of the factor blocks of a factored head (e.g. ``(3, 2, 3)``); targets are then
        joint class indices, split into factor indices (C order) and the loss is summed over
        blocks. ``None`` for a flat head.
    weights : dict, optional
        For ``mix``: component name -> weight, e.g. ``{"ce": 0.3, "f1": 0.7}``.
    gamma : float
        Focal-loss focusing parameter.
    smoothing : float
        Label-smoothing factor in [0, 1).

    Examples
    --------
    >>> import torch
    >>> loss = TrainLoss("mix", weights={"ce": 0.3, "f1": 0.7})
    >>> value = loss(torch.randn(8, 4), torch.randint(0, 4, (8,)))
    >>> value.ndim
    0
    """

    def __init__(self, name: str = "ce", *, factor_sizes: Sequence[int] | None = None,
                 weights: Mapping[str, float] | None = None, gamma: float = 2.0, smoothing: float = 0.1):
        super().__init__()
        if name not in LOSS_NAMES:
            raise EnsemblerError(f"unknown loss {name!r}; choose one of {list(LOSS_NAMES)}")
        if gamma < 0:
            raise ParameterError("gamma", f"gamma must be >= 0, got {gamma}")
        if not 0 <= smoothing < 1:
            raise ParameterError("smoothing", f"smoothing must be in [0, 1), got {smoothing}")
        if name == "mix":
            weights = parse_loss_weights(weights) if weights else {}
            if not weights:
                raise ParameterError("weights", "loss 'mix' needs weights, e.g. ce=0.3,f1=0.7")
        else:
            weights = {name: 1.0}
        self.name = name
        self.weights = dict(weights)
        self.factor_sizes = tuple(int(s) for s in factor_sizes) if factor_sizes else None
        self._parts = [(w, _single(n, gamma=gamma, smoothing=smoothing)) for n, w in self.weights.items() if w > 0]

    def _flat(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = None
        for w, fn in self._parts:
            term = w * fn(logits, target)
            total = term if total is None else total + term
        return total

    def forward(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.factor_sizes is None:
            return self._flat(outputs, target)
        if outputs.shape[1] != sum(self.factor_sizes):
            raise EnsemblerError(
                f"factored head gives {outputs.shape[1]} outputs, factors {self.factor_sizes} need {sum(self.factor_sizes)}"
            )
        total, start = None, 0
        for f_target, size in zip(factor_targets(target, self.factor_sizes), self.factor_sizes):
            term = self._flat(outputs[:, start:start + size], f_target)
            total = term if total is None else total + term
            start += size
        return total

    def extra_repr(self) -> str:
        return f"name={self.name!r}, weights={self.weights}, factor_sizes={self.factor_sizes}"


def factor_targets(target: torch.Tensor, factor_sizes: Sequence[int]) -> list[torch.Tensor]:
    """Split joint class indices into per-factor indices (C order, like ``np.unravel_index``)."""
    out = []
    rest = target
    for size in reversed(list(factor_sizes)):
        out.append(torch.remainder(rest, size))
        rest = torch.div(rest, size, rounding_mode="floor")
    return out[::-1]
