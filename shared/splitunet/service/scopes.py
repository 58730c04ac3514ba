"""Credential scopes: which party's token a route accepts, declared on the route and checked before the body.

Three scopes exist, one per kind of caller:

================  ==========================================================  ======================
scope             who holds it                                                 accepted by
================  ==========================================================  ======================
``aggregator``    the aggregator (one token per site: site A's != site B's)    a site's training API
``operator``      the people/tools that run jobs                               the aggregator's and the
                                                                               audit service's APIs
``audit``         the audit service                                           a site's audit routes
================  ==========================================================  ======================

A router (or a single route) declares its scope with one dependency::

    router = APIRouter(prefix="/v1/audit", dependencies=[requires_scope(Scope.AUDIT)])

and the kit's :class:`~splitunet.service.gate.GateMiddleware` reads that declaration from the matched route
*before the request body is read*: a caller without a token of that scope gets 401 (no token / unknown token) or
403 ``insufficient_scope`` (a valid token of another scope) and its body is never parsed. The dependency itself
runs again inside FastAPI and refuses any request the gate did not pass, so a route can never be reached around
the gate. Routes declaring :func:`public` (health, readiness, metrics) need no token.

Each scope's tokens come from their own file (``<PREFIX>SCOPE_TOKEN_FILES__<SCOPE>``, see
:class:`~splitunet.service.settings.ServiceSettings`); the service's primary scope (a site's ``aggregator``, the
aggregator's ``operator``) also takes the classic ``<PREFIX>AUTH_TOKEN_FILE``.
"""

from __future__ import annotations

from enum import StrEnum

from fastapi import Depends, Request
from fastapi.params import Depends as DependsParam

from splitunet.errors import AuthError

#: Where the gate leaves its decision in the ASGI scope (``request.scope[AUTH_SCOPE_KEY]``).
AUTH_SCOPE_KEY = "splitunet.auth"


class Scope(StrEnum):
    """A credential scope (see the module docstring for who holds which)."""

    AGGREGATOR = "aggregator"
    OPERATOR = "operator"
    AUDIT = "audit"


class ScopeRequirement:
    """The dependency :func:`requires_scope` returns; the gate finds it on a route and reads ``scope``."""

    def __init__(self, scope: Scope | None) -> None:
        self.scope = None if scope is None else Scope(scope)

    def __call__(self, request: Request) -> None:
        if self.scope is None:
            return
        if request.scope.get(AUTH_SCOPE_KEY) is None:
            # Only reachable if the app was built without the gate: fail closed.
            raise AuthError(f"this route needs a credential of scope {self.scope.value!r}")

    def __repr__(self) -> str:
        return f"requires_scope({self.scope})"


def requires_scope(scope: Scope | str) -> DependsParam:
    """``Depends`` declaring that a route (or every route of a router) needs a token of ``scope``."""
    return Depends(ScopeRequirement(Scope(scope)))


def public() -> DependsParam:
    """``Depends`` declaring a route that needs no token (health, readiness, metrics)."""
    return Depends(ScopeRequirement(None))


def declared_requirement(route: object) -> ScopeRequirement | None:
    """The :class:`ScopeRequirement` a route declares (the innermost one wins), or ``None`` if none."""
    found = None
    for dep in getattr(route, "dependencies", None) or ():
        if isinstance(getattr(dep, "dependency", None), ScopeRequirement):
            found = dep.dependency
    return found
