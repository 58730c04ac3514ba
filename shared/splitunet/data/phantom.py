"""Phantom BraTS cohort: multi-modal brain MRI with a glioma, built on real anatomy that ships with nilearn.

Every case starts from the MNI ICBM152 2009a template (T1, grey- and white-matter maps; see
:mod:`splitunet.data.mni` and ``docs/phantom.md`` for origin and licence), read offline from the installed
nilearn package. Per case, deterministically from ``(seed, case index)``:

1. a random smooth deformation, template -> subject: rotation (up to 6 degrees per axis), anisotropic scaling
   (brain size 0.85-1.03 of the template), translation (up to 4 mm) and an elastic displacement (cubic-spline
   field on a 6 x 6 x 5 control grid, sd 2.5 mm, at most 8 mm), sampled trilinearly;
2. a tumour centred in white matter: edema (label 2) around an enhancing rim (ET: label 4 for ``brats2021``,
   3 for ``brats2023``) around a necrotic core (label 1). Each boundary is an ellipsoid perturbed by its own
   smooth random field (the edema reaches further along white matter); the radii are clamped so that the
   boundaries stay more than one voxel apart, so the regions are strictly nested (a 6-neighbour of necrosis is
   core, a 6-neighbour of core is edema) and the core with its neighbours lies inside the brain mask;
3. four contrasts from the tissue fractions plus the template's T1 texture: T1 (the template T1), T1ce (T1
   with a bright enhancing rim), T2 (bright CSF, bright edema and necrosis), FLAIR (bright edema, dark CSF);
4. a smooth multiplicative bias field and Rician noise per modality; every voxel outside the brain is 0
   (skull-stripped like BraTS) and every voxel inside is at least 1, so ``image != 0`` is the brain mask.

Geometry: the field of view is BraTS's 240 x 240 x 155 mm around the brain; ``shape`` sets the number of voxels
(spacing ``fov / shape``: 1 mm at the default 240 x 240 x 155). Arrays are ``(X, Y, Z)``. The default
orientation is ``LPS`` like the BraTS releases (voxel axes run right->left, anterior->posterior,
inferior->superior; ``nibabel.aff2axcodes(affine) == ('L', 'P', 'S')``); ``RAS`` gives the same volumes with
the first two axes flipped and the affine adjusted, both describing the same world (MNI, RAS mm) positions.

Files: images int16 (the float32 arrays of :class:`PhantomCase` hold exactly these integers), segmentation
uint8, written with nibabel, qform and sform code 1, units mm. The model itself is in
:mod:`splitunet.data.phantom_model`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType

import numpy as np

from splitunet.config import MODALITIES
from splitunet.data.layout import SEG, BratsLayout, parse_option
from splitunet.data.mni import MniAnatomy
from splitunet.data.phantom_model import Deformation, Tumour, contrast

logger = logging.getLogger(__name__)

#: BraTS's volume shape (voxels) and field of view (mm, 1 mm voxels).
BRATS_SHAPE: tuple[int, int, int] = (240, 240, 155)
BRATS_FOV_MM: tuple[float, float, float] = (240.0, 240.0, 155.0)
#: Allowed range of each side of ``shape``.
MIN_SIDE, MAX_SIDE = 24, 512
#: Largest case index a BraTS-style id (five digits) can hold.
MAX_CASE_INDEX = 99_999
#: Seed of the audit's public auxiliary cohort (:class:`splitunet.auditing.cohorts.PublicCohort`). No federation
#: cohort is written from it (:func:`write_cohort` refuses it), so the public cohort is disjoint from every
#: phantom federation: the prior and the learned attack's training images never include a federation's case.
PUBLIC_SEED = 0x5EED_A0D1


class Orientation(StrEnum):
    """Voxel axis orientation of the written arrays: ``LPS`` (like BraTS files) or ``RAS``."""

    LPS = "LPS"
    RAS = "RAS"


@dataclass(frozen=True, eq=False)
class PhantomCase:
    """One generated patient (treat the arrays as read-only).

    Attributes:
        images: canonical modality (``t1, t1ce, t2, flair``) -> float32 ``(X, Y, Z)`` intensities, integers in
            ``[1, 32767]`` inside the brain and 0 outside.
        label: uint8 ``(X, Y, Z)``: 0 background, 1 necrosis, 2 edema, ``et_label`` enhancing tumour.
        affine: ``(4, 4)`` float64 voxel index -> world (RAS, mm).
        brain_mask: bool ``(X, Y, Z)``, equal to ``image != 0`` for every modality.
        tissue: ``gm``, ``wm``, ``csf`` -> float32 ``(X, Y, Z)`` tissue fractions in [0, 1] of the deformed
            template (ignoring the tumour), 0 outside the brain mask.
        et_label: 4 (``brats2021``) or 3 (``brats2023``).
        tumour_center: voxel index of the tumour's centre.
    """

    images: Mapping[str, np.ndarray]
    label: np.ndarray
    affine: np.ndarray
    brain_mask: np.ndarray
    tissue: Mapping[str, np.ndarray]
    et_label: int
    tumour_center: tuple[int, int, int]


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    """``shape`` as a tuple of three ints in ``[MIN_SIDE, MAX_SIDE]``, else a ``ValueError``."""
    try:
        values = tuple(shape)
    except TypeError:
        values = ()
    if len(values) != 3 or not all(_is_int(s) and MIN_SIDE <= s <= MAX_SIDE for s in values):
        raise ValueError(f"shape must be three integers X,Y,Z in [{MIN_SIDE}, {MAX_SIDE}], got {shape!r}")
    return int(values[0]), int(values[1]), int(values[2])


def output_spacing(shape: Sequence[int]) -> tuple[float, float, float]:
    """Voxel size (mm) of a phantom of this shape: BraTS's field of view divided by ``shape``."""
    x, y, z = check_shape(shape)
    return (BRATS_FOV_MM[0] / x, BRATS_FOV_MM[1] / y, BRATS_FOV_MM[2] / z)


def case_id(index: int, layout: BratsLayout | str = BratsLayout.BRATS2021) -> str:
    """The BraTS-style id of case ``index``: ``BraTS2021_00042`` or ``BraTS-GLI-00042-000``."""
    layout = parse_option(BratsLayout, layout, "layout")
    if not 0 <= index <= MAX_CASE_INDEX:
        raise ValueError(f"case index must be in [0, {MAX_CASE_INDEX}], got {index}")
    return f"BraTS2021_{index:05d}" if layout is BratsLayout.BRATS2021 else f"BraTS-GLI-{index:05d}-000"


def case_rng(seed: int, index: int) -> np.random.Generator:
    """The random generator of case ``index`` of the cohort ``seed`` (independent streams per case)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))


def make_case(
    seed: int | Sequence[int] | np.random.Generator,
    shape: Sequence[int] = BRATS_SHAPE,
    *,
    layout: BratsLayout | str = BratsLayout.BRATS2021,
    orientation: Orientation | str = Orientation.LPS,
    anatomy: MniAnatomy | None = None,
) -> PhantomCase:
    """Generate one phantom case.

    Args:
        seed: an int or int sequence (seeds ``numpy.random.default_rng``) or a generator (consumed).
        shape: ``(X, Y, Z)`` voxels over BraTS's 240 x 240 x 155 mm field of view.
        layout: ``brats2021`` (ET label 4) or ``brats2023`` (ET label 3).
        orientation: ``LPS`` (like BraTS files) or ``RAS``; the same seed gives the same anatomy in both.
        anatomy: the template prepared for this shape's spacing (``MniAnatomy.load(output_spacing(shape))``);
            loaded here if omitted. Pass it when generating many cases.
    """
    import torch
    import torch.nn.functional as F

    shape = check_shape(shape)
    layout = parse_option(BratsLayout, layout, "layout")
    orientation = parse_option(Orientation, orientation, "orientation")
    spacing = np.asarray(output_spacing(shape))
    if anatomy is None:
        anatomy = MniAnatomy.load(tuple(spacing))
    elif not np.allclose(anatomy.output_spacing_mm, spacing):
        raise ValueError(
            f"anatomy was prepared for spacing {anatomy.output_spacing_mm} mm, but shape {shape} needs "
            f"{tuple(spacing)}; use MniAnatomy.load(output_spacing(shape))"
        )
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    dims = np.asarray(shape)
    origin = anatomy.brain_center_world - spacing * (dims - 1) / 2.0  # world of voxel (0, 0, 0), RAS grid

    deform = Deformation.sample(rng)
    lo, hi = deform.tighten(anatomy, origin, spacing, dims, *deform.crop(anatomy, origin, spacing, dims))
    grid = deform.sampling_grid(anatomy, origin, spacing, dims, lo, hi)
    with torch.no_grad():
        sampled = F.grid_sample(anatomy.volume, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    texture, gm, wm, csf = sampled[0].numpy()
    mask = (gm + wm + csf) > 0.5
    tumour = Tumour.sample(rng, wm, mask, spacing, layout.et_label)

    # Contrasts are computed on the brain voxels only (a 1-D vector in C order of the crop).
    voxels = np.nonzero(mask)
    tissue = np.stack([texture[mask], gm[mask], wm[mask], csf[mask]])
    position = np.full(mask.shape, -1, dtype=np.int32)
    position[mask] = np.arange(tissue.shape[1], dtype=np.int32)
    in_box = mask[tumour.box]
    tumour_at = (position[tumour.box][in_box], tumour.weights[:, in_box])
    values = {m: contrast(rng, m, anatomy, tissue, voxels, tumour_at, lo, dims) for m in MODALITIES}

    # Assemble full volumes, writing the crop straight into its place in the requested orientation.
    flip = orientation is Orientation.LPS
    region = tuple(
        slice(int(dims[d] - 1 - hi[d]), int(dims[d] - lo[d])) if flip and d < 2 else slice(int(lo[d]), int(hi[d] + 1))
        for d in range(3)
    )
    view = (slice(None, None, -1), slice(None, None, -1), slice(None)) if flip else (slice(None),) * 3

    def place(crop: np.ndarray, dtype: type) -> np.ndarray:
        full = np.zeros(shape, dtype=dtype, order="F")  # NIfTI's order: written without a transposition
        full[region] = crop[view]
        return full

    def scatter(vector: np.ndarray) -> np.ndarray:
        crop = np.zeros(mask.shape, dtype=np.float32)
        crop[mask] = vector
        return place(crop, np.float32)

    label_crop = np.zeros(mask.shape, dtype=np.uint8)
    label_crop[tumour.box] = tumour.label
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    center = np.asarray(tumour.center) + lo
    if flip:
        to_lps = np.diag([-1.0, -1.0, 1.0, 1.0])
        to_lps[:2, 3] = dims[:2] - 1
        affine = affine @ to_lps
        center[:2] = dims[:2] - 1 - center[:2]
    return PhantomCase(
        images=MappingProxyType({m: scatter(v) for m, v in values.items()}),
        label=place(label_crop, np.uint8),
        affine=affine,
        brain_mask=place(mask, np.bool_),
        tissue=MappingProxyType({"gm": scatter(tissue[1]), "wm": scatter(tissue[2]), "csf": scatter(tissue[3])}),
        et_label=layout.et_label,
        tumour_center=(int(center[0]), int(center[1]), int(center[2])),
    )


def write_case(
    case: PhantomCase,
    directory: Path,
    case_name: str,
    layout: BratsLayout | str = BratsLayout.BRATS2021,
    *,
    compress: bool = True,
) -> dict[str, Path]:
    """Write one case as BraTS files ``directory/<case_name>/<case_name>{_|-}<suffix>.nii[.gz]``.

    Returns canonical modality (and ``"seg"``) -> path written.
    """
    import nibabel as nib

    layout = parse_option(BratsLayout, layout, "layout")
    case_dir = Path(directory) / case_name
    case_dir.mkdir(parents=True, exist_ok=True)
    ext = ".nii.gz" if compress else ".nii"
    written: dict[str, Path] = {}
    arrays: dict[str, tuple[np.ndarray, type]] = {m: (case.images[m], np.int16) for m in MODALITIES}
    arrays[SEG] = (case.label, np.uint8)
    for kind, (array, dtype) in arrays.items():
        path = case_dir / f"{case_name}{layout.separator}{layout.suffixes[kind]}{ext}"
        img = nib.Nifti1Image(array.astype(dtype), case.affine)
        img.header.set_xyzt_units("mm")
        img.set_qform(case.affine, code=1)
        img.set_sform(case.affine, code=1)
        nib.save(img, path)
        written[kind] = path
    return written


def write_cohort(
    out: Path,
    cases: int,
    seed: int = 0,
    layout: BratsLayout | str = BratsLayout.BRATS2021,
    shape: Sequence[int] = BRATS_SHAPE,
    start_index: int = 0,
    *,
    orientation: Orientation | str = Orientation.LPS,
    compress: bool = True,
    anatomy: MniAnatomy | None = None,
    on_case: Callable[[str], None] | None = None,
) -> list[str]:
    """Write ``cases`` phantom cases in BraTS layout under ``out``; return their ids in order.

    Case ``i`` (``start_index <= i < start_index + cases``) is ``make_case(case_rng(seed, i), ...)``, so a
    cohort can be written in chunks, and ``(seed, i)`` always gives the same arrays. ``on_case(case_id)`` is
    called after each case is written (progress bars).
    """
    for name, value, low in (("cases", cases, 1), ("seed", seed, 0), ("start_index", start_index, 0)):
        if not _is_int(value) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if start_index + cases - 1 > MAX_CASE_INDEX:
        raise ValueError(f"start_index + cases - 1 must be <= {MAX_CASE_INDEX}, got {start_index + cases - 1}")
    if seed == PUBLIC_SEED:
        raise ValueError(f"seed {PUBLIC_SEED} is the audit's public cohort's (its prior must be disjoint from any "
                         "federation); choose another seed")
    layout = parse_option(BratsLayout, layout, "layout")
    orientation = parse_option(Orientation, orientation, "orientation")
    shape = check_shape(shape)
    if anatomy is None:
        anatomy = MniAnatomy.load(output_spacing(shape))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ids: list[str] = []
    for index in range(start_index, start_index + cases):
        cid = case_id(index, layout)
        case = make_case(case_rng(seed, index), shape, layout=layout, orientation=orientation, anatomy=anatomy)
        write_case(case, out, cid, layout, compress=compress)
        logger.debug("phantom case %s written to %s", cid, out / cid)
        ids.append(cid)
        if on_case is not None:
            on_case(cid)
    logger.info(
        "wrote %d phantom cases (%s, %s, shape %s, seed %d) to %s", cases, layout, orientation, shape, seed, out
    )
    return ids
