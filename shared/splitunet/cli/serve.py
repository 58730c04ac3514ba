"""``splitunet serve site|aggregator``: run a service with uvicorn, configured from its environment."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer


class ServiceName(StrEnum):
    SITE = "site"
    AGGREGATOR = "aggregator"
    AUDIT = "audit"


def serve_command(
    service: Annotated[ServiceName, typer.Argument(help="Which service: site (SITE_* env) or aggregator (AGG_* env).")],
    port: Annotated[int | None, typer.Option(help="Override the port from the environment.")] = None,
) -> None:
    """Run a service (the same as `uvicorn --factory services.<service>.app:create_app`, with the service's
    own logging and TLS settings). Configuration comes from environment variables and mounted secret files."""
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
        typer.echo(f"bad {service.value} configuration:\n{exc}", err=True)
        raise typer.Exit(2) from None
    uvicorn.run(create_app(settings), **settings.uvicorn_kwargs())
