"""The aggregator API, ``/v1``: each route parses, calls one runtime method and returns."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response

from services.aggregator.runtime import AggregatorRuntime
from splitunet.federation import (
    AggregatorInfo,
    FederationSpec,
    InferRequest,
    JobCreated,
    JobStatus,
    ValidateRequest,
)
from splitunet.schemas import RUN_ID_PATTERN
from splitunet.service.deps import runtime_dep
from splitunet.service.links import links

AggregatorDep = runtime_dep(AggregatorRuntime)
JobId = Annotated[str, Path(pattern=RUN_ID_PATTERN)]

router = APIRouter(prefix="/v1", tags=["aggregator"])


@router.get("/info")
def info(runtime: AggregatorDep) -> AggregatorInfo:
    return runtime.info()


JOB_LINKS = links("job_id", ("get_job", "/v1/jobs/{job_id}", "get"), ("stop_job", "/v1/jobs/{job_id}/stop", "post"),
                  ("resume_job", "/v1/jobs/{job_id}/resume", "post"))


@router.post("/jobs", status_code=202, responses={202: {"description": "the job, started", "links": JOB_LINKS}})
def create_job(runtime: AggregatorDep, spec: FederationSpec) -> JobCreated:
    return runtime.jobs.create(spec)


@router.get("/jobs")
def list_jobs(runtime: AggregatorDep) -> list[JobStatus]:
    return runtime.jobs.list()


@router.get("/jobs/{job_id}")
def get_job(runtime: AggregatorDep, job_id: JobId) -> JobStatus:
    return runtime.jobs.status(job_id)


@router.post("/jobs/{job_id}/stop")
def stop_job(runtime: AggregatorDep, job_id: JobId) -> JobStatus:
    return runtime.jobs.stop(job_id)


@router.post("/jobs/{job_id}/resume")
def resume_job(runtime: AggregatorDep, job_id: JobId) -> JobStatus:
    """Continue a job paused by the privacy gate, or restart a failed or stopped one from its latest complete
    checkpoint."""
    return runtime.jobs.resume(job_id)


@router.post("/infer", responses={200: {"content": {"application/gzip": {}}, "description": "the segmentation"}})
def infer(runtime: AggregatorDep, request: InferRequest) -> Response:
    data, filename, sites = runtime.jobs.infer(request)
    return Response(data, media_type="application/gzip",
                    headers={"Content-Disposition": f'attachment; filename="{filename}"',
                             "X-Sites-Used": ",".join(sites)})


@router.post("/jobs/{job_id}/validate")
def validate_job(runtime: AggregatorDep, job_id: JobId, request: ValidateRequest) -> dict:
    """Validate a job's model with a subset of its sites (Dice/HD95 per region; ``sites_used``)."""
    return runtime.jobs.validate(job_id, request)
