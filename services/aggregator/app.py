"""The aggregator service's app factory: ``uvicorn --factory services.aggregator.app:create_app``."""

from __future__ import annotations

from fastapi import FastAPI

from services.aggregator.routes import router
from services.aggregator.runtime import aggregator_runtime
from services.aggregator.settings import AggregatorSettings
from splitunet import __version__
from splitunet.service.app import create_service_app


def create_app(settings: AggregatorSettings | None = None, **runtime_options) -> FastAPI:
    """Build the aggregator app; settings come from ``AGG_...`` environment variables unless given.

    ``runtime_options`` go to :class:`AggregatorRuntime` (tests pass an in-process ``transport_factory``).
    """
    settings = settings or AggregatorSettings()
    return create_service_app(
        title="splitunet-aggregator",
        version=__version__,
        settings=settings,
        runtime_factory=lambda s: aggregator_runtime(s, **runtime_options),
        routers=[router],
        readiness=lambda runtime: runtime.ready(),
    )
