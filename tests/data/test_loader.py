"""Loader: RAS reorientation, normalisation, regions, bad input, on_bad_case, writing segmentations back."""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from splitunet.config import MODALITIES
from splitunet.data.cache import ArrayCache
from splitunet.data.cohort import scan_cohort
from splitunet.data.layout import discover_cases
from splitunet.data.loader import (
    labels_to_regions,
    load_images,
    load_label_map,
    load_labels,
    load_regions,
    normalize_nonzero,
    read_geometry,
    regions_to_labels,
    save_segmentation,
)
from splitunet.errors import DataError

ORIENTATIONS = ["RAS", "LPS", "PIR", "SAL"]


def _only(root: Path):
    (case,) = discover_cases(root).values()
    return case


@pytest.fixture
def reference(tmp_path: Path, brats):
    """Images, label map and regions of the RAS .nii.gz 2021 version of case 0."""
    case = _only(brats.write_case(tmp_path / "ref", 0).parent)
    images = load_images(case)
    return images, load_label_map(case), load_regions(case)


@pytest.mark.parametrize("orientation", ORIENTATIONS)
@pytest.mark.parametrize("ext", [".nii.gz", ".nii"])
@pytest.mark.parametrize("layout", ["brats2021", "brats2023"])
def test_same_case_gives_identical_arrays(tmp_path, brats, reference, orientation, ext, layout) -> None:
    ref_images, ref_labels, ref_regions = reference
    case = _only(brats.write_case(tmp_path / "x", 0, layout, orientation=orientation, ext=ext).parent)
    images = load_images(case)
    assert images.array.dtype == np.float32 and images.array.shape == (4, *brats.SHAPE)
    np.testing.assert_array_equal(images.array, ref_images.array)
    np.testing.assert_allclose(images.affine_ras, brats.RAS_AFFINE, atol=1e-6)
    assert images.modalities == MODALITIES
    regions = load_regions(case)
    assert regions.dtype == np.uint8 and regions.shape == (3, *brats.SHAPE)
    np.testing.assert_array_equal(regions, ref_regions)
    labels = load_label_map(case)
    expected = np.where(ref_labels == 4, 3, ref_labels) if layout == "brats2023" else ref_labels
    np.testing.assert_array_equal(labels, expected)


def test_phantom_cohort_same_arrays_across_layout_format_orientation(tmp_path) -> None:
    """The phantom writer's LPS .nii.gz 2021 case and its RAS .nii 2023 twin load identically."""
    from splitunet.data.phantom import write_cohort

    kw = {"cases": 1, "seed": 5, "shape": (40, 40, 28)}
    (a,) = write_cohort(tmp_path / "a", layout="brats2021", orientation="LPS", compress=True, **kw)
    (b,) = write_cohort(tmp_path / "b", layout="brats2023", orientation="RAS", compress=False, **kw)
    case_a, case_b = discover_cases(tmp_path / "a")[a], discover_cases(tmp_path / "b")[b]
    assert case_a.images["t1"].name.endswith(".nii.gz") and case_b.images["t1"].name.endswith("-t1n.nii")
    assert nib.aff2axcodes(nib.load(str(case_a.seg)).affine) == ("L", "P", "S")
    ia, ib = load_images(case_a), load_images(case_b)
    np.testing.assert_array_equal(ia.array, ib.array)
    np.testing.assert_allclose(ia.affine_ras, ib.affine_ras, atol=1e-5)
    ra, rb = load_regions(case_a), load_regions(case_b)
    np.testing.assert_array_equal(ra, rb)
    assert np.all(ra.reshape(3, -1).sum(axis=1) > 0)  # every region is present


def test_lps_file_is_really_flipped_on_disk(tmp_path, brats) -> None:
    case = _only(brats.write_case(tmp_path, 0, orientation="LPS").parent)
    raw = np.asarray(nib.load(str(case.images["t1"])).dataobj)
    ras = load_images(case, ["t1"], normalize=False).array[0]
    np.testing.assert_array_equal(raw[::-1, ::-1, :], ras)
    geom = read_geometry(case.case_id, case.images["t1"])
    assert nib.aff2axcodes(geom.original_affine) == ("L", "P", "S")
    assert nib.aff2axcodes(geom.ras_affine) == ("R", "A", "S")


def test_normalisation_matches_monai_and_keeps_background(tmp_path, brats) -> None:
    from monai.transforms import NormalizeIntensity

    case = _only(brats.write_case(tmp_path, 0).parent)
    raw = load_images(case, normalize=False).array
    norm = load_images(case).array
    expected = np.asarray(NormalizeIntensity(nonzero=True, channel_wise=True)(raw.copy()))
    np.testing.assert_allclose(norm, expected, atol=1e-5)
    for c in range(4):
        inside = raw[c] != 0
        assert np.all(norm[c][~inside] == 0)
        assert abs(norm[c][inside].mean()) < 1e-4 and abs(norm[c][inside].std() - 1) < 1e-4
    # an all-zero channel and a constant channel are handled as MONAI does
    odd = np.zeros((2, 4, 4, 4), np.float32)
    odd[1, 1:3] = 7.0
    out = normalize_nonzero(odd.copy())
    np.testing.assert_array_equal(out, np.asarray(NormalizeIntensity(nonzero=True, channel_wise=True)(odd.copy())))
    assert np.all(out == 0)


def test_modality_subset_and_order(tmp_path, brats) -> None:
    case = _only(brats.write_case(tmp_path, 0).parent)
    full = load_images(case)
    sub = load_images(case, ["t2f", "t1"])
    assert sub.modalities == ("flair", "t1")
    np.testing.assert_array_equal(sub.array, full.channels(["flair", "t1"]))
    with pytest.raises(ValueError, match="must not repeat"):
        load_images(case, ["t1", "t1n"])
    assert not full.array.flags.writeable


def test_region_channels() -> None:
    labels = np.array([0, 1, 2, 4, 3], dtype=np.uint8).reshape(1, 1, 5)
    r21 = labels_to_regions(labels, 4)
    # channels TC, WT, ET
    np.testing.assert_array_equal(r21[:, 0, 0], [[0, 1, 0, 1, 0], [0, 1, 1, 1, 0], [0, 0, 0, 1, 0]])
    r23 = labels_to_regions(labels, 3)
    np.testing.assert_array_equal(r23[:, 0, 0], [[0, 1, 0, 0, 1], [0, 1, 1, 0, 1], [0, 0, 0, 0, 1]])
    back = regions_to_labels(r21, 4)
    np.testing.assert_array_equal(back, [[[0, 1, 2, 4, 0]]])
    with pytest.raises(ValueError, match="et_label must be 4"):
        labels_to_regions(labels, 2)


# --------------------------------------------------------------------------------------------- bad input
def _expect_bad(case, match: str, file_name: str, seg: bool = False) -> None:
    with pytest.raises(DataError, match=match) as err:
        if seg:
            load_label_map(case)
        else:
            load_images(case)
    assert case.case_id in err.value.message and file_name in err.value.message
    assert err.value.detail["case_id"] == case.case_id and err.value.detail["file"].endswith(file_name)


def test_shape_mismatch(tmp_path, brats) -> None:
    d = brats.write_case(tmp_path, 0)
    images, _ = brats.make_volumes(0, (24, 24, 15))
    brats.save_nifti(d / f"{d.name}_t2.nii.gz", images["t2"], brats.RAS_AFFINE)
    _expect_bad(_only(tmp_path), r"shape \(24, 24, 15\).*disagrees", f"{d.name}_t2.nii.gz")


def test_affine_mismatch(tmp_path, brats) -> None:
    d = brats.write_case(tmp_path, 0)
    images, _ = brats.make_volumes(0)
    shifted = brats.RAS_AFFINE.copy()
    shifted[0, 3] += 2.0
    brats.save_nifti(d / f"{d.name}_flair.nii.gz", images["flair"], shifted)
    _expect_bad(_only(tmp_path), "affine disagrees", f"{d.name}_flair.nii.gz")


def test_seg_on_another_grid_than_images(tmp_path, brats) -> None:
    d = brats.write_case(tmp_path, 0)
    _, labels = brats.make_volumes(0)
    shifted = brats.RAS_AFFINE.copy()
    shifted[2, 3] += 1.0
    brats.save_nifti(d / f"{d.name}_seg.nii.gz", labels, shifted)
    case = _only(tmp_path)
    with pytest.raises(DataError, match="segmentation grid"):
        load_labels(case, reference=load_images(case))


def test_truncated_gzip(tmp_path, brats) -> None:
    d = brats.write_case(tmp_path, 0)
    path = d / f"{d.name}_t1ce.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _expect_bad(_only(tmp_path), "corrupt or truncated", path.name)


def test_garbage_file(tmp_path, brats) -> None:
    d = brats.write_case(tmp_path, 0, ext=".nii")
    path = d / f"{d.name}_t1.nii"
    path.write_bytes(b"this is not a NIfTI file at all" * 3)
    _expect_bad(_only(tmp_path), "cannot read the NIfTI header", path.name)
    # a gzip stream holding garbage
    path.unlink()
    (d / f"{d.name}_t1.nii.gz").write_bytes(gzip.compress(b"\x00" * 100))
    _expect_bad(_only(tmp_path), "cannot read", f"{d.name}_t1.nii.gz")


@pytest.mark.parametrize(("layout", "bad"), [("brats2021", 3), ("brats2023", 4), ("brats2021", 7)])
def test_label_value_outside_known_set(tmp_path, brats, layout, bad) -> None:
    _, labels = brats.make_volumes(0)
    labels = labels.copy()
    labels[1, 1, 1] = bad
    if layout == "brats2023":
        labels[labels == 4] = 3  # conftest maps 4 -> 3; keep the bad value distinct
        labels[1, 1, 1] = 4 if bad == 4 else bad
        d = brats.write_case(tmp_path, 0, layout)
        brats.save_nifti(d / f"{d.name}-seg.nii.gz", labels, brats.RAS_AFFINE)
        name = f"{d.name}-seg.nii.gz"
    else:
        d = brats.write_case(tmp_path, 0, layout, labels=labels)
        name = f"{d.name}_seg.nii.gz"
    case = _only(tmp_path)
    _expect_bad(case, rf"label values \[{bad}\] are outside the known set", name, seg=True)
    with pytest.raises(DataError):
        load_regions(case)


def test_non_integer_labels(tmp_path, brats) -> None:
    d = brats.write_case(tmp_path, 0)
    _, labels = brats.make_volumes(0)
    floats = labels.astype(np.float32)
    floats[2, 2, 2] = 1.5
    brats.save_nifti(d / f"{d.name}_seg.nii.gz", floats, brats.RAS_AFFINE)
    _expect_bad(_only(tmp_path), "non-integer", f"{d.name}_seg.nii.gz", seg=True)
    # integral float labels are fine
    brats.save_nifti(d / f"{d.name}_seg.nii.gz", labels.astype(np.float64), brats.RAS_AFFINE)
    np.testing.assert_array_equal(load_label_map(_only(tmp_path)), labels)


def test_nan_image_and_4d_image(tmp_path, brats) -> None:
    d = brats.write_case(tmp_path, 0)
    images, _ = brats.make_volumes(0)
    bad = images["t2"].copy()
    bad[3, 3, 3] = np.nan
    brats.save_nifti(d / f"{d.name}_t2.nii.gz", bad, brats.RAS_AFFINE)
    _expect_bad(_only(tmp_path), "NaN", f"{d.name}_t2.nii.gz")
    brats.save_nifti(d / f"{d.name}_t2.nii.gz", np.stack([images["t2"]] * 2, axis=-1), brats.RAS_AFFINE)
    _expect_bad(_only(tmp_path), "expected a 3D volume", f"{d.name}_t2.nii.gz")


def test_missing_modality_when_loading(tmp_path, brats) -> None:
    d = brats.write_case(tmp_path, 0, modalities=("t1", "t2"))
    case = _only(tmp_path)
    with pytest.raises(DataError, match=rf"modality 't1ce' is missing.*{d.name}_t1ce\.nii\.gz"):
        load_images(case, ["t1", "t1ce"])


# --------------------------------------------------------------------------------------------- cohort
def _bad_cohort(root: Path, brats) -> list[str]:
    ids = brats.write_cohort(root, 5)
    (root / ids[1] / f"{ids[1]}_flair.nii.gz").unlink()  # missing file
    p = root / ids[3] / f"{ids[3]}_t2.nii.gz"  # truncated data (header intact)
    p.write_bytes(p.read_bytes()[:-200])
    _, labels = brats.make_volumes(4)
    labels[0, 0, 0] = 3  # a 2021 case with label 3
    brats.save_nifti(root / ids[4] / f"{ids[4]}_seg.nii.gz", labels, brats.RAS_AFFINE)
    return ids


def test_scan_cohort_skip_reports_each_bad_case(tmp_path, brats, caplog) -> None:
    ids = _bad_cohort(tmp_path, brats)
    cache = ArrayCache()
    with caplog.at_level(logging.WARNING):
        scan = scan_cohort(tmp_path, modalities=MODALITIES, seg=True, on_bad_case="skip", check="full", cache=cache)
    assert list(scan.cases) == [ids[0], ids[2]]
    assert scan.num_skipped == 3 and set(scan.skipped) == {ids[1], ids[3], ids[4]}
    assert "flair" in scan.skipped[ids[1]] and "truncated" in scan.skipped[ids[3]] and "[3]" in scan.skipped[ids[4]]
    for i in (1, 3, 4):
        assert f"skipping case {ids[i]}" in caplog.text
    assert "skipped 3 of 5" in caplog.text
    # the full check decoded the good cases into the cache: loading them again is a hit
    loads = cache.stats.loads
    load_images(scan.case(ids[0]), MODALITIES, cache=cache)
    assert cache.stats.loads == loads and cache.stats.hits >= 1


def test_scan_cohort_raise_and_header_check(tmp_path, brats) -> None:
    ids = _bad_cohort(tmp_path, brats)
    with pytest.raises(DataError, match=ids[1]):
        scan_cohort(tmp_path, modalities=MODALITIES, seg=True)
    # the header check does not decode: the truncated and the bad-label cases pass it
    scan = scan_cohort(tmp_path, modalities=MODALITIES, seg=True, on_bad_case="skip", check="header")
    assert list(scan.skipped) == [ids[1]]
    # a site that does not hold flair is not bothered by the missing flair
    assert len(scan_cohort(tmp_path, modalities=["t1"], check="header")) == 5
    with pytest.raises(ValueError, match="check must be one of"):
        scan_cohort(tmp_path, check="deep")


# --------------------------------------------------------------------------------------------- writing
@pytest.mark.parametrize("orientation", ["LPS", "PIR", "RAS"])
@pytest.mark.parametrize("use_case", [True, False])
def test_save_segmentation_restores_original_grid(tmp_path, brats, orientation, use_case) -> None:
    d = brats.write_case(tmp_path / "in", 0, orientation=orientation, seg=use_case)
    case = _only(d.parent)
    label_ras = load_label_map(case) if use_case else labels_ras_from_images(case)
    reference = case if use_case else case.images["t1"]
    out = save_segmentation(label_ras, reference, tmp_path / "out" / "pred.nii.gz")
    written = nib.load(str(out))
    src = nib.load(str(case.seg if use_case else case.images["t1"]))
    assert written.shape == src.shape
    np.testing.assert_allclose(written.affine, src.affine, atol=1e-6)
    assert written.get_data_dtype() == np.uint8
    if use_case:
        np.testing.assert_array_equal(np.asarray(written.dataobj), np.asarray(src.dataobj))
    # reading the written file back through the loader gives the same RAS label map
    arr = np.asarray(written.dataobj)
    geom = read_geometry(case.case_id, out)
    np.testing.assert_array_equal(geom.to_original(label_ras), arr)
    with pytest.raises(ValueError, match="shape"):
        save_segmentation(label_ras[:-1], reference, tmp_path / "bad.nii.gz")


def labels_ras_from_images(case) -> np.ndarray:
    """A made-up prediction: brain voxels brighter than the mean are 'edema'."""
    img = load_images(case, ["t1"]).array[0]
    return np.where(img > 0.5, 2, 0).astype(np.uint8)
