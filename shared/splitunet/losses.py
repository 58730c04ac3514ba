"""Training losses of the Split-U-Net (computed at the label holder).

Inputs are logits and region targets, both ``B, 3, *spatial`` (TC, WT, ET; one **sigmoid** per channel, the
regions overlap). Every cross-entropy here is therefore a per-channel *binary* cross-entropy on the logits: MONAI's
``DiceCELoss`` is not used because with more than one channel it applies a *softmax* cross-entropy, which is 0 on
an all-background target whatever the logits and so never punishes a false positive.

- ``dice``: MONAI ``DiceLoss(sigmoid=True, squared_pred=True, smooth_nr=0, smooth_dr=1e-5)``, the BraTS recipe
  (methods.md §2); Dice per sample and channel. On a sample without tumour it is 1 with **zero gradient**, so it
  only suits 3D patches that (almost) always hold tumour; do not use it for 2D slices.
- ``dice_batch``: the same Dice over the whole batch per channel (``batch=True``); gradient on empty samples only
  through the other samples of the batch.
- ``dice_ce`` (the default): batch Dice plus per-channel binary cross-entropy with logits
  (``torch.nn.BCEWithLogitsLoss``). The BCE term pushes every background logit down, also on tumour-free slices
  and patches.
- ``dice_focal``: batch Dice plus per-channel sigmoid focal loss (MONAI ``FocalLoss``, gamma 2), which weights
  hard voxels (the tumour border, stray false positives) over the easy background.
"""

from __future__ import annotations

from enum import StrEnum

import torch
from monai.losses import DiceLoss, FocalLoss


class LossKind(StrEnum):
    DICE = "dice"
    DICE_BATCH = "dice_batch"
    DICE_CE = "dice_ce"
    DICE_FOCAL = "dice_focal"


#: The loss of REST jobs and of the in-process federation unless one is asked for.
DEFAULT_LOSS = LossKind.DICE_CE


class DiceBCELoss(torch.nn.Module):
    """``dice_weight * Dice + bce_weight * BCE``: MONAI ``DiceLoss`` (sigmoid) plus per-channel binary
    cross-entropy (or sigmoid focal loss) on logits ``B, C, *spatial`` against 0/1 targets of the same shape.

    Args:
        batch: Dice over the whole batch per channel (``True``) or per sample.
        focal: use MONAI's sigmoid ``FocalLoss(gamma=2)`` instead of plain BCE.
        dice_weight, bce_weight: non-negative weights of the two terms (not both 0).
    """

    def __init__(
        self, *, batch: bool = True, focal: bool = False, dice_weight: float = 1.0, bce_weight: float = 1.0
    ) -> None:
        super().__init__()
        if dice_weight < 0 or bce_weight < 0 or dice_weight + bce_weight == 0:
            raise ValueError(
                f"dice_weight and bce_weight must be >= 0 and not both 0, got {dice_weight} and {bce_weight}"
            )
        self.dice = DiceLoss(sigmoid=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-5, batch=batch)
        self.bce: torch.nn.Module = (
            FocalLoss(gamma=2.0, use_softmax=False) if focal else torch.nn.BCEWithLogitsLoss()
        )
        self.dice_weight = float(dice_weight)
        self.bce_weight = float(bce_weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape != target.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} must have one shape")
        target = target.to(logits.dtype)
        return self.dice_weight * self.dice(logits, target) + self.bce_weight * self.bce(logits, target)


def make_loss(kind: LossKind | str = DEFAULT_LOSS) -> torch.nn.Module:
    """The loss module for ``kind`` (see the module docstring)."""
    try:
        kind = LossKind(kind)
    except ValueError:
        raise ValueError(f"loss must be one of {[k.value for k in LossKind]}, got {kind!r}") from None
    if kind == LossKind.DICE:
        return DiceLoss(sigmoid=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-5)
    if kind == LossKind.DICE_BATCH:
        return DiceLoss(sigmoid=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-5, batch=True)
    return DiceBCELoss(batch=True, focal=kind == LossKind.DICE_FOCAL)


def default_loss() -> torch.nn.Module:
    """The default loss (:data:`DEFAULT_LOSS`: batch Dice + per-channel BCE)."""
    return make_loss(DEFAULT_LOSS)
