"""The project's Dice and HD95 of predicted NIfTI files against a second, independent implementation.

Predictions are written as ``POST /v1/infer`` writes them (BraTS labels on the case's own grid, here an LPS phantom
with anisotropic voxels) with the errors a segmentation model makes: a shifted boundary, a false-positive blob far
from the tumour, a missed enhancing core, one-voxel speckle. The second implementation shares no code with the
project: it reads the files with nibabel in their on-disk orientation (no reorientation to RAS), takes the voxel
size from the header's zooms (not from the affine), builds the regions from the label values by hand, and measures
surface distances with ``scipy.ndimage`` Euclidean distance transforms. Tolerances: 1e-3 Dice, 0.5 mm HD95.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from splitunet.data.cohort import scan_cohort
from splitunet.data.loader import load_label_map, save_segmentation
from splitunet.data.phantom import write_cohort
from splitunet.metrics import HD95_ONE_EMPTY_MM
from splitunet.scoring import score_prediction

REGION_LABELS = {"TC": (1, 4), "WT": (1, 2, 4), "ET": (4,)}


def _reference(pred_path: Path, truth_path: Path) -> dict[str, tuple[float, float]]:
    """(Dice, HD95 mm) per region, computed without the project's code."""
    pred_img, truth_img = nib.load(str(pred_path)), nib.load(str(truth_path))
    pred, truth = np.asarray(pred_img.dataobj), np.asarray(truth_img.dataobj)
    spacing = tuple(float(z) for z in truth_img.header.get_zooms()[:3])
    out = {}
    for region, labels in REGION_LABELS.items():
        p, t = np.isin(pred, labels), np.isin(truth, labels)
        size = p.sum() + t.sum()
        d = 1.0 if size == 0 else 2.0 * np.logical_and(p, t).sum() / size
        if not p.any() and not t.any():
            h = 0.0
        elif p.any() != t.any():
            h = HD95_ONE_EMPTY_MM
        else:
            # a voxel is on the surface if a face neighbour is outside the mask (or outside the volume)
            sp = p & ~ndimage.binary_erosion(p, border_value=0)
            st = t & ~ndimage.binary_erosion(t, border_value=0)
            to_t = ndimage.distance_transform_edt(~st, sampling=spacing)[sp]
            to_p = ndimage.distance_transform_edt(~sp, sampling=spacing)[st]
            h = max(np.percentile(to_t, 95), np.percentile(to_p, 95))
        out[region] = (float(d), float(h))
    return out


def _errors(truth: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Predicted label maps (RAS) with typical errors of a segmentation model."""
    tumour = truth > 0
    shifted = np.zeros_like(truth)
    shifted[2:] = truth[:-2]  # the whole tumour two voxels off along x
    blob = truth.copy()
    far = np.argwhere(~ndimage.binary_dilation(tumour, iterations=12))
    x, y, z = far[len(far) // 3]
    blob[max(x - 2, 0):x + 2, max(y - 2, 0):y + 2, max(z - 1, 0):z + 2] = 2  # false-positive oedema far away
    no_et = np.where(truth == 4, 1, truth).astype(np.uint8)  # enhancing core called necrotic core: ET empty
    speckle = truth.copy()
    idx = rng.choice(truth.size, size=40, replace=False)
    speckle.reshape(-1)[idx] = 2  # scattered one-voxel false positives
    grown = np.where(ndimage.binary_dilation(tumour, iterations=1) & ~tumour, 2, truth).astype(np.uint8)
    return {"shifted": shifted, "far_blob": blob, "no_et": no_et, "speckle": speckle, "grown": grown}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("xcheck")
    write_cohort(root, 1, seed=7, shape=(64, 64, 40))
    return root


def test_dice_and_hd95_of_predicted_files_agree_with_an_independent_implementation(cohort, tmp_path):
    case = next(iter(scan_cohort(cohort, seg=True).cases.values()))
    truth = load_label_map(case)
    assert truth.max() == 4 and (truth == 1).any(), "the phantom case must hold all three regions"
    rng = np.random.default_rng(0)
    checked = 0
    for name, label_map in _errors(truth, rng).items():
        path = save_segmentation(label_map, case, tmp_path / f"{name}_pred.nii.gz")
        ours = score_prediction(path, case)
        ref = _reference(path, case.seg_path())
        for region, (d, h) in ref.items():
            assert ours.dice[region] == pytest.approx(d, abs=1e-3), (name, region)
            assert ours.hd95[region] == pytest.approx(h, abs=0.5), (name, region, ours.hd95[region], h)
            checked += 1
    assert checked == 15
    # the errors are visible in the figures (a cross-check of a metric that reads zero everywhere would pass too)
    far = score_prediction(tmp_path / "far_blob_pred.nii.gz", case)
    assert far.hd95["WT"] > 5 * score_prediction(tmp_path / "grown_pred.nii.gz", case).hd95["WT"] > 0
    assert score_prediction(tmp_path / "no_et_pred.nii.gz", case).hd95["ET"] == HD95_ONE_EMPTY_MM


def test_a_prediction_on_another_grid_is_refused(cohort, tmp_path):
    from splitunet.errors import DataError

    case = next(iter(scan_cohort(cohort, seg=True).cases.values()))
    img = nib.load(str(case.seg_path()))
    other = nib.Nifti1Image(np.asarray(img.dataobj)[:-1], img.affine)
    nib.save(other, tmp_path / "cropped_pred.nii.gz")
    with pytest.raises(DataError, match="grid"):
        score_prediction(tmp_path / "cropped_pred.nii.gz", case)
