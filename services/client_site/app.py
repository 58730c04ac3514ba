"""The site service's app factory: ``uvicorn --factory services.client_site.app:create_app``."""

from __future__ import annotations

from fastapi import FastAPI

from services.client_site.audit_routes import router as audit_router
from services.client_site.routes import router
from services.client_site.runtime import site_runtime
from services.client_site.settings import SiteSettings
from splitunet import __version__
from splitunet.service.app import create_service_app
from splitunet.service.metrics import ServiceMetrics


def create_app(settings: SiteSettings | None = None) -> FastAPI:
    """Build the site app; settings come from ``SITE_...`` environment variables unless given."""
    settings = settings or SiteSettings()
    metrics = ServiceMetrics("splitunet-site", __version__)
    return create_service_app(
        title="splitunet-site",
        version=__version__,
        settings=settings,
        metrics=metrics,
        runtime_factory=lambda s: site_runtime(s, metrics),
        routers=[router, audit_router],
        readiness=lambda runtime: runtime.ready(),
    )
