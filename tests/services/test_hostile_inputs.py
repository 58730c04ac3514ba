"""The hostile inputs of issue 22, reproduced against the in-process services: each is refused with a typed 4xx
naming what was wrong (never a 500), and the leaks it found stay closed."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from federation_testkit import AGG_HEADERS, SITE_HEADERS, align_site, identity_aligner, model_config, peers, run_job

from services.aggregator.app import create_app as create_aggregator_app
from services.audit.app import create_app as create_audit_app
from services.audit.settings import AuditSettings
from services.client_site.app import create_app as create_site_app
from splitunet.client import Federation
from splitunet.errors import ConflictError
from splitunet.schemas import RunSetup

RUN = "run-h"
AUDIT_OPERATOR = "audit-operator-token-0123456789abcdef"
AUDIT_OPERATOR_HEADERS = {"Authorization": f"Bearer {AUDIT_OPERATOR}"}


def setup_body(run_id: str = RUN, **model: Any) -> dict[str, Any]:
    body = RunSetup(run_id=run_id, model=model_config(cut_level=1)).model_dump(mode="json")
    body["model"].update(model)
    return body


def started(start_app, site_settings, **overrides: Any) -> TestClient:
    client = start_app(create_site_app(site_settings("t1", **overrides)))
    assert align_site(client, client.app.state.runtime.case_ids()).status_code == 200
    return client


# ---------------------------------------------------------------------------------------------- act / norm specs
@pytest.mark.parametrize("field, spec, says", [
    ("act", ["LeakyReLU", {"bogus": 1}], "bogus"),
    ("act", ["nonexistent", {}], "not supported"),
    ("act", "relu", "pair"),
    ("act", ["LeakyReLU", {"negative_slope": "x"}], "negative_slope"),
    ("norm", ["group", {"num_groups": 3}], "num_groups"),
    ("norm", ["layer", {}], "not supported"),
    ("norm", ["instance", {"affine": "yes"}], "affine"),
])
def test_bad_layer_specs_are_422_naming_the_field(start_app, site_settings, security, field, spec, says) -> None:
    client = started(start_app, site_settings)
    response = client.post("/v1/runs", json=setup_body(**{field: spec}), headers=SITE_HEADERS)
    security.refused("bad_layer_spec", response.status_code, expected=422)
    assert response.json()["code"] == "invalid_request" and says in response.json()["message"], response.text


@pytest.mark.parametrize("spec, rule", [
    (["LeakyReLU", {"negative_slope": 0.99}], "max_negative_slope"),
    (["LeakyReLU", {"negative_slope": 0.5}], "max_negative_slope"),
    (["gelu", {}], "activations"),
])
def test_the_site_policy_names_the_activations_it_accepts(start_app, site_settings, security, spec, rule) -> None:
    client = started(start_app, site_settings)
    response = client.post("/v1/runs", json=setup_body(act=spec), headers=SITE_HEADERS)
    security.refused("policy_activation", response.status_code, expected=403)
    assert response.json()["detail"]["rule"] == rule, response.text


def test_an_affine_activation_is_refused_and_the_fingerprint_covers_the_layers(start_app, site_settings,
                                                                                 security) -> None:
    client = started(start_app, site_settings)
    # slope 1 is the identity: the encoder would be affine, its activations invertible by least squares
    affine = client.post("/v1/runs", json=setup_body(act=["LeakyReLU", {"negative_slope": 1}]), headers=SITE_HEADERS)
    security.refused("policy_activation", affine.status_code, expected=422)
    prints = []
    for run, act in (("run-a", ["LeakyReLU", {"negative_slope": 0.1}]), ("run-b", ["relu", {}]),
                     ("run-c", ["LeakyReLU", {"negative_slope": 0.2}])):
        response = client.post("/v1/runs", json=setup_body(run, act=act), headers=SITE_HEADERS)
        assert response.status_code == 200, response.text
        prints.append(response.json()["fingerprint"])
    assert len(set(prints)) == 3, prints
    # a site whose policy allows a wider set still refuses what is outside the closed set
    wide = started(start_app, site_settings, policy={"activations": ["leakyrelu", "gelu"], "norms": ["instance"]})
    ok = wide.post("/v1/runs", json=setup_body(act=["gelu", {}]), headers=SITE_HEADERS)
    assert ok.status_code == 200, ok.text


# ---------------------------------------------------------------------------------------------- memory bounds
def test_a_forward_over_the_sites_memory_bound_is_413_before_any_work(start_app, site_settings, security) -> None:
    client = started(start_app, site_settings, max_forward_bytes=2**21)
    assert client.post("/v1/runs", json=setup_body(), headers=SITE_HEADERS).status_code == 200
    case = client.app.state.runtime.case_ids()[0]
    samples = [{"case_id": case, "start": [4, 2], "size": [16, 16], "axial_index": 4 + i % 8} for i in range(64)]
    small = client.post(f"/v1/runs/{RUN}/forward", json={"step": 1, "samples": samples[:4]}, headers=SITE_HEADERS)
    assert small.status_code == 200, small.text
    big = client.post(f"/v1/runs/{RUN}/forward", json={"step": 2, "samples": samples}, headers=SITE_HEADERS)
    security.refused("over_memory_bound", big.status_code, expected=413)
    body = big.json()
    assert body["code"] == "over_memory_bound" and "SITE_MAX_FORWARD_BYTES" in body["message"], body
    assert body["detail"]["limit"] == 2**21 and body["detail"]["bytes"] > 2**21
    # an evaluation forward over the bound is refused before the site charges its evaluation budget
    eval_big = client.post(f"/v1/runs/{RUN}/forward", json={"step": 2, "phase": "eval", "samples": samples * 3},
                           headers=SITE_HEADERS)
    security.refused("over_memory_bound", eval_big.status_code, expected=413)
    assert not client.app.state.runtime.eval_budget._per_run.get(RUN)


def test_an_encoder_over_the_sites_memory_bound_is_refused_at_setup(start_app, site_settings, security) -> None:
    client = started(start_app, site_settings, max_forward_bytes=2**20)
    response = client.post("/v1/runs", json=setup_body(features=[256, 512, 512]), headers=SITE_HEADERS)
    security.refused("over_memory_bound", response.status_code, expected=413)
    assert response.json()["detail"]["setting"] == "SITE_MAX_FORWARD_BYTES"


@pytest.mark.parametrize("model, batch, roi", [
    ({"spatial_dims": 2, "features": [8, 200000], "cut_level": 0}, 2, [16, 16]),  # the job
    ({"spatial_dims": 2, "features": [512, 1024], "cut_level": 0}, 256, [512, 512]),
])
def test_a_job_over_the_aggregators_memory_bound_is_refused_at_once(aggregator, security, model, batch, roi) -> None:
    spec = {"sites": peers(), "model": model, "roi": roi, "batch_size": batch, "steps": 2}
    response = aggregator.post("/v1/jobs", json=spec, headers=AGG_HEADERS)
    security.refused("over_memory_bound", response.status_code, expected=413)
    assert "AGG_MAX_STEP_BYTES" in response.json()["message"]
    assert aggregator.get("/v1/jobs", headers=AGG_HEADERS).json() == []  # nothing was started


# ---------------------------------------------------------------------------------------------- small leaks
def test_error_log_lines_escape_what_the_client_wrote(site, caplog, security) -> None:
    caplog.set_level(logging.INFO)
    response = site.post("/v1/runs/x%1B%5B31mred%E2%80%A8forged/release", headers=SITE_HEADERS)
    security.refused("control_characters_in_path", response.status_code, expected=422)
    lines = [r.getMessage() for r in caplog.records]
    assert any("red" in line for line in lines), lines
    assert not any("\x1b" in line or "\u2028" in line or "\n" in line for line in lines), lines


def test_a_token_file_changed_to_hold_another_scopes_token_is_refused(start_app, site_settings, tmp_path,
                                                                        security) -> None:
    audit_file = tmp_path / "audit-token"
    audit_file.write_text("audit-token-rotated-0123456789\n")
    client = start_app(create_site_app(site_settings("t1", scope_tokens={}, scope_token_files={"audit": audit_file})))
    assert client.get("/v1/info", headers=SITE_HEADERS).status_code == 200
    # a rotation writes the aggregator's token into the audit scope's file: one token would serve two scopes
    time.sleep(0.01)
    audit_file.write_text(SITE_HEADERS["Authorization"].split()[1] + "\n")
    response = client.get("/v1/info", headers=SITE_HEADERS)
    security.refused("token_in_two_scopes", response.status_code, expected=401)
    assert "more than one credential scope" in response.json()["message"]


def test_internal_errors_in_job_status_are_generic(start_app, aggregator_settings, security) -> None:
    def explode(request: httpx.Request) -> httpx.Response:
        raise RuntimeError("secret detail /srv/aggregator/state/jobs.sqlite")

    app = create_aggregator_app(aggregator_settings(), aligner=identity_aligner,
                                transport_factory=lambda peer: httpx.MockTransport(explode))
    client = start_app(app)
    status = run_job(client, {"sites": peers(), "model": {"spatial_dims": 2, "features": [4, 8, 16]},
                              "roi": [16, 16], "batch_size": 2, "steps": 2}, headers=AGG_HEADERS)
    assert status["state"] == "failed", status
    assert status["error"]["code"] == "internal" and "secret" not in json.dumps(status), status["error"]
    security.blocked("internal_detail_in_status")


def audit_service(start_app, tmp_path, **settings: Any) -> TestClient:
    (tmp_path / "transcripts" / "run-x").mkdir(parents=True)
    values = {"transcripts_dir": tmp_path / "transcripts", "auth_token": AUDIT_OPERATOR, "lab_images_dir": tmp_path}
    return start_app(create_audit_app(AuditSettings(**(values | settings))))


@pytest.mark.parametrize("budgets", [{"whitebox_iterations": 10**9}, {"learned_steps": 10**7},
                                     {"segmenter_steps": 10**6}, {"unsplit_main_iters": 10**5}])
def test_audit_budgets_are_capped(start_app, tmp_path, security, budgets) -> None:
    audit = audit_service(start_app, tmp_path)
    body = {"run_id": "run-x", "mode": "lab", "spec": {"budgets": budgets}}
    response = audit.post("/v1/audits", json=body, headers=AUDIT_OPERATOR_HEADERS)
    security.refused("audit_budget", response.status_code, expected=422)
    assert "less than or equal" in response.json()["message"], response.text


def test_an_audit_can_be_cancelled(start_app, tmp_path, monkeypatch, security) -> None:
    import services.audit.runtime as audit_runtime

    def endless(self, spec, progress):  # an audit that would hold the only worker (bounded: a failing test ends)
        stop = time.monotonic() + 60
        while time.monotonic() < stop:
            progress(0.5, "attacking")
            time.sleep(0.01)
        raise RuntimeError("not cancelled in 60 s")

    monkeypatch.setattr(audit_runtime.AuditRunner, "run", endless)
    monkeypatch.setattr(audit_runtime, "LabCohort", lambda *args: None)
    audit = audit_service(start_app, tmp_path)
    body = {"run_id": "run-x", "mode": "lab"}
    running = audit.post("/v1/audits", json=body, headers=AUDIT_OPERATOR_HEADERS).json()["audit_id"]
    queued = audit.post("/v1/audits", json=body, headers=AUDIT_OPERATOR_HEADERS).json()["audit_id"]
    deadline = time.monotonic() + 30
    while audit.get(f"/v1/audits/{running}", headers=AUDIT_OPERATOR_HEADERS).json()["state"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    for audit_id in (queued, running):
        answer = audit.post(f"/v1/audits/{audit_id}/cancel", headers=AUDIT_OPERATOR_HEADERS)
        assert answer.status_code == 200 and set(answer.json()) >= {"audit_id", "state"}, answer.text
    for audit_id in (running, queued):
        while (state := audit.get(f"/v1/audits/{audit_id}", headers=AUDIT_OPERATOR_HEADERS).json()["state"]) \
                not in ("cancelled", "failed", "succeeded"):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert state == "cancelled"
    again = audit.post(f"/v1/audits/{running}/cancel", headers=AUDIT_OPERATOR_HEADERS)
    security.refused("cancel_ended_audit", again.status_code, expected=409)
    assert set(again.json()) == {"code", "message", "detail"}
    # the typed client: a cancelled audit is final for wait(), and cancelling it again is a ConflictError
    token = tmp_path / "operator-token"
    token.write_text(AUDIT_OPERATOR + "\n")
    unused = httpx.MockTransport(lambda request: httpx.Response(404))
    with Federation("http://agg.test", token_file=token, audit_url="http://testserver", transport=unused,
                    audit_transport=audit._transport) as fed:
        assert fed.audits.get(queued).wait(timeout_s=10).state == "cancelled"
        with pytest.raises(ConflictError):
            fed.audits.get(running).cancel()
