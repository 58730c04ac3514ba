"""The aggregator service in process, driving four in-process sites: the job API, validation, inference."""

from __future__ import annotations

import gzip
import json
import math
from typing import Any

import httpx
import nibabel as nib
import numpy as np
import pytest
from fastapi.testclient import TestClient
from federation_testkit import (
    AGG_HEADERS,
    N_RAS_CASES,
    SITE_TOKENS,
    Cohort,
    identity_aligner,
    peers,
    run_job,
    site_headers,
    wait_for_job,
    write_registry,
)
from scipy import ndimage

from services.aggregator.app import create_app as create_aggregator_app
from splitunet.data.layout import discover_cases
from splitunet.data.loader import regions_to_labels


def job_spec(**overrides: Any) -> dict[str, Any]:
    """A tiny 2D job: 16x16 in-plane crops, widths (4, 8, 16), batch 2, one validation case."""
    spec: dict[str, Any] = {
        "sites": peers(),
        "model": {"spatial_dims": 2, "features": [4, 8, 16]},
        "roi": [16, 16],
        "batch_size": 2,
        "steps": 4,
        "val_interval": 2,
        "val_cases": 1,
        "seed": 3,
        "site_optimizer": {"lr": 1e-3},
        "server_optimizer": {"lr": 1e-3},
    }
    return spec | overrides


def post_job(client: TestClient, spec: dict[str, Any]) -> httpx.Response:
    return client.post("/v1/jobs", json=spec, headers=AGG_HEADERS)


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"code", "message", "detail"} and body["code"] == code, body
    return body


def check_region_scores(validation: dict[str, Any]) -> None:
    assert set(validation["dice"]) == {"TC", "WT", "ET", "mean"}
    for region in ("TC", "WT", "ET", "mean"):
        value = validation["dice"][region]
        assert value is not None and 0.0 <= value <= 1.0, validation
    assert set(validation["hd95"]) == {"TC", "WT", "ET", "mean"}


def independent_dice(pred: np.ndarray, true: np.ndarray) -> float:
    total = pred.sum() + true.sum()
    return 1.0 if total == 0 else 2.0 * np.logical_and(pred, true).sum() / total


def independent_hd95(pred: np.ndarray, true: np.ndarray, spacing) -> float:
    """BraTS convention: both empty 0, one empty 373.13 mm, else the larger directed 95th percentile of the
    surface distances in mm (scipy distance transforms)."""
    if not pred.any() and not true.any():
        return 0.0
    if not pred.any() or not true.any():
        return 373.13
    sp, st = pred & ~ndimage.binary_erosion(pred), true & ~ndimage.binary_erosion(true)
    to_t = ndimage.distance_transform_edt(~st, sampling=spacing)
    to_p = ndimage.distance_transform_edt(~sp, sampling=spacing)
    return max(np.percentile(to_t[sp], 95), np.percentile(to_p[st], 95))


def infer(client: TestClient, case_id: str, job_id: str | None = None) -> httpx.Response:
    return client.post("/v1/infer", json={"case_id": case_id, "job_id": job_id}, headers=AGG_HEADERS)


def check_segmentation(response: httpx.Response, cohort: Cohort, case_id: str) -> None:
    """The answer is a gzipped NIfTI with exactly the shape and affine of the case's segmentation file."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/gzip"
    assert f"{case_id}_pred.nii.gz" in response.headers["content-disposition"]
    raw = gzip.decompress(response.content)
    predicted = nib.Nifti1Image.from_bytes(raw)
    reference = nib.load(str(discover_cases(cohort.labels_dir)[case_id].seg_path()))
    assert predicted.shape == reference.shape
    np.testing.assert_allclose(predicted.affine, reference.affine, atol=1e-6)
    assert nib.aff2axcodes(predicted.affine) == nib.aff2axcodes(reference.affine)
    labels = np.asarray(predicted.dataobj)
    assert labels.dtype == np.uint8
    assert set(np.unique(labels).tolist()) <= {0, 1, 2, 4}


# ---------------------------------------------------------------------------------------------- a job
def test_a_2d_job_trains_validates_checkpoints_and_infers(
    aggregator: TestClient, sites: dict[str, TestClient], cohort: Cohort, tmp_path
) -> None:
    created = post_job(aggregator, job_spec(run_id="job-2d"))
    assert created.status_code == 202, created.text
    assert created.json()["job_id"] == "job-2d"
    status = wait_for_job(aggregator, "job-2d")

    assert status["state"] == "succeeded", status
    assert status["step"] == status["steps"] == 4
    assert math.isfinite(status["loss"]) and status["loss"] > 0
    assert status["aligned_cases"] == N_RAS_CASES + 1
    assert (status["train_cases"], status["val_cases"]) == (N_RAS_CASES, 1)
    assert status["validation_step"] == 4
    check_region_scores(status["validation"])
    assert status["checkpoint_step"] == 4
    assert status["bytes_sent"] > 0 and status["bytes_received"] > 0
    assert status["steps_per_second"] > 0 and status["error"] is None

    # the validation figures, recomputed independently per case: numpy Dice, scipy surface distances in mm
    job = aggregator.app.state.runtime.jobs.get("job-2d")
    (case_id,) = status["val_case_ids"]
    (reported,) = status["validation"]["per_case"]
    assert reported["case_id"] == case_id
    probs, _ = job.predict_case(case_id)
    seg = nib.as_closest_canonical(nib.load(str(discover_cases(cohort.labels_dir)[case_id].seg_path())))
    truth = np.asarray(seg.dataobj)
    zooms = seg.header.get_zooms()[:3]
    for index, (region, labels) in enumerate((("TC", (1, 4)), ("WT", (1, 2, 4)), ("ET", (4,)))):
        pred, true = probs[index] > 0.5, np.isin(truth, labels)
        assert reported["dice"][region] == pytest.approx(independent_dice(pred, true), abs=1e-6)
        assert reported["hd95"][region] == pytest.approx(independent_hd95(pred, true, zooms), abs=1e-4)

    listed = aggregator.get("/v1/jobs", headers=AGG_HEADERS)
    assert listed.status_code == 200
    assert [j["job_id"] for j in listed.json()] == ["job-2d"]

    # every party checkpointed the final step
    assert (tmp_path / "aggregator-state" / "job-2d" / "aggregator-step-00000004.safetensors").is_file()
    for name, client in sites.items():
        assert (tmp_path / f"site-{name}-state" / "job-2d" / f"site-{name}-step-00000004.safetensors").is_file()
        assert client.get("/v1/info", headers=site_headers(name)).json()["runs"]["job-2d"]["step"] == 4

    # inference on a case stored LPS: the NIfTI has the file's own grid and affine, not the RAS working grid
    response = infer(aggregator, cohort.lps_case)
    check_segmentation(response, cohort, cohort.lps_case)
    # ... and its voxels are the RAS prediction stored back in LPS (not just relabelled in the header)
    ras = regions_to_labels(job.predict_case(cohort.lps_case)[0], et_label=4)
    assert not np.array_equal(ras, ras[::-1, ::-1]), "a prediction symmetric under the LPS flip tells nothing"
    stored = nib.as_closest_canonical(nib.Nifti1Image.from_bytes(gzip.decompress(response.content)))
    assert np.array_equal(np.asarray(stored.dataobj), ras)
    check_segmentation(infer(aggregator, cohort.case_ids[0], "job-2d"), cohort, cohort.case_ids[0])

    assert_error(infer(aggregator, "BraTS2021_99999"), 404, "case_not_found")
    assert_error(infer(aggregator, cohort.case_ids[0], "job-nope"), 404, "not_found")


def test_a_3d_job_validates_by_sliding_window(aggregator: TestClient, cohort: Cohort) -> None:
    spec = job_spec(model={"spatial_dims": 3, "features": [4, 8, 16], "cut_level": 1},
                    roi=[16, 16, 16], steps=2, val_interval=0)
    status = run_job(aggregator, spec)
    assert status["state"] == "succeeded", status
    assert status["validation_step"] == 2
    check_region_scores(status["validation"])
    check_segmentation(infer(aggregator, cohort.lps_case, status["job_id"]), cohort, cohort.lps_case)


def test_a_2d_job_with_resized_slices(aggregator: TestClient, cohort: Cohort) -> None:
    # the cases' 24x24 slices are resized to 16x16 at the sites (images) and the aggregator (labels)
    status = run_job(aggregator, job_spec(resize_slices=True, steps=2, val_interval=0))
    assert status["state"] == "succeeded", status
    check_region_scores(status["validation"])
    job = aggregator.app.state.runtime.jobs.get(status["job_id"])
    samples = job.plan(99)
    assert all(s.resize == (16, 16) and s.size == cohort.shape[:2] for s in samples)
    probs, _ = job.predict_case(cohort.case_ids[0])  # resized back to the case's grid
    assert probs.shape == (3, *cohort.shape)
    check_segmentation(infer(aggregator, cohort.lps_case, status["job_id"]), cohort, cohort.lps_case)
    bad = post_job(aggregator, job_spec(resize_slices=True, model={"spatial_dims": 3, "features": [4, 8, 16]},
                                        roi=[16, 16, 16]))
    assert_error(bad, 422, "invalid_request")


def test_one_job_at_a_time_and_stop(aggregator: TestClient) -> None:
    first = post_job(aggregator, job_spec(steps=100_000, val_interval=0))
    assert first.status_code == 202, first.text
    job_id = first.json()["job_id"]
    wait_for_job(aggregator, job_id, ("running",))

    second = assert_error(post_job(aggregator, job_spec()), 409, "conflict")
    assert second["detail"]["running"] == job_id

    stopped = aggregator.post(f"/v1/jobs/{job_id}/stop", headers=AGG_HEADERS)
    assert stopped.status_code == 200 and stopped.json()["state"] in ("stopping", "stopped")
    status = wait_for_job(aggregator, job_id)
    assert status["state"] == "stopped" and status["step"] < 100_000

    # stopping again is harmless, and the aggregator takes a new job once the first one is over
    assert aggregator.post(f"/v1/jobs/{job_id}/stop", headers=AGG_HEADERS).json()["state"] == "stopped"
    assert run_job(aggregator, job_spec(steps=1, val_interval=0))["state"] == "succeeded"
    assert {j["job_id"] for j in aggregator.get("/v1/jobs", headers=AGG_HEADERS).json()} >= {job_id}


def test_a_repeated_run_id_is_409(aggregator: TestClient) -> None:
    assert run_job(aggregator, job_spec(run_id="job-a", steps=1))["state"] == "succeeded"
    assert_error(post_job(aggregator, job_spec(run_id="job-a", steps=1)), 409, "conflict")


# ---------------------------------------------------------------------------------------------- bad specs
@pytest.mark.parametrize(
    ("overrides", "where"),
    [
        pytest.param({"roi": [18, 18]}, "roi", id="roi-not-a-multiple"),
        pytest.param({"roi": [4, 4]}, "roi", id="roi-too-small"),
        pytest.param({"roi": [16, 16, 16]}, "roi", id="roi-dims"),
        pytest.param({"steps": 0}, "steps", id="steps-0"),
        pytest.param({"batch_size": 0}, "batch_size", id="batch-0"),
        pytest.param({"val_cases": 0}, "val_cases", id="val-cases-0"),
        pytest.param({"sites": []}, "sites", id="no-site"),
        pytest.param({"sites": peers(("t1", "t1"))}, "sites", id="duplicate-site"),
        pytest.param({"model": {"spatial_dims": 2, "features": [4, 8, 16], "cut_level": 7}}, "cut_level",
                     id="cut-level"),
        pytest.param({"model": {"spatial_dims": 2, "features": [4, 8, 16], "cut_level": 2, "skips": [5]}}, "skips",
                     id="skips-beyond-the-cut"),
        pytest.param({"model": {"spatial_dims": 4, "features": [4, 8, 16]}, "roi": [16] * 4}, "spatial_dims",
                     id="spatial-dims"),
        pytest.param({"learning_rate": 1.0}, "learning_rate", id="unknown-field"),
    ],
)
def test_invalid_specs_are_422(aggregator: TestClient, overrides: dict[str, Any], where: str) -> None:
    body = assert_error(post_job(aggregator, job_spec(**overrides)), 422, "invalid_request")
    assert where in body["message"] or where in str(body["detail"]), body
    assert aggregator.get("/v1/jobs", headers=AGG_HEADERS).json() == []


@pytest.mark.parametrize(
    ("overrides", "code", "words"),
    [
        pytest.param({"val_cases": N_RAS_CASES + 1}, "bad_data", "val_cases", id="val-cases-too-many"),
        pytest.param({"val_cases": ["BraTS2021_99999"]}, "bad_data", "BraTS2021_99999", id="val-case-unknown"),
    ],
)
def test_jobs_that_cannot_run_fail_with_a_clear_error(
    aggregator: TestClient, overrides: dict[str, Any], code: str, words: str
) -> None:
    status = run_job(aggregator, job_spec(**overrides))
    assert status["state"] == "failed", status
    assert status["error"]["code"] == code, status["error"]
    assert words in status["error"]["message"], status["error"]
    assert status["step"] == 0


def test_a_site_refuses_another_sites_token(start_app, aggregator_settings, sites, tmp_path) -> None:
    """Per-site credentials: the registry gives t1 the token of t2, and t1 refuses it."""
    tokens = dict(SITE_TOKENS) | {"t1": SITE_TOKENS["t2"]}
    app = create_aggregator_app(
        aggregator_settings(sites=write_registry(tmp_path / "swapped", tokens)),
        aligner=identity_aligner, transport_factory=lambda peer: sites[peer.name]._transport,
    )
    status = run_job(start_app(app), job_spec())
    assert status["state"] == "failed" and status["error"]["code"] == "peer_failed", status
    assert "401" in status["error"]["message"]
    assert SITE_TOKENS["t2"] not in json.dumps(status)


def test_unknown_jobs_and_missing_auth(aggregator: TestClient) -> None:
    assert_error(aggregator.get("/v1/jobs/job-nope", headers=AGG_HEADERS), 404, "not_found")
    assert_error(aggregator.post("/v1/jobs/job-nope/stop", headers=AGG_HEADERS), 404, "not_found")
    assert_error(aggregator.get("/v1/jobs/bad id!", headers=AGG_HEADERS), 422, "invalid_request")
    assert_error(aggregator.post("/v1/infer", json={"case_id": "x"}, headers=AGG_HEADERS), 404, "not_found")
    assert_error(aggregator.get("/v1/jobs"), 401, "unauthorized")
    assert_error(aggregator.post("/v1/jobs", json=job_spec()), 401, "unauthorized")
    assert_error(aggregator.post("/v1/infer", json={"case_id": "x"}), 401, "unauthorized")
    info = aggregator.get("/v1/info", headers=AGG_HEADERS).json()
    assert info["labelled_cases"] == N_RAS_CASES + 1
    assert aggregator.get("/readyz").status_code == 200


def test_every_party_follows_the_learning_rate_schedule(aggregator: TestClient, sites: dict[str, TestClient]) -> None:
    schedule = {"lr": 1e-3, "schedule": "cosine", "warmup_steps": 1, "min_lr_factor": 0.25}
    status = run_job(aggregator, job_spec(steps=3, val_interval=0, site_optimizer=schedule,
                                          server_optimizer=schedule | {"lr": 2e-3}))
    assert status["state"] == "succeeded", status
    job = aggregator.app.state.runtime.jobs.get(status["job_id"])
    # the last step (3 of 3) ends the cosine at min_lr_factor
    assert job.aggregator.optimizer.param_groups[0]["lr"] == pytest.approx(2e-3 * 0.25)
    for client in sites.values():
        run = client.app.state.runtime._run(status["job_id"])
        assert run.step.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.25)
        assert run.setup.optimizer.total_steps == 3
