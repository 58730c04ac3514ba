"""The MNI ICBM152 2009a anatomy that the phantom cohort is built on, read offline from the nilearn package.

nilearn ships three 1 mm volumes of the ICBM152 2009a nonlinear template inside its wheel
(``nilearn/datasets/data/mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz``, 197 x 233 x 189 voxels,
RAS, 1 mm) and loads them with :func:`nilearn.datasets.load_mni152_template`,
:func:`~nilearn.datasets.load_mni152_gm_template` and :func:`~nilearn.datasets.load_mni152_wm_template`
without any network access (``resolution=1`` means no resampling either). Origin and licence: see
``docs/phantom.md``.

:class:`MniAnatomy` prepares, once per cohort, what every phantom case samples from: the template cropped to
the brain, tissue fractions (grey matter, white matter, CSF) and the part of the T1 intensity that the tissue
fractions do not explain (the "texture"), optionally blurred for a coarse output grid.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

#: Channel order of :attr:`MniAnatomy.volume`.
CHANNELS: tuple[str, ...] = ("texture", "gm", "wm", "csf")
#: Voxels kept around the brain's bounding box when cropping the template.
_CROP_MARGIN = 4


@dataclass(frozen=True, eq=False)
class MniAnatomy:
    """The template prepared for sampling (treat every array as read-only).

    Attributes:
        volume: ``(1, 4, I, J, K)`` float32 tensor, channels :data:`CHANNELS`, on the template's voxel grid
            (cropped to the brain). ``gm``, ``wm``, ``csf`` are tissue fractions in [0, 1] that sum to the
            brain's partial-volume mask; ``texture`` is ``t1 - t1_model(gm, wm, csf)`` in template T1 units.
        world_to_voxel: ``(4, 4)`` float64, MNI world (RAS, mm) -> index into ``volume``'s last three axes.
        brain_bbox_world: ``(2, 3)`` float64, min and max world coordinates (mm) of the brain's voxels.
        t1_model: least-squares T1 intensity of pure white matter, grey matter and CSF (template units, the
            T1 volume scaled to a maximum of 1).
        output_spacing_mm: the output voxel size (mm) this anatomy was prepared for.
        blur_mm: Gaussian FWHM (mm) per axis that was applied to anti-alias sampling on a coarse grid.
    """

    volume: torch.Tensor
    world_to_voxel: np.ndarray
    brain_bbox_world: np.ndarray
    t1_model: tuple[float, float, float]
    output_spacing_mm: tuple[float, float, float]
    blur_mm: tuple[float, float, float]

    @property
    def brain_center_world(self) -> np.ndarray:
        """``(3,)`` centre of the brain's bounding box, world mm."""
        return self.brain_bbox_world.mean(axis=0)

    @classmethod
    def load(cls, output_spacing_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> MniAnatomy:
        """Read the template from the installed nilearn package and prepare it.

        Args:
            output_spacing_mm: voxel size of the grid the phantom will be sampled on; where it is coarser
                than the template's 1 mm, the channels are blurred with a Gaussian of FWHM
                ``sqrt(spacing**2 - 1)`` mm so that point sampling does not alias.
        """
        spacing = np.asarray(output_spacing_mm, dtype=np.float64)
        if spacing.shape != (3,) or not np.all(spacing > 0):
            raise ValueError(f"output_spacing_mm must be three positive numbers, got {output_spacing_mm!r}")
        import torch
        from nilearn.datasets import (
            load_mni152_gm_template,
            load_mni152_template,
            load_mni152_wm_template,
        )
        from scipy import ndimage

        t1_img = load_mni152_template(resolution=1)
        gm_img = load_mni152_gm_template(resolution=1)
        wm_img = load_mni152_wm_template(resolution=1)
        affine = np.asarray(t1_img.affine, dtype=np.float64)
        for name, img in (("gm", gm_img), ("wm", wm_img)):
            if img.shape != t1_img.shape or not np.allclose(img.affine, affine):
                raise RuntimeError(f"nilearn's MNI152 {name} map is not on the T1 template's grid")
        t1 = np.asarray(t1_img.dataobj, dtype=np.float32)
        brain = t1 > 0  # the template is skull-stripped: background is exactly 0
        idx = np.argwhere(brain)
        lo = np.maximum(idx.min(axis=0) - _CROP_MARGIN, 0)
        hi = np.minimum(idx.max(axis=0) + _CROP_MARGIN + 1, brain.shape)
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
        bbox_vox = np.stack([idx.min(axis=0), idx.max(axis=0)]).astype(np.float64)
        brain_bbox_world = bbox_vox @ affine[:3, :3].T + affine[:3, 3]

        t1 = t1[box]
        brain_f = brain[box].astype(np.float32)
        gm = np.asarray(gm_img.dataobj, dtype=np.float32)[box] * brain_f
        wm = np.asarray(wm_img.dataobj, dtype=np.float32)[box] * brain_f
        csf = np.clip(brain_f - gm - wm, 0.0, 1.0)
        inside = brain[box]
        design = np.stack([wm[inside], gm[inside], csf[inside]], axis=1)
        coef, *_ = np.linalg.lstsq(design, t1[inside], rcond=None)
        texture = (t1 - (coef[0] * wm + coef[1] * gm + coef[2] * csf)) * brain_f
        channels = [texture, gm, wm, csf]

        fwhm = np.sqrt(np.clip(spacing**2 - 1.0, 0.0, None))
        sigma = fwhm / (2.0 * np.sqrt(2.0 * np.log(2.0)))
        if np.any(sigma > 0.25):
            channels = [ndimage.gaussian_filter(c, sigma=sigma, mode="constant") for c in channels]
        volume = torch.from_numpy(np.stack(channels).astype(np.float32, copy=False))[None].contiguous()

        crop_affine = affine.copy()
        crop_affine[:3, 3] = affine[:3, :3] @ lo + affine[:3, 3]
        logger.debug("MNI anatomy: crop %s, T1 model %s, blur FWHM %s mm", volume.shape, coef, fwhm)
        return cls(
            volume=volume,
            world_to_voxel=np.linalg.inv(crop_affine),
            brain_bbox_world=brain_bbox_world,
            t1_model=(float(coef[0]), float(coef[1]), float(coef[2])),
            output_spacing_mm=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
            blur_mm=(float(fwhm[0]), float(fwhm[1]), float(fwhm[2])),
        )
