"""Segmentation quality per BraTS region, by the BraTS convention: Dice and HD95 per case, in millimetres.

Per case and region (TC, WT, ET), over the whole volume:

- **Dice** ``2|P∩T| / (|P|+|T|)``; both masks empty -> 1.
- **HD95**: the 95th-percentile Hausdorff distance between the masks' surfaces in **mm** (voxel spacing from the
  case's affine), MONAI's ``compute_hausdorff_distance(percentile=95, spacing=...)`` (the larger of the two
  directed 95th percentiles); both masks empty -> 0; exactly one empty -> :data:`HD95_ONE_EMPTY_MM` (373.13 mm,
  the diagonal of the 240x240x155 mm BraTS volume, as the BraTS challenge scores a missed or a phantom region).

Nothing is dropped: every case counts in every region, and the summary gives the **mean and the median** over
cases next to the per-case figures (so an outlier is visible).

Layouts: predictions are sigmoid logits ``3, X, Y, Z`` (thresholded at probability 0.5) or boolean masks,
labels are region channels ``3, X, Y, Z`` (0/1) in MONAI's ``[TC, WT, ET]`` order; spacing is ``(sx, sy, sz)``
in mm along the array axes.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from splitunet.config import REGIONS

#: HD95 of a region present in exactly one of prediction and truth (BraTS: the 240x240x155 mm diagonal).
HD95_ONE_EMPTY_MM = 373.13


def spacing_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel spacing in mm along the array axes of a ``(4, 4)`` voxel-to-world affine (column norms)."""
    a = np.asarray(affine, dtype=np.float64)
    if a.shape != (4, 4):
        raise ValueError(f"affine must be (4, 4), got {a.shape}")
    spacing = np.linalg.norm(a[:3, :3], axis=0)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise ValueError(f"affine has a zero or non-finite voxel size: {spacing.tolist()}")
    return tuple(float(s) for s in spacing)  # type: ignore[return-value]


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Dice of two boolean masks of one shape; 1.0 when both are empty."""
    p, t = np.asarray(pred, dtype=bool), np.asarray(target, dtype=bool)
    if p.shape != t.shape:
        raise ValueError(f"pred {p.shape} and target {t.shape} must have one shape")
    total = int(p.sum()) + int(t.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, t).sum()) / total


def hd95_mm(pred: np.ndarray, target: np.ndarray, spacing: Sequence[float]) -> float:
    """HD95 in mm of two boolean 2D/3D masks (BraTS convention for empty masks; see the module docstring)."""
    from monai.metrics import compute_hausdorff_distance

    p, t = np.asarray(pred, dtype=bool), np.asarray(target, dtype=bool)
    if p.shape != t.shape:
        raise ValueError(f"pred {p.shape} and target {t.shape} must have one shape")
    if len(spacing) != p.ndim or any(float(s) <= 0 for s in spacing):
        raise ValueError(f"spacing must be {p.ndim} positive sizes in mm, got {list(spacing)}")
    has_p, has_t = bool(p.any()), bool(t.any())
    if not has_p and not has_t:
        return 0.0
    if has_p != has_t:
        return HD95_ONE_EMPTY_MM
    value = compute_hausdorff_distance(
        torch.from_numpy(p)[None, None], torch.from_numpy(t)[None, None], include_background=True, percentile=95,
        spacing=[float(s) for s in spacing],
    )
    return float(value.reshape(-1)[0])


@dataclass(frozen=True)
class CaseResult:
    """One case's figures: ``dice`` and ``hd95`` (mm, or ``None`` if not computed) per region."""

    case_id: str
    dice: dict[str, float]
    hd95: dict[str, float] | None

    def to_dict(self) -> dict:
        hd95 = None if self.hd95 is None else dict(self.hd95)
        return {"case_id": self.case_id, "dice": dict(self.dice), "hd95": hd95}


def evaluate_case(
    case_id: str,
    prediction: torch.Tensor | np.ndarray,
    regions: torch.Tensor | np.ndarray,
    spacing: Sequence[float],
    *,
    hd95: bool = True,
    logits: bool = True,
) -> CaseResult:
    """Dice (and HD95 in mm) per region of one whole case.

    Args:
        prediction: ``3, *spatial`` logits (``logits=True``, thresholded at sigmoid 0.5, i.e. logit 0) or
            probabilities / masks (``logits=False``, thresholded at 0.5).
        regions: ``3, *spatial`` region channels (0/1).
        spacing: voxel size in mm per spatial axis.
    """
    pred = torch.as_tensor(prediction).detach().float().cpu()
    pred_mask = (pred > 0.0) if logits else (pred > 0.5)
    target = torch.as_tensor(regions).detach().cpu() > 0.5
    if pred_mask.shape != target.shape or pred_mask.shape[0] != len(REGIONS):
        raise ValueError(
            f"prediction {tuple(pred_mask.shape)} and regions {tuple(target.shape)} must both be (3, *spatial)"
        )
    p, t = pred_mask.numpy(), target.numpy()
    dices = {r: dice(p[i], t[i]) for i, r in enumerate(REGIONS)}
    hds = {r: hd95_mm(p[i], t[i], spacing) for i, r in enumerate(REGIONS)} if hd95 else None
    return CaseResult(case_id=case_id, dice=dices, hd95=hds)


def _summary(values: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    mean = {r: statistics.fmean(v) for r, v in values.items()}
    median = {r: float(statistics.median(v)) for r, v in values.items()}
    mean["mean"] = statistics.fmean(mean[r] for r in REGIONS)
    median["mean"] = statistics.fmean(median[r] for r in REGIONS)
    return {"mean": mean, "median": median}


class RegionMetrics:
    """Per-case results and their summary.

    Args:
        hd95: also compute HD95 (slower).
    """

    def __init__(self, *, hd95: bool = False) -> None:
        self.hd95 = hd95
        self.cases: list[CaseResult] = []

    def add_case(
        self, case_id: str, prediction: torch.Tensor | np.ndarray, regions: torch.Tensor | np.ndarray,
        spacing: Sequence[float], *, logits: bool = True,
    ) -> CaseResult:
        """Evaluate one whole case (see :func:`evaluate_case`) and keep its result."""
        result = evaluate_case(case_id, prediction, regions, spacing, hd95=self.hd95, logits=logits)
        self.cases.append(result)
        return result

    @property
    def count(self) -> int:
        return len(self.cases)

    def aggregate(self) -> dict:
        """``{"dice": {TC, WT, ET, mean}, "hd95": {...} | None, "dice_median", "hd95_median", "cases": n,
        "per_case": [...]}``: ``dice``/``hd95`` are means over cases (``mean`` is the mean of the three regions)."""
        if not self.cases:
            raise ValueError("no case was added; call add_case() before aggregate()")
        d = _summary({r: [c.dice[r] for c in self.cases] for r in REGIONS})
        result: dict = {"dice": d["mean"], "dice_median": d["median"], "hd95": None, "hd95_median": None,
                        "cases": len(self.cases), "per_case": [c.to_dict() for c in self.cases]}
        if self.hd95:
            h = _summary({r: [c.hd95[r] for c in self.cases if c.hd95 is not None] for r in REGIONS})
            result["hd95"], result["hd95_median"] = h["mean"], h["median"]
        return result

    def reset(self) -> None:
        self.cases.clear()
