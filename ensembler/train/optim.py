"""Optimiser and learning-rate schedule of a fold.

The schedule is a :class:`torch.optim.lr_scheduler.LambdaLR` stepped once per batch: its
whole state is two integers, so it resumes exactly, and the shape is a pure function of the
step (linear warm-up, then cosine / cosine with restarts / step decay / constant).
"""

from __future__ import annotations

import math

import torch

from ..errors import EnsemblerError


def build_optimizer(model: torch.nn.Module, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW / Adam / SGD (Nesterov, momentum 0.9).

    Biases and normalisation weights (1-d parameters) get no weight decay, as in timm.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)
    raise EnsemblerError(f"--optimizer must be adamw, adam or sgd, got {name!r}")


class LRShape:
    """LR multiplier as a function of the batch step (picklable, no closures).

    Parameters
    ----------
    kind : {"cosine", "cosine-restarts", "step", "none"}
    total_steps : int
    warmup_steps : int
    min_factor : float
        Floor of the cosine shapes (fraction of the base LR).
    """

    def __init__(self, kind: str, total_steps: int, warmup_steps: int = 0, min_factor: float = 0.01):
        self.kind = kind
        self.total = max(1, int(total_steps))
        # Warm-up is capped at a quarter of the run: a 1-epoch run with --warmup-epochs 1
        # would otherwise never reach its learning rate.
        self.warmup = max(0, min(int(warmup_steps), self.total // 4))
        self.min_factor = float(min_factor)

    def __call__(self, step: int) -> float:
        if self.warmup and step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        t = step - self.warmup
        span = max(1, self.total - self.warmup)
        if self.kind == "none":
            return 1.0
        if self.kind == "step":
            # / 10 at one third and two thirds of the post-warm-up run.
            return 0.1 ** min(2, int(3 * t / span))
        if self.kind == "cosine-restarts":
            cycle = max(1, math.ceil(span / 3))
            t = t % cycle
            span = cycle
        frac = min(1.0, t / span)
        return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * frac))


def build_scheduler(optimizer, kind: str, *, epochs: int, steps_per_epoch: int, warmup_epochs: float,
                    min_factor: float = 0.01):
    """A per-batch LambdaLR implementing ``kind`` with linear warm-up."""
    shape = LRShape(kind, epochs * steps_per_epoch, round(warmup_epochs * steps_per_epoch), min_factor)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, shape)
