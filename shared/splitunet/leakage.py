"""Leakage metrics: how close a reconstruction is to the original, measured inside the brain.

Images are numpy arrays of one modality, ``(H, W)`` or ``(H, W, D)``, z-scored inside the brain and 0 outside (the
sites' preprocessing); the brain mask is ``original != 0`` unless given.

- :func:`brain_ssim`: THE brain SSIM of the project (every attack, the audit, the site's scoring, the gate and the
  report use it): both images are rescaled to ``[0, 1]`` by the *original's* brain range (``(v - lo) / (hi - lo)``
  with ``lo, hi`` the original's min and max inside the brain; the same affine map for both, so the
  reconstruction is not clipped), then the SSIM map (scikit-image, Gaussian window sigma 1.5, data range 1) is
  averaged over brain voxels only. On the sites' signed, zero-mean images SSIM's luminance term
  ``(2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1)`` collapses wherever the local means are near 0 or of opposite
  sign: a mean-image prior scored near 0 and RDLV was inflated several-fold. On ``[0, 1]`` the figure does not
  depend on the images' offset or scale (``brain_ssim(a x_hat + b, a x + b) == brain_ssim(x_hat, x)``, ``a > 0``).
  SSIM of whole images with a zeroed background rates even the cohort's mean image highly against any slice;
  restricted to the brain it does not.
- :func:`brain_psnr`, :func:`brain_nmse`: within the brain (PSNR in dB over the original's brain range).
- :func:`rdlv`: relative data leakage value ``(SSIM(x_hat, x) - SSIM(prior, x)) / SSIM(prior, x)``; <= 0 means
  the attack learned nothing beyond the prior.
- :func:`delta_ssim`: ``SSIM(x_hat, x) - SSIM(prior, x)`` paired over samples, its mean and a 95 % Student-t
  confidence interval (a ratio over a small prior SSIM is unstable in sign; the difference is not).
- :func:`distance_correlation`: dCor between inputs and the features sent (NoPeek's leakage measure).
- :func:`semantic_leakage`: Dice between a frozen segmenter's masks on the reconstruction and on the original.
- :func:`reidentification_top1`: the fraction of reconstructions closest (brain SSIM) to their own case.
- :func:`dice`, :func:`leak_auc`: for recovered label masks (Dice to the true mask, ROC AUC of the scores).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

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


def unit_scale(image: np.ndarray, original: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``image`` mapped by the affine map that takes the original's brain range ``[lo, hi]`` to ``[0, 1]``."""
    values = original[mask]
    lo = float(values.min())
    return (image - lo) / data_range(original, mask)


def brain_ssim(recon: np.ndarray, original: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean of the SSIM map over the brain mask, both images on ``[0, 1]`` by the original's brain range (1 =
    identical inside the brain; see the module docstring)."""
    recon, original = _check(recon, original)
    m = _mask(original, mask)
    _, ssim_map = structural_similarity(
        unit_scale(original, original, m), unit_scale(recon, original, m), data_range=1.0, gaussian_weights=True,
        sigma=1.5, use_sample_covariance=False, full=True,
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


@dataclass(frozen=True)
class DeltaSSIM:
    """``mean`` of the paired differences ``SSIM(x_hat_i, x_i) - SSIM(prior_i, x_i)`` over ``n`` samples (and
    modalities) and its 95 % Student-t confidence interval ``[low, high]`` (``None`` with fewer than 2 pairs)."""

    mean: float
    low: float | None
    high: float | None
    n: int


def delta_ssim(recon_ssim: Sequence[float], prior_ssim: Sequence[float], *, level: float = 0.95) -> DeltaSSIM:
    """ΔSSIM of a reconstruction over the prior, paired per sample: mean and a Student-t interval at ``level``.

    The interval is ``mean +- t_{n-1, (1+level)/2} * sd / sqrt(n)`` over the ``n`` paired differences (samples are
    the unit; the interval says how far the mean could move with other samples of the same cohort).
    """
    from scipy import stats

    recon, prior = np.asarray(recon_ssim, dtype=np.float64), np.asarray(prior_ssim, dtype=np.float64)
    if recon.ndim != 1 or recon.shape != prior.shape or recon.size == 0:
        raise ValueError(f"delta_ssim needs one prior SSIM per reconstruction SSIM (equal lengths >= 1), got "
                         f"{recon.shape} and {prior.shape}")
    d = recon - prior
    mean = float(d.mean())
    if d.size < 2:
        return DeltaSSIM(mean, None, None, 1)
    half = float(stats.t.ppf((1 + level) / 2, d.size - 1) * d.std(ddof=1) / np.sqrt(d.size))
    return DeltaSSIM(mean, mean - half, mean + half, int(d.size))


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
        # a candidate whose crop holds no brain (the same window in another case's anatomy) cannot be the match
        scores = [brain_ssim(recon, cand) if np.any(cand != 0) else -np.inf for cand in candidates]
        hits += int(int(np.argmax(scores)) == int(true_index))
    return hits / len(recons)
