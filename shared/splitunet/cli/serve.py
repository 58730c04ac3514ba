"""``splitunet serve site|aggregator``: run a service with uvicorn, configured from its environment."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer


def settings_problems(exc) -> str:
    """A settings :class:`pydantic.ValidationError` as one line per field, never with the input values (they
    hold the environment, tokens included)."""
    return "\n".join(
        f"  {'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors(include_input=False)
    )


class ServiceName(StrEnum):
    SITE = "site"
    AGGREGATOR = "aggregator"
    AUDIT = "audit"


def serve_command(
    service: Annotated[ServiceName, typer.Argument(help="Which service: site (SITE_* env) or aggregator (AGG_* env).")],
    port: Annotated[int | None, typer.Option(help="Override the port from the environment.")] = None,
) -> None:
    """Run a service: the one supported command (containers, the launcher, by hand). It serves HTTPS whenever TLS
    files are configured (a bare `uvicorn --factory` with TLS files configured refuses to start). Configuration
    comes from environment variables and mounted secret files."""
    import uvicorn
    from pydantic import ValidationError

    try:
        if service == ServiceName.SITE:
            from services.client_site.app import create_app
            from services.client_site.settings import SiteSettings

            settings = SiteSettings() if port is None else SiteSettings(port=port)
        elif service == ServiceName.AUDIT:
            from services.audit.app import create_app
            from services.audit.settings import AuditSettings

            settings = AuditSettings() if port is None else AuditSettings(port=port)
        else:
            from services.aggregator.app import create_app
            from services.aggregator.settings import AggregatorSettings

            settings = AggregatorSettings() if port is None else AggregatorSettings(port=port)
    except ValidationError as exc:
        typer.echo(f"bad {service.value} configuration:\n{settings_problems(exc)}", err=True)
        raise typer.Exit(2) from None
    import os

    from splitunet.errors import ConfigurationError
    from splitunet.service.settings import TLS_SERVER_ENV

    kwargs = settings.uvicorn_kwargs()
    if settings.tls_enabled:
        # The files go to uvicorn just below: tell create_service_app that TLS is served (see its docstring).
        os.environ[TLS_SERVER_ENV] = "1"
    try:
        app = create_app(settings)
    except (ConfigurationError, ValueError, OSError) as exc:
        typer.echo(f"cannot start the {service.value} service: {exc}", err=True)
        raise typer.Exit(2) from None
    uvicorn.run(app, **kwargs)
