"""The site API, ``/v1``: each route parses, calls one :class:`SiteRuntime` method and returns.

Torch work runs in plain ``def`` routes (FastAPI runs them in its thread pool).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from services.client_site.runtime import SiteRuntime
from splitunet.psi import PsiRequest, PsiResponse
from splitunet.schemas import (
    RUN_ID_PATTERN,
    STEP_LIMIT,
    AlignedCases,
    AlignmentAck,
    BackwardAck,
    CheckpointInfo,
    CheckpointRequest,
    ForwardRequest,
    RunInfo,
    RunSetup,
    SiteInfo,
)
from splitunet.secure_sum import SecureSumAck, SecureSumOffer, SecureSumPeers
from splitunet.service.deps import BundleBody, BundleResponse, runtime_dep

SiteRuntimeDep = runtime_dep(SiteRuntime)
RunId = Annotated[str, Path(pattern=RUN_ID_PATTERN)]

router = APIRouter(prefix="/v1", tags=["site"])


@router.get("/info")
def info(runtime: SiteRuntimeDep) -> SiteInfo:
    return runtime.info()


@router.post("/psi")
def psi(runtime: SiteRuntimeDep, request: PsiRequest) -> PsiResponse:
    return runtime.psi(request)


@router.post("/alignment")
def alignment(runtime: SiteRuntimeDep, aligned: AlignedCases) -> AlignmentAck:
    return runtime.set_alignment(aligned)


@router.post("/runs")
def setup_run(runtime: SiteRuntimeDep, setup: RunSetup) -> RunInfo:
    return runtime.setup_run(setup)


@router.post("/runs/{run_id}/forward", response_class=BundleResponse)
def forward(runtime: SiteRuntimeDep, run_id: RunId, request: ForwardRequest) -> BundleResponse:
    return BundleResponse(runtime.forward(run_id, request))


@router.post("/runs/{run_id}/backward", response_model_exclude_none=True)
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
