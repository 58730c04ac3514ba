"""The phantom's generative model: the subject deformation, the tumour and the MRI contrasts.

Used by :mod:`splitunet.data.phantom`, which documents the model as a whole. Conventions here: a case is
computed on a *crop* ``lo..hi`` (inclusive voxel bounds) of the RAS output grid of shape ``dims``, voxel size
``spacing`` (mm), world position of voxel ``(0, 0, 0)`` ``origin`` (MNI RAS mm); arrays are ``(i, j, k)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

import numpy as np

from splitunet.data.mni import MniAnatomy

if TYPE_CHECKING:
    import torch

# Healthy tissue model per modality: intensity of pure (WM, GM, CSF) and weight of the T1 texture, in template
# T1 units (WM ~ 0.87). T1 and T1ce use the template's own fit (None).
_HEALTHY: Mapping[str, tuple[float, float, float, float] | None] = MappingProxyType(
    {"t1": None, "t1ce": None, "t2": (0.35, 0.55, 1.0, -0.7), "flair": (0.45, 0.58, 0.08, -0.35)}
)
# Tumour compartments per modality: (edema, enhancing rim, necrosis), same units.
_TUMOUR: Mapping[str, tuple[float, float, float]] = MappingProxyType(
    {"t1": (0.62, 0.55, 0.30), "t1ce": (0.62, 1.35, 0.28), "t2": (0.85, 0.62, 0.95), "flair": (0.95, 0.75, 0.45)}
)
# Scanner gain per modality (intensity units per template unit) before a per-case factor of 0.85-1.15.
_GAIN: Mapping[str, float] = MappingProxyType({"t1": 700.0, "t1ce": 750.0, "t2": 1000.0, "flair": 900.0})
# Relative radius perturbations of the tumour boundaries (the core's outward bulge is capped at _CORE_OUTWARD).
_EDEMA_IRREGULARITY, _CORE_OUTWARD, _NECROSIS_IRREGULARITY = 0.3, 0.25, 0.2
_MAX_DISPLACEMENT_MM = 8.0
_CONTROL_GRID = (6, 6, 5)


def rotation_matrix(angles_rad: np.ndarray) -> np.ndarray:
    """``(3, 3)`` rotation ``Rz @ Ry @ Rx`` for angles about x, y, z."""
    cx, cy, cz = np.cos(angles_rad)
    sx, sy, sz = np.sin(angles_rad)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass(frozen=True)
class Deformation:
    """Subject world -> template world: ``y = M (x - c) + c + shift + u(x)``, ``c`` the brain centre."""

    matrix: np.ndarray  # (3, 3)
    shift: np.ndarray  # (3,) mm
    control: np.ndarray  # (3, *_CONTROL_GRID) elastic displacement (mm) on a grid spanning the field of view

    @classmethod
    def sample(cls, rng: np.random.Generator) -> Deformation:
        rotation = rotation_matrix(np.deg2rad(rng.uniform(-6.0, 6.0, 3)))
        size = rng.uniform(0.88, 1.0) * rng.uniform(0.97, 1.03, 3)  # subject brain size / template's
        control = np.clip(rng.normal(0.0, 2.5, (3, *_CONTROL_GRID)), -7.5, 7.5)
        return cls(matrix=rotation @ np.diag(1.0 / size), shift=rng.uniform(-4.0, 4.0, 3), control=control)

    def crop(
        self, anatomy: MniAnatomy, origin: np.ndarray, spacing: np.ndarray, dims: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Inclusive voxel bounds (RAS grid) of every output voxel that can land in the template's brain."""
        margin = _MAX_DISPLACEMENT_MM + 2.0 + max(anatomy.blur_mm)
        lo_w, hi_w = anatomy.brain_bbox_world[0] - margin, anatomy.brain_bbox_world[1] + margin
        corners = np.array([[(lo_w, hi_w)[b >> d & 1][d] for d in range(3)] for b in range(8)])
        c = anatomy.brain_center_world
        x = (corners - c - self.shift) @ np.linalg.inv(self.matrix).T + c
        idx_lo = np.floor((x.min(axis=0) - origin) / spacing) - 1
        idx_hi = np.ceil((x.max(axis=0) - origin) / spacing) + 1
        lo = np.clip(idx_lo, 0, dims - 1).astype(int)
        hi = np.clip(idx_hi, 0, dims - 1).astype(int)
        return lo, np.maximum(hi, lo + 1)

    def _lattice(
        self,
        anatomy: MniAnatomy,
        origin: np.ndarray,
        spacing: np.ndarray,
        dims: np.ndarray,
        lo: np.ndarray,
        hi: np.ndarray,
        step_mm: float,
    ) -> tuple[list[np.ndarray], np.ndarray]:
        """A lattice of about ``step_mm`` over the crop ``lo..hi``: its axes (RAS-grid voxel positions) and the
        ``(ni, nj, nk, 3)`` ``grid_sample`` coordinates of its points (x, y, z = template k, j, i in [-1, 1])."""
        from scipy import ndimage

        steps = np.maximum(np.ceil((hi - lo) * spacing / step_mm).astype(int) + 1, 2)
        axes = [np.linspace(lo[d], hi[d], steps[d]) for d in range(3)]
        world = origin + np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1) * spacing
        fov_hi = origin + (dims - 1) * spacing
        ctrl = np.moveaxis((world - origin) / (fov_hi - origin) * (np.asarray(_CONTROL_GRID) - 1), -1, 0)
        disp = np.stack([ndimage.map_coordinates(self.control[d], ctrl, order=3, mode="nearest") for d in range(3)], -1)
        disp = np.clip(disp, -_MAX_DISPLACEMENT_MM, _MAX_DISPLACEMENT_MM)
        c = anatomy.brain_center_world
        template_world = (world - c) @ self.matrix.T + c + self.shift + disp
        a = anatomy.world_to_voxel
        vox = template_world @ a[:3, :3].T + a[:3, 3]
        extent = np.asarray(anatomy.volume.shape[2:], dtype=np.float64) - 1.0
        norm = 2.0 * vox / extent - 1.0  # align_corners=True convention
        return axes, np.ascontiguousarray(norm[..., ::-1], dtype=np.float32)

    def tighten(
        self,
        anatomy: MniAnatomy,
        origin: np.ndarray,
        spacing: np.ndarray,
        dims: np.ndarray,
        lo: np.ndarray,
        hi: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Shrink the crop to the brain found on a 4 mm lattice, plus 8 mm (half the work of a loose crop)."""
        import torch
        import torch.nn.functional as F

        axes, norm = self._lattice(anatomy, origin, spacing, dims, lo, hi, step_mm=4.0)
        with torch.no_grad():
            sampled = F.grid_sample(anatomy.volume, torch.from_numpy(norm)[None], align_corners=True)[0].numpy()
        brain = sampled[1:].sum(axis=0) > 0.01
        if not brain.any():
            return lo, hi
        margin = np.ceil(8.0 / spacing)
        new_lo, new_hi = lo.copy(), hi.copy()
        for d in range(3):
            hit = np.flatnonzero(brain.any(axis=tuple(e for e in range(3) if e != d)))
            new_lo[d] = max(lo[d], int(np.floor(axes[d][hit[0]] - margin[d])))
            new_hi[d] = min(hi[d], int(np.ceil(axes[d][hit[-1]] + margin[d])))
        return new_lo, new_hi

    def sampling_grid(
        self,
        anatomy: MniAnatomy,
        origin: np.ndarray,
        spacing: np.ndarray,
        dims: np.ndarray,
        lo: np.ndarray,
        hi: np.ndarray,
    ) -> torch.Tensor:
        """``grid_sample`` grid ``(1, ci, cj, ck, 3)`` for the crop ``lo..hi``: computed on a ~8 mm lattice and
        trilinearly upsampled (exact for the affine part, smooth for the elastic part)."""
        import torch
        import torch.nn.functional as F

        _, norm = self._lattice(anatomy, origin, spacing, dims, lo, hi, step_mm=8.0)
        coarse = torch.from_numpy(np.ascontiguousarray(norm.transpose(3, 0, 1, 2)))
        size = tuple(int(s) for s in hi - lo + 1)
        fine = F.interpolate(coarse[None], size=size, mode="trilinear", align_corners=True)
        return fine.permute(0, 2, 3, 4, 1).contiguous()


@dataclass(frozen=True, eq=False)
class Tumour:
    """The tumour on a box of the crop: labels and soft compartment weights (edema, core, necrosis)."""

    box: tuple[slice, slice, slice]
    center: tuple[int, int, int]  # crop voxel index
    label: np.ndarray  # uint8 on the box
    weights: np.ndarray  # float32 (4, *box): w_edema >= w_core >= w_necrosis in [0, 1], texture field in [-1, 1]

    @classmethod
    def sample(
        cls, rng: np.random.Generator, wm: np.ndarray, mask: np.ndarray, spacing: np.ndarray, et_label: int
    ) -> Tumour:
        import torch
        import torch.nn.functional as F

        s_max = float(spacing.max())
        axes_scale = rng.uniform(0.8, 1.25, 3)
        e_min, e_max = float(axes_scale.min()), float(axes_scale.max())
        rotation = rotation_matrix(rng.uniform(-np.pi, np.pi, 3))
        nominal = rng.uniform(20.0, 32.0) * np.array([1.0, rng.uniform(0.5, 0.7), 1.0])
        nominal[2] = nominal[1] * rng.uniform(0.4, 0.7)
        # Boundaries are kept ``gap`` apart in ellipsoidal distance, i.e. more than one voxel step apart in space.
        gap = 1.25 * s_max / e_min
        for shrink in (1.0, 0.8, 0.64, 0.5, 0.4):
            r_e, r_c, r_n = nominal * shrink
            necrosis_max = r_n * (1.0 + _NECROSIS_IRREGULARITY)
            r_c = max(r_c, (necrosis_max + gap) / (1.0 + _CORE_OUTWARD))
            core_max = r_c * (1.0 + _CORE_OUTWARD)
            center = cls._find_center(rng, wm, mask, spacing, reach=core_max * e_max + s_max)
            if center is not None:
                break
        else:
            raise ValueError(
                f"no white-matter voxel with enough brain around it for a nested tumour: the phantom grid is too "
                f"coarse (spacing {tuple(round(float(s), 2) for s in spacing)} mm); use a larger shape"
            )
        edema_min = core_max + gap
        edema_max = max(r_e * (1.0 + _EDEMA_IRREGULARITY) * 1.3, edema_min)
        half = np.ceil((edema_max * e_max + 2.0 * s_max) / spacing).astype(int)
        lo = np.maximum(np.asarray(center) - half, 0)
        hi = np.minimum(np.asarray(center) + half + 1, mask.shape)
        box = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
        size = tuple(int(b - a) for a, b in zip(lo, hi, strict=True))

        offsets = [(np.arange(lo[d], hi[d]) - center[d]) * spacing[d] for d in range(3)]
        dx = np.stack(np.meshgrid(*offsets, indexing="ij"), axis=-1).astype(np.float32)
        local = (dx @ rotation.astype(np.float32)) / axes_scale.astype(np.float32)
        dist = np.sqrt(np.sum(local * local, axis=-1))

        # Smooth random fields in [-1, 1] on the box, with features about half the radius they perturb.
        fields = np.empty((4, *size), dtype=np.float32)
        extent = np.asarray(size) * spacing
        for k, scale in enumerate((r_e, r_c, r_n, r_c)):
            cells = np.clip(np.ceil(extent / (0.5 * scale)).astype(int) + 1, 2, 24)
            coarse = rng.standard_normal(tuple(cells))
            coarse /= np.abs(coarse).max()
            fields[k] = F.interpolate(
                torch.from_numpy(coarse.astype(np.float32))[None, None], size=size, mode="trilinear", align_corners=True
            )[0, 0].numpy()
        # Edema reaches further along white matter; each radius is clamped so that the nesting gaps hold.
        radius = (
            np.maximum(r_e * (1.0 + _EDEMA_IRREGULARITY * fields[0]) * (0.6 + 0.7 * wm[box]), edema_min),
            np.clip(r_c * (1.0 + 0.4 * fields[1]), necrosis_max + gap, core_max),
            r_n * (1.0 + _NECROSIS_IRREGULARITY * fields[2]),
        )

        in_brain = mask[box]
        label = np.zeros(size, dtype=np.uint8)
        label[(dist < radius[0]) & in_brain] = 2
        label[dist < radius[1]] = et_label
        label[dist < radius[2]] = 1
        weights = np.empty((4, *size), dtype=np.float32)
        for k in range(3):
            np.clip(0.5 + (radius[k] - dist) / s_max, 0.0, 1.0, out=weights[k])
        np.minimum(weights[1], weights[0], out=weights[1])
        np.minimum(weights[2], weights[1], out=weights[2])
        weights[3] = fields[3]
        return cls(box=box, center=tuple(int(c) for c in center), label=label, weights=weights)

    @staticmethod
    def _find_center(
        rng: np.random.Generator, wm: np.ndarray, mask: np.ndarray, spacing: np.ndarray, reach: float
    ) -> tuple[int, int, int] | None:
        """A white-matter voxel whose ball of radius ``reach`` (mm) lies inside the brain mask (200 tries)."""
        half = np.ceil(reach / spacing).astype(int)
        grids = np.meshgrid(*[np.arange(-h, h + 1) * s for h, s in zip(half, spacing, strict=True)], indexing="ij")
        ball = sum(g * g for g in grids) <= reach * reach
        shape = np.asarray(mask.shape)
        candidates = np.flatnonzero((wm > 0.75) & mask)
        if candidates.size == 0:
            candidates = np.flatnonzero(mask)
        for flat in rng.choice(candidates, size=min(200, candidates.size), replace=False) if candidates.size else []:
            c = np.asarray(np.unravel_index(flat, mask.shape))
            if np.any(c - half < 0) or np.any(c + half + 1 > shape):
                continue
            window = mask[c[0] - half[0] : c[0] + half[0] + 1, c[1] - half[1] : c[1] + half[1] + 1,
                          c[2] - half[2] : c[2] + half[2] + 1]  # fmt: skip
            if window[ball].all():
                return int(c[0]), int(c[1]), int(c[2])
        return None


def contrast(
    rng: np.random.Generator,
    modality: str,
    anatomy: MniAnatomy,
    tissue: np.ndarray,
    voxels: tuple[np.ndarray, np.ndarray, np.ndarray],
    tumour_at: tuple[np.ndarray, np.ndarray],
    lo: np.ndarray,
    dims: np.ndarray,
) -> np.ndarray:
    """One modality on the brain voxels: tissue model + tumour, times bias field, Rician noise, quantised.

    Args:
        tissue: ``(4, n)`` texture, GM, WM, CSF of the ``n`` brain voxels.
        voxels: their crop indices ``(i, j, k)``, each ``(n,)``.
        tumour_at: positions (into ``n``) of the brain voxels in the tumour box and their ``(4, m)`` weights.
        lo: crop origin in the RAS grid; ``dims`` the grid's shape.

    Returns:
        ``(n,)`` float32 integers in ``[1, 32767]``.
    """
    model = _HEALTHY[modality]
    c_wm, c_gm, c_csf, c_tex = (*anatomy.t1_model, 1.0) if model is None else model
    jitter = rng.uniform(0.95, 1.05, 3)
    texture, gm, wm, csf = tissue
    img = (c_wm * jitter[0]) * wm
    img += (c_gm * jitter[1]) * gm
    img += (c_csf * jitter[2]) * csf
    img += c_tex * texture

    edema, rim, necrosis = _TUMOUR[modality]
    where, (w_e, w_c, w_n, tex) = tumour_at
    healthy = img[where]
    texture_gain = 1.0 + 0.08 * tex
    img[where] = (
        (1.0 - w_e) * healthy
        + (w_e - w_c) * (0.35 * healthy + 0.65 * edema * texture_gain)
        + (w_c - w_n) * (rim * texture_gain)
        + w_n * (necrosis * texture_gain)
    )

    # Separable smooth bias field exp(f(x) + f(y) + f(z)) over the field of view, times the scanner gain.
    gain = _GAIN[modality] * rng.uniform(0.85, 1.15)
    for d in range(3):
        t = (lo[d] + np.arange(int(voxels[d].max()) + 1)) / max(dims[d] - 1, 1)
        amp = rng.normal(0.0, 0.06, 2) / np.array([1.0, 2.0])
        phase = rng.uniform(0.0, 2.0 * np.pi, 2)
        factor = np.exp(sum(amp[h] * np.cos(np.pi * (h + 1) * t + phase[h]) for h in range(2)))
        img *= (factor * (gain if d == 0 else 1.0)).astype(np.float32)[voxels[d]]

    sigma = np.float32(rng.uniform(0.015, 0.035) * _GAIN[modality])
    noise = rng.standard_normal((2, img.size), dtype=np.float32)
    noise *= sigma
    img += noise[0]
    np.square(img, out=img)
    np.square(noise[1], out=noise[1])
    img += noise[1]
    np.sqrt(img, out=img)
    np.rint(img, out=img)
    np.clip(img, 1.0, 32767.0, out=img)
    return img
