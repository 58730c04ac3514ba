"""Sites' grids (header grid + brain extent): 2D planning inside the brain, inference of cases without labels,
and a BraTS 2023 cohort (ET = 3) through PSI alignment, training, validation and ``/v1/infer``."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from federation_testkit import AGG_HEADERS, SITE_HEADERS, SITES, Cohort, align_site, peers, run_job

from services.aggregator.app import create_app as create_aggregator_app
from services.client_site.app import create_app as create_site_app
from splitunet.data.grid import axial_extent
from splitunet.data.layout import discover_cases
from splitunet.data.loader import load_images

UNLABELED = "BraTS-GLI-00005-000"


def _set_codes(path: Path, qform: int, sform: int) -> None:
    img = nib.load(str(path))
    out = nib.Nifti1Image(np.asarray(img.dataobj), img.affine)
    out.set_qform(img.affine, code=qform)
    out.set_sform(img.affine, code=sform)
    nib.save(out, str(path))


@pytest.fixture(scope="module")
def cohort2023(tmp_path_factory, brats) -> Cohort:
    """Five labelled 2023-layout cases at every party, plus one case only the sites hold (no label file),
    whose files carry qform code 1 and sform code 2."""
    root = tmp_path_factory.mktemp("cohort2023")
    ids = []
    for index in range(6):
        for m in SITES:
            case_dir = brats.write_case(root / f"site-{m}", index, "brats2023", modalities=(m,), seg=False)
            if index == 5:
                for f in case_dir.iterdir():
                    _set_codes(f, 1, 2)
        if index < 5:
            ids.append(brats.write_case(root / "labels", index, "brats2023", modalities=()).name)
    return Cohort(site_dirs={m: root / f"site-{m}" for m in SITES}, labels_dir=root / "labels", case_ids=ids,
                  lps_case=ids[-1], shape=tuple(brats.SHAPE))


def test_the_2d_planner_draws_only_slices_inside_the_brain(aggregator, sites, cohort: Cohort):
    status = run_job(aggregator, {"sites": peers(), "model": {"spatial_dims": 2, "features": [4, 8, 16]},
                                  "roi": [16, 16], "batch_size": 4, "steps": 1, "val_cases": 1, "fg_ratio": 0.0})
    assert status["state"] == "succeeded", status
    job = aggregator.app.state.runtime.jobs.get(status["job_id"])
    cases = discover_cases(cohort.site_dirs["t1"])
    grids = job.case_grids(job.train_cases)
    for case_id in job.train_cases:  # the sites' reports equal the extent of the images
        extent = axial_extent(load_images(cases[case_id], ["t1"]).array)
        assert grids[case_id].brain_z == extent
    lo, hi = grids[job.train_cases[0]].brain_z
    assert (lo, hi) == (1, 14)  # slices 0 and 15 hold no brain
    z = {s.axial_index for step in range(2, 80) for s in job.plan(step)}
    assert z <= set(range(1, 15)) and len(z) > 8, sorted(z)  # uniform over the brain's slices, never outside


def test_sites_report_grids_only_for_aligned_cases(site, cohort: Cohort):
    case_id = cohort.case_ids[0]
    # before any alignment no case is served, and an unknown id gets the same answer as a known one
    before = site.post("/v1/grids", json={"case_ids": [case_id]}, headers=SITE_HEADERS)
    assert before.status_code == 409 and before.json()["code"] == "not_aligned"
    assert align_site(site, [case_id]).status_code == 200
    reply = site.post("/v1/grids", json={"case_ids": [case_id]}, headers=SITE_HEADERS)
    assert reply.status_code == 200, reply.text
    grid = reply.json()["grids"][case_id]
    assert grid["shape"] == list(cohort.shape) and grid["brain_z"] == [1, 14] and grid["layout"] == "brats2021"
    unknown = site.post("/v1/grids", json={"case_ids": ["BraTS2021_99999"]}, headers=SITE_HEADERS)
    other = site.post("/v1/grids", json={"case_ids": [cohort.case_ids[1]]}, headers=SITE_HEADERS)
    assert unknown.status_code == other.status_code == 409 and other.json()["code"] == "not_aligned"
    assert site.post("/v1/grids", json={"case_ids": []}, headers=SITE_HEADERS).status_code == 422


def test_a_brats2023_cohort_end_to_end_with_an_unlabeled_case(start_app, site_settings, aggregator_settings,
                                                              cohort2023: Cohort, tmp_path):
    sites = {m: start_app(create_site_app(site_settings(m, data_dir=cohort2023.site_dirs[m]))) for m in SITES}
    aggregator = start_app(create_aggregator_app(  # the real PSI aligner, sites in process
        aggregator_settings(data_dir=cohort2023.labels_dir), transport_factory=lambda peer: sites[peer.name]._transport
    ))
    spec = {"sites": peers(), "model": {"spatial_dims": 2, "features": [8, 16, 32]}, "roi": [24, 24],
            "batch_size": 8, "steps": 60, "val_cases": 1, "seed": 2, "fg_ratio": 0.9,
            "site_optimizer": {"lr": 1e-2}, "server_optimizer": {"lr": 1e-2}, "infer_cases": [UNLABELED]}
    status = run_job(aggregator, spec, headers=AGG_HEADERS, timeout_s=600)
    assert status["state"] == "succeeded", status
    assert (status["aligned_cases"], status["unlabeled_cases"], status["train_cases"]) == (6, 1, 4)
    assert UNLABELED not in status["val_case_ids"]
    validation = status["validation"]
    assert [c["case_id"] for c in validation["per_case"]] == status["val_case_ids"]
    assert validation["dice"]["WT"] > 0.5, validation  # it learned the 2023 labels' regions

    labelled = status["val_case_ids"][0]
    for case_id in (labelled, UNLABELED):
        response = aggregator.post("/v1/infer", json={"case_id": case_id}, headers=AGG_HEADERS)
        assert response.status_code == 200, response.text
        written = nib.Nifti1Image.from_bytes(gzip.decompress(response.content))
        source = nib.load(str(next((cohort2023.site_dirs["t1"] / case_id).iterdir())))
        assert written.shape == source.shape
        np.testing.assert_allclose(written.affine, source.affine, atol=1e-6)
        assert int(written.header["qform_code"]) == int(source.header["qform_code"])
        assert int(written.header["sform_code"]) == int(source.header["sform_code"])
        labels = set(np.unique(np.asarray(written.dataobj)).tolist())
        assert labels == {0, 1, 2, 3}, (case_id, labels)  # BraTS 2023: ET written as 3, never 4
    assert int(written.header["sform_code"]) == 2  # the unlabeled case's own code, from the sites' headers

    unknown = aggregator.post("/v1/infer", json={"case_id": "BraTS-GLI-00042-000"}, headers=AGG_HEADERS)
    assert unknown.status_code == 404 and "infer_cases" in unknown.json()["message"]
