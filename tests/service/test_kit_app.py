"""The service kit's app: typed error bodies, auth, body limit, health/readiness, metrics, lifespan."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from splitunet.errors import ConfigurationError
from splitunet.service.auth import BearerAuth
from splitunet.service.metrics import ServiceMetrics
from splitunet.wire import CONTENT_TYPE, decode_bundle


def _is_error_body(body: object, code: str) -> bool:
    return isinstance(body, dict) and set(body) == {"code", "message", "detail"} and body["code"] == code


# --- error bodies -----------------------------------------------------------------------------------------


def test_domain_error_becomes_typed_body(make_app, headers) -> None:
    app, _ = make_app()
    with TestClient(app) as client:
        r = client.post("/v1/backward", headers=headers)
    assert r.status_code == 409
    assert r.json() == {
        "code": "out_of_order",
        "message": "backward for step 3 without its forward",
        "detail": {"step": 3},
    }


def test_validation_error_is_422_invalid_request(make_app, headers) -> None:
    app, _ = make_app()
    with TestClient(app) as client:
        r = client.post("/v1/echo", json={"value": -1}, headers=headers)
        bad_json = client.post(
            "/v1/echo", content=b"{not json", headers={**headers, "Content-Type": "application/json"}
        )
    assert r.status_code == 422 and _is_error_body(r.json(), "invalid_request")
    assert r.json()["detail"][0]["loc"] == ["body", "value"]
    assert "body.value" in r.json()["message"]
    assert "input" not in r.json()["detail"][0]
    assert bad_json.status_code == 422 and _is_error_body(bad_json.json(), "invalid_request")


def test_unexpected_error_is_500_without_internals(make_app, headers, caplog) -> None:
    app, _ = make_app()
    with caplog.at_level(logging.ERROR, logger="splitunet.service.errors"):
        with TestClient(app) as client:  # raise_server_exceptions: nothing escapes the app
            r = client.get("/v1/boom", headers=headers)
    assert r.status_code == 500
    body = r.json()
    assert _is_error_body(body, "internal") and body["message"] == "internal server error"
    assert "secret" not in r.text and "Traceback" not in r.text and "RuntimeError" not in r.text
    assert body["detail"]["request_id"] == r.headers["x-request-id"]
    labels = {"route": "/v1/boom", "method": "GET", "status": "500"}
    assert app.state.metrics.value("splitunet_http_requests_total", labels) == 1
    logged = [rec for rec in caplog.records if rec.exc_info]
    assert logged and "secret internal detail" in str(logged[0].exc_info[1])


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [("GET", "/nope", 404, "not_found"), ("GET", "/v1/echo", 405, "method_not_allowed")],
)
def test_http_errors_get_typed_bodies(make_app, headers, method, path, status, code) -> None:
    app, _ = make_app()
    with TestClient(app) as client:
        r = client.request(method, path, headers=headers)
    assert r.status_code == status and _is_error_body(r.json(), code)


# --- auth -------------------------------------------------------------------------------------------------


def test_auth_required_accepted_rejected(make_app, tokens) -> None:
    token, other = tokens
    app, _ = make_app(auth_tokens=[other])
    with TestClient(app) as client:
        missing = client.post("/v1/echo", json={"value": 1})
        wrong = client.post("/v1/echo", json={"value": 1}, headers={"Authorization": "Bearer nope"})
        basic = client.post("/v1/echo", json={"value": 1}, headers={"Authorization": f"Basic {token}"})
        ok = client.post("/v1/echo", json={"value": 1}, headers={"Authorization": f"Bearer {token}"})
        rotated = client.post("/v1/echo", json={"value": 2}, headers={"Authorization": f"bearer {other}"})
        public = [client.get(p).status_code for p in ("/healthz", "/metrics")]
    for r in (missing, wrong, basic):
        assert r.status_code == 401 and _is_error_body(r.json(), "unauthorized")
        assert r.headers["www-authenticate"] == "Bearer"
    assert "missing bearer token" in missing.json()["message"]
    assert ok.status_code == 200 and ok.json() == {"value": 1}
    assert rotated.status_code == 200 and rotated.json() == {"value": 2}
    assert public == [200, 200]


def test_auth_rejects_before_validation_and_runtime(make_app) -> None:
    app, runtimes = make_app()
    with TestClient(app) as client:
        r = client.post("/v1/echo", json={"value": -5})
    assert r.status_code == 401 and runtimes[0].calls == 0


def test_token_read_from_file_and_rotated(make_app, tmp_path: Path) -> None:
    secret = tmp_path / "token"
    secret.write_text("# mounted secret\nfile-token-1111111111\n")
    app, _ = make_app(auth_token=None, auth_token_file=secret)
    with TestClient(app) as client:
        assert client.post(
            "/v1/echo", json={"value": 1}, headers={"Authorization": "Bearer file-token-1111111111"}
        ).is_success
        secret.write_text("file-token-2222222222\n")
        st = secret.stat()
        os.utime(secret, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # make the change visible on coarse clocks
        old = client.post("/v1/echo", json={"value": 1}, headers={"Authorization": "Bearer file-token-1111111111"})
        new = client.post("/v1/echo", json={"value": 1}, headers={"Authorization": "Bearer file-token-2222222222"})
    assert old.status_code == 401 and new.status_code == 200


def test_auth_disabled_must_be_explicit(make_app) -> None:
    with pytest.raises(ValueError, match="no auth token configured: set DEMO_AUTH_TOKEN"):
        make_app(auth_token=None)
    with pytest.raises(ConfigurationError, match="no bearer token configured"):
        BearerAuth()
    app, _ = make_app(auth_token=None, auth_disabled=True)
    with TestClient(app) as client:
        assert client.post("/v1/echo", json={"value": 3}).json() == {"value": 3}


# --- body size limit -------------------------------------------------------------------------------------


def test_oversize_body_rejected_by_content_length(make_app, headers) -> None:
    app, runtimes = make_app(max_request_bytes=1000)
    with TestClient(app) as client:
        r = client.post("/v1/double", content=b"x" * 1001, headers={**headers, "Content-Type": CONTENT_TYPE})
        ok = client.post("/v1/echo", json={"value": 1}, headers=headers)
    assert r.status_code == 413 and _is_error_body(r.json(), "request_too_large")
    assert r.json()["detail"] == {"size": 1001, "max_bytes": 1000}
    assert runtimes[0].calls == 1 and ok.status_code == 200  # only the echo reached the runtime


def test_streamed_body_without_length_is_refused_411(make_app, headers) -> None:
    app, runtimes = make_app(max_request_bytes=1000)

    def chunks() -> Iterator[bytes]:
        for _ in range(10):
            yield b"x" * 300

    with TestClient(app) as client:
        r = client.post("/v1/double", content=chunks(), headers={**headers, "Content-Type": CONTENT_TYPE})
        as_json = client.post("/v1/echo", content=chunks(), headers={**headers, "Content-Type": "application/json"})
    assert "content-length" not in {k.lower() for k in r.request.headers}
    for response in (r, as_json):  # refused by the gate before the body is read
        assert response.status_code == 411 and _is_error_body(response.json(), "length_required")
    assert runtimes[0].calls == 0


# --- bundles through a route -----------------------------------------------------------------------------


def test_bundle_route_round_trip_and_errors(make_app, headers, bundle_bytes) -> None:
    app, _ = make_app()
    with TestClient(app) as client:
        r = client.post("/v1/double", content=bundle_bytes, headers={**headers, "Content-Type": CONTENT_TYPE})
        wrong_type = client.post("/v1/double", content=bundle_bytes, headers={**headers, "Content-Type": "text/plain"})
        corrupt = client.post(
            "/v1/double", content=bundle_bytes[:-1], headers={**headers, "Content-Type": CONTENT_TYPE}
        )
    assert r.status_code == 200 and r.headers["content-type"] == CONTENT_TYPE
    assert torch.equal(decode_bundle(r.content, max_bytes=2**20).tensors["x"], 2 * torch.arange(6.0).reshape(2, 3))
    assert wrong_type.status_code == 415 and _is_error_body(wrong_type.json(), "unsupported_media_type")
    assert corrupt.status_code == 400 and _is_error_body(corrupt.json(), "bad_bundle")
    assert "truncated" in corrupt.json()["message"]


# --- health, readiness, lifespan ---------------------------------------------------------------------------


@pytest.mark.parametrize("declared_delta", [1, -1], ids=["shorter-than-declared", "longer-than-declared"])
def test_bundle_body_that_disagrees_with_its_length_is_400(make_app, headers, bundle_bytes, declared_delta) -> None:
    """The bundle body is read into a buffer of its declared length: a body that does not fill it exactly is the
    client's mistake (400, nothing decoded), never a 500."""
    app, runtimes = make_app()
    declared = len(bundle_bytes) + declared_delta
    with TestClient(app) as client:
        r = client.post("/v1/double", content=bundle_bytes,
                        headers={**headers, "Content-Type": CONTENT_TYPE, "Content-Length": str(declared)})
    assert r.status_code == 400 and _is_error_body(r.json(), "body_length_mismatch"), r.text
    assert str(declared) in r.json()["message"] and runtimes[0].calls == 0


def test_healthz_and_readyz_follow_the_runtime(make_app) -> None:
    app, runtimes = make_app()
    cold = TestClient(app)  # no lifespan: the service has not started
    assert cold.get("/healthz").json() == {"status": "ok", "service": "demo", "version": "1.2.3"}
    starting = cold.get("/readyz")
    assert starting.status_code == 503 and starting.json()["message"] == "the service is starting"
    with TestClient(app) as client:
        not_ready = client.get("/readyz")
        runtimes[0].ready = True
        ready = client.get("/readyz")
    assert not_ready.status_code == 503 and _is_error_body(not_ready.json(), "not_ready")
    assert not_ready.json()["message"] == "model not loaded"
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


def test_readiness_check_that_raises_is_not_ready(make_app) -> None:
    def broken(runtime: object) -> bool:
        raise RuntimeError("boom")

    app, _ = make_app(readiness=broken)
    with TestClient(app) as client:
        r = client.get("/readyz")
    assert r.status_code == 503 and r.json()["message"] == "the readiness check failed"


def test_runtime_built_in_lifespan_and_closed(make_app, headers) -> None:
    app, runtimes = make_app()
    assert runtimes == []  # nothing heavy at construction
    r = TestClient(app).post("/v1/echo", json={"value": 1}, headers=headers)
    assert r.status_code == 503 and _is_error_body(r.json(), "not_ready")
    with TestClient(app) as client:
        assert len(runtimes) == 1 and app.state.runtime is runtimes[0] and not runtimes[0].closed
        assert client.post("/v1/echo", json={"value": 1}, headers=headers).status_code == 200
    assert runtimes[0].closed and app.state.runtime is None


def test_request_id_is_echoed_or_generated(make_app) -> None:
    app, _ = make_app()
    with TestClient(app) as client:
        given = client.get("/healthz", headers={"X-Request-ID": "abc-123"})
        made = client.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces"})
    assert given.headers["x-request-id"] == "abc-123"
    assert len(made.headers["x-request-id"]) == 32


def test_one_access_log_line_per_request(make_app, headers, caplog) -> None:
    app, _ = make_app()
    with caplog.at_level(logging.INFO, logger="splitunet.service.access"), TestClient(app) as client:
        client.post("/v1/echo", json={"value": 1}, headers={**headers, "X-Request-ID": "req-42"})
        client.get("/healthz")  # probes log at DEBUG only
    lines = [r.getMessage() for r in caplog.records if r.name == "splitunet.service.access"]
    assert len(lines) == 1
    assert lines[0].startswith("POST /v1/echo -> 200 in ") and lines[0].endswith("id=req-42")


# --- metrics -----------------------------------------------------------------------------------------------


def test_metrics_count_requests_bytes_and_latency(make_app, headers, bundle_bytes) -> None:
    app, _ = make_app()
    metrics: ServiceMetrics = app.state.metrics
    with TestClient(app) as client:
        sent = received = 0
        for value in (1, 22, 333):
            r = client.post("/v1/echo", json={"value": value}, headers=headers)
            sent += len(r.request.content)
            received += len(r.content)
        client.get("/v1/items/7", headers=headers)
        client.get("/v1/items/8", headers=headers)
        client.get("/no/such/path", headers=headers)
        client.post("/v1/echo", json={"value": 1})  # 401 before its body is read
        client.post("/v1/double", content=bundle_bytes, headers={**headers, "Content-Type": CONTENT_TYPE})
        text = client.get("/metrics")
    echo = {"route": "/v1/echo", "method": "POST"}
    assert metrics.value("splitunet_http_requests_total", {**echo, "status": "200"}) == 3
    assert metrics.value("splitunet_http_requests_total", {**echo, "status": "401"}) == 1
    assert metrics.value("splitunet_http_request_bytes_total", echo) == sent  # the refused body was never read
    assert metrics.value("splitunet_http_response_bytes_total", echo) > received
    assert metrics.value("splitunet_http_request_duration_seconds_count", echo) == 4
    items = {"route": "/v1/items/{item_id}", "method": "GET", "status": "200"}
    assert metrics.value("splitunet_http_requests_total", items) == 2
    unmatched = {"route": "<unmatched>", "method": "GET", "status": "404"}
    assert metrics.value("splitunet_http_requests_total", unmatched) == 1
    assert metrics.value("splitunet_tensor_bytes_in_total") == len(bundle_bytes)
    assert text.status_code == 200 and text.headers["content-type"].startswith("text/plain")
    assert 'splitunet_service_info{service="demo",version="1.2.3"} 1.0' in text.text
    assert 'splitunet_http_requests_total{method="POST",route="/v1/echo",status="200"} 3.0' in text.text


def test_two_apps_do_not_share_metrics(make_app, headers) -> None:
    app_a, _ = make_app()
    app_b, _ = make_app()
    with TestClient(app_a) as a, TestClient(app_b) as b:
        a.post("/v1/echo", json={"value": 1}, headers=headers)
        a.post("/v1/echo", json={"value": 1}, headers=headers)
        b.post("/v1/echo", json={"value": 1}, headers=headers)
    labels = {"route": "/v1/echo", "method": "POST", "status": "200"}
    assert app_a.state.metrics.value("splitunet_http_requests_total", labels) == 2
    assert app_b.state.metrics.value("splitunet_http_requests_total", labels) == 1


def test_custom_metrics_are_created_once() -> None:
    metrics = ServiceMetrics("site", "0.1")
    step = metrics.histogram("step_seconds", "split step latency", ["phase"])
    assert metrics.histogram("step_seconds", "split step latency", ["phase"]) is step
    step.labels(phase="train").observe(0.3)
    assert metrics.value("splitunet_step_seconds_count", {"phase": "train"}) == 1
    with pytest.raises(ValueError, match="already exists"):
        metrics.counter("step_seconds", "clash")
    with pytest.raises(ValueError, match="service"):
        ServiceMetrics("")
