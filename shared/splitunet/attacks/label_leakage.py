"""Label leakage by a curious site (Li et al., ICLR 2022): the tumour mask from the gradients it receives.

The gradient map returned for a tensor ``level{i}`` (``B, C, *spatial/2**i``) lines up with the labels: the loss
pulls tumour and background voxels in different directions, with different strength. Two scores per voxel,
upsampled to the input's resolution and scaled to ``[0, 1]`` per sample:

- ``norm``: the L2 norm over channels of the gradient (largest where the decoder is most wrong, mostly the tumour);
- ``direction``: the projection of each voxel's gradient on the gradients' first principal direction, signed
  so the smaller side (the tumour is the minority) scores high.

The attack returns scores ``B, 1, *spatial``; :func:`mask_from_scores` thresholds them (Otsu).
"""

from __future__ import annotations

from enum import StrEnum

import numpy as np
import torch
import torch.nn.functional as F

from splitunet.attacks.base import AttackKind, Observation, Target


class LeakageScore(StrEnum):
    NORM = "norm"
    DIRECTION = "direction"


class LabelLeakage:
    kind = AttackKind.LABEL_LEAKAGE
    target = Target.LABELS

    def __init__(self, *, score: LeakageScore | str = LeakageScore.DIRECTION) -> None:
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
            maps.append(s)
        scores = torch.stack(maps).mean(0)
        dims = tuple(range(1, scores.ndim))
        lo, hi = scores.amin(dims, keepdim=True), scores.amax(dims, keepdim=True)
        return (scores - lo) / (hi - lo).clamp_min(1e-12)


def _direction(g: torch.Tensor) -> torch.Tensor:
    """Per sample: projection of the voxels' gradient vectors on their first principal direction ``B, 1, *sp``."""
    out = []
    for sample in g:
        vectors = sample.reshape(sample.shape[0], -1).T  # voxels x channels
        centred = vectors - vectors.mean(0, keepdim=True)
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)
        proj = centred @ vh[0]
        if (proj > proj.median()).float().mean() > 0.5 or proj.max() < -proj.min():
            proj = -proj  # the tumour is the small, far-out side
        out.append(proj.reshape(1, *sample.shape[1:]))
    return torch.stack(out)


def mask_from_scores(scores: np.ndarray) -> np.ndarray:
    """Otsu threshold of one sample's scores (``(H, W[, D])``) -> bool mask."""
    from skimage.filters import threshold_otsu

    scores = np.asarray(scores, dtype=np.float64)
    if np.ptp(scores) == 0:
        return np.zeros(scores.shape, dtype=bool)
    return scores > threshold_otsu(scores)
