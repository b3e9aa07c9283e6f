"""Training losses: agreement with torch's reference losses, factored heads, soft-F1 learning."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ensembler.errors import EnsemblerError
from ensembler.labels import LabelSpace, factored_to_joint_logprobs
from ensembler.train.losses import (
    TrainLoss,
    factor_targets,
    focal_loss,
    label_smoothing_loss,
    parse_loss_weights,
    soft_f1_loss,
)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(64, 5, generator=g) * 3, torch.randint(0, 5, (64,), generator=g)


def test_focal_gamma_zero_is_cross_entropy(batch):
    x, y = batch
    torch.testing.assert_close(focal_loss(x, y, gamma=0.0), F.cross_entropy(x, y))
    torch.testing.assert_close(TrainLoss("focal", gamma=0.0)(x, y), F.cross_entropy(x, y))


def test_focal_downweights_easy_examples(batch):
    x, y = batch
    # Focal loss is below CE for gamma > 0 and decreases with gamma.
    ce = F.cross_entropy(x, y)
    f1, f2 = focal_loss(x, y, 1.0), focal_loss(x, y, 2.0)
    assert f2 < f1 < ce


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_label_smoothing_equals_torch(batch, eps):
    x, y = batch
    ref = F.cross_entropy(x, y, label_smoothing=eps)
    torch.testing.assert_close(label_smoothing_loss(x, y, eps), ref)
    torch.testing.assert_close(TrainLoss("label-smoothing", smoothing=eps)(x, y), ref)


def test_soft_f1_is_one_minus_f1_on_hard_predictions():
    # With near one-hot probabilities the soft F1 equals the hard macro-F1.
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 1, 1, 1, 2, 0])
    logits = F.one_hot(pred, 3).float() * 50
    from ensembler.metrics import macro_f1

    expected = 1 - macro_f1(y.numpy(), pred.numpy(), 3)
    assert soft_f1_loss(logits, y).item() == pytest.approx(expected, abs=1e-5)


def test_soft_f1_is_differentiable_and_learns_separable_problem():
    g = torch.Generator().manual_seed(1)
    n, d, c = 120, 2, 3
    centers = torch.tensor([[4.0, 0.0], [-4.0, 0.0], [0.0, 4.0]])
    y = torch.arange(n) % c
    x = centers[y] + 0.5 * torch.randn(n, d, generator=g)
    model = torch.nn.Linear(d, c)
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = soft_f1_loss(model(x), y)
        loss.backward()
        assert model.weight.grad is not None and torch.isfinite(model.weight.grad).all()
        assert model.weight.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3
    assert all(b <= a + 1e-6 for a, b in zip(losses[:5], losses[1:6]))
    assert (model(x).argmax(1) == y).float().mean() > 0.95


def test_mix_is_weighted_sum(batch):
    x, y = batch
    loss = TrainLoss("mix", weights="ce=0.3,f1=0.7")
    expected = 0.3 * F.cross_entropy(x, y) + 0.7 * soft_f1_loss(x, y)
    torch.testing.assert_close(loss(x, y), expected)


def test_factored_ce_equals_joint_cross_entropy():
    # Per-factor-block CE summed == CE of the joint log-probs (the choice in losses.py costs nothing for CE).
    ls = LabelSpace.mask()
    g = torch.Generator().manual_seed(2)
    outputs = torch.randn(16, sum(ls.factor_sizes), generator=g)
    y = torch.randint(0, ls.num_classes, (16,), generator=g)
    joint = factored_to_joint_logprobs(outputs, ls.factor_sizes)
    per_block = TrainLoss("ce", factor_sizes=ls.factor_sizes)(outputs, y)
    torch.testing.assert_close(per_block, F.nll_loss(joint, y) * 1.0, rtol=1e-5, atol=1e-5)


def test_factor_targets_match_label_space():
    ls = LabelSpace.mask()
    y = torch.arange(ls.num_classes)
    parts = factor_targets(y, ls.factor_sizes)
    expected = ls.factor_indices(y.numpy())
    for got, exp in zip(parts, expected):
        np.testing.assert_array_equal(got.numpy(), exp)


def test_bad_loss_options_name_the_parameter():
    with pytest.raises(EnsemblerError, match="loss 'mix' needs weights"):
        TrainLoss("mix")
    with pytest.raises(EnsemblerError, match="unknown loss 'dice'"):
        parse_loss_weights("dice=1")
    with pytest.raises(EnsemblerError, match="not a number"):
        parse_loss_weights("ce=abc")
    with pytest.raises(EnsemblerError, match="^smoothing must be in"):
        TrainLoss("label-smoothing", smoothing=1.0)
    with pytest.raises(EnsemblerError, match="unknown loss"):
        TrainLoss("hinge")
