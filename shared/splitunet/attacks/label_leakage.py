"""Label leakage by a curious site (Li et al., ICLR 2022): the tumour mask from the gradients it receives.

The gradient map returned for a tensor ``level{i}`` (``B, C, *spatial/2**i``) lines up with the labels: the loss
pulls tumour and background voxels in different directions, with different strength. Two scores per voxel,
upsampled to the input's resolution and scaled to ``[0, 1]`` per sample:

- ``norm``: the L2 norm over channels of the gradient (largest where the decoder is most wrong, mostly the tumour);
- ``direction``: the projection of each voxel's gradient on the gradients' first principal direction. A principal
  direction has no sign; it is oriented so that the projection *agrees* with the norm score (non-negative
  correlation over the sample's voxels). The earlier rule ("the smaller, far-out side is the tumour") pointed the
  wrong way on about 4 samples in 10 (AUC < 0.5).

Masks from scores (:func:`threshold_scores`): Otsu's threshold, or the top ``k`` voxels with ``k`` the public
cohort's tumour fraction of the sample's voxels (an attacker knows the public cohort and the sampling geometry).
:func:`evaluate_label_leakage` scores every (score, threshold) method on every recorded sample and reports the best
one: the audit credits the adversary with the strongest of its attacks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
import torch
import torch.nn.functional as F

from splitunet.attacks.base import AttackKind, Observation, Target


class LeakageScore(StrEnum):
    NORM = "norm"
    DIRECTION = "direction"


class Threshold(StrEnum):
    OTSU = "otsu"
    TOP_K = "top_k"


class LabelLeakage:
    kind = AttackKind.LABEL_LEAKAGE
    target = Target.LABELS

    def __init__(self, *, score: LeakageScore | str = LeakageScore.NORM) -> None:
        try:
            self.score = LeakageScore(score)
        except ValueError:
            raise ValueError(f"score must be one of {[s.value for s in LeakageScore]}, got {score!r}") from None

    def __call__(self, observation: Observation) -> torch.Tensor:
        if not observation.gradients:
            raise ValueError("label leakage needs the gradients the site received; the observation has none")
        spatial = observation.spatial
        maps = []
        for g in observation.gradients.values():
            g = g.detach().float()
            s = g.norm(dim=1, keepdim=True) if self.score == LeakageScore.NORM else _direction(g)
            if tuple(s.shape[2:]) != spatial:
                s = F.interpolate(s, size=spatial, mode="nearest")
            maps.append(_unit(s))
        return _unit(torch.stack(maps).mean(0))


def _unit(scores: torch.Tensor) -> torch.Tensor:
    """Per sample, min-max to ``[0, 1]`` (``B, 1, *spatial``)."""
    dims = tuple(range(1, scores.ndim))
    lo, hi = scores.amin(dims, keepdim=True), scores.amax(dims, keepdim=True)
    return (scores - lo) / (hi - lo).clamp_min(1e-12)


def _direction(g: torch.Tensor) -> torch.Tensor:
    """Per sample: projection of the voxels' gradient vectors on their first principal direction ``B, 1, *sp``,
    signed to correlate non-negatively with the per-voxel gradient norm."""
    out = []
    for sample in g:
        vectors = sample.reshape(sample.shape[0], -1).T  # voxels x channels
        centred = vectors - vectors.mean(0, keepdim=True)
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)
        proj = centred @ vh[0]
        norm = vectors.norm(dim=1)
        if float(((proj - proj.mean()) * (norm - norm.mean())).sum()) < 0:
            proj = -proj
        out.append(proj.reshape(1, *sample.shape[1:]))
    return torch.stack(out)


def mask_from_scores(scores: np.ndarray) -> np.ndarray:
    """Otsu threshold of one sample's scores (``(H, W[, D])``) -> bool mask."""
    from skimage.filters import threshold_otsu

    scores = np.asarray(scores, dtype=np.float64)
    if np.ptp(scores) == 0:
        return np.zeros(scores.shape, dtype=bool)
    return scores > threshold_otsu(scores)


def top_k_mask(scores: np.ndarray, fraction: float) -> np.ndarray:
    """The ``round(fraction * voxels)`` highest-scoring voxels of one sample (``(H, W[, D])``) -> bool mask."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    scores = np.asarray(scores, dtype=np.float64)
    k = int(round(fraction * scores.size))
    mask = np.zeros(scores.size, dtype=bool)
    if k:
        mask[np.argpartition(-scores.reshape(-1), k - 1)[:k]] = True
    return mask.reshape(scores.shape)


def threshold_scores(scores: np.ndarray, method: Threshold | str, fraction: float | None = None) -> np.ndarray:
    """A mask from one sample's scores by ``method`` (``top_k`` needs the tumour ``fraction``)."""
    if Threshold(method) is Threshold.OTSU:
        return mask_from_scores(scores)
    if fraction is None:
        raise ValueError("the top-k threshold needs the public cohort's tumour fraction")
    return top_k_mask(scores, fraction)


@dataclass(frozen=True)
class LabelLeakageFigures:
    """The best method (``"<score>/<threshold>"``) by mean Dice over the evaluated samples, its mean Dice and the
    mean AUC of its score, the per-sample Dice of that method (for an interval against a baseline), and every
    method's ``{"dice", "auc"}``."""

    method: str
    dice: float
    auc: float
    n: int
    per_sample_dice: list[float] = field(default_factory=list)
    methods: dict[str, dict[str, float]] = field(default_factory=dict)


def evaluate_label_leakage(scores: dict[LeakageScore, Sequence[np.ndarray]], truths: Sequence[np.ndarray],
                           fractions: Sequence[float]) -> LabelLeakageFigures | None:
    """Dice and AUC of every (score, threshold) method on every sample with a tumour; the best method's figures.

    Args:
        scores: per score kind, one ``(H, W[, D])`` map per sample (:class:`LabelLeakage`'s output, squeezed).
        truths: the true whole-tumour masks, one per sample (same shape).
        fractions: the public cohort's tumour fraction for each sample's geometry (top-k's ``k``).
    Returns ``None`` when no sample has a tumour (Dice and AUC are undefined there).
    """
    from splitunet.leakage import dice, leak_auc

    keep = [i for i, t in enumerate(truths) if np.asarray(t, dtype=bool).any() and not np.asarray(t, bool).all()]
    if not keep:
        return None
    table: dict[str, tuple[list[float], float]] = {}
    for kind, maps in scores.items():
        if len(maps) != len(truths) or len(fractions) != len(truths):
            raise ValueError("need one score map, one true mask and one tumour fraction per sample")
        auc = float(np.mean([leak_auc(maps[i], truths[i]) for i in keep]))
        for method in Threshold:
            dices = [dice(threshold_scores(maps[i], method, fractions[i]), truths[i]) for i in keep]
            table[f"{LeakageScore(kind).value}/{method.value}"] = (dices, auc)
    best = max(table, key=lambda m: (float(np.mean(table[m][0])), table[m][1]))
    dices, auc = table[best]
    return LabelLeakageFigures(method=best, dice=float(np.mean(dices)), auc=auc, n=len(keep),
                               per_sample_dice=[float(d) for d in dices],
                               methods={m: {"dice": float(np.mean(d)), "auc": a} for m, (d, a) in table.items()})
