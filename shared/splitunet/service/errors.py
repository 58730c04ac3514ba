"""One typed error body for every failure a service reports, and the handlers that produce it.

Every non-2xx response of a service built with the kit has the JSON body :class:`ErrorBody`
``{code, message, detail}``. ``code`` is stable and machine-readable:

- domain errors (:class:`splitunet.errors.SplitUNetError` subclasses) keep their own ``code`` and
  ``status_code`` (e.g. ``out_of_order`` 409, ``bad_bundle`` 400, ``bundle_too_large`` 413);
- request validation errors are 422 ``invalid_request`` with the failing fields in ``detail``;
- Starlette/FastAPI ``HTTPException`` keep their status, with a code from :data:`HTTP_CODES`;
- anything else is 500 ``internal``: logged with its traceback, never sent to the client.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from splitunet.errors import AuthError, SplitUNetError
from splitunet.logsafe import escape_path

logger = logging.getLogger(__name__)

#: Stable ``code`` for HTTP errors raised as ``HTTPException`` (other statuses get ``http_<status>``).
HTTP_CODES: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    411: "length_required",
    413: "request_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "too_many_requests",
    503: "not_ready",
}


class ErrorBody(BaseModel):
    """The body of every error response."""

    code: str
    message: str
    detail: Any = None


class ServiceUnavailableError(SplitUNetError):
    """The service is not ready (still starting, or its runtime says so)."""

    code = "not_ready"
    status_code = 503


class CodedHTTPException(StarletteHTTPException):
    """An ``HTTPException`` with an explicit stable ``code`` (FastAPI re-raises these untouched)."""

    def __init__(self, status_code: int, code: str, message: str, *, detail: Any = None) -> None:
        super().__init__(status_code=status_code, detail=message)
        self.code = code
        self.extra_detail = detail


def error_response(
    status_code: int, code: str, message: str, detail: Any = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    """A JSON response with an :class:`ErrorBody`; ``detail`` is made JSON-safe (unknown objects -> str)."""
    try:
        safe = jsonable_encoder(detail)
    except (TypeError, ValueError):
        safe = str(detail)
    body = ErrorBody(code=code, message=message, detail=safe)
    return JSONResponse(body.model_dump(mode="json"), status_code=status_code, headers=headers)


def _request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, SplitUNetError)
    if exc.status_code >= 500:
        level = logging.ERROR if type(exc) is SplitUNetError else logging.WARNING
        logger.log(
            level,
            "%s %s failed: %s: %s",
            escape_path(request.method),
            escape_path(request.url.path),
            exc.code,
            exc.message,
            exc_info=type(exc) is SplitUNetError,
        )
    else:
        logger.info("%s %s rejected: %s (%s)", escape_path(request.method), escape_path(request.url.path), exc.code,
                    escape_path(exc.message))
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, AuthError) else None
    return error_response(exc.status_code, exc.code, exc.message, exc.detail, headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    # Keep loc/msg/type only: the offending input may be large or sensitive.
    errors = [
        {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
        for e in exc.errors()
    ]
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    where = ".".join(str(p) for p in first["loc"])
    message = f"invalid request: {where}: {first['msg']}" if where else f"invalid request: {first['msg']}"
    logger.info("%s %s rejected: %s", escape_path(request.method), escape_path(request.url.path), escape_path(message))
    return error_response(422, "invalid_request", message, errors)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    code = getattr(exc, "code", None) or HTTP_CODES.get(status, f"http_{status}")
    if isinstance(exc.detail, str) and exc.detail:
        message, detail = exc.detail, getattr(exc, "extra_detail", None)
    else:
        message, detail = _phrase(status), exc.detail
    return error_response(status, code, message, detail, dict(exc.headers) if exc.headers else None)


def internal_error_body(exc: BaseException) -> dict[str, Any]:
    """The error a background task (a job, an audit) reports for an unexpected exception: a stable generic message
    and the exception's type name only; its text (paths, peers' words) belongs in the log, logged by the caller."""
    return {"code": "internal", "message": "internal error; the service's log has the details",
            "detail": {"type": type(exc).__name__}}


def internal_error(method: str, path: str, exc: BaseException, request_id: str | None) -> JSONResponse:
    """Log an unexpected exception with its traceback; the 500 ``internal`` response hides everything else."""
    logger.error("unhandled error on %s %s (request id %s)", method, path, request_id, exc_info=exc)
    return error_response(500, "internal", "internal server error", {"request_id": request_id})


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    # Normally the kit's ObservabilityMiddleware answers first; this covers apps without it.
    return internal_error(escape_path(request.method), escape_path(request.url.path), exc, _request_id(request))


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return f"HTTP {status}"


def install_error_handlers(app: FastAPI) -> None:
    """Map every exception of ``app`` to an :class:`ErrorBody` response (see the module docstring)."""
    app.add_exception_handler(SplitUNetError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
