"""The gate: authentication, body-size and transport checks of every request, before its body is read.

:class:`GateMiddleware` is pure ASGI and sits between the observability middleware and FastAPI's routing. For
each HTTP request it

1. refuses plain HTTP with 421 ``tls_required`` when the service is configured for TLS (a service must never
   answer in clear what it was told to protect): it reads the transport (the ASGI ``tls`` extension that
   :mod:`splitunet.service.server` sets), not ``scope["scheme"]``, which forwarded headers can rewrite;
2. finds the route the path and method match in the table the app factory built from the routers it was given
   (:class:`GateRoute`: the route and the credential scope it declares with
   :func:`~splitunet.service.scopes.requires_scope`, or the router's default); routes declaring
   :func:`~splitunet.service.scopes.public` pass; ``/docs``, ``/openapi.json`` and unmatched paths need a
   token of any scope (unless ``public_docs``);
3. checks the bearer token for that scope: 401 ``unauthorized`` (missing, malformed, unknown) or 403
   ``insufficient_scope`` (a token of another scope);
4. for a request that carries a body (``POST``/``PUT``/``PATCH``), requires ``Content-Length`` (411
   ``length_required``) and refuses one above the route's limit (413 ``request_too_large``): the limit a route
   declares with :func:`body_limit`, otherwise ``max_json_bytes`` (1 MiB by default);

all before one byte of the body is received. The decision is left in the ASGI scope for the route's own scope
dependency (which refuses anything the gate did not pass) and for :func:`splitunet.service.auth.principal`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fastapi import Depends
from fastapi.params import Depends as DependsParam
from starlette.datastructures import Headers
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from splitunet.errors import AuthError
from splitunet.service.auth import ScopedAuth
from splitunet.service.errors import error_response
from splitunet.service.scopes import AUTH_SCOPE_KEY, declared_requirement
from splitunet.service.scopes import Scope as CredentialScope
from splitunet.service.settings import ServiceSettings

#: Where the gate leaves the request's body limit (bytes) for the body-size middleware.
BODY_LIMIT_KEY = "splitunet.body_limit"
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class BodyLimit:
    """The dependency :func:`body_limit` returns: ``resolve(settings) -> bytes`` is the route's body limit."""

    def __init__(self, resolve: Callable[[ServiceSettings], int]) -> None:
        self.resolve = resolve

    def __call__(self) -> None:
        return None


def body_limit(resolve: Callable[[ServiceSettings], int]) -> DependsParam:
    """``Depends`` declaring a route's own body limit, computed from the service's settings (tensor routes)."""
    return Depends(BodyLimit(resolve))


def _declared_limit(route: object) -> BodyLimit | None:
    found = None
    for dep in getattr(route, "dependencies", None) or ():
        if isinstance(getattr(dep, "dependency", None), BodyLimit):
            found = dep.dependency
    return found


@dataclass(frozen=True)
class GateRoute:
    """One route as the gate sees it: the route (for matching), whether it is public, the scope it needs, and its
    body limit (``None``: ``max_json_bytes``)."""

    route: object
    public: bool
    scope: CredentialScope | None
    limit: BodyLimit | None

    @classmethod
    def of(cls, route: object, default: CredentialScope | None) -> GateRoute:
        """The gate's view of ``route`` included with ``default`` scope (``None``: public); the route's own
        declaration wins."""
        declared = declared_requirement(route)
        scope = declared.scope if declared is not None else default
        public = scope is None
        return cls(route=route, public=public, scope=scope, limit=_declared_limit(route))


class GateMiddleware:
    """Auth, 411/413 and TLS checks before the body (see the module docstring)."""

    def __init__(
        self, app: ASGIApp, *, auth: ScopedAuth, settings: ServiceSettings, routes: Sequence[GateRoute],
        docs_paths: frozenset[str],
    ) -> None:
        self.app = app
        self.auth = auth
        self.settings = settings
        self.routes = tuple(routes)
        self.docs_paths = docs_paths

    def _route(self, scope: Scope) -> GateRoute | None:
        partial = None
        for entry in self.routes:
            match, _ = entry.route.matches(scope)  # type: ignore[attr-defined]
            if match is Match.FULL:
                return entry
            if match is Match.PARTIAL and partial is None:
                partial = entry
        return partial

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # the transport's own TLS facts (the ASGI ``tls`` extension the kit's server protocol sets), never
        # ``scope["scheme"]``, which a proxy-headers middleware rewrites from a client's X-Forwarded-Proto
        if self.settings.tls_enabled and "tls" not in (scope.get("extensions") or {}):
            message = "this service serves HTTPS only; call it with https://"
            await error_response(421, "tls_required", message)(scope, receive, send)
            return
        route = self._route(scope)
        if route is not None:
            scope.setdefault("route", route.route)  # metrics label the refusals by their route template too
        is_public = route is not None and route.public
        if route is None and self.settings.public_docs and scope.get("path") in self.docs_paths:
            is_public = True
        headers = Headers(scope=scope)
        if not is_public:
            try:
                decision = self.auth.authenticate(headers.get("authorization"), route.scope if route else None)
            except AuthError as exc:
                extra = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
                await error_response(exc.status_code, exc.code, exc.message, exc.detail, extra)(scope, receive, send)
                return
            scope[AUTH_SCOPE_KEY] = decision
        declared = route.limit if route is not None else None
        limit = declared.resolve(self.settings) if declared is not None else self.settings.max_json_bytes
        length = headers.get("content-length")
        if length is None:
            if scope.get("method") in _BODY_METHODS:
                message = "a request body needs a Content-Length header (chunked uploads are not accepted)"
                await error_response(411, "length_required", message)(scope, receive, send)
                return
        elif length.isdigit() and int(length) > limit:
            message = f"request body exceeds the limit of {limit} bytes for this endpoint"
            detail = {"size": int(length), "max_bytes": limit}
            await error_response(413, "request_too_large", message, detail)(scope, receive, send)
            return
        scope[BODY_LIMIT_KEY] = limit
        await self.app(scope, receive, send)
