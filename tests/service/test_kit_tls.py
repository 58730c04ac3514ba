"""A kit app served by real uvicorn with mutual TLS from ``uvicorn_kwargs()``, called by PeerClient."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from splitunet.errors import PeerError
from splitunet.service.client import PeerClient, PeerTimeouts, tls_context


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(tmp: Path, stem: str, cn: str, ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None):
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca[0].subject if ca else _name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca is None, path_length=None), critical=True)
    )
    if ca is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
    cert = builder.sign(ca[1] if ca else key, hashes.SHA256())
    (tmp / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / f"{stem}.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert, key


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    ca = _issue(tmp_path, "ca", "test-ca", None)
    _issue(tmp_path, "server", "localhost", ca)
    _issue(tmp_path, "client", "aggregator", ca)
    return tmp_path


@pytest.fixture
def served(make_app, pki: Path) -> Iterator[str]:
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
