"""Segmentation quality per BraTS region: Dice and HD95 for TC, WT and ET.

Predictions are sigmoid logits ``B, 3, *spatial`` thresholded at 0.5; labels are region channels ``B, 3, *spatial``
(0/1) in MONAI's [TC, WT, ET] order. HD95 is in voxels (multiply by the spacing in mm; BraTS is 1 mm isotropic).
"""

from __future__ import annotations

import math

import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric

from splitunet.config import REGIONS


class RegionMetrics:
    """Accumulates Dice (and optionally HD95) per region over batches.

    Args:
        hd95: also compute the 95th-percentile Hausdorff distance (slower; skipped for empty regions).
    """

    def __init__(self, *, hd95: bool = False) -> None:
        self._dice = DiceMetric(include_background=True, reduction="mean_batch", ignore_empty=False)
        self._hd = (
            HausdorffDistanceMetric(include_background=True, percentile=95, reduction="mean_batch") if hd95 else None
        )
        self.count = 0

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch: ``logits`` and ``labels`` are ``B, 3, *spatial``."""
        pred = (torch.sigmoid(logits.float()) > 0.5).float()
        target = labels.float()
        self._dice(y_pred=pred, y=target)
        if self._hd is not None:
            self._hd(y_pred=pred, y=target)
        self.count += int(pred.shape[0])

    def aggregate(self) -> dict[str, dict[str, float] | float | None]:
        """``{"dice": {"TC", "WT", "ET", "mean"}, "hd95": {...} | None, "cases": n}``; NaN becomes ``None``."""
        if self.count == 0:
            raise ValueError("no batches were added; call update() before aggregate()")
        dice = self._dice.aggregate()
        result: dict = {"dice": _per_region(dice), "hd95": None, "cases": self.count}
        if self._hd is not None:
            result["hd95"] = _per_region(self._hd.aggregate())
        return result

    def reset(self) -> None:
        self._dice.reset()
        if self._hd is not None:
            self._hd.reset()
        self.count = 0


def _per_region(values: torch.Tensor) -> dict[str, float | None]:
    vals = [float(v) for v in values.flatten()]
    out: dict[str, float | None] = {r: (None if math.isnan(v) or math.isinf(v) else v) for r, v in zip(REGIONS, vals)}
    finite = [v for v in out.values() if v is not None]
    out["mean"] = sum(finite) / len(finite) if finite else None
    return out
