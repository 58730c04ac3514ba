"""The audit service's app factory: ``uvicorn --factory services.audit.app:create_app``."""

from __future__ import annotations

from fastapi import FastAPI

from services.audit.routes import router
from services.audit.runtime import audit_runtime
from services.audit.settings import AuditSettings
from splitunet import __version__
from splitunet.service.app import create_service_app


def create_app(settings: AuditSettings | None = None, **runtime_options) -> FastAPI:
    """Build the audit app; settings come from ``AUDIT_...`` environment variables unless given.

    ``runtime_options`` go to :class:`~services.audit.runtime.AuditManager` (tests pass a ``transport_factory``).
    """
    settings = settings or AuditSettings()
    return create_service_app(
        title="splitunet-audit",
        version=__version__,
        settings=settings,
        runtime_factory=lambda s: audit_runtime(s, **runtime_options),
        routers=[router],
    )
