"""Shared test fixtures: tiny BraTS-layout NIfTI cases generated on the fly (never committed data).

A case is a 24x24x16 RAS volume: an ellipsoidal "brain" with a different smooth intensity per modality and a
spherical tumour (edema 2, enhancing shell = ET, necrotic centre 1). The same voxels can be written in any
orientation (the file's data and affine are reoriented together, so the scan is physically the same), as
``.nii`` or ``.nii.gz``, in the 2021 or the 2023 layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import nibabel.orientations as nio
import numpy as np
import pytest
from security_ledger import ledger_configure, ledger_summary, security  # noqa: F401 - the `security` fixture

from splitunet.config import MODALITIES

SHAPE = (24, 24, 16)
SUFFIX_2021 = {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair", "seg": "seg"}
SUFFIX_2023 = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f", "seg": "seg"}
#: A RAS affine with 1 mm voxels and a non-trivial origin.
RAS_AFFINE = np.array([[1.0, 0.0, 0.0, -12.0], [0.0, 1.0, 0.0, -14.0], [0.0, 0.0, 1.0, -6.0], [0.0, 0.0, 0.0, 1.0]])


def case_id_for(index: int, layout: str) -> str:
    return f"BraTS2021_{index:05d}" if layout == "brats2021" else f"BraTS-GLI-{index:05d}-000"


def make_volumes(seed: int = 0, shape: Sequence[int] = SHAPE) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """RAS images (float32, 0 outside the brain) per canonical modality and a 2021-convention label map."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.arange(s, dtype=np.float64) for s in shape), indexing="ij")
    c = [(s - 1) / 2 for s in shape]
    brain = ((x - c[0]) / (shape[0] * 0.42)) ** 2 + ((y - c[1]) / (shape[1] * 0.45)) ** 2 + (
        (z - c[2]) / (shape[2] * 0.45)
    ) ** 2 <= 1.0
    tc = (c[0] + 3 + rng.integers(-1, 2), c[1] - 2 + rng.integers(-1, 2), c[2] + rng.integers(-1, 2))
    r = np.sqrt((x - tc[0]) ** 2 + (y - tc[1]) ** 2 + (z - tc[2]) ** 2)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[(r <= 4.5) & brain] = 2
    labels[(r <= 2.8) & brain] = 4
    labels[(r <= 1.2) & brain] = 1
    images = {}
    for k, m in enumerate(MODALITIES):
        base = 100.0 + 40.0 * k + 10.0 * np.sin(x / 3.0 + k) + 5.0 * np.cos(y / 4.0) + 3.0 * z / shape[2]
        vol = base + rng.normal(0.0, 2.0, size=shape) + 30.0 * (labels > 0) * (k + 1)
        images[m] = np.where(brain, vol, 0.0).astype(np.float32)
    return images, labels


def reorient(data: np.ndarray, affine: np.ndarray, axcodes: str) -> tuple[np.ndarray, np.ndarray]:
    """The same physical image stored with voxel axes ``axcodes`` (e.g. ``"LPS"``): ``(data, affine)``."""
    img = nib.Nifti1Image(data, affine)
    out = img.as_reoriented(nio.ornt_transform(nio.io_orientation(affine), nio.axcodes2ornt(tuple(axcodes))))
    return np.asarray(out.dataobj), out.affine


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray, axcodes: str = "RAS") -> Path:
    """Save ``data`` (given in RAS on ``affine``) in orientation ``axcodes``."""
    arr, aff = reorient(data, affine, axcodes) if axcodes != "RAS" else (data, affine)
    img = nib.Nifti1Image(np.ascontiguousarray(arr), aff)
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def write_case(
    root: Path,
    index: int = 0,
    layout: str = "brats2021",
    *,
    seed: int | None = None,
    shape: Sequence[int] = SHAPE,
    orientation: str = "RAS",
    ext: str = ".nii.gz",
    modalities: Sequence[str] = MODALITIES,
    seg: bool = True,
    labels: np.ndarray | None = None,
    case_id: str | None = None,
) -> Path:
    """Write one case folder under ``root`` and return it. ``labels`` (2021 convention, RAS) overrides the
    generated label map; in the 2023 layout ET 4 is written as 3."""
    cid = case_id or case_id_for(index, layout)
    images, gen_labels = make_volumes(seed if seed is not None else index, shape)
    lab = gen_labels if labels is None else labels
    suffix, sep = (SUFFIX_2021, "_") if layout == "brats2021" else (SUFFIX_2023, "-")
    if layout == "brats2023":
        lab = np.where(lab == 4, 3, lab).astype(np.uint8)
    case_dir = root / cid
    for m in modalities:
        save_nifti(case_dir / f"{cid}{sep}{suffix[m]}{ext}", images[m], RAS_AFFINE, orientation)
    if seg:
        save_nifti(case_dir / f"{cid}{sep}seg{ext}", lab.astype(np.uint8), RAS_AFFINE, orientation)
    return case_dir


def write_cohort(root: Path, n: int, layout: str = "brats2021", **kwargs: object) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    return [write_case(root, i, layout, **kwargs).name for i in range(n)]  # type: ignore[arg-type]


class BratsFactory:
    """The helpers of this module, handed to tests by the ``brats`` fixture."""

    SHAPE = SHAPE
    RAS_AFFINE = RAS_AFFINE
    case_id_for = staticmethod(case_id_for)
    make_volumes = staticmethod(make_volumes)
    reorient = staticmethod(reorient)
    save_nifti = staticmethod(save_nifti)
    write_case = staticmethod(write_case)
    write_cohort = staticmethod(write_cohort)


@pytest.fixture(scope="session")
def brats() -> type[BratsFactory]:
    """Generators of tiny BraTS cases: ``brats.write_case``, ``write_cohort``, ``make_volumes``, ``save_nifti``."""
    return BratsFactory


def pytest_configure(config: pytest.Config) -> None:
    ledger_configure(config)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """``make test`` ends with the security summary (see ``security_ledger.py``)."""
    ledger_summary(terminalreporter, config)
