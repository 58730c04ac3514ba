"""Gates held by the data owner: a site's own leakage thresholds, checked by its own audit before the next
activations leave; the aggregator's job pauses naming the site and the figure; the aggregator's own gate covers
label leakage only; a gate without a threshold is a start-up error.
"""

from __future__ import annotations

import time

import pytest
from federation_testkit import AGG_HEADERS, SITE_HEADERS, identity_aligner, wait_for_job
from pydantic import ValidationError

from services.aggregator.app import create_app as create_aggregator_app
from services.aggregator.privacy_gate import PrivacyGateSettings
from services.client_site.app import create_app as create_site_app
from services.client_site.policy import LeakagePolicy
from splitunet.transcript import Transcript

GATED = {"every": 2, "max_ssim": -0.5, "whitebox_iterations": 30, "max_samples": 1}
SPEC = {
    "run_id": "gated", "sites": ["t1", "flair"],
    "model": {"spatial_dims": 2, "features": [4, 8, 16], "cut_level": 0},
    "roi": [16, 16], "batch_size": 2, "steps": 4, "val_cases": 1, "seed": 5, "val_interval": 0,
}


def test_a_sites_threshold_stops_a_leaking_run_before_the_next_forward_leaves(start_app, site_settings,
                                                                              aggregator_settings, tmp_path):
    transcript = {"enabled": True, "every": 1, "fsync": False}
    sites = {
        # t1 holds a threshold every undefended run exceeds (SSIM is >= -1); flair holds no gate
        "t1": start_app(create_site_app(site_settings("t1", transcript=transcript,
                                                      policy={"leakage": GATED}))),
        "flair": start_app(create_site_app(site_settings("flair", transcript=transcript))),
    }
    app = create_aggregator_app(aggregator_settings(), aligner=identity_aligner,
                                transport_factory=lambda peer: sites[peer.name]._transport)
    aggregator = start_app(app)
    assert aggregator.post("/v1/jobs", json=SPEC, headers=AGG_HEADERS).status_code == 202
    paused = wait_for_job(aggregator, "gated", ("paused_by_privacy_gate", "succeeded", "failed", "stopped"))
    assert paused["state"] == "paused_by_privacy_gate", paused
    gate = paused["privacy_gate"]
    assert gate["passed"] is False and gate["site"] == "t1" and gate["party"] == "site:t1", gate
    assert gate["rule"] == "leakage" and gate["figure"] == "ssim" and gate["attack"] == "whitebox", gate
    assert gate["step"] == 2 and gate["threshold"] == -0.5 and gate["value"] > -0.5, gate
    assert paused["step"] == 2, paused  # step 3 never ran

    # before the next forward left: t1's own record ends with step 2's activations
    record = Transcript(tmp_path / "site-t1-state" / "transcripts" / "gated")
    assert max(r.step for r in record.records(phase="train") if r.flow.value == "sent") == 2
    record.close()
    # the site says so itself: 403 policy_violation with the rule and the figure, in /v1/info and /metrics
    forward = sites["t1"].post("/v1/runs/gated/forward", headers=SITE_HEADERS, json={
        "step": 3, "phase": "train",
        "samples": [{"case_id": paused["val_case_ids"][0], "start": [0, 0], "size": [16, 16], "axial_index": 8}]})
    assert forward.status_code == 403, forward.text
    body = forward.json()
    assert body["code"] == "policy_violation" and body["detail"]["rule"] == "leakage", body
    assert body["detail"]["figure"] == "ssim" and body["detail"]["value"] == gate["value"], body
    info = sites["t1"].get("/v1/info", headers=SITE_HEADERS).json()
    assert info["leakage_gate"]["stopped"]["gated"]["value"] == gate["value"], info["leakage_gate"]
    metrics = sites["t1"].get("/metrics").text
    assert 'splitunet_site_leakage_stopped{run="gated"} 1.0' in metrics, metrics[-2000:]
    assert 'splitunet_site_leakage{figure="ssim",run="gated"}' in metrics

    # the aggregator cannot override the data owner: resumed, it rolls back and is refused again
    assert aggregator.post("/v1/jobs/gated/resume", headers=AGG_HEADERS).status_code == 200
    time.sleep(0.5)
    again = wait_for_job(aggregator, "gated", ("paused_by_privacy_gate", "succeeded", "failed", "stopped"))
    assert again["state"] == "paused_by_privacy_gate" and again["privacy_gate"]["site"] == "t1", again
    assert aggregator.post("/v1/jobs/gated/stop", headers=AGG_HEADERS).status_code in (200, 202)
    assert wait_for_job(aggregator, "gated")["state"] == "stopped"


def test_a_site_stop_survives_a_restart(start_app, site_settings, aggregator_settings, tmp_path):
    """The decision is kept in the site's state folder: a restarted site still refuses the run."""
    transcript = {"enabled": True, "every": 1, "fsync": False}
    settings = site_settings("t1", transcript=transcript, policy={"leakage": GATED})
    sites = {"t1": start_app(create_site_app(settings)),
             "flair": start_app(create_site_app(site_settings("flair", transcript=transcript)))}
    app = create_aggregator_app(aggregator_settings(), aligner=identity_aligner,
                                transport_factory=lambda peer: sites[peer.name]._transport)
    aggregator = start_app(app)
    assert aggregator.post("/v1/jobs", json=SPEC, headers=AGG_HEADERS).status_code == 202
    assert wait_for_job(aggregator, "gated", ("paused_by_privacy_gate", "failed"))["state"] == "paused_by_privacy_gate"
    restarted = start_app(create_site_app(settings))
    info = restarted.get("/v1/info", headers=SITE_HEADERS).json()
    assert "gated" in info["leakage_gate"]["stopped"], info


def test_a_gate_without_a_threshold_is_a_start_up_error(site_settings) -> None:
    with pytest.raises(ValidationError, match="no threshold"):
        site_settings("t1", policy={"leakage": {"every": 5}})
    with pytest.raises(ValidationError, match="never check"):
        LeakagePolicy(max_ssim=0.5)
    with pytest.raises(ValidationError, match="no threshold"):
        PrivacyGateSettings(every=10)
    # the aggregator no longer gates images: the old settings say where image thresholds live now
    with pytest.raises(ValidationError, match="SITE_POLICY__LEAKAGE"):
        PrivacyGateSettings(every=10, max_ssim=0.6)
    with pytest.raises(ValidationError, match="SITE_POLICY__LEAKAGE"):
        PrivacyGateSettings(audit_token_file="/run/secrets/audit-token")
    assert LeakagePolicy(every=5, max_delta_ssim=0.1).every == 5
    assert PrivacyGateSettings(every=10, max_label_dice=0.5).every == 10


def test_the_aggregators_gate_audits_label_leakage_with_its_own_labels(start_app, sites, aggregator_settings,
                                                                        tmp_path):
    settings = aggregator_settings(transcript={"enabled": True, "dir": tmp_path / "transcripts", "every": 5,
                                               "fsync": False},
                                   privacy_gate={"every": 2, "max_label_dice": 0.0})
    app = create_aggregator_app(settings, aligner=identity_aligner,
                                transport_factory=lambda peer: sites[peer.name]._transport)
    aggregator = start_app(app)
    spec = SPEC | {"run_id": "labels"}
    assert aggregator.post("/v1/jobs", json=spec, headers=AGG_HEADERS).status_code == 202
    status = wait_for_job(aggregator, "labels", ("paused_by_privacy_gate", "succeeded", "failed", "stopped"))
    gate = status["privacy_gate"]
    assert gate is not None and gate["party"] == "aggregator" and gate["step"] == 2, status
    assert {f["attack"] for f in gate["findings"]} == {"label_leakage"}, gate["findings"]
    dices = [f["dice"] for f in gate["findings"] if f["dice"] is not None]
    # the gate pauses exactly when a site's recovered mask overlaps the true tumour (Dice > 0)
    assert (status["state"] == "paused_by_privacy_gate") is any(d > 0.0 for d in dices), (status["state"], dices)
    if status["state"] == "paused_by_privacy_gate":
        assert gate["figure"] == "dice" and gate["value"] > 0.0
        assert aggregator.post("/v1/jobs/labels/stop", headers=AGG_HEADERS).status_code in (200, 202)
