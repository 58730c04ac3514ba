"""Pure ASGI middleware of the kit (no ``BaseHTTPMiddleware``: it would buffer bodies and wrap errors).

- :class:`BodySizeLimitMiddleware` rejects a request body larger than the limit with 413 ``request_too_large``
  *before* reading it when ``Content-Length`` says so, and otherwise as soon as the streamed bytes exceed it.
- :class:`ObservabilityMiddleware` gives each request an id (``X-Request-ID``, taken from the client when sane),
  counts body bytes both ways, times the request, records :class:`~splitunet.service.metrics.ServiceMetrics`
  and logs one line per request (health/metrics probes at DEBUG). It also turns an exception that escaped the
  app into the typed 500 ``internal`` body (traceback logged, nothing leaked).
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from splitunet.logsafe import escape_path
from splitunet.service.errors import CodedHTTPException, error_response, internal_error
from splitunet.service.metrics import UNMATCHED_ROUTE, ServiceMetrics

logger = logging.getLogger("splitunet.service.access")

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


class RequestTooLarge(CodedHTTPException):
    def __init__(self, size: int | None, limit: int) -> None:
        message = f"request body exceeds the limit of {limit} bytes"
        super().__init__(413, "request_too_large", message, detail={"size": size, "max_bytes": limit})


class BodySizeLimitMiddleware:
    """Limit request bodies to ``max_bytes`` (typed 413 body)."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = min(self.max_bytes, scope.get("splitunet.body_limit", self.max_bytes))
        length = Headers(scope=scope).get("content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = -1
            if declared < 0:
                response = error_response(400, "bad_request", f"invalid Content-Length {length!r}")
                await response(scope, receive, send)
                return
            if declared > limit:
                exc = RequestTooLarge(declared, limit)
                await error_response(413, exc.code, exc.detail, exc.extra_detail)(scope, receive, send)
                return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise RequestTooLarge(None, limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except RequestTooLarge as exc:
            # Raised outside a FastAPI route (whose handler already answers it): answer here if we still can.
            if started:
                raise
            await error_response(413, exc.code, exc.detail, exc.extra_detail)(scope, receive, send)


class ObservabilityMiddleware:
    """Request id, byte counts, latency, Prometheus metrics and one log line per HTTP request."""

    def __init__(self, app: ASGIApp, *, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get("x-request-id", "")
        request_id = given if _REQUEST_ID_RE.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        counts = {"in": 0, "out": 0, "status": 500, "status_sent": 0}
        start = time.perf_counter()

        async def counting_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                counts["in"] += len(message.get("body", b""))
            return message

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                counts["status"], counts["status_sent"] = message["status"], 1
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode("ascii"))]
            elif message["type"] == "http.response.body":
                counts["out"] += len(message.get("body", b""))
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, counting_receive, counting_send)
        except Exception as exc:
            if counts["status_sent"]:
                raise
            # Answer here rather than in Starlette's outer ServerErrorMiddleware, so the 500 is a typed body
            # that carries the request id, and is counted like every other response.
            response = internal_error(
                escape_path(scope.get("method", "")), escape_path(scope.get("path", "")), exc, request_id
            )
            await response(scope, receive, counting_send)
        finally:
            self.metrics.in_flight.dec()
            seconds = time.perf_counter() - start
            route = scope.get("route")
            template = getattr(route, "path", None) or UNMATCHED_ROUTE
            method = scope.get("method", "")
            self.metrics.observe_request(
                route=template,
                method=method,
                status=counts["status"],
                request_bytes=counts["in"],
                response_bytes=counts["out"],
                seconds=seconds,
            )
            level = logging.DEBUG if scope.get("path") in _QUIET_PATHS else logging.INFO
            logger.log(
                level,
                "%s %s -> %d in %.1f ms (in %d B, out %d B) id=%s",
                escape_path(method),
                escape_path(scope.get("path", "")),
                counts["status"],
                1000 * seconds,
                counts["in"],
                counts["out"],
                request_id,
            )
