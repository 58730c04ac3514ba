"""The app factory every service uses: one place for what the three services share.

A service's ``create_app`` is a few lines::

    def create_app(settings: SiteSettings | None = None) -> FastAPI:
        settings = settings or SiteSettings()
        return create_service_app(
            title="splitunet-site", version=__version__, settings=settings,
            runtime_factory=build_runtime,          # settings -> context manager yielding the runtime
            routers=[v1.router],                    # each route needs a token of the service's primary scope
            readiness=lambda runtime: runtime.ready(),
        )

and runs with ``uvicorn --factory services.client_site.app:create_app``. The heavy objects (model, optimizer,
peer clients) are built by ``runtime_factory`` when the app starts (in the ASGI lifespan, not at import or
construction time), kept on ``app.state.runtime`` and closed when the app stops. Routes reach them through
:mod:`splitunet.service.deps`.

``app.state`` holds: ``settings``, ``metrics`` (:class:`ServiceMetrics`), ``auth`` (:class:`ScopedAuth`),
``runtime`` (``None`` until started), ``readiness`` and ``started``.

Middleware, outermost first: request id + metrics + access log, then the gate (TLS, bearer token of the route's
scope, 411/413: all before the body is read, :mod:`splitunet.service.gate`), then the streamed body-size limit;
then FastAPI's routing, whose errors all become :class:`ErrorBody` responses.

Credential scopes, in one line each (:mod:`splitunet.service.scopes`):

- a router of a service's main API: pass it in ``routers``; its routes need the service's primary scope
  (``settings.primary_scope``: a site's ``aggregator``, the aggregator's and the audit service's ``operator``);
- a router that needs another scope declares it:
  ``APIRouter(prefix="/v1/audit", dependencies=[requires_scope(Scope.AUDIT)])`` (pass it in ``routers`` too;
  the router's own declaration wins), and the service reads that scope's tokens from
  ``<PREFIX>SCOPE_TOKEN_FILES__AUDIT``;
- a route with a large body (tensors) declares its limit: ``dependencies=[body_limit(lambda s: ...)]``; every
  other body is limited to ``max_json_bytes`` (1 MiB).

If TLS files are configured, the app is only built inside ``splitunet serve`` (which serves them); any other
launcher (a bare ``uvicorn --factory``) fails to start with :class:`ConfigurationError` instead of serving HTTP.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractContextManager, asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI

from splitunet.errors import ConfigurationError
from splitunet.service.auth import ScopedAuth
from splitunet.service.errors import ErrorBody, install_error_handlers
from splitunet.service.gate import GateMiddleware, GateRoute
from splitunet.service.health import ReadinessCheck, health_router
from splitunet.service.metrics import ServiceMetrics, metrics_router
from splitunet.service.middleware import BodySizeLimitMiddleware, ObservabilityMiddleware
from splitunet.service.scopes import Scope, public, requires_scope
from splitunet.service.settings import TLS_SERVER_ENV, ServiceSettings

logger = logging.getLogger(__name__)

#: The typed error responses every authenticated route may give, documented in its OpenAPI operation (so a
#: client, and schemathesis, can check every answer against the schema).
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in (
        (400, "malformed request"), (401, "missing or invalid credential"), (403, "wrong scope or policy refusal"),
        (404, "not found"), (409, "conflict / out of order"), (411, "Content-Length required"),
        (413, "body over this endpoint's limit"), (415, "unsupported media type"), (421, "HTTPS required"),
        (422, "invalid request"), (503, "not ready"),
    )
}

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
    scope: Scope | None = None,
) -> FastAPI:
    """Build a FastAPI app with the kit's settings, auth, errors, health, metrics and middleware.

    Args:
        title, version: shown in OpenAPI, ``/healthz`` and ``splitunet_service_info``.
        settings: the service's settings (a :class:`ServiceSettings` subclass instance).
        runtime_factory: ``settings -> context manager`` yielding the runtime; ``None`` for no runtime.
        routers: routers whose every route requires a bearer token: of ``scope``, unless the router (or route)
            declares its own with :func:`~splitunet.service.scopes.requires_scope`.
        public_routers: routers served without authentication (use sparingly).
        scope: the default scope of ``routers``; default ``settings.primary_scope``.
        readiness: ``runtime -> bool | (bool, reason)``; default: ready once started.
        service_name: metrics label; default ``title``.
        metrics: the app's metrics registry, when the service's runtime records its own metrics on it too
            (default: a new one).

    Raises:
        ValueError: bad arguments. ConfigurationError: no auth token and auth not explicitly disabled; TLS
        files configured but the process was not started by ``splitunet serve`` (it would serve plain HTTP).
    """
    if not isinstance(settings, ServiceSettings):
        raise ValueError(f"settings must be a ServiceSettings instance, got {type(settings).__name__}")
    if not title or not version:
        raise ValueError("title and version must be non-empty")
    if settings.tls_enabled and os.environ.get(TLS_SERVER_ENV) != "1":
        raise ConfigurationError(
            f"{title}: TLS files are configured, but this process was not started by `splitunet serve`, the one "
            "supported command (it hands them to uvicorn); refusing to start rather than serve plain HTTP"
        )
    auth = ScopedAuth.from_settings(settings)
    scope = scope if scope is not None else settings.primary_scope
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
    table: list[GateRoute] = []
    for router in (health_router(), metrics_router(), *public_routers):
        table += [GateRoute.of(route, None) for route in router.routes]
        app.include_router(router, dependencies=[public()])
    for router in routers:
        table += [GateRoute.of(route, scope) for route in router.routes]
        app.include_router(router, dependencies=[requires_scope(scope)], responses=ERROR_RESPONSES)
    docs = frozenset(p for p in (app.docs_url, app.openapi_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url) if p)
    # add_middleware puts the last one outermost.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(GateMiddleware, auth=auth, settings=settings, routes=table, docs_paths=docs)
    app.add_middleware(ObservabilityMiddleware, metrics=metrics)
    return app
