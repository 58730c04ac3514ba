"""OpenAPI links between a service's operations: what a response's ids let a client call next.

``POST /v1/jobs`` answers a ``job_id`` that ``GET /v1/jobs/{job_id}`` takes, and so on. Declared on the route that
produces the id (``responses={202: {"description": ..., "links": links(...)}}``), they document the workflow
for a typed client and let schemathesis' stateful tests chain calls (tests/services/test_schemathesis.py).
"""

from __future__ import annotations

import re
from typing import Any


def operation_id(name: str, path: str, method: str) -> str:
    """FastAPI's default operation id of route function ``name`` at ``path`` (``generate_unique_id``)."""
    return re.sub(r"\W", "_", f"{name}{path}") + f"_{method.lower()}"


def links(field: str, *targets: tuple[str, str, str], parameter: str | None = None) -> dict[str, Any]:
    """Links from a JSON response's ``field`` to the path parameter ``parameter`` (default: ``field``) of each
    target operation ``(route function name, path, method)``."""
    out = {}
    for name, path, method in targets:
        out[name] = {"operationId": operation_id(name, path, method),
                     "parameters": {parameter or field: f"$response.body#/{field}"}}
    return out
