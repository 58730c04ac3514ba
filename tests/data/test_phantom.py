"""The phantom cohort: offline MNI anatomy, determinism, nested tumour labels, contrasts, geometry, BraTS files."""

from __future__ import annotations

import socket
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from splitunet.config import MODALITIES
from splitunet.data.mni import MniAnatomy
from splitunet.data.phantom import (
    PhantomCase,
    case_id,
    case_rng,
    make_case,
    output_spacing,
    write_case,
    write_cohort,
)

SHAPE = (64, 64, 48)
SUFFIXES = {
    "brats2021": {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair", "seg": "seg"},
    "brats2023": {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f", "seg": "seg"},
}


@pytest.fixture(scope="module")
def anatomy() -> MniAnatomy:
    return MniAnatomy.load(output_spacing(SHAPE))


@pytest.fixture(scope="module")
def case(anatomy: MniAnatomy) -> PhantomCase:
    return make_case(case_rng(7, 0), SHAPE, orientation="RAS", anatomy=anatomy)


def _arrays(c: PhantomCase) -> dict[str, np.ndarray]:
    return {**c.images, "label": c.label, "mask": c.brain_mask, **{f"tissue_{k}": v for k, v in c.tissue.items()}}


def test_template_is_read_offline_from_the_nilearn_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import nilearn.datasets as nds

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setenv("NILEARN_DATA", str(tmp_path / "nilearn_data"))
    monkeypatch.setenv("NILEARN_SHARED_DATA", str(tmp_path / "nilearn_shared"))
    nds.load_mni152_template.cache_clear()  # force a real read, not nilearn's in-memory cache

    anatomy = MniAnatomy.load((1.0, 1.0, 1.0))

    assert list(tmp_path.iterdir()) == []  # nothing fetched into a data directory
    assert anatomy.volume.shape[:2] == (1, 4)
    assert anatomy.blur_mm == (0.0, 0.0, 0.0)
    # The skull-stripped MNI brain is about 145 x 181 x 155 mm; T1 of WM > GM > CSF.
    size = anatomy.brain_bbox_world[1] - anatomy.brain_bbox_world[0] + 1
    np.testing.assert_allclose(size, [145, 181, 155], atol=3)
    wm, gm, csf = anatomy.t1_model
    assert wm > gm > csf > 0


def test_same_seed_same_bytes_other_seed_differs(anatomy: MniAnatomy, case: PhantomCase) -> None:
    again = make_case(case_rng(7, 0), SHAPE, orientation="RAS", anatomy=anatomy)
    for name, array in _arrays(case).items():
        assert array.tobytes() == _arrays(again)[name].tobytes(), name
    np.testing.assert_array_equal(case.affine, again.affine)

    other = make_case(case_rng(7, 1), SHAPE, orientation="RAS", anatomy=anatomy)
    assert not np.array_equal(other.images["t1"], case.images["t1"])
    assert not np.array_equal(other.brain_mask, case.brain_mask)  # the deformation differs, not only the noise


@pytest.mark.parametrize("layout, et", [("brats2021", 4), ("brats2023", 3)])
def test_tumour_labels_present_nested_and_inside_the_brain(anatomy: MniAnatomy, layout: str, et: int) -> None:
    for index in range(3):
        c = make_case(case_rng(3, index), SHAPE, layout=layout, anatomy=anatomy)
        assert c.et_label == et
        assert c.label.dtype == np.uint8
        assert set(np.unique(c.label).tolist()) == {0, 1, 2, et}
        necrosis = c.label == 1
        core = (c.label == 1) | (c.label == et)
        whole = c.label > 0
        # Strictly nested: every 6-neighbour of necrosis is core, every 6-neighbour of core is tumour.
        assert core[ndimage.binary_dilation(necrosis)].all()
        assert whole[ndimage.binary_dilation(core)].all()
        assert c.brain_mask[whole].all()
        assert c.label[c.tumour_center] == 1
        assert c.tissue["wm"][c.tumour_center] > 0.5  # placed in white matter


def test_background_is_zero_and_brain_is_nonzero_in_every_modality(case: PhantomCase) -> None:
    assert 0.1 < case.brain_mask.mean() < 0.4  # a brain, not an empty or a full box
    for modality in MODALITIES:
        image = case.images[modality]
        assert image.dtype == np.float32 and image.shape == SHAPE
        np.testing.assert_array_equal(image != 0, case.brain_mask)
        assert np.array_equal(image, np.rint(image)) and image.max() <= 32767  # exactly representable as int16


def _check_contrasts(c: PhantomCase) -> None:
    healthy = (c.label == 0) & c.brain_mask
    wm = healthy & (c.tissue["wm"] > 0.8)
    gm = healthy & (c.tissue["gm"] > 0.6)
    csf = healthy & (c.tissue["csf"] > 0.8)
    edema, enhancing, necrosis = c.label == 2, c.label == c.et_label, c.label == 1
    assert wm.sum() > 100 and gm.sum() > 50 and csf.sum() > 20

    def mean(m: str, region: np.ndarray) -> float:
        return float(c.images[m][region].mean())

    assert mean("t1", wm) > mean("t1", gm) > mean("t1", csf)
    assert mean("t2", csf) > mean("t2", gm) > mean("t2", wm)
    assert mean("flair", edema) > 1.3 * mean("flair", wm)
    assert mean("flair", csf) < 0.5 * mean("flair", wm)
    assert mean("t2", edema) > 1.5 * mean("t2", wm)
    assert mean("t1ce", enhancing) > 1.2 * mean("t1ce", wm)
    assert mean("t1ce", enhancing) > 1.5 * mean("t1", enhancing) * mean("t1ce", wm) / mean("t1", wm)
    assert mean("t1ce", necrosis) < mean("t1ce", enhancing)


def test_contrasts_per_modality(anatomy: MniAnatomy) -> None:
    for index in range(3):
        _check_contrasts(make_case(case_rng(11, index), SHAPE, anatomy=anatomy))


def test_lps_is_the_same_scan_as_ras(anatomy: MniAnatomy, case: PhantomCase) -> None:
    lps = make_case(case_rng(7, 0), SHAPE, anatomy=anatomy)  # default orientation: LPS like BraTS
    assert nib.aff2axcodes(lps.affine) == ("L", "P", "S")
    assert nib.aff2axcodes(case.affine) == ("R", "A", "S")
    np.testing.assert_allclose(np.abs(np.diag(lps.affine)[:3]), output_spacing(SHAPE))
    for name, array in _arrays(case).items():
        np.testing.assert_array_equal(_arrays(lps)[name], array[::-1, ::-1, :], err_msg=name)
    # The same voxel is at the same world position.
    ijk_lps = np.array([5, 9, 13, 1.0])
    ijk_ras = np.array([SHAPE[0] - 1 - 5, SHAPE[1] - 1 - 9, 13, 1.0])
    np.testing.assert_allclose(lps.affine @ ijk_lps, case.affine @ ijk_ras)
    ras_center = (SHAPE[0] - 1 - lps.tumour_center[0], SHAPE[1] - 1 - lps.tumour_center[1], lps.tumour_center[2])
    assert ras_center == case.tumour_center


@pytest.mark.parametrize("layout", ["brats2021", "brats2023"])
def test_write_cohort_writes_brats_files_that_load_back_exactly(
    anatomy: MniAnatomy, tmp_path: Path, layout: str
) -> None:
    ids = write_cohort(tmp_path, cases=2, seed=5, layout=layout, shape=SHAPE, start_index=3, anatomy=anatomy)
    assert ids == [case_id(3, layout), case_id(4, layout)]
    assert ids[0] == ("BraTS2021_00003" if layout == "brats2021" else "BraTS-GLI-00003-000")
    assert sorted(p.name for p in tmp_path.iterdir()) == ids
    sep = "_" if layout == "brats2021" else "-"
    expected = sorted(f"{ids[1]}{sep}{s}.nii.gz" for s in SUFFIXES[layout].values())
    assert sorted(p.name for p in (tmp_path / ids[1]).iterdir()) == expected

    reference = make_case(case_rng(5, 4), SHAPE, layout=layout, anatomy=anatomy)
    for kind, suffix in SUFFIXES[layout].items():
        img = nib.load(tmp_path / ids[1] / f"{ids[1]}{sep}{suffix}.nii.gz")
        want = reference.label if kind == "seg" else reference.images[kind]
        assert img.get_data_dtype() == (np.uint8 if kind == "seg" else np.int16)
        assert img.shape == SHAPE
        np.testing.assert_array_equal(np.asarray(img.dataobj), want)
        np.testing.assert_allclose(img.affine, reference.affine)
        assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1


def test_write_case_uncompressed(case: PhantomCase, tmp_path: Path) -> None:
    written = write_case(case, tmp_path, "BraTS2021_00042", compress=False)
    assert sorted(written) == ["flair", "seg", "t1", "t1ce", "t2"]
    assert written["t1ce"] == tmp_path / "BraTS2021_00042" / "BraTS2021_00042_t1ce.nii"
    np.testing.assert_array_equal(np.asarray(nib.load(written["flair"]).dataobj), case.images["flair"])


def test_render_one_slice_per_modality_to_png(case: PhantomCase, tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    z = case.tumour_center[2]
    labels = case.label[:, :, z]
    mask = case.brain_mask[:, :, z]
    assert (labels > 0).sum() > 10 and mask[labels > 0].all()  # tumour on this slice, inside the brain

    fig, axes = plt.subplots(1, len(MODALITIES) + 1, figsize=(10, 2.4))
    for ax, modality in zip(axes, MODALITIES, strict=False):
        ax.imshow(case.images[modality][:, :, z].T, cmap="gray", origin="lower")
        ax.set_title(modality)
        ax.axis("off")
    axes[-1].imshow(case.images["flair"][:, :, z].T, cmap="gray", origin="lower")
    axes[-1].imshow(np.ma.masked_equal(labels, 0).T, cmap="autumn", alpha=0.6, origin="lower")
    axes[-1].set_title("seg")
    axes[-1].axis("off")
    path = tmp_path / "phantom_slice.png"
    fig.savefig(path, dpi=60)
    plt.close(fig)

    assert path.stat().st_size > 5_000
    pixels = mpimg.imread(path)
    assert pixels.ndim == 3 and pixels[..., :3].std() > 0.05  # a picture, not a blank canvas


def test_coarse_shapes_still_give_every_label(tmp_path: Path) -> None:
    shape = (24, 24, 24)  # 10 x 10 x 6.5 mm voxels: the smallest allowed
    anatomy = MniAnatomy.load(output_spacing(shape))
    for index in range(3):
        c = make_case(case_rng(0, index), shape, anatomy=anatomy)
        assert set(np.unique(c.label).tolist()) == {0, 1, 2, 4}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"shape": (64, 64)}, "shape"),
        ({"shape": (16, 64, 48)}, "shape"),
        ({"shape": ("a", 64, 48)}, "shape"),
        ({"shape": (64.5, 64, 48)}, "shape"),
        ({"layout": "brats2019"}, "layout"),
        ({"orientation": "LAS"}, "orientation"),
    ],
)
def test_make_case_rejects_bad_arguments(anatomy: MniAnatomy, kwargs: dict, match: str) -> None:
    args = {"shape": SHAPE, "anatomy": anatomy, **kwargs}
    with pytest.raises(ValueError, match=match):
        make_case(0, **args)


def test_make_case_rejects_anatomy_prepared_for_another_spacing(anatomy: MniAnatomy) -> None:
    with pytest.raises(ValueError, match="spacing"):
        make_case(0, (80, 80, 60), anatomy=anatomy)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"cases": 0}, "cases"),
        ({"cases": True}, "cases"),
        ({"seed": -1}, "seed"),
        ({"start_index": -2}, "start_index"),
        ({"start_index": 99_999, "cases": 2}, "start_index"),
        ({"layout": "brats"}, "layout"),
        ({"seed": 0x5EED_A0D1}, "public cohort"),  # the audit's public cohort stays disjoint from any federation
    ],
)
def test_write_cohort_rejects_bad_arguments(anatomy: MniAnatomy, tmp_path: Path, kwargs: dict, match: str) -> None:
    args = {"cases": 1, "shape": SHAPE, "anatomy": anatomy, **kwargs}
    with pytest.raises(ValueError, match=match):
        write_cohort(tmp_path, **args)
    assert list(tmp_path.iterdir()) == []
