"""The app factory every service uses: one place for what the three services share.

A service's ``create_app`` is a few lines::

    def create_app(settings: SiteSettings | None = None) -> FastAPI:
        settings = settings or SiteSettings()
        return create_service_app(
            title="splitunet-site", version=__version__, settings=settings,
            runtime_factory=build_runtime,          # settings -> context manager yielding the runtime
            routers=[v1.router],                    # bearer auth is added to every route of these
            readiness=lambda runtime: runtime.ready(),
        )

and runs with ``uvicorn --factory services.client_site.app:create_app``. The heavy objects (model, optimizer,
peer clients) are built by ``runtime_factory`` when the app starts (in the ASGI lifespan, not at import or
construction time), kept on ``app.state.runtime`` and closed when the app stops. Routes reach them through
:mod:`splitunet.service.deps`.

``app.state`` holds: ``settings``, ``metrics`` (:class:`ServiceMetrics`), ``auth`` (:class:`BearerAuth`),
``runtime`` (``None`` until started), ``readiness`` and ``started``.

Middleware, outermost first: request id + metrics + access log, then the body-size limit (413 before the body
is read); then FastAPI's routing, whose errors all become :class:`ErrorBody` responses.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractContextManager, asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI

from splitunet.service.auth import BearerAuth, require_auth
from splitunet.service.errors import install_error_handlers
from splitunet.service.health import ReadinessCheck, health_router
from splitunet.service.metrics import ServiceMetrics, metrics_router
from splitunet.service.middleware import BodySizeLimitMiddleware, ObservabilityMiddleware
from splitunet.service.settings import ServiceSettings

logger = logging.getLogger(__name__)

#: Builds a service's runtime from its settings; entered at startup, exited at shutdown.
RuntimeFactory = Callable[[Any], AbstractContextManager[Any]]


def create_service_app(
    *,
    title: str,
    version: str,
    settings: ServiceSettings,
    runtime_factory: RuntimeFactory | None = None,
    routers: Sequence[APIRouter] = (),
    public_routers: Sequence[APIRouter] = (),
    readiness: ReadinessCheck | None = None,
    service_name: str | None = None,
    metrics: ServiceMetrics | None = None,
) -> FastAPI:
    """Build a FastAPI app with the kit's settings, auth, errors, health, metrics and middleware.

    Args:
        title, version: shown in OpenAPI, ``/healthz`` and ``splitunet_service_info``.
        settings: the service's settings (a :class:`ServiceSettings` subclass instance).
        runtime_factory: ``settings -> context manager`` yielding the runtime; ``None`` for no runtime.
        routers: routers whose every route requires a bearer token.
        public_routers: routers served without authentication (use sparingly).
        readiness: ``runtime -> bool | (bool, reason)``; default: ready once started.
        service_name: metrics label; default ``title``.
        metrics: the app's metrics registry, when the service's runtime records its own metrics on it too
            (default: a new one).

    Raises:
        ValueError: bad arguments. ConfigurationError: no auth token and auth not explicitly disabled.
    """
    if not isinstance(settings, ServiceSettings):
        raise ValueError(f"settings must be a ServiceSettings instance, got {type(settings).__name__}")
    if not title or not version:
        raise ValueError("title and version must be non-empty")
    auth = BearerAuth.from_settings(settings)
    metrics = metrics if metrics is not None else ServiceMetrics(service_name or title, version)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        logger.info(
            "%s %s starting on %s://%s:%d (auth %s)",
            title,
            version,
            settings.scheme,
            settings.host,
            settings.port,
            "DISABLED" if auth.disabled else "on",
        )
        if auth.disabled:
            logger.warning("%s: bearer-token auth is disabled; do not run like this outside development", title)
        if runtime_factory is None:
            app.state.started = True
            try:
                yield
            finally:
                app.state.started = False
            return
        with runtime_factory(settings) as runtime:
            app.state.runtime = runtime
            app.state.started = True
            logger.info("%s ready", title)
            try:
                yield
            finally:
                app.state.started = False
                logger.info("%s stopping", title)
        app.state.runtime = None

    app = FastAPI(title=title, version=version, lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.auth = auth
    app.state.runtime = None
    app.state.readiness = readiness
    app.state.started = False

    install_error_handlers(app)
    app.include_router(health_router())
    app.include_router(metrics_router())
    for router in public_routers:
        app.include_router(router)
    for router in routers:
        app.include_router(router, dependencies=[Depends(require_auth)])
    # add_middleware puts the last one outermost.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(ObservabilityMiddleware, metrics=metrics)
    return app
