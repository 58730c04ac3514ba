"""A kit app served by real uvicorn with mutual TLS from ``uvicorn_kwargs()``, called by PeerClient."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from splitunet.errors import ConfigurationError, PeerError
from splitunet.service.client import PeerClient, PeerTimeouts, tls_context
from splitunet.service.pki import ThrowawayCA
from splitunet.service.settings import TLS_SERVER_ENV


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    ca = ThrowawayCA(tmp_path, "ca")
    ca.server("server", hosts=("localhost",))
    ca.client("client", "aggregator")
    return tmp_path


TLS_SETTINGS = {"tls_client_auth": "required", "host": "127.0.0.1", "port": 0, "log_level": "warning"}


def test_tls_configured_app_refuses_to_start_outside_serve(make_app, pki: Path, monkeypatch) -> None:
    """`uvicorn --factory` with TLS files configured would serve plain HTTP: the factory refuses instead."""
    monkeypatch.delenv(TLS_SERVER_ENV, raising=False)
    with pytest.raises(ConfigurationError, match="splitunet serve"):
        make_app(tls_cert_file=pki / "server.pem", tls_key_file=pki / "server.key", tls_ca_file=pki / "ca.pem",
                 **TLS_SETTINGS)


def test_plain_http_request_to_a_tls_app_is_refused(make_app, pki: Path, headers, monkeypatch) -> None:
    """Belt and braces: a TLS-configured app answers nothing over plain HTTP (421 tls_required)."""
    from fastapi.testclient import TestClient

    monkeypatch.setenv(TLS_SERVER_ENV, "1")
    app, _ = make_app(tls_cert_file=pki / "server.pem", tls_key_file=pki / "server.key", tls_ca_file=pki / "ca.pem",
                      **TLS_SETTINGS)
    with TestClient(app, base_url="http://testserver") as client:
        r = client.post("/v1/echo", json={"value": 1}, headers=headers)
    assert r.status_code == 421 and r.json()["code"] == "tls_required"


def test_optional_client_auth_is_not_a_mode(make_app, pki: Path) -> None:
    with pytest.raises(ValueError, match="tls_client_auth"):
        make_app(tls_cert_file=pki / "server.pem", tls_key_file=pki / "server.key", tls_ca_file=pki / "ca.pem",
                 tls_client_auth="optional")


@pytest.fixture
def served(make_app, pki: Path, monkeypatch) -> Iterator[str]:
    monkeypatch.setenv(TLS_SERVER_ENV, "1")  # what `splitunet serve` sets when it hands the files to uvicorn
    app, _ = make_app(
        host="127.0.0.1",
        port=0,
        tls_cert_file=pki / "server.pem",
        tls_key_file=pki / "server.key",
        tls_ca_file=pki / "ca.pem",
        tls_client_auth="required",
        log_level="warning",
    )
    kwargs = app.state.settings.uvicorn_kwargs()
    server = uvicorn.Server(uvicorn.Config(app, **kwargs))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"https://localhost:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_mutual_tls_end_to_end(served: str, pki: Path, tokens) -> None:
    timeouts = PeerTimeouts(connect=5, read=10, write=10, pool=5)
    context = tls_context(ca_file=pki / "ca.pem", cert_file=pki / "client.pem", key_file=pki / "client.key")
    with PeerClient(served, name="demo", token=tokens[0], verify=context, timeouts=timeouts) as client:
        assert client.post_json("/v1/echo", {"value": 9}) == {"value": 9}
        assert client.get_json("/healthz")["status"] == "ok"
    # Without a client certificate the TLS handshake is refused: a transport error, retried, then PeerError.
    anonymous = tls_context(ca_file=pki / "ca.pem")
    sleeps: list[float] = []
    with PeerClient(served, verify=anonymous, timeouts=timeouts, retries=1, sleep=sleeps.append) as client:
        with pytest.raises(PeerError, match="attempt"):
            client.get_json("/healthz")
    # A client that does not trust the server's CA refuses the server.
    with PeerClient(served, timeouts=timeouts, retries=0) as client:
        with pytest.raises(PeerError, match="ConnectError"):
            client.get_json("/healthz")
