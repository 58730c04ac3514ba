"""Losses on empty targets: every default must punish false positives on tumour-free samples."""

from __future__ import annotations

import pytest
import torch

from splitunet.losses import DEFAULT_LOSS, DiceBCELoss, LossKind, default_loss, make_loss

SHAPE = (2, 3, 8, 8)


def _grad(loss_fn: torch.nn.Module, value: float, target: torch.Tensor) -> tuple[float, torch.Tensor]:
    logits = torch.full(SHAPE, value, requires_grad=True)
    loss = loss_fn(logits, target)
    loss.backward()
    return float(loss.detach()), logits.grad


@pytest.mark.parametrize("kind", [LossKind.DICE_CE, LossKind.DICE_FOCAL])
def test_cross_entropy_losses_punish_false_positives_on_empty_targets(kind):
    empty = torch.zeros(SHAPE)
    losses = [_grad(make_loss(kind), v, empty)[0] for v in (-5.0, 0.0, 5.0)]
    # a softmax CE over the 3 channels (MONAI DiceCELoss) gives the same value for all three
    assert losses[0] < losses[1] < losses[2], losses
    _, grad = _grad(make_loss(kind), 2.0, empty)
    assert torch.all(grad > 0), "every background voxel's logit must be pushed down"


def test_dice_ce_is_batch_dice_plus_per_channel_bce():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(SHAPE, generator=g)
    target = (torch.rand(SHAPE, generator=g) > 0.7).float()
    p = torch.sigmoid(logits)
    dims = (0, 2, 3)
    dice = 1 - (2 * (p * target).sum(dims)) / ((p**2).sum(dims) + (target**2).sum(dims) + 1e-5)
    bce = -(target * torch.log(p) + (1 - target) * torch.log(1 - p)).mean()
    expected = dice.mean() + bce
    assert torch.allclose(make_loss(LossKind.DICE_CE)(logits, target), expected, atol=1e-5)


def test_default_loss_gives_gradient_on_a_tumour_free_sample():
    assert DEFAULT_LOSS == LossKind.DICE_CE
    _, grad = _grad(default_loss(), 1.0, torch.zeros(SHAPE))
    assert grad.abs().min() > 0


def test_per_sample_dice_has_no_gradient_on_empty_targets():
    # documented behaviour of `dice` (why it is not the default): an all-background sample teaches nothing
    loss, grad = _grad(make_loss(LossKind.DICE), 3.0, torch.zeros(SHAPE))
    assert loss == pytest.approx(1.0)
    assert torch.count_nonzero(grad) == 0


def test_batch_dice_alone_is_constant_on_an_all_empty_batch():
    loss_lo, _ = _grad(make_loss(LossKind.DICE_BATCH), -5.0, torch.zeros(SHAPE))
    loss_hi, _ = _grad(make_loss(LossKind.DICE_BATCH), 5.0, torch.zeros(SHAPE))
    assert loss_lo == pytest.approx(loss_hi) == pytest.approx(1.0)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="loss must be one of"):
        make_loss("dice_softmax")
    with pytest.raises(ValueError, match="not both 0"):
        DiceBCELoss(dice_weight=0, bce_weight=0)
    with pytest.raises(ValueError, match="one shape"):
        make_loss(LossKind.DICE_CE)(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 5))
