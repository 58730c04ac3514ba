"""Case grids (what a site reports about a case) and writing segmentations with the source's header codes."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from splitunet.data.grid import CaseGrid, axial_extent, brain_slices, case_grid, combine_grids
from splitunet.data.layout import discover_cases
from splitunet.data.loader import load_images, save_segmentation, write_segmentation
from splitunet.errors import DataError


def _grid(**overrides) -> CaseGrid:
    values = {"shape": (24, 24, 16), "affine": tuple(map(tuple, np.eye(4))), "brain_z": (2, 10)}
    return CaseGrid(**(values | overrides))


def test_axial_extent_and_brain_slices():
    volume = np.zeros((2, 4, 4, 10), dtype=np.float32)
    volume[1, 2, 2, 3] = 1.0
    volume[0, 0, 1, 6] = -2.0
    assert axial_extent(volume) == (3, 6)
    assert axial_extent(np.zeros((1, 4, 4, 10))) is None
    assert brain_slices((3, 6)).tolist() == [3, 4, 5, 6]
    assert brain_slices(None) is None
    with pytest.raises(ValueError, match=r"\(C, X, Y, Z\)"):
        axial_extent(np.zeros((4, 4, 10)))


def test_combine_grids_checks_agreement_and_unites_extents():
    combined = combine_grids("c", {"a": _grid(brain_z=(2, 10)), "b": _grid(brain_z=(1, 9)), "c": _grid(brain_z=None)})
    assert combined.brain_z == (1, 10)
    moved = np.eye(4)
    moved[0, 3] = 5.0
    with pytest.raises(DataError, match="site 'b'.*site 'a'.*one grid"):
        combine_grids("c", {"a": _grid(), "b": _grid(affine=tuple(map(tuple, moved)))})
    with pytest.raises(DataError, match="layout"):
        combine_grids("c", {"a": _grid(), "b": _grid(layout="brats2023")})
    with pytest.raises(DataError, match="no site"):
        combine_grids("c", {})
    with pytest.raises(ValueError, match="brain_z"):
        _grid(brain_z=(5, 2))


def test_a_site_grid_describes_the_file(tmp_path, brats):
    case_dir = brats.write_case(tmp_path, 0, orientation="LPS", modalities=("t2",), seg=False)
    case = discover_cases(tmp_path)[case_dir.name]
    grid = case_grid(case, ("t2",))
    source = nib.load(str(case.image_path("t2")))
    assert grid.shape == source.shape
    np.testing.assert_allclose(np.asarray(grid.affine), source.affine)
    assert grid.geometry().ras_shape == brats.SHAPE
    assert grid.brain_z == axial_extent(load_images(case, ["t2"]).array)


@pytest.mark.parametrize(("qform", "sform"), [(2, 4), (1, 0)])
def test_save_segmentation_keeps_the_source_codes(tmp_path, brats, qform, sform):
    path = tmp_path / "ref.nii.gz"
    img = nib.Nifti1Image(np.zeros(brats.SHAPE, dtype=np.uint8), brats.RAS_AFFINE)
    img.set_qform(brats.RAS_AFFINE, code=qform)
    img.set_sform(brats.RAS_AFFINE, code=sform)
    nib.save(img, str(path))
    labels = np.zeros(brats.SHAPE, dtype=np.uint8)
    labels[3:5, 4:6, 2:3] = 2
    out = nib.load(str(save_segmentation(labels, path, tmp_path / "out.nii.gz")))
    assert (int(out.header["qform_code"]), int(out.header["sform_code"])) == (qform, sform)
    np.testing.assert_allclose(out.affine, brats.RAS_AFFINE)
    assert np.array_equal(np.asarray(out.dataobj), labels)


def test_write_segmentation_on_a_reported_grid(tmp_path, brats):
    case_dir = brats.write_case(tmp_path, 1, orientation="LPS", modalities=("t1",), seg=False)
    case = discover_cases(tmp_path)[case_dir.name]
    grid = case_grid(case, ("t1",)).model_copy(update={"sform_code": 2})
    labels = np.zeros(brats.SHAPE, dtype=np.uint8)
    labels[2, 3, 4] = 4
    out = nib.load(str(write_segmentation(labels, grid.geometry(), tmp_path / "o.nii.gz", sform_code=2)))
    assert out.shape == nib.load(str(case.image_path("t1"))).shape
    assert int(out.header["sform_code"]) == 2
    assert np.array_equal(np.asarray(nib.as_closest_canonical(out).dataobj), labels)
    with pytest.raises(ValueError, match="RAS shape"):
        write_segmentation(labels[:-1], grid.geometry(), tmp_path / "bad.nii.gz")
