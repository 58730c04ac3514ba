"""Where the data is: a site answers no request that returns its weights or a function of its images against
tensors a caller supplies; it audits its own record on its own premises and publishes figures only.

Tried as the attacker with each credential a site knows (the aggregator's, the audit's, none, a forged one).
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from federation_testkit import AGG_TOKEN, AUDIT_HEADERS, SITE_HEADERS, identity_aligner, peers, run_job

from services.aggregator.app import create_app as create_aggregator_app
from splitunet.transcript import Transcript, verify_transcript
from splitunet.wire import CONTENT_TYPE, BundleKind, BundleMeta, WireDtype, encode_bundle

SPEC = {
    "sites": peers(("t1", "flair")),
    "model": {"spatial_dims": 2, "features": [4, 8, 16], "cut_level": 0},
    "roi": [16, 16], "batch_size": 2, "steps": 2, "val_cases": 1, "seed": 3, "run_id": "audited",
    "wire": {"activations": "fp32", "gradients": "fp32"},
}
CREDENTIALS = {
    "aggregator": SITE_HEADERS,
    "audit": AUDIT_HEADERS,
    "none": {},
    "forged": {"Authorization": "Bearer forged-token-0123456789abcdef"},
}
#: Every route a site serves: the training protocol (aggregator credential), its own audits (audit credential),
#: and the kit's public health and metrics. A new route must be added here on purpose.
SITE_ROUTES = {
    ("GET", "/v1/info"), ("POST", "/v1/psi"), ("POST", "/v1/alignment"), ("POST", "/v1/grids"),
    ("POST", "/v1/runs"), ("POST", "/v1/runs/{run_id}/release"), ("POST", "/v1/runs/{run_id}/forward"),
    ("POST", "/v1/runs/{run_id}/backward"), ("POST", "/v1/runs/{run_id}/checkpoint"),
    ("POST", "/v1/runs/{run_id}/restore"), ("GET", "/v1/runs/{run_id}/secure-sum"),
    ("POST", "/v1/runs/{run_id}/secure-sum"),
    ("POST", "/v1/runs/{run_id}/audits"), ("GET", "/v1/runs/{run_id}/audits/{audit_id}"),
}
#: What one finding may carry: names, a step, and figures (never an image, a tensor, a case id or a weight).
FINDING_KEYS = {"site", "step", "attack", "ssim", "psnr", "nmse", "prior_ssim", "rdlv", "semantic",
                "prior_semantic", "reid_top1", "dice", "auc", "baseline_empty_dice", "baseline_blob_dice", "seconds",
                # ΔSSIM over the prior with its 95 % interval (issue 21); the label fields stay empty at a site
                "delta_ssim", "delta_ssim_low", "delta_ssim_high", "n_samples", "label_method", "label_methods",
                "label_steps", "delta_dice", "delta_dice_low", "delta_dice_high"}


def _recorded(start_app, aggregator_settings, sites, tmp_path) -> None:
    settings = aggregator_settings(transcript={"enabled": True, "dir": tmp_path / "transcripts", "every": 1,
                                               "fsync": False})
    app = create_aggregator_app(settings, aligner=identity_aligner,
                                transport_factory=lambda peer: sites[peer.name]._transport)
    status = run_job(start_app(app), SPEC, headers={"Authorization": f"Bearer {AGG_TOKEN}"})
    assert status["state"] == "succeeded", status


def _wait(site, path: str, timeout_s: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while (status := site.get(path, headers=AUDIT_HEADERS).json())["state"] in ("pending", "running"):
        assert time.monotonic() < deadline, status
        time.sleep(0.1)
    return status


def test_the_site_serves_no_other_route(site) -> None:
    paths = site.app.openapi()["paths"]
    routes = {(m.upper(), p) for p, ops in paths.items() if p.startswith("/v1/") for m in ops}
    assert routes == SITE_ROUTES, routes ^ SITE_ROUTES


def test_removed_data_channels_answer_no_credential(site, cohort) -> None:
    """The encoder-weights and score routes are gone: with every credential, 404/405 and no body that holds data."""
    sample = {"case_id": cohort.case_ids[0], "start": [0, 0], "size": [16, 16], "axial_index": 8}
    meta = BundleMeta(run_id="r1", step=0, site="t1", kind=BundleKind.ACTIVATIONS,
                      extra={"samples": json.dumps([sample])})
    probe = encode_bundle({"reconstruction": torch.zeros(1, 1, 16, 16)}, meta=meta, dtype=WireDtype.FP32,
                          max_bytes=2**20)
    for name, headers in CREDENTIALS.items():
        tried = [
            site.get("/v1/runs/r1/audit/encoder", params={"step": 0}, headers=headers),
            site.post("/v1/score", content=probe, headers=headers | {"Content-Type": CONTENT_TYPE}),
            site.get("/v1/runs/r1/encoder", headers=headers),
            site.get("/v1/runs/r1/checkpoint", headers=headers),
        ]
        for response in tried:
            assert response.status_code in (401, 403, 404, 405), (name, response.request.url, response.status_code)
            assert len(response.content) < 2048 and b"safetensors" not in response.content
        if name in ("audit", "aggregator"):  # the credentials that once opened them: the routes are gone
            assert [r.status_code for r in tried[:2]] == [404, 404], (name, [r.text for r in tried[:2]])


def test_a_site_audits_its_own_record_and_publishes_figures_only(start_app, aggregator_settings, recording_sites,
                                                                  cohort, tmp_path) -> None:
    sites = recording_sites
    _recorded(start_app, aggregator_settings, sites, tmp_path)
    site = sites["t1"]
    # the site's own record: what it sent and received, in the transcript format, chained and verifiable
    own = tmp_path / "site-t1-state" / "transcripts" / "audited"
    assert verify_transcript(own).ok
    transcript = Transcript(own)
    assert transcript.run["party"] == "site:t1"
    assert {(r.step, r.flow.value) for r in transcript.records(phase="train")} == {
        (s, f) for s in (1, 2) for f in ("sent", "received")}
    transcript.close()

    body = {"steps": [2], "attacks": ["whitebox", "unsplit"], "max_samples": 2,
            "budgets": {"whitebox_iterations": 60, "unsplit_main_iters": 2, "unsplit_inner_iters": 5,
                        "segmenter_steps": 0}}
    # only the site's audit credential starts its audits
    for name in ("aggregator", "none", "forged"):
        assert site.post("/v1/runs/audited/audits", json=body, headers=CREDENTIALS[name]).status_code in (401, 403)
    created = site.post("/v1/runs/audited/audits", json=body, headers=AUDIT_HEADERS)
    assert created.status_code == 202, created.text
    response = site.get(f"/v1/runs/audited/audits/{created.json()['audit_id']}", headers=AUDIT_HEADERS)
    status = _wait(site, f"/v1/runs/audited/audits/{created.json()['audit_id']}")
    assert status["state"] == "succeeded", status
    result = status["result"]
    assert {(f["site"], f["attack"], f["step"]) for f in result["findings"]} == {
        ("t1", "whitebox", 2), ("t1", "unsplit", 2)}
    for finding in result["findings"]:
        assert set(finding) == FINDING_KEYS
        assert all(v is None or isinstance(v, int | float) for k, v in finding.items()
                   if k not in ("site", "attack")), finding
        assert -1.0 <= finding["ssim"] <= 1.0
    assert set(result) == {"run_id", "records", "findings", "dcor", "segmenters", "gate"}
    assert set(result["dcor"]) <= {"t1"}
    # figures only: no case id, no array, a few hundred bytes per finding
    text = json.dumps(status)
    assert not any(case in text for case in cohort.case_ids), text
    assert len(text) < 4096, len(text)
    response = site.get(f"/v1/runs/audited/audits/{created.json()['audit_id']}", headers=SITE_HEADERS)
    assert response.status_code == 403


@pytest.mark.parametrize("body, status, words", [
    ({"attacks": ["label_leakage"]}, 422, "aggregator"),
    ({"transcript": "/etc"}, 422, "transcript"),
    ({"tensors": {"reconstruction": [0.0]}}, 422, "tensors"),
    ({"steps": [-1]}, 422, "steps"),
])
def test_a_site_audit_takes_no_tensor_path_or_label_attack(site, body, status, words) -> None:
    response = site.post("/v1/runs/r1/audits", json=body, headers=AUDIT_HEADERS)
    assert response.status_code == status and words in response.text, response.text


def test_a_site_audit_of_an_unknown_run_is_404(site) -> None:
    response = site.post("/v1/runs/nope/audits", json={}, headers=AUDIT_HEADERS)
    assert response.status_code == 404, response.text
    response = site.get("/v1/runs/nope/audits/audit-000000000000", headers=AUDIT_HEADERS)
    assert response.status_code == 404, response.text
