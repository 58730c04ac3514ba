"""``splitunet probe site|aggregator|audit [PATH]``: ask the service in this container whether it is healthy.

Kubernetes' HTTP probes cannot present a client certificate, so a service that requires mutual TLS is probed
with this command (an ``exec`` probe, see ``k8s/components/tls``): it reads the same settings as the service
(port, TLS files) from the environment, calls ``https://127.0.0.1:<port><PATH>`` with the service's own
certificate as the client certificate, and exits 0 on 200, 1 otherwise. The server certificate is verified
against the configured CA; its host name is not checked (the certificate names the Service, the probe dials
the loopback address).
"""

from __future__ import annotations

import importlib
from enum import StrEnum
from typing import Annotated

import typer


class ProbedService(StrEnum):
    SITE = "site"
    AGGREGATOR = "aggregator"
    AUDIT = "audit"


#: service -> the settings class it reads its environment with.
_SETTINGS = {
    ProbedService.SITE: "services.client_site.settings:SiteSettings",
    ProbedService.AGGREGATOR: "services.aggregator.settings:AggregatorSettings",
    ProbedService.AUDIT: "services.audit.settings:AuditSettings",
}


def probe_command(
    service: Annotated[ProbedService, typer.Argument(help="The service whose settings (environment) to read.")],
    path: Annotated[str, typer.Argument(help="Path to call: /readyz (readiness) or /healthz (liveness).")] = "/readyz",
    timeout: Annotated[float, typer.Option(help="Seconds before the probe fails.")] = 5.0,
) -> None:
    """Call the local service's health endpoint with its own TLS settings; exit 0 when it answers 200."""
    import ssl

    import httpx
    from pydantic import ValidationError

    module, name = _SETTINGS[service].split(":")
    try:
        settings = getattr(importlib.import_module(module), name)()
    except ValidationError as exc:
        typer.echo(f"bad {service.value} configuration:\n{exc}", err=True)
        raise typer.Exit(2) from None
    verify: ssl.SSLContext | bool = False
    if settings.tls_enabled:
        verify = ssl.create_default_context(cafile=str(settings.tls_ca_file) if settings.tls_ca_file else None)
        verify.check_hostname = False
        verify.load_cert_chain(str(settings.tls_cert_file), str(settings.tls_key_file))
    url = f"{settings.scheme}://127.0.0.1:{settings.port}/{path.lstrip('/')}"
    try:
        response = httpx.get(url, verify=verify, timeout=timeout)
    except httpx.HTTPError as exc:
        typer.echo(f"{url}: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(1) from None
    if response.status_code != 200:
        typer.echo(f"{url}: HTTP {response.status_code} {response.text[:200]}", err=True)
        raise typer.Exit(1)
