"""Scoring predicted segmentation files: a ``*_pred.nii.gz`` (BraTS labels, as ``POST /v1/infer`` writes it) against
its case's ground truth, with the project's metrics (:mod:`splitunet.metrics`).

The prediction is read with nibabel and reoriented to RAS exactly as the loader reorients the case's segmentation
(:func:`splitunet.data.loader.geometry_of`), so both masks are on one grid; the voxel spacing in mm comes from the
truth's RAS affine. Labels become region channels ``[TC, WT, ET]`` by the case's ET label (4, or 3 for BraTS 2023).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from splitunet.data.layout import BratsCase
from splitunet.errors import DataError
from splitunet.metrics import CaseResult, evaluate_case, spacing_from_affine


def read_prediction(path: Path | str) -> tuple[np.ndarray, np.ndarray]:
    """A predicted label file as ``(label_map (X, Y, Z) uint8 RAS, RAS affine (4, 4))``."""
    import nibabel as nib
    import nibabel.orientations as nio

    from splitunet.data.loader import geometry_of

    try:
        img = nib.load(str(path), mmap=False)
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for unreadable files
        raise DataError(f"{path}: cannot read the predicted segmentation ({type(exc).__name__}: {exc})") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{path}: a predicted segmentation must be a 3D label map, got shape {data.shape}")
    geom = geometry_of(data.shape, img.affine)
    labels = np.ascontiguousarray(nio.apply_orientation(data, geom.to_ras)).astype(np.uint8)
    return labels, geom.ras_affine


def prediction_regions(path: Path | str, et_label: int) -> tuple[np.ndarray, np.ndarray]:
    """A predicted label file as boolean region channels ``(3, X, Y, Z)`` ``[TC, WT, ET]`` and its RAS affine."""
    from splitunet.data.loader import labels_to_regions

    labels, affine = read_prediction(path)
    return labels_to_regions(labels, et_label).astype(bool), affine


def score_prediction(path: Path | str, case: BratsCase, *, hd95: bool = True) -> CaseResult:
    """Dice (and HD95 in mm) per region of a predicted label file against ``case``'s segmentation.

    Raises:
        DataError: the file is unreadable, or its grid is not the case's.
    """
    from splitunet.data.loader import AFFINE_ATOL_MM, labels_to_regions, load_labels

    truth = load_labels(case)
    pred, affine = prediction_regions(path, case.et_label)
    if pred.shape[1:] != truth.label_map.shape or not np.allclose(affine, truth.affine_ras, atol=AFFINE_ATOL_MM):
        raise DataError(f"{path}: the prediction's grid (RAS {pred.shape[1:]}) is not case {case.case_id}'s "
                        f"(RAS {truth.label_map.shape}); predict on the case's own grid")
    regions = labels_to_regions(truth.label_map, case.et_label)
    return evaluate_case(case.case_id, pred, regions, spacing_from_affine(truth.affine_ras), hd95=hd95, logits=False)


def infer_to_files(client: Any, job_id: str, case_ids: Sequence[str], out_dir: Path) -> dict[str, Path]:
    """``POST /v1/infer`` each case with job ``job_id``'s model (``client``: a
    :class:`~splitunet.service.client.PeerClient` of the aggregator); the files written, by case."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for case_id in case_ids:
        response = client.request("POST", "/v1/infer", json={"case_id": case_id, "job_id": job_id},
                                  accept="application/gzip")
        paths[case_id] = out_dir / f"{case_id}_pred.nii.gz"
        paths[case_id].write_bytes(response.content)
    return paths


def postprocessed_figures(paths: dict[str, Path], source: Path) -> dict[str, Any]:
    """Raw and post-processed figures of predicted label files of cases of the cohort at ``source`` (which holds
    their segmentations): :func:`splitunet.postprocess.cross_validated` over these cases."""
    from splitunet.data.cohort import scan_cohort
    from splitunet.data.loader import labels_to_regions, load_labels
    from splitunet.postprocess import cross_validated

    cases = scan_cohort(source, seg=True).cases
    masks, truths, spacings = [], [], []
    for case_id, path in paths.items():
        truth = load_labels(cases[case_id])
        pred, _ = prediction_regions(path, cases[case_id].et_label)
        if pred.shape[1:] != truth.label_map.shape:
            raise DataError(f"{path}: the prediction's grid is not case {case_id}'s")
        masks.append(pred)
        truths.append(labels_to_regions(truth.label_map, truth.et_label))
        spacings.append(spacing_from_affine(truth.affine_ras))
    return cross_validated(list(paths), masks, truths, spacings)
