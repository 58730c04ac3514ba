"""A kit app served by real uvicorn from ``uvicorn_kwargs()``: half-open connections are bounded and closed, a
client's forwarded headers are not believed, and the HTTPS-only check reads the transport."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from demo_service import TOKEN, DemoSettings
from fastapi import APIRouter, Request

from splitunet.service.app import create_service_app
from splitunet.service.settings import TLS_SERVER_ENV

HEADERS = {"Authorization": f"Bearer {TOKEN}"}


def whoami_app(**settings):
    router = APIRouter(prefix="/v1")

    @router.get("/whoami")
    def whoami(request: Request) -> dict[str, str]:
        return {"client": request.client.host if request.client else "", "scheme": request.url.scheme}

    values = {"auth_token": TOKEN, "host": "127.0.0.1", "port": 0, "log_level": "warning"} | settings
    return create_service_app(title="limits", version="1", settings=DemoSettings(**values), routers=[router])


@contextmanager
def serve(app, **uvicorn_overrides) -> Iterator[tuple[int, uvicorn.Server]]:
    """Run ``app`` with the kit's uvicorn settings (or ``uvicorn_overrides`` instead) in a thread; yield its port."""
    kwargs = uvicorn_overrides or app.state.settings.uvicorn_kwargs()
    server = uvicorn.Server(uvicorn.Config(app, **kwargs))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield server.servers[0].sockets[0].getsockname()[1], server
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def closed_by_server(sock: socket.socket, wait_s: float) -> bool:
    sock.settimeout(wait_s)
    try:
        sock.recv(4096)  # b"" (EOF) or an error response before the close
        return True
    except TimeoutError:
        return False
    except OSError:
        return True


def test_half_open_connections_are_bounded_and_closed(security) -> None:
    app = whoami_app(max_connections=8, header_timeout_s=1.0)
    with serve(app) as (port, server):
        flood = []
        for i in range(40):  # a bounded flood: 5x the limit, half silent, half a partial request line
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            if i % 2:
                s.sendall(b"GET /v1/whoami HTTP/1.1\r\nHost: x\r\n")
            flood.append(s)
        time.sleep(0.3)
        assert len(server.server_state.connections) <= 8, len(server.server_state.connections)
        # a client that sends its request at once is served during the flood (the oldest half-open one yields)
        assert httpx.get(f"http://127.0.0.1:{port}/v1/whoami", headers=HEADERS, timeout=5).status_code == 200
        closed = sum(closed_by_server(s, 3.0) for s in flood)
        for s in flood:
            s.close()
        security.blocked("half_open_connection")
    assert closed == 40


def test_slow_headers_and_huge_headers_are_cut_off(security) -> None:
    app = whoami_app(header_timeout_s=1.0)
    with serve(app) as (port, _):
        slow = socket.create_connection(("127.0.0.1", port), timeout=5)
        started = time.monotonic()
        closed = False
        for byte in b"GET /v1/whoami HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 30:  # slowloris: 1 byte / 0.1 s
            try:
                slow.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            if closed_by_server(slow, 0.1):
                closed = True
                break
        assert closed and time.monotonic() - started < 5.0
        security.blocked("slow_headers")
        big = httpx.get(f"http://127.0.0.1:{port}/v1/whoami", headers={**HEADERS, "X-Big": "a" * 70_000}, timeout=5)
        security.refused("oversized_headers", big.status_code, expected=431)


def test_forwarded_headers_are_ignored_unless_the_proxy_is_trusted(security) -> None:
    spoofed = {**HEADERS, "X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "https"}
    with serve(whoami_app()) as (port, _):
        answer = httpx.get(f"http://127.0.0.1:{port}/v1/whoami", headers=spoofed, timeout=5).json()
    assert answer == {"client": "127.0.0.1", "scheme": "http"}
    security.blocked("spoofed_forwarded_headers")
    with serve(whoami_app(trusted_proxies="127.0.0.1")) as (port, _):
        answer = httpx.get(f"http://127.0.0.1:{port}/v1/whoami", headers=spoofed, timeout=5).json()
    assert answer == {"client": "6.6.6.6", "scheme": "https"}  # a named proxy's headers are believed


def test_tls_check_reads_the_transport_not_the_scheme(tmp_path: Path, monkeypatch, security) -> None:
    """A TLS-configured app behind bare uvicorn on plain HTTP (uvicorn trusts X-Forwarded-Proto from 127.0.0.1 by
    default): a client's ``X-Forwarded-Proto: https`` does not make the request HTTPS."""
    for name in ("cert.pem", "key.pem"):
        (tmp_path / name).write_text("pem")
    monkeypatch.setenv(TLS_SERVER_ENV, "1")
    app = whoami_app(tls_cert_file=tmp_path / "cert.pem", tls_key_file=tmp_path / "key.pem")
    with serve(app, host="127.0.0.1", port=0, log_level="warning") as (port, _):
        r = httpx.get(f"http://127.0.0.1:{port}/v1/whoami", headers={**HEADERS, "X-Forwarded-Proto": "https"},
                      timeout=5)
    security.refused("forwarded_proto_spoof", r.status_code, expected=421)


@pytest.mark.parametrize("value", ["*", ["10.0.0.1", "*"]])
def test_trusting_every_proxy_is_refused(value) -> None:
    with pytest.raises(ValueError, match="trusted_proxies"):
        DemoSettings(auth_token=TOKEN, trusted_proxies=value)
