"""``Federation``: the operator's entry point to a deployed federation (its aggregator and audit service)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from splitunet.client.http import PeerTimeouts, ServiceClient, read_token, tls_verify
from splitunet.client.jobs import Jobs
from splitunet.client.profiles import Profile, resolve_profile
from splitunet.errors import ConfigurationError

if TYPE_CHECKING:
    from splitunet.client.audits import Audits


class Federation:
    """A deployed federation as its operator sees it: ``jobs`` on the aggregator, ``audits`` on the audit service.

    Example::

        from splitunet.client import Federation

        fed = Federation("https://aggregator:8443", token_file="operator-token", ca_file="ca.pem",
                         client_cert="operator.pem", client_key="operator-key.pem",
                         audit_url="https://audit:8443")
        job = fed.jobs.submit({"sites": ["t1", "flair"], "steps": 100, "roi": [128, 128]})
        final = job.wait(progress=lambda s: print(s.step, s.loss))
        job.infer("BraTS2021_00001", "seg.nii.gz")
        audit = fed.audits.start(job.job_id, sites=["t1", "flair"])
        audit.wait(); audit.report("audit.html")

    Args:
        url: the aggregator's base URL (``None``: only ``audits`` is usable).
        token_file: file holding the operator token (read once, now; a token is never passed in the clear).
        audit_url: the audit service's base URL (``None``: only ``jobs`` is usable).
        audit_token_file: the audit service's token file (default: ``token_file``).
        ca_file: CA bundle that signed the services' certificates (default: the system's CAs).
        client_cert: the operator's client certificate, for services that require mutual TLS (with client_key).
        client_key: the client certificate's private key.
        timeout_s: read and write timeout of one call (connect: 5 s).
        retries: extra attempts of a call that may be retried (see :mod:`splitunet.client.http`).
        transport: an ``httpx`` transport to the aggregator instead of the network (tests).
        audit_transport: the same for the audit service.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        token_file: str | Path | None = None,
        audit_url: str | None = None,
        audit_token_file: str | Path | None = None,
        ca_file: str | Path | None = None,
        client_cert: str | Path | None = None,
        client_key: str | Path | None = None,
        timeout_s: float = 60.0,
        retries: int = 2,
        transport: httpx.BaseTransport | None = None,
        audit_transport: httpx.BaseTransport | None = None,
    ) -> None:
        if url is None and audit_url is None:
            raise ConfigurationError("give the aggregator's url, the audit service's audit_url, or both")
        if timeout_s <= 0:
            raise ConfigurationError(f"timeout_s must be positive, got {timeout_s}")
        verify = tls_verify(ca_file, client_cert, client_key)
        timeouts = PeerTimeouts(connect=5.0, read=timeout_s, write=timeout_s, pool=10.0)
        self._clients: list[ServiceClient] = []

        def connect(base: str, tokens: str | Path | None, transport: Any, name: str) -> ServiceClient:
            try:
                client = ServiceClient(base, name=name, token=read_token(tokens) if tokens else None,
                                       timeouts=timeouts, retries=retries, verify=verify, transport=transport)
            except ValueError as exc:
                raise ConfigurationError(str(exc)) from None
            self._clients.append(client)
            return client

        self._jobs_client = connect(url, token_file, transport, f"aggregator {url}") if url else None
        self._audit_client = (
            connect(audit_url, audit_token_file or token_file, audit_transport, f"audit service {audit_url}")
            if audit_url else None
        )
        self.url, self.audit_url = url, audit_url

    @classmethod
    def from_profile(cls, profile: str | None = None, **overrides: Any) -> Federation:
        """Connect as the profile file and the environment say (:mod:`splitunet.client.profiles`); keyword
        ``overrides`` (e.g. ``url=...``) take precedence; transports and ``retries`` pass through."""
        passthrough = {k: overrides.pop(k) for k in ("transport", "audit_transport", "retries") if k in overrides}
        settings: Profile = resolve_profile(overrides, profile=profile)
        return cls(**settings.model_dump(), **passthrough)

    @property
    def jobs(self) -> Jobs:
        """The aggregator's job API."""
        if self._jobs_client is None:
            raise ConfigurationError("no aggregator URL configured: give url (--url, SPLITUNET_URL, or a profile)")
        return Jobs(self._jobs_client)

    @property
    def audits(self) -> Audits:
        """The audit service's API."""
        if self._audit_client is None:
            raise ConfigurationError(
                "no audit service URL configured: give audit_url (--url of `splitunet audits`, SPLITUNET_AUDIT_URL, "
                "or a profile's audit_url)")
        from splitunet.client.audits import Audits  # the audit schemas import the attack stack: only when used

        return Audits(self._audit_client)

    def close(self) -> None:
        for client in self._clients:
            client.close()

    def __enter__(self) -> Federation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
