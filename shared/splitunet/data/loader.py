"""Reading BraTS cases: images, label maps, region channels, and writing segmentations back.

Every array this module returns is in **RAS orientation** (voxel axes ``X, Y, Z`` increase towards the
subject's Right, Anterior and Superior), whatever the file's affine: an LPS file
and the RAS file of the same scan give identical arrays. Only axis permutations and flips are applied (the
closest canonical orientation, as :func:`nibabel.as_closest_canonical`); nothing is resampled, so the cohort is
expected on its native grid (BraTS: 240x240x155, 1 mm isotropic).

Layouts:

- images: ``(C, X, Y, Z)`` float32, one channel per modality in the order asked for, each z-scored over its
  nonzero voxels (mean 0, std 1 inside the brain, 0 outside) — the same result as MONAI's
  ``NormalizeIntensity(nonzero=True, channel_wise=True)`` (tested), computed in numpy, ~4x faster.
- label map: ``(X, Y, Z)`` uint8 with the file's values (``{0,1,2,4}`` for 2021, ``{0,1,2,3}`` for 2023).
- regions: ``(3, X, Y, Z)`` uint8, channels ``[TC, WT, ET]`` (MONAI's
  ``ConvertToMultiChannelBasedOnBratsClasses(et_label=case.et_label)``).

Bad input (a missing file, modalities whose RAS shapes or affines disagree, a corrupt or truncated file,
non-finite values, label values outside the layout's set) raises one :class:`DataError` naming the case and the
file. Arrays returned are read-only (they may be shared through an :class:`~splitunet.data.cache.ArrayCache`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from splitunet.data.cache import ArrayCache, file_signature
from splitunet.data.layout import (
    BratsCase,
    canonical_modality,
)
from splitunet.errors import DataError

logger = logging.getLogger(__name__)

#: Bump when what the loader returns for the same file changes (invalidates disk caches).
LOADER_VERSION = 1
#: Two affines within this many millimetres (per entry) describe the same grid.
AFFINE_ATOL_MM = 1e-3


@dataclass(frozen=True, eq=False)
class Geometry:
    """Where a file's voxels are: its on-disk grid and its RAS-reoriented grid.

    Attributes:
        original_shape: the file's 3D shape ``(i, j, k)``.
        original_affine: the file's voxel-to-world (mm, RAS+ world) affine, ``(4, 4)``.
        ras_shape: the shape after reorientation, ``(X, Y, Z)``.
        ras_affine: the affine of the reoriented array, ``(4, 4)``.
        to_ras: the nibabel orientation transform from the file's axes to RAS, ``(3, 2)``.
    """

    original_shape: tuple[int, int, int]
    original_affine: np.ndarray
    ras_shape: tuple[int, int, int]
    ras_affine: np.ndarray
    to_ras: np.ndarray

    def same_grid(self, other: Geometry) -> bool:
        return self.ras_shape == other.ras_shape and bool(
            np.allclose(self.ras_affine, other.ras_affine, rtol=0.0, atol=AFFINE_ATOL_MM)
        )

    def to_original(self, array_ras: np.ndarray) -> np.ndarray:
        """Undo the reorientation of a spatial ``(X, Y, Z)`` array: back to the file's axes."""
        import nibabel.orientations as nio

        back = nio.ornt_transform(nio.axcodes2ornt("RAS"), nio.io_orientation(self.original_affine))
        return np.ascontiguousarray(nio.apply_orientation(array_ras, back))


@dataclass(frozen=True, eq=False)
class LoadedImages:
    """A case's normalised images.

    Attributes:
        case_id: the case.
        modalities: canonical modality of each channel.
        array: ``(C, X, Y, Z)`` float32, RAS, nonzero z-scored per channel, read-only.
        affine_ras: ``(4, 4)`` voxel-to-world affine of ``array``.
        original_affine: ``(4, 4)`` affine of the files on disk.
        original_shape: the files' 3D shape on disk.
    """

    case_id: str
    modalities: tuple[str, ...]
    array: np.ndarray
    affine_ras: np.ndarray
    original_affine: np.ndarray
    original_shape: tuple[int, int, int]

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape[1:])  # type: ignore[return-value]

    def channels(self, modalities: Sequence[str]) -> np.ndarray:
        """The ``(len(modalities), X, Y, Z)`` sub-array of some of this case's modalities, in that order."""
        idx = []
        for m in modalities:
            key = canonical_modality(m)
            if key not in self.modalities:
                raise ValueError(f"modality {key!r} was not loaded for case {self.case_id}; loaded {self.modalities}")
            idx.append(self.modalities.index(key))
        return self.array[idx]


@dataclass(frozen=True, eq=False)
class LoadedLabels:
    """A case's label map: ``label_map`` ``(X, Y, Z)`` uint8 RAS (read-only), its grid, and its ET label."""

    case_id: str
    label_map: np.ndarray
    et_label: int
    affine_ras: np.ndarray
    original_affine: np.ndarray
    original_shape: tuple[int, int, int]


# ---------------------------------------------------------------------------------------------- file level
def _bad(case_id: str, path: Path, message: str, **detail: Any) -> DataError:
    return DataError(f"case {case_id}: {path}: {message}", detail={"case_id": case_id, "file": str(path), **detail})


def _open(case_id: str, path: Path) -> tuple[Any, Geometry]:
    """Open a NIfTI file (header only) and compute its geometry."""
    import nibabel as nib

    try:
        img = nib.load(str(path), mmap=False)  # no memory map: arrays must not change with the file
        shape = tuple(int(s) for s in img.shape)
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:  # nibabel raises many types for unreadable files
        raise _bad(case_id, path, f"cannot read the NIfTI header ({type(exc).__name__}: {exc})") from exc
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise _bad(case_id, path, f"expected a 3D volume, got shape {shape}")
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise _bad(case_id, path, f"the affine is not a finite invertible transform:\n{affine}")
    return img, geometry_of(shape, affine)  # type: ignore[arg-type]


def geometry_of(shape: tuple[int, int, int], affine: np.ndarray) -> Geometry:
    """The :class:`Geometry` of a 3D on-disk grid: ``shape`` and its ``(4, 4)`` voxel-to-world affine."""
    import nibabel.orientations as nio

    affine = np.asarray(affine, dtype=np.float64)
    shape = tuple(int(s) for s in shape)  # type: ignore[assignment]
    if len(shape) != 3 or affine.shape != (4, 4) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ValueError(f"need a 3D shape and an invertible (4, 4) affine, got {shape} and\n{affine}")
    to_ras = nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt("RAS"))
    ras_affine = affine @ nio.inv_ornt_aff(to_ras, shape)
    ras_shape = [0, 0, 0]
    for src_axis, (dst_axis, _) in enumerate(to_ras):
        ras_shape[int(dst_axis)] = shape[src_axis]
    return Geometry(
        original_shape=shape,
        original_affine=affine,
        ras_shape=tuple(ras_shape),  # type: ignore[arg-type]
        ras_affine=ras_affine,
        to_ras=to_ras,
    )


def read_header_codes(case_id: str, path: Path | str) -> tuple[int, int]:
    """The ``(qform_code, sform_code)`` of a NIfTI file's header."""
    img, _ = _open(case_id, Path(path))
    return int(img.header["qform_code"]), int(img.header["sform_code"])


def read_geometry(case_id: str, path: Path | str) -> Geometry:
    """The geometry of one file, reading only its header; :class:`DataError` if it cannot be read."""
    return _open(case_id, Path(path))[1]


def _decode(case_id: str, path: Path, img: Any, geom: Geometry, *, as_float: bool) -> np.ndarray:
    """Decode the voxels (once), squeeze a trailing singleton axis and reorient to RAS."""
    import nibabel.orientations as nio

    try:
        data = img.get_fdata(dtype=np.float32) if as_float else np.asanyarray(img.dataobj)
    except Exception as exc:  # truncated gzip: EOFError, zlib.error, OSError, ValueError...
        raise _bad(case_id, path, f"corrupt or truncated file ({type(exc).__name__}: {exc})") from exc
    data = np.asarray(data).reshape(geom.original_shape)
    if data.dtype.kind == "f" and not np.all(np.isfinite(data)):
        raise _bad(case_id, path, "contains NaN or infinite values")
    return np.ascontiguousarray(nio.apply_orientation(data, geom.to_ras))


def check_same_grid(case_id: str, files: Sequence[tuple[Path, Geometry]]) -> None:
    ref_path, ref = files[0]
    for path, geom in files[1:]:
        if geom.ras_shape != ref.ras_shape:
            raise _bad(
                case_id,
                path,
                f"shape {geom.original_shape} (RAS {geom.ras_shape}) disagrees with {ref_path.name}, "
                f"shape {ref.original_shape} (RAS {ref.ras_shape})",
            )
        if not geom.same_grid(ref):
            raise _bad(
                case_id,
                path,
                f"affine disagrees with {ref_path.name} (after reorientation to RAS, tolerance "
                f"{AFFINE_ATOL_MM} mm):\n{geom.ras_affine}\nvs\n{ref.ras_affine}",
            )


def normalize_nonzero(array: np.ndarray) -> np.ndarray:
    """Z-score each channel of a ``(C, ...)`` float32 array over its nonzero voxels, in place; zeros stay 0.

    Equal (to float32 rounding) to MONAI's ``NormalizeIntensity(nonzero=True, channel_wise=True)``: population
    std, a std of 0 counts as 1, an all-zero channel is left unchanged.
    """
    if array.dtype != np.float32:
        raise ValueError(f"normalize_nonzero expects float32, got {array.dtype}")
    if not array.flags.c_contiguous or not array.flags.writeable:
        raise ValueError("normalize_nonzero works in place: array must be C-contiguous and writeable")
    block = 1 << 20
    for channel in array:
        flat = channel.reshape(-1)  # a view: channels of a C-contiguous array are contiguous
        mask = flat != 0
        count = int(np.count_nonzero(mask))
        if count == 0:
            continue
        mean = float(flat.sum(dtype=np.float64)) / count  # zeros add nothing to the sum
        centred = flat - np.float32(mean)
        centred *= mask
        # float32 dot products per block, accumulated in float64: ~1e-7 relative error, 3x faster than masking
        sq = sum(float(np.dot(centred[i : i + block], centred[i : i + block])) for i in range(0, flat.size, block))
        std = float(np.sqrt(sq / count))
        np.multiply(centred, np.float32(1.0 / (std if std > 0 else 1.0)), out=flat)
    return array


def _freeze(*arrays: np.ndarray) -> None:
    for a in arrays:
        a.flags.writeable = False


# ---------------------------------------------------------------------------------------------- images
def load_images(
    case: BratsCase,
    modalities: Sequence[str] | None = None,
    *,
    cache: ArrayCache | None = None,
    normalize: bool = True,
) -> LoadedImages:
    """Load (or fetch from ``cache``) the images of ``modalities`` (default: all the case has).

    Returns:
        :class:`LoadedImages` with ``array`` ``(C, X, Y, Z)`` float32 RAS, z-scored per channel if
        ``normalize``. Each file is decoded once.

    Raises:
        DataError: a file is missing, unreadable or truncated, or the modalities' grids disagree.
    """
    mods = tuple(canonical_modality(m) for m in modalities) if modalities is not None else case.modalities
    if not mods:
        raise ValueError(f"modalities must name at least one modality; case {case.case_id} has {case.modalities}")
    if len(set(mods)) != len(mods):
        raise ValueError(f"modalities must not repeat, got {list(mods)}")
    paths = [case.image_path(m) for m in mods]

    def load() -> dict[str, np.ndarray]:
        opened = [(p, *_open(case.case_id, p)) for p in paths]
        check_same_grid(case.case_id, [(p, g) for p, _, g in opened])
        geom = opened[0][2]
        array = np.empty((len(mods), *geom.ras_shape), dtype=np.float32)
        for c, (p, img, g) in enumerate(opened):
            array[c] = _decode(case.case_id, p, img, g, as_float=True)
        if normalize:
            normalize_nonzero(array)
        return {
            "array": array,
            "affine_ras": geom.ras_affine,
            "original_affine": geom.original_affine,
            "original_shape": np.asarray(geom.original_shape, dtype=np.int64),
        }

    key = ("images", LOADER_VERSION, case.case_id, mods, normalize, *(file_signature(p) for p in paths))
    bundle = cache.get_or_load(key, load) if cache is not None else load()
    _freeze(*bundle.values())
    return LoadedImages(
        case_id=case.case_id,
        modalities=mods,
        array=bundle["array"],
        affine_ras=bundle["affine_ras"],
        original_affine=bundle["original_affine"],
        original_shape=tuple(int(s) for s in bundle["original_shape"]),  # type: ignore[arg-type]
    )


# ---------------------------------------------------------------------------------------------- labels
def _validate_labels(case: BratsCase, path: Path, data: np.ndarray) -> np.ndarray:
    """Check a decoded segmentation holds only the layout's label values; return it as uint8."""
    allowed = sorted(case.label_values)
    if data.dtype.kind == "f":
        lo, hi = float(data.min(initial=0)), float(data.max(initial=0))
        ints = data.astype(np.int64) if -(2**31) < lo and hi < 2**31 else None
        if ints is None or not np.array_equal(ints, data):
            frac = data[data != np.round(data)]
            example = float(frac.flat[0]) if frac.size else lo
            raise _bad(case.case_id, path, f"label map has non-integer values (e.g. {example}); allowed {allowed}")
        data = ints
    elif data.dtype.kind not in "iub":
        raise _bad(case.case_id, path, f"label map has dtype {data.dtype}; expected integers {allowed}")
    lo, hi = int(data.min(initial=0)), int(data.max(initial=0))
    if lo < 0 or hi > 255:
        bad = sorted({v for v in (lo, hi) if v not in case.label_values})
        raise _bad(
            case.case_id,
            path,
            f"label values {bad} are outside the known set {allowed} of the {case.layout.value} layout "
            f"(ET = {case.et_label})",
            bad_values=bad,
        )
    u8 = data.astype(np.uint8, copy=False)
    present = np.flatnonzero(np.bincount(u8.ravel(), minlength=256))
    bad = [int(v) for v in present if int(v) not in case.label_values]
    if bad:
        raise _bad(
            case.case_id,
            path,
            f"label values {bad} are outside the known set {allowed} of the {case.layout.value} layout "
            f"(ET = {case.et_label})",
            bad_values=bad,
        )
    return np.ascontiguousarray(u8)


def load_labels(
    case: BratsCase, *, cache: ArrayCache | None = None, reference: LoadedImages | None = None
) -> LoadedLabels:
    """Load (or fetch from ``cache``) the case's segmentation as a checked ``(X, Y, Z)`` uint8 RAS label map.

    Args:
        reference: images of the same case; if given, the segmentation's RAS grid must match theirs.

    Raises:
        DataError: the segmentation is missing, unreadable, truncated, on another grid than ``reference``, or
            holds a label value outside the layout's set.
    """
    path = case.seg_path()

    def load() -> dict[str, np.ndarray]:
        img, geom = _open(case.case_id, path)
        labels = _validate_labels(case, path, _decode(case.case_id, path, img, geom, as_float=False))
        return {
            "label_map": labels,
            "affine_ras": geom.ras_affine,
            "original_affine": geom.original_affine,
            "original_shape": np.asarray(geom.original_shape, dtype=np.int64),
        }

    key = ("labels", LOADER_VERSION, case.case_id, file_signature(path))
    bundle = cache.get_or_load(key, load) if cache is not None else load()
    _freeze(*bundle.values())
    out = LoadedLabels(
        case_id=case.case_id,
        label_map=bundle["label_map"],
        et_label=case.et_label,
        affine_ras=bundle["affine_ras"],
        original_affine=bundle["original_affine"],
        original_shape=tuple(int(s) for s in bundle["original_shape"]),  # type: ignore[arg-type]
    )
    if reference is not None:
        if out.label_map.shape != reference.spatial_shape or not np.allclose(
            out.affine_ras, reference.affine_ras, rtol=0.0, atol=AFFINE_ATOL_MM
        ):
            raise _bad(
                case.case_id,
                path,
                f"segmentation grid (RAS shape {out.label_map.shape}) disagrees with the images' grid "
                f"(RAS shape {reference.spatial_shape}) or affine",
            )
    return out


def load_label_map(case: BratsCase, *, cache: ArrayCache | None = None) -> np.ndarray:
    """The case's label map, ``(X, Y, Z)`` uint8 RAS, values as in the file; see :func:`load_labels`."""
    return load_labels(case, cache=cache).label_map


def labels_to_regions(label_map: np.ndarray, et_label: int) -> np.ndarray:
    """``(..., X, Y, Z)`` label map -> ``(3, X, Y, Z)`` uint8 region channels ``[TC, WT, ET]``.

    Uses MONAI's ``ConvertToMultiChannelBasedOnBratsClasses(et_label)``: TC = {1, ET}, WT = {1, 2, ET},
    ET = {ET}. A leading singleton channel axis is accepted.
    """
    if et_label not in (3, 4):
        raise ValueError(f"et_label must be 4 (BraTS 2018-2022) or 3 (BraTS 2023), got {et_label}")
    from monai.transforms import ConvertToMultiChannelBasedOnBratsClasses

    regions = ConvertToMultiChannelBasedOnBratsClasses(et_label=et_label)(np.asarray(label_map))
    return np.asarray(regions).astype(np.uint8)


def regions_to_labels(regions: np.ndarray, et_label: int, threshold: float = 0.5) -> np.ndarray:
    """``(3, X, Y, Z)`` region channels ``[TC, WT, ET]`` (probabilities or 0/1) -> ``(X, Y, Z)`` uint8 label map.

    The usual BraTS post-processing: WT voxels get 2 (edema), TC voxels 1 (core), ET voxels ``et_label``.
    """
    if et_label not in (3, 4):
        raise ValueError(f"et_label must be 4 (BraTS 2018-2022) or 3 (BraTS 2023), got {et_label}")
    regions = np.asarray(regions)
    if regions.ndim < 2 or regions.shape[0] != 3:
        raise ValueError(f"regions must have shape (3, X, Y, Z) with channels [TC, WT, ET], got {regions.shape}")
    tc, wt, et = (regions[i] > threshold for i in range(3))
    out = np.zeros(regions.shape[1:], dtype=np.uint8)
    out[wt] = 2
    out[tc] = 1
    out[et] = et_label
    return out


def load_regions(case: BratsCase, *, cache: ArrayCache | None = None) -> np.ndarray:
    """The case's ``(3, X, Y, Z)`` uint8 region channels ``[TC, WT, ET]`` with the case's ET label."""
    return labels_to_regions(load_label_map(case, cache=cache), case.et_label)


# ---------------------------------------------------------------------------------------------- writing
def save_segmentation(label_map_ras: np.ndarray, reference: BratsCase | Path | str, out_path: Path | str) -> Path:
    """Write a ``(X, Y, Z)`` RAS label map as a uint8 NIfTI on the reference's original grid and affine.

    Args:
        label_map_ras: the label map in RAS orientation (as this module returns arrays).
        reference: a case (its segmentation if present, else its first image) or a NIfTI file of that case;
            the written file has exactly its shape, affine, qform/sform codes and units (the reorientation to
            RAS is undone).
        out_path: the file to write (``.nii`` or ``.nii.gz``); parent folders are created.
    """
    if isinstance(reference, BratsCase):
        ref_path = reference.seg if reference.seg is not None else reference.image_path(reference.modalities[0])
        case_id = reference.case_id
    else:
        ref_path = Path(reference)
        case_id = ref_path.parent.name
    img, geom = _open(case_id, ref_path)
    return write_segmentation(
        label_map_ras, geom, out_path, qform_code=int(img.header["qform_code"]),
        sform_code=int(img.header["sform_code"]), units=img.header.get_xyzt_units(), source=str(ref_path),
    )


def write_segmentation(
    label_map_ras: np.ndarray,
    geometry: Geometry,
    out_path: Path | str,
    *,
    qform_code: int = 1,
    sform_code: int = 1,
    units: tuple[str, str] = ("mm", "sec"),
    source: str = "the reference grid",
) -> Path:
    """Write a ``(X, Y, Z)`` RAS label map as a uint8 NIfTI on ``geometry``'s original grid and affine, with the
    given qform/sform codes (e.g. those a site reported for a case that has no label file)."""
    import nibabel as nib

    label_map_ras = np.asarray(label_map_ras)
    if label_map_ras.shape != geometry.ras_shape:
        raise ValueError(
            f"label_map_ras has shape {label_map_ras.shape}, but {source} has RAS shape {geometry.ras_shape}"
        )
    if label_map_ras.dtype.kind == "f" and not np.array_equal(label_map_ras, np.round(label_map_ras)):
        raise ValueError("label_map_ras must hold integer label values")
    if label_map_ras.size and (label_map_ras.min() < 0 or label_map_ras.max() > 255):
        raise ValueError("label_map_ras values must be in 0..255")
    data = geometry.to_original(label_map_ras.astype(np.uint8))
    out = nib.Nifti1Image(data, geometry.original_affine)
    out.set_data_dtype(np.uint8)
    out.header.set_xyzt_units(*units)
    out.set_qform(geometry.original_affine, code=int(qform_code))
    out.set_sform(geometry.original_affine, code=int(sform_code))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(out, str(out_path))
    return out_path
