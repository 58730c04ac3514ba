"""What a site tells the aggregator about a case's grid, so the aggregator can plan and segment without images.

For each aligned case a site reports a :class:`CaseGrid`: the on-disk **header grid** of its files (shape,
affine, qform/sform codes; header only) and the **axial extent of the brain**, the first and last RAS axial
slice ``z`` holding a nonzero voxel in any of its modalities (skull-stripped BraTS images are 0 outside the brain).

The aggregator combines the sites' reports with :func:`combine_grids`: the grids must agree (else the parties
would cut different voxels), and the brain extent is the union of the sites' extents. With it the aggregator

- plans 2D training slices only inside the brain, exactly as the in-process dataset does
  (:func:`brain_slices`, used by both paths), and
- segments a case that has no label file (``/v1/infer``): the output grid comes from the sites' headers.

What it reveals to the aggregator (docs/concepts.md, *What the sites' grids reveal*): per aligned case, the scan's
grid (for BraTS the same 240x240x155 1 mm grid for every case) and two integers, the brain's lowest and highest axial
slice, i.e. its cranio-caudal coverage in voxels. No intensity, no in-plane extent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from splitunet.data.cache import ArrayCache
from splitunet.data.layout import BratsCase, BratsLayout
from splitunet.data.loader import AFFINE_ATOL_MM, Geometry, geometry_of, load_images, read_header_codes
from splitunet.errors import DataError

#: Largest accepted size along one axis of a reported grid.
MAX_GRID_SIZE = 4096


class CaseGrid(BaseModel):
    """One case's header grid and brain extent as one site sees it.

    Args:
        shape: the files' on-disk 3D shape ``(i, j, k)``.
        affine: the files' voxel-to-world affine (mm, RAS+ world), 4 rows of 4.
        qform_code, sform_code: the NIfTI header's codes (kept when a segmentation is written).
        brain_z: ``(first, last)`` RAS axial slice with a nonzero image voxel, or ``None`` if the images are all 0.
        layout: the case's file layout at the site (gives the ET label of a segmentation written for it).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    shape: tuple[int, int, int]
    affine: tuple[tuple[float, float, float, float], ...] = Field(min_length=4, max_length=4)
    qform_code: int = Field(default=1, ge=0, le=4)
    sform_code: int = Field(default=1, ge=0, le=4)
    brain_z: tuple[int, int] | None = None
    layout: BratsLayout = BratsLayout.BRATS2021

    @field_validator("shape")
    @classmethod
    def _shape(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(not 1 <= s <= MAX_GRID_SIZE for s in value):
            raise ValueError(f"shape entries must be in 1..{MAX_GRID_SIZE}, got {list(value)}")
        return value

    @field_validator("brain_z")
    @classmethod
    def _brain(cls, value: tuple[int, int] | None) -> tuple[int, int] | None:
        if value is not None and not 0 <= value[0] <= value[1] < MAX_GRID_SIZE:
            raise ValueError(f"brain_z must be (first, last) with 0 <= first <= last, got {list(value)}")
        return value

    def geometry(self) -> Geometry:
        """The :class:`~splitunet.data.loader.Geometry` (RAS shape and affine) of this grid."""
        return geometry_of(self.shape, np.asarray(self.affine, dtype=np.float64))

    def same_grid(self, other: CaseGrid) -> bool:
        return self.shape == other.shape and bool(
            np.allclose(np.asarray(self.affine), np.asarray(other.affine), rtol=0.0, atol=AFFINE_ATOL_MM)
        )


def axial_extent(volume: np.ndarray) -> tuple[int, int] | None:
    """``(first, last)`` axial index ``z`` with a nonzero voxel in any channel of a ``(C, X, Y, Z)`` array."""
    v = np.asarray(volume)
    if v.ndim != 4:
        raise ValueError(f"volume must be (C, X, Y, Z), got shape {v.shape}")
    z = np.flatnonzero(np.any(v != 0, axis=(0, 1, 2)))
    return None if z.size == 0 else (int(z[0]), int(z[-1]))


def brain_slices(extent: tuple[int, int] | None) -> np.ndarray | None:
    """The axial slices a 2D planner draws from: ``first..last`` of the brain, or ``None`` (all) if unknown."""
    if extent is None:
        return None
    return np.arange(extent[0], extent[1] + 1)


def case_grid(case: BratsCase, modalities: Sequence[str], *, cache: ArrayCache | None = None) -> CaseGrid:
    """A site's :class:`CaseGrid` of one case: header of its first modality, brain extent of its images."""
    images = load_images(case, modalities, cache=cache, normalize=True)
    qform, sform = read_header_codes(case.case_id, case.image_path(modalities[0]))
    return CaseGrid(
        shape=images.original_shape,
        affine=tuple(tuple(float(x) for x in row) for row in images.original_affine),
        qform_code=qform,
        sform_code=sform,
        brain_z=axial_extent(images.array),
        layout=case.layout,
    )


def combine_grids(case_id: str, grids: Mapping[str, CaseGrid]) -> CaseGrid:
    """The case's grid agreed by every site, with the union of their brain extents.

    Raises:
        DataError: no site reported, or two sites' header grids disagree (naming both).
    """
    if not grids:
        raise DataError(f"case {case_id}: no site reported its grid", detail={"case_id": case_id})
    names = list(grids)
    ref = grids[names[0]]
    extents = []
    for name in names:
        grid = grids[name]
        if grid.layout != ref.layout:
            raise DataError(
                f"case {case_id}: site {name!r} stores it in the {grid.layout.value} layout but site {names[0]!r} in "
                f"the {ref.layout.value} layout; one case must use one BraTS release's labels",
                detail={"case_id": case_id, "sites": [names[0], name]},
            )
        if not grid.same_grid(ref):
            raise DataError(
                f"case {case_id}: site {name!r} has grid {list(grid.shape)} / {[list(r) for r in grid.affine]} but "
                f"site {names[0]!r} has {list(ref.shape)} / {[list(r) for r in ref.affine]}; the sites' files must "
                "be on one grid",
                detail={"case_id": case_id, "sites": [names[0], name]},
            )
        if grid.brain_z is not None:
            extents.append(grid.brain_z)
    brain = (min(e[0] for e in extents), max(e[1] for e in extents)) if extents else None
    return ref.model_copy(update={"brain_z": brain})
