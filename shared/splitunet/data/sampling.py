"""Samples: which voxels of which case one training example uses, planned once and applied by every party.

In vertical split learning the sites (images) and the aggregator (labels) must crop and flip the *same*
voxels. The aggregator, which holds the labels, plans the samples (:func:`plan_patches`, :func:`plan_slices`),
sends the :class:`Sample` objects to the sites in the forward request, and every party calls
:func:`extract` with them on its own ``(C, X, Y, Z)`` RAS volume (images or regions / label map).

Geometry of a sample (all in voxel indices of the RAS volume):

- 3D (``axial_index is None``): ``start`` and ``size`` are ``(x, y, z)``; the output is
  ``(C, *size)`` = ``volume[:, x0:x0+sx, y0:y0+sy, z0:z0+sz]``.
- 2D (``axial_index = z``): the axial slice ``volume[:, :, :, z]`` is cropped in-plane with ``start`` and
  ``size`` ``(x, y)``; the output is ``(C, sx, sy)``. There is no resizing: a fixed in-plane size is reached
  by cropping or zero-padding (BraTS slices are 240x240, a multiple of 16, so the whole slice usually fits).
- ``start`` may be negative and ``start + size`` may exceed the volume: voxels outside are zero (a ROI larger
  than the volume is zero-padded, the volume centred in it).
- ``flip_axes`` are spatial axes of the output (0 = x, 1 = y, 2 = z) flipped after cropping.
- ``volume_shape``, if set, is the ``(X, Y, Z)`` shape the planner saw; :func:`extract` refuses a volume of
  another shape (the parties' grids disagree) instead of cutting different voxels silently.

Samples are pydantic models, so they travel as JSON in the REST requests; their sizes are bounded so a
request cannot make a site allocate an absurd array.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from enum import StrEnum

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from splitunet.errors import DataError

logger = logging.getLogger(__name__)

#: Largest accepted size along one axis of a sample.
MAX_SAMPLE_SIZE = 1024
#: Largest accepted ``|start|`` along one axis.
MAX_SAMPLE_OFFSET = 4096


class Sample(BaseModel):
    """One planned training example: a crop (3D) or an in-plane crop of one axial slice (2D), plus flips.

    Args:
        case_id: the case.
        start: first voxel of the crop, 3 ints (3D) or 2 ints in-plane (2D); may be negative (zero padding).
        size: crop size, same length as ``start``, each in ``1 .. MAX_SAMPLE_SIZE``.
        axial_index: the axial slice ``z`` for a 2D sample, ``None`` for 3D.
        flip_axes: output spatial axes to flip (distinct, each ``< len(size)``).
        volume_shape: optional ``(X, Y, Z)`` of the volume the sample was planned on.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    case_id: str = Field(min_length=1, max_length=256)
    start: tuple[int, ...]
    size: tuple[int, ...]
    axial_index: int | None = Field(default=None, ge=0, le=MAX_SAMPLE_OFFSET)
    flip_axes: tuple[int, ...] = ()
    volume_shape: tuple[int, int, int] | None = None
    resize: tuple[int, int] | None = None

    @field_validator("start")
    @classmethod
    def _check_start(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(abs(v) > MAX_SAMPLE_OFFSET for v in value):
            raise ValueError(f"start entries must be within +-{MAX_SAMPLE_OFFSET}, got {list(value)}")
        return value

    @field_validator("size")
    @classmethod
    def _check_size(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(not 1 <= v <= MAX_SAMPLE_SIZE for v in value):
            raise ValueError(f"size entries must be in 1..{MAX_SAMPLE_SIZE}, got {list(value)}")
        return value

    @field_validator("volume_shape")
    @classmethod
    def _check_volume_shape(cls, value: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
        if value is not None and any(not 1 <= v <= MAX_SAMPLE_OFFSET for v in value):
            raise ValueError(f"volume_shape entries must be in 1..{MAX_SAMPLE_OFFSET}, got {list(value)}")
        return value

    @model_validator(mode="after")
    def _check_dims(self) -> Sample:
        dims = 2 if self.axial_index is not None else 3
        if len(self.start) != dims or len(self.size) != dims:
            what = (
                "2D (axial_index set): start and size need 2 in-plane ints"
                if dims == 2
                else ("3D (axial_index None): start and size need 3 ints (x, y, z)")
            )
            raise ValueError(f"{what}; got start={list(self.start)}, size={list(self.size)}")
        if len(set(self.flip_axes)) != len(self.flip_axes) or any(not 0 <= a < dims for a in self.flip_axes):
            raise ValueError(f"flip_axes must be distinct axes in 0..{dims - 1}, got {list(self.flip_axes)}")
        if self.resize is not None and (dims != 2 or any(not 1 <= r <= MAX_SAMPLE_SIZE for r in self.resize)):
            raise ValueError(
                f"resize is for 2D samples only and needs 2 sizes in 1..{MAX_SAMPLE_SIZE}, got {self.resize}"
            )
        if self.volume_shape is not None and self.axial_index is not None and self.axial_index >= self.volume_shape[2]:
            raise ValueError(f"axial_index {self.axial_index} is outside volume_shape {list(self.volume_shape)}")
        return self

    @property
    def spatial_dims(self) -> int:
        return 2 if self.axial_index is not None else 3

    @property
    def output_size(self) -> tuple[int, ...]:
        """Spatial size of what :func:`extract` returns: ``resize`` if set, else ``size``."""
        return tuple(self.resize) if self.resize is not None else tuple(self.size)


def extract(volume: np.ndarray, sample: Sample, *, interpolation: Interpolation | str = "linear") -> np.ndarray:
    """Cut ``sample`` out of a ``(C, X, Y, Z)`` volume: ``(C, *sample.size)`` (or ``(C, *sample.resize)``), a new
    C-contiguous array.

    The same call on the sites' images and the aggregator's regions (or label map with a channel axis)
    yields voxel-aligned examples. Voxels outside the volume are 0. A 2D sample with ``resize`` is resized
    in-plane after cropping: ``interpolation="linear"`` (bilinear; images) or ``"nearest"`` (labels, regions).

    Raises:
        ValueError: ``volume`` is not 4D.
        DataError: ``volume``'s shape differs from ``sample.volume_shape``, or ``axial_index`` is outside it.
    """
    if volume.ndim != 4:
        raise ValueError(f"volume must be (C, X, Y, Z), got shape {volume.shape}")
    spatial = tuple(int(s) for s in volume.shape[1:])
    if sample.volume_shape is not None and spatial != tuple(sample.volume_shape):
        raise DataError(
            f"case {sample.case_id}: the volume has shape {spatial} but the sample was planned on "
            f"{tuple(sample.volume_shape)}; the parties' grids disagree",
            detail={"case_id": sample.case_id},
        )
    if sample.axial_index is not None:
        if sample.axial_index >= spatial[2]:
            raise DataError(
                f"case {sample.case_id}: axial_index {sample.axial_index} is outside the volume's {spatial[2]} slices",
                detail={"case_id": sample.case_id},
            )
        source = volume[:, :, :, sample.axial_index]
    else:
        source = volume
    out = np.zeros((volume.shape[0], *sample.size), dtype=volume.dtype)
    src_sl: list[slice] = [slice(None)]
    dst_sl: list[slice] = [slice(None)]
    for start, size, extent in zip(sample.start, sample.size, source.shape[1:], strict=True):
        lo, hi = max(start, 0), min(start + size, extent)
        if hi <= lo:
            return _flip(_resize(out, sample.resize, interpolation), sample.flip_axes)
        src_sl.append(slice(lo, hi))
        dst_sl.append(slice(lo - start, hi - start))
    out[tuple(dst_sl)] = source[tuple(src_sl)]
    return _flip(_resize(out, sample.resize, interpolation), sample.flip_axes)


class Interpolation(StrEnum):
    LINEAR = "linear"
    NEAREST = "nearest"


def _resize(array: np.ndarray, size: tuple[int, int] | None, interpolation: Interpolation | str) -> np.ndarray:
    """Resize a ``(C, X, Y)`` array in-plane to ``size`` (bilinear, or nearest for labels); dtype kept."""
    if size is None or tuple(array.shape[1:]) == tuple(size):
        return array
    import torch
    import torch.nn.functional as F

    mode = Interpolation(interpolation)
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]
    if mode == Interpolation.LINEAR:
        out = F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    else:
        out = F.interpolate(t, size=tuple(size), mode="nearest-exact")
    return np.ascontiguousarray(out[0].numpy().astype(array.dtype, copy=False))


def _flip(array: np.ndarray, axes: Sequence[int]) -> np.ndarray:
    if not axes:
        return array
    return np.ascontiguousarray(np.flip(array, axis=tuple(a + 1 for a in axes)))


# ---------------------------------------------------------------------------------------------- planning
def foreground_mask(volume: np.ndarray) -> np.ndarray:
    """``(X, Y, Z)`` bool mask of voxels nonzero in any channel of a ``(C, X, Y, Z)`` (or ``(X, Y, Z)``) array:
    the tumour for a label map / regions, the brain for skull-stripped images."""
    v = np.asarray(volume)
    if v.ndim == 3:
        return v != 0
    if v.ndim == 4:
        return np.any(v != 0, axis=0)
    raise ValueError(f"volume must be (X, Y, Z) or (C, X, Y, Z), got shape {v.shape}")


def slices_with_foreground(volume: np.ndarray) -> np.ndarray:
    """Indices of the axial slices ``z`` where :func:`foreground_mask` has any voxel, ascending."""
    return np.flatnonzero(foreground_mask(volume).any(axis=(0, 1)))


def _check_common(
    shape: Sequence[int], n: int, rng: np.random.Generator, fg_ratio: float, flip_prob: float
) -> tuple[int, int, int]:
    shape_t = tuple(int(s) for s in shape)
    if len(shape_t) != 3 or any(s < 1 for s in shape_t):
        raise ValueError(f"shape must be the volume's (X, Y, Z), 3 positive ints, got {shape}")
    if n < 1:
        raise ValueError(f"n (samples to plan) must be >= 1, got {n}")
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), got {type(rng)}")
    if not 0.0 <= fg_ratio <= 1.0:
        raise ValueError(f"fg_ratio must be in [0, 1], got {fg_ratio}")
    if not 0.0 <= flip_prob <= 1.0:
        raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
    return shape_t  # type: ignore[return-value]


def _foreground_coords(foreground: np.ndarray | None, shape: tuple[int, int, int]) -> np.ndarray | None:
    if foreground is None:
        return None
    fg = np.asarray(foreground)
    if fg.ndim == 2 and fg.shape[1] == 3:
        return fg.astype(np.int64)
    mask = foreground_mask(fg)
    if mask.shape != shape:
        raise ValueError(f"foreground has spatial shape {mask.shape}, expected the volume's {shape}")
    return np.argwhere(mask)


def _start(extent: int, size: int, rng: np.random.Generator, centre: int | None, random_crop: bool) -> int:
    """Crop start along one axis: random (or centred) inside the volume, around ``centre`` if given, and
    centred with zero padding on both sides when the crop is larger than the volume."""
    if size >= extent:
        return -((size - extent) // 2)
    if centre is not None:
        return int(np.clip(centre - size // 2, 0, extent - size))
    if not random_crop:
        return (extent - size) // 2
    return int(rng.integers(0, extent - size + 1))


def _flips(rng: np.random.Generator, axes: Sequence[int], flip_prob: float) -> tuple[int, ...]:
    if flip_prob == 0.0:
        return ()
    return tuple(a for a in axes if rng.random() < flip_prob)


def plan_patches(
    case_id: str,
    shape: Sequence[int],
    roi: Sequence[int] | None,
    n: int,
    rng: np.random.Generator,
    *,
    foreground: np.ndarray | None = None,
    fg_ratio: float = 0.0,
    flip_prob: float = 0.0,
    flip_axes: Sequence[int] = (0, 1, 2),
    random_crop: bool = True,
) -> list[Sample]:
    """Plan ``n`` 3D crops of size ``roi`` from a volume of spatial ``shape`` ``(X, Y, Z)``.

    Args:
        roi: crop size ``(x, y, z)``; ``None`` means the whole volume.
        rng: the randomness (``np.random.default_rng(seed)``); the plan is deterministic for a seed.
        foreground: tumour voxels for foreground weighting: a ``(X, Y, Z)`` / ``(C, X, Y, Z)`` label or region
            array (nonzero = foreground) or an ``(N, 3)`` array of voxel indices.
        fg_ratio: probability that a crop is centred on a random foreground voxel (clamped to stay inside
            the volume); a case without foreground falls back to uniform crops.
        flip_prob: probability of flipping each axis of ``flip_axes``.
        random_crop: ``False`` centres every crop that is not foreground-centred (deterministic validation).
    """
    shape_t = _check_common(shape, n, rng, fg_ratio, flip_prob)
    roi_t = shape_t if roi is None else tuple(int(r) for r in roi)
    if len(roi_t) != 3 or any(not 1 <= r <= MAX_SAMPLE_SIZE for r in roi_t):
        raise ValueError(f"roi must be 3 sizes in 1..{MAX_SAMPLE_SIZE} (x, y, z) for 3D patches, got {roi}")
    if any(a not in (0, 1, 2) for a in flip_axes):
        raise ValueError(f"flip_axes must be axes among (0, 1, 2), got {list(flip_axes)}")
    if fg_ratio > 0 and foreground is None:
        raise ValueError("fg_ratio > 0 needs foreground (the label map, regions or foreground coordinates)")
    coords = _foreground_coords(foreground, shape_t) if fg_ratio > 0 else None
    if coords is not None and len(coords) == 0:
        logger.debug("case %s has no foreground voxel; planning uniform crops", case_id)
        coords = None
    samples = []
    for _ in range(n):
        centre = None
        if coords is not None and rng.random() < fg_ratio:
            centre = coords[int(rng.integers(len(coords)))]
        start = tuple(
            _start(e, s, rng, None if centre is None else int(centre[i]), random_crop)
            for i, (e, s) in enumerate(zip(shape_t, roi_t, strict=True))
        )
        samples.append(
            Sample(
                case_id=case_id,
                start=start,
                size=roi_t,
                flip_axes=_flips(rng, flip_axes, flip_prob),
                volume_shape=shape_t,
            )
        )
    return samples


def plan_slices(
    case_id: str,
    shape: Sequence[int],
    roi: Sequence[int] | None,
    n: int,
    rng: np.random.Generator,
    *,
    allowed_slices: Sequence[int] | np.ndarray | None = None,
    foreground: np.ndarray | None = None,
    fg_ratio: float = 0.0,
    flip_prob: float = 0.0,
    flip_axes: Sequence[int] = (0, 1),
    random_crop: bool = True,
    resize: bool = False,
) -> list[Sample]:
    """Plan ``n`` 2D samples: axial slices of a ``(X, Y, Z)`` volume, cropped/padded in-plane to ``roi``
    (or, with ``resize=True``, whole slices resized to ``roi``).

    Args:
        roi: in-plane size ``(x, y)``; ``None`` means the whole slice.
        allowed_slices: the slice indices to draw from (e.g. :func:`slices_with_foreground` of the brain or
            of the tumour); ``None`` means all. An empty set falls back to all slices.
        foreground: tumour voxels (as in :func:`plan_patches`); with probability ``fg_ratio`` a sample takes
            the slice of a random foreground voxel (among ``allowed_slices``), its in-plane crop centred on it.
        flip_prob, flip_axes: in-plane flips (axes 0 = x, 1 = y).
        random_crop: ``False`` centres the in-plane crop of non-foreground samples.
        resize: take whole slices and resize them to ``roi`` (see :func:`extract`) instead of cropping.
    """
    shape_t = _check_common(shape, n, rng, fg_ratio, flip_prob)
    roi_t = shape_t[:2] if roi is None else tuple(int(r) for r in roi)
    target = roi_t if resize else None
    if resize:
        roi_t = shape_t[:2]
    if len(roi_t) != 2 or any(not 1 <= r <= MAX_SAMPLE_SIZE for r in roi_t):
        raise ValueError(f"roi must be 2 in-plane sizes in 1..{MAX_SAMPLE_SIZE} (x, y) for 2D slices, got {roi}")
    if any(a not in (0, 1) for a in flip_axes):
        raise ValueError(f"flip_axes must be in-plane axes among (0, 1), got {list(flip_axes)}")
    if fg_ratio > 0 and foreground is None:
        raise ValueError("fg_ratio > 0 needs foreground (the label map, regions or foreground coordinates)")
    slices = np.arange(shape_t[2]) if allowed_slices is None else np.unique(np.asarray(allowed_slices, dtype=int))
    if slices.size and (slices[0] < 0 or slices[-1] >= shape_t[2]):
        raise ValueError(f"allowed_slices must be in 0..{shape_t[2] - 1}, got {slices.min()}..{slices.max()}")
    if slices.size == 0:
        logger.debug("case %s: no allowed slice; drawing from all %d", case_id, shape_t[2])
        slices = np.arange(shape_t[2])
    coords = _foreground_coords(foreground, shape_t) if fg_ratio > 0 else None
    if coords is not None:
        coords = coords[np.isin(coords[:, 2], slices)]
        if len(coords) == 0:
            logger.debug("case %s has no foreground voxel in the allowed slices; uniform slices", case_id)
            coords = None
    samples = []
    for _ in range(n):
        centre = None
        if coords is not None and rng.random() < fg_ratio:
            centre = coords[int(rng.integers(len(coords)))]
            z = int(centre[2])
        else:
            z = int(slices[int(rng.integers(slices.size))])
        start = tuple(
            _start(e, s, rng, None if centre is None else int(centre[i]), random_crop)
            for i, (e, s) in enumerate(zip(shape_t[:2], roi_t, strict=True))
        )
        samples.append(
            Sample(
                case_id=case_id,
                start=start,
                size=roi_t,
                axial_index=z,
                flip_axes=_flips(rng, flip_axes, flip_prob),
                volume_shape=shape_t,
                resize=target,
            )
        )
    return samples
