"""Training loss of the Split-U-Net (computed at the label holder)."""

from __future__ import annotations

from monai.losses import DiceLoss


def default_loss() -> DiceLoss:
    """MONAI ``DiceLoss`` on sigmoid outputs, the BraTS recipe (input/target ``B, 3, *spatial``, TC/WT/ET).

    ``squared_pred=True, smooth_nr=0, smooth_dr=1e-5`` as in the reference pipeline (methods.md §2).
    """
    return DiceLoss(sigmoid=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-5)
