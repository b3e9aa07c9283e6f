"""Heads: what a checkpoint outputs, and how that becomes joint log-probabilities.

A *flat* head outputs one logit per class of the LabelSpace. A *factored* head outputs one
block of logits per factor (mask 3 + gender 2 + age 3 = 8 outputs); its joint
log-probabilities are the sum of each block's log-softmax, so flat and factored models meet
in one joint space (:func:`joint_logits`, :func:`joint_log_probs`).

A *multilabel* head has the factored head's outputs (one per factor level; one block of C
for an unfactored space) but each is an independent sigmoid, trained with binary
cross-entropy against the one-hot factor labels (``--loss bce``). Its joint log-probabilities
are those of the sigmoids conditioned on what a label is, exactly one level on per factor:
``P(level i) ∝ σ(z_i) Π_{j≠i} (1 − σ(z_j))``, and since ``σ(z)/(1 − σ(z)) = e^z`` this is
``softmax(z)_i``; the factors multiply, so ``logp[m, g, a] = Σ_f log_softmax(z_f)[i_f]``, the
factored head's formula applied to the sigmoid logits. Raw sigmoid scores, which need not
sum to 1, are never voted.
"""

from __future__ import annotations

from typing import Mapping

from .errors import EnsemblerError
from .labels import LabelSpace, factored_to_joint_logprobs
from .names import HEADS


def as_label_space(label_space) -> LabelSpace:
    """A LabelSpace from a LabelSpace or its ``to_dict()`` form."""
    if isinstance(label_space, LabelSpace):
        return label_space
    if isinstance(label_space, Mapping):
        return LabelSpace.from_dict(dict(label_space))
    raise EnsemblerError(
        f"label_space must be a LabelSpace or its dict form, got {type(label_space).__name__}"
    )


def check_head(head: str, label_space: LabelSpace) -> None:
    """EnsemblerError for an unknown head, or a factored head on a space without factors."""
    if head not in HEADS:
        raise EnsemblerError(f"head must be one of {HEADS}, got {head!r}")
    if head == "factored" and not label_space.is_factored:
        raise EnsemblerError(
            f"a factored head needs a factored LabelSpace (e.g. LabelSpace.mask()); "
            f"this one has {label_space.num_classes} unfactored classes"
        )


def head_blocks(label_space, head: str) -> tuple[int, ...] | None:
    """Sizes of the output blocks normalised one by one: factored and multilabel heads; None for flat."""
    ls = as_label_space(label_space)
    if head == "flat":
        return None
    return ls.factor_sizes if ls.is_factored else (ls.num_classes,)


def head_num_outputs(label_space, head: str = "flat") -> int:
    """Number of outputs of a head over ``label_space``.

    Parameters
    ----------
    label_space : LabelSpace or dict
    head : {"flat", "factored", "multilabel"}

    Returns
    -------
    int
        ``num_classes`` for a flat head, the sum of the factor sizes for a factored or
        multilabel one (a multilabel head over an unfactored space: ``num_classes``).

    Examples
    --------
    >>> from ensembler import LabelSpace
    >>> head_num_outputs(LabelSpace.mask(), "flat"), head_num_outputs(LabelSpace.mask(), "factored")
    (18, 8)
    """
    ls = as_label_space(label_space)
    check_head(head, ls)
    return ls.num_classes if head == "flat" else int(sum(head_blocks(ls, head)))


def _check_outputs(outputs, head: str, ls: LabelSpace) -> None:
    expected = head_num_outputs(ls, head)
    if outputs.ndim != 2 or outputs.shape[1] != expected:
        raise EnsemblerError(
            f"a {head} head over {ls.num_classes} classes has {expected} outputs per image; "
            f"got an array of shape {tuple(outputs.shape)}"
        )


def joint_logits(outputs, head: str, label_space):
    """Model outputs -> joint logits over the LabelSpace.

    Flat heads: the raw logits, unchanged. Factored and multilabel heads (see the module
    docstring): joint log-probabilities,
    ``logp[m, g, a] = log_softmax(mask)[m] + log_softmax(gender)[g] + log_softmax(age)[a]``.
    Either way ``softmax`` of the result gives the class probabilities. Works on torch
    tensors and numpy arrays of shape (N, head_num_outputs).

    Examples
    --------
    >>> import torch
    >>> from ensembler import LabelSpace
    >>> joint_logits(torch.zeros(2, 8), "factored", LabelSpace.mask()).shape
    torch.Size([2, 18])
    """
    ls = as_label_space(label_space)
    _check_outputs(outputs, head, ls)
    if head == "flat":
        return outputs
    return factored_to_joint_logprobs(outputs, head_blocks(ls, head))


def joint_log_probs(outputs, head: str, label_space):
    """Model outputs -> joint log-probabilities (normalised: ``exp`` sums to 1 per row)."""
    ls = as_label_space(label_space)
    _check_outputs(outputs, head, ls)
    if head != "flat":
        return factored_to_joint_logprobs(outputs, head_blocks(ls, head))
    from .metrics import log_softmax

    return log_softmax(outputs, axis=-1)  # torch stays in torch


__all__ = ["HEADS", "as_label_space", "check_head", "head_blocks", "head_num_outputs", "joint_log_probs",
           "joint_logits"]
