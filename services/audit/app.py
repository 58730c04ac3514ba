"""The audit service's app factory: ``uvicorn --factory services.audit.app:create_app``."""

from __future__ import annotations

from fastapi import FastAPI

from services.audit.routes import router
from services.audit.runtime import audit_runtime
from services.audit.settings import AuditSettings
from splitunet import __version__
from splitunet.service.app import create_service_app


def create_app(settings: AuditSettings | None = None) -> FastAPI:
    """Build the audit app; settings come from ``AUDIT_...`` environment variables unless given."""
    settings = settings or AuditSettings()
    return create_service_app(
        title="splitunet-audit",
        version=__version__,
        settings=settings,
        runtime_factory=audit_runtime,
        routers=[router],
    )
