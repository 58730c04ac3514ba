"""The site API, ``/v1``: each route parses, calls one :class:`SiteRuntime` method and returns.

Torch work runs in plain ``def`` routes (FastAPI runs them in its thread pool).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query

from services.client_site.runtime import SiteRuntime
from splitunet.psi import PsiRequest, PsiResponse
from splitunet.schemas import (
    RUN_ID_PATTERN,
    STEP_LIMIT,
    AlignedCases,
    AlignmentAck,
    BackwardAck,
    CaseGrids,
    CheckpointInfo,
    CheckpointRequest,
    ForwardRequest,
    GridRequest,
    RunInfo,
    RunSetup,
    SiteInfo,
)
from splitunet.secure_sum import SecureSumAck, SecureSumOffer, SecureSumPeers
from splitunet.service.auth import principal
from splitunet.service.deps import BundleBody, BundleResponse, runtime_dep
from splitunet.service.gate import body_limit
from splitunet.service.links import links
from splitunet.wire import CONTENT_TYPE

SiteRuntimeDep = runtime_dep(SiteRuntime)
RunId = Annotated[str, Path(pattern=RUN_ID_PATTERN)]
#: Body limit of a PSI request: 100 000 blinded ids (64 hex characters each, JSON-quoted) fit.
PSI_BODY_BYTES = 8 * 2**20
#: The authenticated caller (scope and token digest): binds the alignment to the caller's own PSI session.
Caller = Annotated[str, Depends(principal)]

#: The training API: every route needs the aggregator's credential (the site's primary scope).
router = APIRouter(prefix="/v1", tags=["site"])


@router.get("/info")
def info(runtime: SiteRuntimeDep) -> SiteInfo:
    return runtime.info()


@router.post("/psi", dependencies=[body_limit(lambda s: PSI_BODY_BYTES)])
def psi(runtime: SiteRuntimeDep, request: PsiRequest, caller: Caller) -> PsiResponse:
    return runtime.psi(request, caller)


@router.post("/alignment")
def alignment(runtime: SiteRuntimeDep, aligned: AlignedCases, caller: Caller) -> AlignmentAck:
    return runtime.set_alignment(aligned, caller)


@router.post("/grids")
def grids(runtime: SiteRuntimeDep, request: GridRequest) -> CaseGrids:
    return runtime.grids(request)


RUN_LINKS = links("run_id", ("release_run", "/v1/runs/{run_id}/release", "post"),
                  ("forward", "/v1/runs/{run_id}/forward", "post"),
                  ("checkpoint", "/v1/runs/{run_id}/checkpoint", "post"),
                  ("restore", "/v1/runs/{run_id}/restore", "post"),
                  ("secure_sum_offer", "/v1/runs/{run_id}/secure-sum", "get"))


@router.post("/runs", responses={200: {"description": "the run's encoder at this site", "links": RUN_LINKS}})
def setup_run(runtime: SiteRuntimeDep, setup: RunSetup) -> RunInfo:
    return runtime.setup_run(setup)


@router.post("/runs/{run_id}/release")
def release_run(runtime: SiteRuntimeDep, run_id: RunId) -> RunInfo:
    return runtime.release_run(run_id)


@router.post("/runs/{run_id}/forward", responses={200: {"content": {CONTENT_TYPE: {}}, "description": "activations"}})
def forward(runtime: SiteRuntimeDep, run_id: RunId, request: ForwardRequest) -> BundleResponse:
    return BundleResponse(runtime.forward(run_id, request))


@router.post(
    "/runs/{run_id}/backward", response_model_exclude_none=True,
    dependencies=[body_limit(lambda s: s.max_tensor_request_bytes())],
)
def backward(
    runtime: SiteRuntimeDep, run_id: RunId, body: BundleBody, step: Annotated[int, Query(ge=0, lt=STEP_LIMIT)]
) -> BackwardAck:
    return runtime.backward(run_id, step, body)


@router.post("/runs/{run_id}/checkpoint")
def checkpoint(runtime: SiteRuntimeDep, run_id: RunId, request: CheckpointRequest) -> CheckpointInfo:
    return runtime.checkpoint(run_id, request.step)


@router.post("/runs/{run_id}/restore")
def restore(runtime: SiteRuntimeDep, run_id: RunId, request: CheckpointRequest) -> CheckpointInfo:
    return runtime.restore(run_id, request.step)


@router.get("/runs/{run_id}/secure-sum")
def secure_sum_offer(runtime: SiteRuntimeDep, run_id: RunId) -> SecureSumOffer:
    return runtime.secure_sum_offer(run_id)


@router.post("/runs/{run_id}/secure-sum")
def secure_sum_establish(runtime: SiteRuntimeDep, run_id: RunId, peers: SecureSumPeers) -> SecureSumAck:
    return runtime.secure_sum_establish(run_id, peers)
