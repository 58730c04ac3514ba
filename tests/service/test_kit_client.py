"""PeerClient: explicit timeouts, bounded retries, error-body mapping, bundles, and a real kit app as peer."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from splitunet.errors import PeerError
from splitunet.service.client import BodyChunks, PeerClient, PeerTimeouts, tls_context
from splitunet.wire import CONTENT_TYPE, BundleExpectation, BundleKind, BundleMeta, encode_bundle

Handler = Callable[[httpx.Request], httpx.Response]


def _client(handler: Handler, sleeps: list[float] | None = None, **kwargs) -> PeerClient:
    kwargs.setdefault("retries", 2)
    return PeerClient(
        "http://site-t1:8000",
        name="site-t1",
        token="peer-token",
        transport=httpx.MockTransport(handler),
        sleep=(sleeps.append if sleeps is not None else lambda s: None),
        **kwargs,
    )


def test_explicit_timeouts_and_headers_on_every_request() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"ok": True})

    timeouts = PeerTimeouts(connect=1.0, read=2.0, write=3.0, pool=4.0)
    with _client(handler, timeouts=timeouts) as client:
        assert client.get_json("/v1/info") == {"ok": True}
        assert client.post_json("/v1/x", {"a": 1}) == {"ok": True}
    assert len(seen) == 2
    for request in seen:
        assert request.extensions["timeout"] == {"connect": 1.0, "read": 2.0, "write": 3.0, "pool": 4.0}
        assert request.headers["authorization"] == "Bearer peer-token"
        assert request.headers["accept-encoding"] == "identity"
    default = PeerClient("http://x", transport=httpx.MockTransport(handler))
    default.get_json("/")
    assert seen[-1].extensions["timeout"] == {"connect": 5.0, "read": 120.0, "write": 120.0, "pool": 10.0}


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_connection_errors_retried_a_bounded_number_of_times(method: str) -> None:
    calls: list[httpx.Request] = []
    sleeps: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.ConnectError("connection refused", request=request)

    client = _client(handler, sleeps, retries=3, backoff_s=0.1, backoff_max_s=0.25)
    with pytest.raises(PeerError, match="site-t1: .* failed after 4 attempt") as info:
        client.request(method, "/v1/forward")
    assert len(calls) == 4  # 1 + 3 retries, even for a POST: it never reached the peer
    assert sleeps == [0.1, 0.2, 0.25]  # exponential, capped
    assert info.value.detail["attempts"] == 4 and info.value.detail["error"] == "ConnectError"
    assert info.value.detail["code"] is None and info.value.status_code == 502


def test_connection_error_then_success() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) == 1:
            raise httpx.ConnectTimeout("slow", request=request)
        return httpx.Response(200, json={"step": 1})

    assert _client(handler).post_json("/v1/forward", {}) == {"step": 1}
    assert len(calls) == 2


def test_read_timeout_retried_only_when_idempotent() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        raise httpx.ReadTimeout("no answer", request=request)

    with pytest.raises(PeerError, match="ReadTimeout"):
        _client(handler).post_json("/v1/backward", {})
    assert calls == ["POST"]  # may have been applied by the peer: never resent
    calls.clear()
    with pytest.raises(PeerError):
        _client(handler).post_json("/v1/forward", {}, idempotent=True)
    assert calls == ["POST"] * 3
    calls.clear()
    with pytest.raises(PeerError):
        _client(handler).get_json("/v1/info")
    assert calls == ["GET"] * 3


def test_unavailable_retried_for_idempotent_calls_only() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        if len(calls) < 3:
            return httpx.Response(503, json={"code": "not_ready", "message": "starting", "detail": None})
        return httpx.Response(200, json={"ready": True})

    assert _client(handler).get_json("/v1/info") == {"ready": True} and len(calls) == 3
    calls.clear()
    with pytest.raises(PeerError) as info:
        _client(handler).post_json("/v1/backward", {})
    assert len(calls) == 1 and info.value.detail["code"] == "not_ready"


def test_error_body_mapped_to_peer_error_and_not_retried() -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        body = {"code": "out_of_order", "message": "backward for step 3 without its forward", "detail": {"step": 3}}
        return httpx.Response(409, json=body)

    with pytest.raises(PeerError) as info:
        _client(handler).get_json("/v1/state")
    err = info.value
    assert len(calls) == 1
    assert err.code == "peer_failed" and err.status_code == 502
    assert err.detail["code"] == "out_of_order" and err.detail["status"] == 409
    assert err.detail["peer"] == "site-t1"
    # the remote body is never echoed: only its stable code and the status
    assert err.detail["detail"] is None and err.detail["message"] is None and "without its forward" not in str(err)
    assert "HTTP 409 out_of_order" in err.message


def test_non_json_error_body() -> None:
    client = _client(lambda r: httpx.Response(500, text="<html>proxy error</html>"))
    with pytest.raises(PeerError, match="HTTP 500 Internal Server Error$") as info:
        client.post_json("/v1/x", {})
    assert info.value.detail["code"] is None and info.value.detail["status"] == 500


def test_invalid_json_success_body() -> None:
    with pytest.raises(PeerError, match="invalid JSON"):
        _client(lambda r: httpx.Response(200, text="not json")).get_json("/")


def test_response_size_is_capped() -> None:
    client = _client(lambda r: httpx.Response(200, content=b"x" * 2000), max_response_bytes=1000)
    with pytest.raises(PeerError, match="exceeds 1000 bytes"):
        client.get_json("/")

    def streamed(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=iter([b"x" * 600, b"x" * 600]))  # no Content-Length

    with pytest.raises(PeerError, match="exceeds 1000 bytes"):
        _client(streamed, max_response_bytes=1000).get_json("/")


def _bundle(step: int = 4) -> bytes:
    meta = BundleMeta(run_id="run", step=step, site="t1", kind=BundleKind.ACTIVATIONS)
    return encode_bundle({"level_0": torch.ones(2, 3, 4, 4)}, meta=meta, max_bytes=2**20)


def test_bundles_both_ways() -> None:
    received: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        received.append(request)
        if request.url.path == "/v1/forward":
            return httpx.Response(200, content=_bundle(), headers={"Content-Type": CONTENT_TYPE})
        return httpx.Response(200, json={"applied": True})

    client = _client(handler)
    bundle = client.post_json_for_bundle(
        "/v1/forward", {"step": 4}, expect=BundleExpectation(names={"level_0"}, step=4, batch_size=2)
    )
    assert bundle.meta.step == 4 and torch.equal(bundle.tensors["level_0"], torch.ones(2, 3, 4, 4))
    assert received[0].headers["accept"] == CONTENT_TYPE
    assert client.post_bundle("/v1/backward", _bundle(), params={"step": 4}) == {"applied": True}
    assert received[1].headers["content-type"] == CONTENT_TYPE and received[1].content == _bundle()
    assert received[1].url.params["step"] == "4"


def test_bundle_body_goes_in_slices_with_its_length_and_is_resent_whole_on_retry() -> None:
    """A bundle is posted as zero-copy slices with an explicit Content-Length (never chunked, which services refuse);
    a retried request sends every byte again."""
    data = bytes(range(256)) * 40  # 10240 bytes
    assert [bytes(c) for c in BodyChunks(data, chunk_bytes=4096)] == [data[:4096], data[4096:8192], data[8192:]]
    assert len(BodyChunks(data)) == len(data) and b"".join(BodyChunks(data)) == b"".join(BodyChunks(data)) == data
    with pytest.raises(ValueError, match="chunk_bytes must be positive"):
        BodyChunks(data, chunk_bytes=0)
    received: list[tuple[dict, bytes]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = request.read()
        if not received:
            received.append(({}, b""))
            raise httpx.ConnectError("refused", request=request)
        received.append((dict(request.headers), body))
        return httpx.Response(200, json={"applied": True})

    assert _client(handler).post_bundle("/v1/backward", data) == {"applied": True}
    headers, body = received[-1]
    assert len(received) == 2 and body == data
    assert headers["content-length"] == str(len(data)) and "transfer-encoding" not in headers


def test_bad_bundle_from_peer_is_a_peer_error() -> None:
    def wrong_step(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=_bundle(step=5), headers={"Content-Type": CONTENT_TYPE})

    with pytest.raises(PeerError, match=r"invalid bundle \(bad_bundle\)$") as info:  # logged, not echoed
        _client(wrong_step).post_json_for_bundle("/v1/forward", {}, expect=BundleExpectation(step=4))
    assert info.value.detail["code"] == "bad_bundle"

    def json_instead(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"oops": 1})

    with pytest.raises(PeerError, match="expected a application/vnd.splitunet.bundle response"):
        _client(json_instead).post_json_for_bundle("/v1/forward", {})


def test_against_a_kit_app(make_app, tokens) -> None:
    """The peer is a real kit app (in process, through the TestClient's transport)."""
    app, runtimes = make_app()
    with TestClient(app) as test_client:
        transport = test_client._transport  # the in-process ASGI transport, with the app's lifespan running
        good = PeerClient("http://testserver", name="demo", token=tokens[0], transport=transport)
        bad = PeerClient("http://testserver", name="demo", token=tokens[1], transport=transport, retries=0)
        assert good.post_json("/v1/echo", {"value": 5}) == {"value": 5}
        assert good.get_json("/healthz")["status"] == "ok"
        with pytest.raises(PeerError) as denied:
            bad.post_json("/v1/echo", {"value": 5})
        with pytest.raises(PeerError) as conflict:
            good.post_json("/v1/backward", {})
        with pytest.raises(PeerError) as invalid:
            good.post_json("/v1/echo", {"value": -1})
    assert denied.value.detail["code"] == "unauthorized" and denied.value.detail["status"] == 401
    assert conflict.value.detail["code"] == "out_of_order" and conflict.value.detail["detail"] is None
    assert invalid.value.detail["code"] == "invalid_request"
    assert runtimes[0].calls == 1


def test_argument_validation() -> None:
    with pytest.raises(ValueError, match="base_url"):
        PeerClient("site-t1:8000")
    with pytest.raises(ValueError, match="retries"):
        PeerClient("http://x", retries=-1)
    with pytest.raises(ValueError, match="retries"):
        PeerClient("http://x", retries=100)
    with pytest.raises(ValueError, match="timeouts.read"):
        PeerTimeouts(read=0)
    with pytest.raises(ValueError, match="together"):
        tls_context(cert_file="c.pem")
    assert isinstance(tls_context(), __import__("ssl").SSLContext)
