"""Audit-only site endpoints, on their own router so that only the ``audit`` credential may call them.

Each route parses, calls one :class:`~services.client_site.audit.SiteAuditor` method and returns.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response

from services.client_site.audit import ScoreResponse
from services.client_site.runtime import SiteRuntime
from splitunet.schemas import RUN_ID_PATTERN, STEP_LIMIT, Phase
from splitunet.service.deps import BundleBody, runtime_dep
from splitunet.service.gate import body_limit
from splitunet.service.scopes import Scope, requires_scope

SiteRuntimeDep = runtime_dep(SiteRuntime)
RunId = Annotated[str, Path(pattern=RUN_ID_PATTERN)]

router = APIRouter(prefix="/v1", tags=["site-audit"], dependencies=[requires_scope(Scope.AUDIT)])


@router.get("/runs/{run_id}/audit/encoder", response_class=Response,
            responses={200: {"content": {"application/octet-stream": {}}}})
def encoder_weights(
    runtime: SiteRuntimeDep, run_id: RunId, step: Annotated[int, Query(ge=0, lt=STEP_LIMIT)],
    phase: Annotated[Phase, Query()] = Phase.TRAIN,
) -> Response:
    """The encoder weights (safetensors) this site used for the forward of ``step`` in ``phase``."""
    return Response(runtime.audit.encoder_weights(run_id, step, phase), media_type="application/octet-stream")


@router.post("/score", dependencies=[body_limit(lambda s: s.max_bundle_bytes)])
def score(runtime: SiteRuntimeDep, body: BundleBody) -> ScoreResponse:
    return runtime.audit.score(body)
