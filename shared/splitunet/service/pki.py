"""A throwaway PKI for tests and local federations: one CA, server and client certificates, PEM files.

Real deployments bring their own CA (cert-manager, the hospital's PKI); this exists so the tests and
``LocalFederation(tls=True)`` exercise the same TLS and mutual-TLS code paths with generated material. Keys are
P-256, certificates live one hour by default; private keys are written with mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class CertFiles:
    """A certificate and its private key as PEM files."""

    cert: Path
    key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class ThrowawayCA:
    """A self-signed CA that issues server and client certificates into ``folder``.

    Args:
        folder: where the PEM files go (created).
        name: the CA's common name (also the stem of ``<name>.pem``).
        hours: validity of every certificate.
    """

    def __init__(self, folder: Path, name: str = "test-ca", *, hours: float = 1.0) -> None:
        if hours <= 0:
            raise ValueError(f"hours must be positive, got {hours}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.hours = hours
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._cert = self._builder(_name(name), _name(name), self._key.public_key()).add_extension(
            x509.BasicConstraints(ca=True, path_length=0), critical=True
        ).sign(self._key, hashes.SHA256())
        self.cert_file = self.folder / f"{name}.pem"
        self.cert_file.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))

    def _builder(self, subject: x509.Name, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
        now = dt.datetime.now(dt.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(hours=self.hours))
        )

    def _issue(self, stem: str, cn: str, *, server: bool, hosts: tuple[str, ...]) -> CertFiles:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = self._builder(_name(cn), self._cert.subject, key.public_key()).add_extension(
            x509.BasicConstraints(ca=False, path_length=None), critical=True
        )
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if hosts:
            names: list[x509.GeneralName] = []
            for host in hosts:
                try:
                    names.append(x509.IPAddress(ipaddress.ip_address(host)))
                except ValueError:
                    names.append(x509.DNSName(host))
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        files = CertFiles(cert=self.folder / f"{stem}.pem", key=self.folder / f"{stem}.key")
        files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        fd = os.open(files.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        return files

    def server(self, stem: str, hosts: tuple[str, ...] = ("localhost", "127.0.0.1")) -> CertFiles:
        """A server certificate valid for ``hosts`` (DNS names or IP addresses)."""
        return self._issue(stem, hosts[0] if hosts else stem, server=True, hosts=hosts)

    def client(self, stem: str, cn: str | None = None) -> CertFiles:
        """A client certificate (mutual TLS) with common name ``cn`` (default ``stem``)."""
        return self._issue(stem, cn or stem, server=False, hosts=())
