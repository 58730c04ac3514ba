"""BraTS-convention metrics against independent computations (scipy distance transforms, closed forms)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from splitunet.metrics import HD95_ONE_EMPTY_MM, RegionMetrics, dice, evaluate_case, hd95_mm, spacing_from_affine


def _sphere(shape, centre_mm, radius_mm, spacing) -> np.ndarray:
    axes = [np.arange(n) * s for n, s in zip(shape, spacing)]
    grid = np.meshgrid(*axes, indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grid, centre_mm)) <= radius_mm**2


def _reference_hd95(a: np.ndarray, b: np.ndarray, spacing) -> float:
    """Symmetric HD95 from scipy: surfaces = mask minus its erosion; the larger directed 95th percentile."""
    def surface(m):
        return m & ~ndimage.binary_erosion(m)

    sa, sb = surface(a), surface(b)
    to_b = ndimage.distance_transform_edt(~sb, sampling=spacing)
    to_a = ndimage.distance_transform_edt(~sa, sampling=spacing)
    return max(np.percentile(to_b[sa], 95), np.percentile(to_a[sb], 95))


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.0, 0.8, 2.5)])
def test_hd95_of_concentric_spheres_is_the_radius_difference_in_mm(spacing):
    shape = tuple(int(40 / s) for s in spacing)
    centre = (20.0, 20.0, 20.0)
    inner, outer = _sphere(shape, centre, 6.0, spacing), _sphere(shape, centre, 11.0, spacing)
    value = hd95_mm(inner, outer, spacing)
    assert value == pytest.approx(_reference_hd95(inner, outer, spacing), abs=1e-4)
    assert value == pytest.approx(5.0, abs=max(spacing))  # the surfaces are 5 mm apart everywhere


def test_hd95_of_shifted_spheres_matches_scipy_and_grows_with_the_shift():
    spacing = (1.0, 1.0, 2.0)
    shape = (40, 40, 20)
    a = _sphere(shape, (15.0, 20.0, 20.0), 7.0, spacing)
    b = _sphere(shape, (23.0, 20.0, 20.0), 7.0, spacing)
    value = hd95_mm(a, b, spacing)
    assert value == pytest.approx(_reference_hd95(a, b, spacing), abs=1e-4)
    assert 4.0 < value <= 8.0 + 1e-6  # never more than the 8 mm shift (the Hausdorff distance itself)


def test_empty_masks_follow_the_brats_convention():
    empty = np.zeros((6, 6, 6), dtype=bool)
    blob = empty.copy()
    blob[2:4, 2:4, 2:4] = True
    assert hd95_mm(empty, empty, (1, 1, 1)) == 0.0
    assert hd95_mm(empty, blob, (1, 1, 1)) == HD95_ONE_EMPTY_MM == 373.13  # a missed tumour
    assert hd95_mm(blob, empty, (1, 1, 1)) == HD95_ONE_EMPTY_MM  # a phantom tumour
    assert dice(empty, empty) == 1.0
    assert dice(empty, blob) == 0.0


def test_dice_of_overlapping_boxes():
    a = np.zeros((10, 10, 10), dtype=bool)
    b = a.copy()
    a[0:4, 0:5, 0:5] = True  # 100 voxels
    b[2:6, 0:5, 0:5] = True  # 100 voxels, 50 shared
    assert dice(a, b) == pytest.approx(0.5)


def test_spacing_comes_from_the_affine_columns():
    affine = np.array([[0.0, -1.5, 0.0, 10.0], [2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0], [0, 0, 0, 1.0]])
    assert spacing_from_affine(affine) == (2.0, 1.5, 3.0)
    with pytest.raises(ValueError, match="zero or non-finite"):
        spacing_from_affine(np.diag([1.0, 0.0, 1.0, 1.0]))


def test_region_metrics_keep_every_case_with_mean_and_median():
    shape = (16, 16, 8)
    truth = np.zeros((3, *shape), dtype=np.uint8)
    truth[:, 4:10, 4:10, 2:6] = 1
    perfect = torch.where(torch.from_numpy(truth) > 0, 10.0, -10.0)
    missed = torch.full((3, *shape), -10.0)  # predicts nothing: Dice 0, HD95 373.13 in every region
    metrics = RegionMetrics(hd95=True)
    metrics.add_case("good", perfect, truth, (1.0, 1.0, 1.0))
    metrics.add_case("missed", missed, truth, (1.0, 1.0, 1.0))
    metrics.add_case("good2", perfect, truth, (1.0, 1.0, 1.0))
    result = metrics.aggregate()
    assert result["cases"] == 3
    assert result["dice"]["WT"] == pytest.approx(2 / 3)
    assert result["dice_median"]["WT"] == 1.0
    assert result["hd95"]["ET"] == pytest.approx(373.13 / 3)  # the missed case is not dropped
    assert result["hd95_median"]["ET"] == 0.0
    assert [c["case_id"] for c in result["per_case"]] == ["good", "missed", "good2"]
    assert result["per_case"][1]["hd95"] == {"TC": 373.13, "WT": 373.13, "ET": 373.13}
    assert result["per_case"][1]["dice"] == {"TC": 0.0, "WT": 0.0, "ET": 0.0}


def test_a_case_without_tumour_predicted_empty_is_perfect():
    truth = np.zeros((3, 8, 8, 8), dtype=np.uint8)
    result = evaluate_case("healthy", torch.full((3, 8, 8, 8), -4.0), truth, (1.0, 1.0, 1.0))
    assert result.dice == {"TC": 1.0, "WT": 1.0, "ET": 1.0}
    assert result.hd95 == {"TC": 0.0, "WT": 0.0, "ET": 0.0}


def test_bad_input_raises():
    with pytest.raises(ValueError, match="one shape"):
        dice(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="spacing"):
        hd95_mm(np.ones((2, 2, 2)), np.ones((2, 2, 2)), (1.0, 1.0))
    with pytest.raises(ValueError, match=r"\(3, \*spatial\)"):
        evaluate_case("x", torch.zeros(2, 4, 4, 4), np.zeros((2, 4, 4, 4)), (1, 1, 1))
    with pytest.raises(ValueError, match="add_case"):
        RegionMetrics().aggregate()
