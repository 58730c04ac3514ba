"""Training losses of the Split-U-Net (computed at the label holder).

Inputs are logits and region targets, both ``B, 3, *spatial`` (TC, WT, ET; one sigmoid per channel).

- ``dice``: MONAI ``DiceLoss(sigmoid=True, squared_pred=True, smooth_nr=0, smooth_dr=1e-5)``, the BraTS recipe
  (methods.md §2); Dice per sample and channel. With 2D slices, a slice without tumour contributes no gradient,
  so false positives there go unpunished.
- ``dice_batch``: the same Dice computed over the whole batch per channel (``batch=True``).
- ``dice_ce``: batch Dice plus binary cross-entropy (MONAI ``DiceCELoss``); the most robust choice for 2D slices
  and short runs.
"""

from __future__ import annotations

from enum import StrEnum

import torch
from monai.losses import DiceCELoss, DiceLoss


class LossKind(StrEnum):
    DICE = "dice"
    DICE_BATCH = "dice_batch"
    DICE_CE = "dice_ce"


def make_loss(kind: LossKind | str = LossKind.DICE) -> torch.nn.Module:
    """The loss module for ``kind`` (see the module docstring)."""
    try:
        kind = LossKind(kind)
    except ValueError:
        raise ValueError(f"loss must be one of {[k.value for k in LossKind]}, got {kind!r}") from None
    common = dict(sigmoid=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-5)
    if kind == LossKind.DICE:
        return DiceLoss(**common)
    if kind == LossKind.DICE_BATCH:
        return DiceLoss(batch=True, **common)
    return DiceCELoss(batch=True, **common)


def default_loss() -> torch.nn.Module:
    """The BraTS recipe's Dice loss (``dice``)."""
    return make_loss(LossKind.DICE)
