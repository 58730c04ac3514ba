"""Leakage metrics: how close a reconstruction is to the original, measured inside the brain.

Images are numpy arrays of one modality, ``(H, W)`` or ``(H, W, D)``, z-scored inside the brain and 0 outside (the
sites' preprocessing); the brain mask is ``original != 0`` unless given.

- :func:`brain_ssim`: the SSIM *map* (scikit-image, Gaussian window sigma 1.5, data range = the original's range
  inside the brain) averaged over brain voxels only. SSIM of whole images with a zeroed background rates even
  the cohort's mean image highly against any slice; restricted to the brain it does not.
- :func:`brain_psnr`, :func:`brain_nmse`: within the brain (PSNR in dB over the original's brain range).
- :func:`rdlv`: relative data leakage value ``(SSIM(x_hat, x) - SSIM(prior, x)) / SSIM(prior, x)``; <= 0 means
  the attack learned nothing beyond the prior.
- :func:`distance_correlation`: dCor between inputs and the features sent (NoPeek's leakage measure).
- :func:`semantic_leakage`: Dice between a frozen segmenter's masks on the reconstruction and on the original.
- :func:`reidentification_top1`: the fraction of reconstructions closest (brain SSIM) to their own case.
- :func:`dice`, :func:`leak_auc`: for recovered label masks (Dice to the true mask, ROC AUC of the scores).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from skimage.metrics import structural_similarity

#: A segmenter of one image: ``(H, W[, D]) -> bool mask`` of the same shape.
Segmenter = Callable[[np.ndarray], np.ndarray]


def _mask(original: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    m = original != 0 if mask is None else np.asarray(mask, dtype=bool)
    if m.shape != original.shape:
        raise ValueError(f"mask shape {m.shape} differs from the image shape {original.shape}")
    if not m.any():
        raise ValueError("the brain mask is empty; leakage is measured inside the brain (original != 0)")
    return m


def _check(recon: np.ndarray, original: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    recon, original = np.asarray(recon, dtype=np.float64), np.asarray(original, dtype=np.float64)
    if recon.shape != original.shape or recon.ndim not in (2, 3):
        raise ValueError(f"reconstruction {recon.shape} and original {original.shape} must be equal 2D/3D shapes")
    return recon, original


def data_range(original: np.ndarray, mask: np.ndarray) -> float:
    values = original[mask]
    return float(max(values.max() - values.min(), 1e-6))


def brain_ssim(recon: np.ndarray, original: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean of the SSIM map over the brain mask (1 = identical inside the brain)."""
    recon, original = _check(recon, original)
    m = _mask(original, mask)
    _, ssim_map = structural_similarity(
        original, recon, data_range=data_range(original, m), gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False, full=True,
    )
    return float(ssim_map[m].mean())


def brain_psnr(recon: np.ndarray, original: np.ndarray, mask: np.ndarray | None = None) -> float:
    recon, original = _check(recon, original)
    m = _mask(original, mask)
    mse = float(np.mean((recon[m] - original[m]) ** 2))
    return float(10 * np.log10(data_range(original, m) ** 2 / max(mse, 1e-12)))


def brain_nmse(recon: np.ndarray, original: np.ndarray, mask: np.ndarray | None = None) -> float:
    """``||x_hat - x||^2 / ||x||^2`` inside the brain."""
    recon, original = _check(recon, original)
    m = _mask(original, mask)
    return float(np.sum((recon[m] - original[m]) ** 2) / max(np.sum(original[m] ** 2), 1e-12))


def rdlv(ssim_recon: float, ssim_prior: float) -> float:
    """Relative data leakage value; the prior's SSIM must be positive."""
    if ssim_prior <= 0:
        raise ValueError(f"RDLV needs a prior with positive SSIM to the original, got {ssim_prior:.3f}")
    return (ssim_recon - ssim_prior) / ssim_prior


def distance_correlation(x: torch.Tensor, f: torch.Tensor) -> float:
    """Sample distance correlation between ``x`` (``N, ...``) and ``f`` (``N, ...``), flattened per sample."""
    if x.shape[0] != f.shape[0] or x.shape[0] < 2:
        raise ValueError(f"need the same number (>= 2) of inputs and features, got {x.shape[0]} and {f.shape[0]}")

    def centred(z: torch.Tensor) -> torch.Tensor:
        d = torch.cdist(z.reshape(z.shape[0], -1).double(), z.reshape(z.shape[0], -1).double())
        return d - d.mean(0, keepdim=True) - d.mean(1, keepdim=True) + d.mean()

    a, b = centred(x), centred(f)
    dcov_xy, dcov_xx, dcov_yy = (a * b).mean(), (a * a).mean(), (b * b).mean()
    denom = torch.sqrt(dcov_xx * dcov_yy)
    return 0.0 if float(denom) == 0 else float(torch.sqrt(torch.clamp(dcov_xy, min=0) / denom))


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty."""
    pred, truth = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    total = pred.sum() + truth.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(pred, truth).sum() / total)


def leak_auc(scores: np.ndarray, truth: np.ndarray) -> float:
    """ROC AUC of per-voxel scores against the true mask (0.5 = chance), via MONAI."""
    from monai.metrics import compute_roc_auc

    truth = np.asarray(truth, dtype=bool).reshape(-1)
    if truth.all() or not truth.any():
        raise ValueError("the AUC needs both tumour and background voxels in the true mask")
    return float(compute_roc_auc(torch.as_tensor(np.asarray(scores, dtype=np.float64).reshape(-1)),
                                 torch.as_tensor(truth.astype(np.float64))))


def semantic_leakage(segment: Segmenter, recon: np.ndarray, original: np.ndarray) -> float:
    """Dice between ``segment(recon)`` and ``segment(original)``: the tumour a reconstruction still shows."""
    return dice(segment(recon), segment(original))


def reidentification_top1(recons: Sequence[np.ndarray], candidates: np.ndarray, truth: Sequence[int]) -> float:
    """Fraction of ``recons[i]`` whose most similar candidate (brain SSIM) is ``candidates[truth[i]]``.

    ``candidates`` is ``(N, H, W[, D])``: the same slice or crop of every case of the cohort.
    """
    if len(recons) != len(truth) or not len(recons):
        raise ValueError("need one true candidate index per reconstruction")
    hits = 0
    for recon, true_index in zip(recons, truth, strict=True):
        scores = [brain_ssim(recon, cand) for cand in candidates]
        hits += int(int(np.argmax(scores)) == int(true_index))
    return hits / len(recons)
