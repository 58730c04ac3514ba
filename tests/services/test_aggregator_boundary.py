"""The aggregator is no confused deputy: jobs name registry sites only; scoped credentials; no remote body is
echoed; a bad registry is a start-up error; finished jobs release what they hold."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from federation_testkit import (
    AGG_HEADERS,
    SITE_HEADERS,
    SITE_TOKENS,
    identity_aligner,
    peers,
    run_job,
    write_registry,
)

from services.aggregator.app import create_app as create_aggregator_app
from splitunet.errors import ConfigurationError
from splitunet.registry import SiteRegistry


def job_spec(**overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"sites": peers(), "model": {"spatial_dims": 2, "features": [4, 8, 16]}, "roi": [16, 16],
                            "batch_size": 2, "steps": 2, "val_cases": 1, "seed": 3}
    return spec | overrides


@pytest.mark.parametrize(
    "sites",
    [
        pytest.param([{"name": "t1", "url": "http://attacker.example", "token_file": "/etc/passwd"}], id="url+file"),
        pytest.param([{"name": "t1", "url": "http://127.0.0.1:9"}], id="url"),
        pytest.param(["http://attacker.example"], id="url-as-name"),
    ],
)
def test_a_job_may_not_carry_urls_or_credentials(aggregator, sites, security) -> None:
    response = aggregator.post("/v1/jobs", json=job_spec(sites=sites), headers=AGG_HEADERS)
    security.refused("confused_deputy", response.status_code, expected=422)
    assert aggregator.get("/v1/jobs", headers=AGG_HEADERS).json() == []


def test_a_job_may_name_only_registry_sites(aggregator, security) -> None:
    response = aggregator.post("/v1/jobs", json=job_spec(sites=["t1", "elsewhere"]), headers=AGG_HEADERS)
    security.refused("unregistered_site", response.status_code, expected=403)
    body = response.json()
    assert body["detail"]["rule"] == "site_registry" and body["detail"]["unknown"] == ["elsewhere"]
    assert aggregator.get("/v1/jobs", headers=AGG_HEADERS).json() == []


def test_job_api_takes_only_the_operator_credential(aggregator, security) -> None:
    for headers in ({}, SITE_HEADERS, {"Authorization": "Bearer forged-0000000000000000"}):
        response = aggregator.post("/v1/jobs", json=job_spec(), headers=headers)
        security.refused("unauthenticated", response.status_code, expected=401)
        assert response.json()["code"] == "unauthorized"


def test_no_remote_body_or_token_in_job_status(start_app, aggregator_settings, tmp_path, security) -> None:
    """A site answering with an error body full of its own text: the job fails, the status keeps only the code."""
    leak = "REMOTE-BODY-7f3a with internal detail"

    def hostile(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500, json={"code": "internal", "message": leak, "detail": {"secret": leak}})

    app = create_aggregator_app(aggregator_settings(), aligner=identity_aligner,
                                transport_factory=lambda peer: httpx.MockTransport(hostile))
    status = run_job(start_app(app), job_spec())
    assert status["state"] == "failed" and status["error"]["code"] == "peer_failed", status
    text = json.dumps(status)
    assert "REMOTE-BODY" not in text and not any(token in text for token in SITE_TOKENS.values())
    security.blocked("remote_body_echo")  # the job failed with a typed peer error that echoes nothing


@pytest.mark.parametrize(
    ("write", "match"),
    [
        pytest.param(lambda d: d.joinpath("sites.json").write_text("{not yaml: ["), "cannot read", id="garbage"),
        pytest.param(lambda d: d.joinpath("sites.json").write_text('{"sites": []}'), "sites", id="empty"),
        pytest.param(
            lambda d: d.joinpath("sites.json").write_text(
                '{"sites": [{"name": "t1", "url": "http://x", "token_file": "missing"}]}'),
            "token file", id="missing-token-file"),
    ],
)
def test_a_bad_registry_is_a_start_up_error(aggregator_settings, tmp_path: Path, write, match) -> None:
    folder = tmp_path / "bad-registry"
    folder.mkdir()
    write(folder)
    with pytest.raises(ValueError, match=match):
        aggregator_settings(sites=folder / "sites.json")
    with pytest.raises(ValueError, match="AGG_SITES"):
        aggregator_settings(sites=tmp_path / "no-such-file.json")


def test_http_site_url_with_tls_configured_is_a_configuration_error(tmp_path: Path, aggregator_settings) -> None:
    from splitunet.service.pki import ThrowawayCA

    ca = ThrowawayCA(tmp_path / "pki")
    registry = write_registry(tmp_path / "registry")  # http:// URLs
    with pytest.raises(ConfigurationError, match="https"):
        SiteRegistry.load(registry, tls_configured=True)
    with pytest.raises(ValueError, match="https"):
        aggregator_settings(sites=registry, site_ca_file=ca.cert_file)


def test_finished_jobs_release_threads_clients_and_model(aggregator, sites, security) -> None:
    first = run_job(aggregator, job_spec(run_id="job-a"))
    manager = aggregator.app.state.runtime.jobs
    job_a = manager.get("job-a")
    assert first["state"] == "succeeded" and job_a.aggregator is not None  # the latest keeps its model
    clients_a = list(job_a.clients.values())
    second = run_job(aggregator, job_spec(run_id="job-b"))
    assert second["state"] == "succeeded"
    # job-b's thread releases the older jobs once it has published its final state: wait for that
    deadline = time.monotonic() + 60
    while "job-a" not in manager._released or job_a.aggregator is not None:
        assert time.monotonic() < deadline, "job-a was not released after job-b finished"
        time.sleep(0.05)
    assert job_a.aggregator is None and job_a.pool._shutdown
    assert clients_a and all(c.peer._client.is_closed for c in clients_a)
    # and dropped: a released job keeps its status, not its clients, grids, recorder or gate
    assert job_a.clients == {} and job_a.grids == {} and job_a.privacy_gate is None
    assert "job-a" not in manager._threads
    # and the sites were told: job-a's run may make room for a new one at once, job-b's (the latest) may not
    for site in sites.values():
        runs = site.app.state.runtime._runs
        assert runs["job-a"].active == float("-inf") and runs["job-b"].active > float("-inf")
    assert aggregator.get("/v1/jobs/job-a", headers=AGG_HEADERS).json()["state"] == "succeeded"  # status stays
    refused = aggregator.post("/v1/infer", json={"case_id": first["val_case_ids"][0], "job_id": "job-a"},
                              headers=AGG_HEADERS)
    security.refused("released_job_inference", refused.status_code, expected=409)


def test_aggregator_checkpoints_count_against_a_disk_budget(start_app, aggregator_settings, sites, security) -> None:
    app = create_aggregator_app(aggregator_settings(checkpoint_budget_bytes=1000), aligner=identity_aligner,
                                transport_factory=lambda peer: sites[peer.name]._transport)
    status = run_job(start_app(app), job_spec())
    assert status["state"] == "failed" and status["error"]["code"] == "policy_violation", status
    assert "AGG_CHECKPOINT_BUDGET_BYTES" in status["error"]["message"]
    security.blocked("disk_budget")
