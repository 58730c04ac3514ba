"""Liveness and readiness endpoints (unauthenticated; Kubernetes probes call them).

- ``GET /healthz``: 200 while the process serves HTTP at all (liveness).
- ``GET /readyz``: 200 only when the service has finished starting (its runtime is built) and its readiness
  check says so; otherwise 503 with an :class:`~splitunet.service.errors.ErrorBody` ``not_ready`` whose
  message says why. A readiness check that raises counts as not ready (and is logged).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel

from splitunet.service.errors import error_response

logger = logging.getLogger(__name__)

#: A readiness check receives the runtime (``app.state.runtime``) and returns ``ready`` or
#: ``(ready, reason)``.
ReadinessCheck = Callable[[Any], "bool | tuple[bool, str | None]"]


class HealthStatus(BaseModel):
    status: str
    service: str
    version: str


def evaluate_readiness(state: Any) -> tuple[bool, str | None]:
    """``(ready, reason)`` for an app's ``state`` (``started``, ``runtime``, ``readiness``)."""
    if not getattr(state, "started", False):
        return False, "the service is starting"
    check: ReadinessCheck | None = getattr(state, "readiness", None)
    if check is None:
        return True, None
    try:
        result = check(getattr(state, "runtime", None))
    except Exception:
        logger.exception("readiness check failed")
        return False, "the readiness check failed"
    if isinstance(result, tuple):
        ready, reason = bool(result[0]), result[1]
    else:
        ready, reason = bool(result), None
    if ready:
        return True, None
    return False, reason or "the service is not ready"


def health_router() -> APIRouter:
    router = APIRouter(tags=["health"])

    @router.get("/healthz", response_model=HealthStatus)
    def healthz(request: Request) -> HealthStatus:
        return HealthStatus(status="ok", service=request.app.title, version=request.app.version)

    @router.get(
        "/readyz",
        response_model=HealthStatus,
        responses={503: {"description": "not ready; body is an ErrorBody with code 'not_ready'"}},
    )
    def readyz(request: Request) -> Any:
        ready, reason = evaluate_readiness(request.app.state)
        if not ready:
            return error_response(503, "not_ready", reason or "the service is not ready")
        return HealthStatus(status="ready", service=request.app.title, version=request.app.version)

    return router
