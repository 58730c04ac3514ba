"""How the client turns a service's answer into the project's typed exceptions.

Every error a service sends is the kit's body ``{code, message, detail}``
(:class:`splitunet.service.errors.ErrorBody`). The client raises the :mod:`splitunet.errors` class whose ``code``
matches (``not_found`` -> :class:`~splitunet.errors.NotFoundError`, ``policy_violation`` ->
:class:`~splitunet.errors.PolicyError`, ...), falling back on the HTTP status, and keeps the service's own
``code``, ``message`` and ``detail`` on the exception (``exc.code``, ``exc.message``, ``exc.detail``) with
``exc.status_code`` and ``exc.http_status`` the HTTP status. Exception tree of what a client call raises::

    SplitUNetError
    ├── ConfigurationError      4xx the service refused the request (invalid_request, bad_request, ...), or a
    │                           spec the client's own schema validation refused before sending it
    ├── AuthError               401 (a wrong or revoked token), 403 ``insufficient_scope`` (a token of another
    │                           scope) or ``forbidden``
    ├── PolicyError             403 ``policy_violation`` (a site or registry rule)
    ├── NotFoundError           404 (no such job, audit or case)
    ├── ConflictError           409 (a job already running, nothing to resume)
    ├── PeerError               502 (a site failed the aggregator), or the response broke the client's limits
    │   └── ServiceUnreachableError   no answer at all: connection refused, DNS, TLS handshake, timeouts
    └── SplitUNetError          other 5xx (``internal``, ``not_ready``)
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from splitunet.errors import (
    AuthError,
    ConfigurationError,
    ConflictError,
    NotFoundError,
    PeerError,
    PolicyError,
    SplitUNetError,
)

#: Codes of the service kit (``splitunet.service.errors.HTTP_CODES``) that have no class of their own.
_KIT_CODES: dict[str, type[SplitUNetError]] = {
    "invalid_request": ConfigurationError,
    "bad_request": ConfigurationError,
    "length_required": ConfigurationError,
    "request_too_large": ConfigurationError,
    "unsupported_media_type": ConfigurationError,
    "method_not_allowed": ConfigurationError,
    "not_acceptable": ConfigurationError,
    "too_many_requests": ConfigurationError,
    "forbidden": AuthError,
    "insufficient_scope": AuthError,  # the gate's 403 for a token of another scope
}
#: Fallbacks by HTTP status for a code the client does not know (a newer service).
_BY_STATUS: dict[int, type[SplitUNetError]] = {
    401: AuthError, 403: PolicyError, 404: NotFoundError, 409: ConflictError, 502: PeerError,
}


class ServiceUnreachableError(PeerError):
    """The service gave no answer: connection refused, name not resolved, TLS handshake refused, or a timeout
    (after the client's retries). ``detail`` names the URL, the transport error and the attempts."""

    code = "unreachable"
    status_code = 503


def _codes() -> dict[str, type[SplitUNetError]]:
    found: dict[str, type[SplitUNetError]] = {}
    pending = [SplitUNetError]
    while pending:
        cls = pending.pop(0)
        found.setdefault(cls.code, cls)
        pending.extend(cls.__subclasses__())
    return found | _KIT_CODES


def error_from_response(response: httpx.Response) -> SplitUNetError:
    """The typed exception for a non-2xx ``response``, carrying the service's ``{code, message, detail}``."""
    status = response.status_code
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict):
        body = {}
    code = body.get("code") if isinstance(body.get("code"), str) else None
    message = body.get("message") if isinstance(body.get("message"), str) else None
    detail: Any = body.get("detail")
    cls = _codes().get(code or "") or _BY_STATUS.get(status)
    if cls is None:
        cls = ConfigurationError if 400 <= status < 500 else SplitUNetError
    where = f"{response.request.method} {response.request.url.path}"
    error = cls(message or f"{where} -> HTTP {status} {response.reason_phrase}", detail=detail)
    error.code = code or cls.code
    error.status_code = status
    error.http_status = status  # marks an error the service answered (not one raised before sending)
    return error
