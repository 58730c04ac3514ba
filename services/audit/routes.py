"""The audit API, ``/v1``: each route parses, calls one :class:`AuditManager` method and returns."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path
from fastapi.responses import HTMLResponse

from services.audit.runtime import AuditManager, AuditRequest, AuditStatus
from splitunet.service.deps import runtime_dep
from splitunet.service.links import links

AuditDep = runtime_dep(AuditManager)
AuditId = Annotated[str, Path(pattern=r"^audit-[0-9a-f]{12}$")]

router = APIRouter(prefix="/v1", tags=["audit"])


AUDIT_LINKS = links("audit_id", ("get_audit", "/v1/audits/{audit_id}", "get"),
                    ("cancel_audit", "/v1/audits/{audit_id}/cancel", "post"),
                    ("get_report", "/v1/audits/{audit_id}/report", "get"))


@router.post("/audits", status_code=202, responses={202: {"description": "the audit, admitted", "links": AUDIT_LINKS}})
def create_audit(runtime: AuditDep, request: AuditRequest) -> AuditStatus:
    return runtime.create(request)


@router.get("/audits/{audit_id}")
def get_audit(runtime: AuditDep, audit_id: AuditId) -> AuditStatus:
    return runtime.status(audit_id)


@router.post("/audits/{audit_id}/cancel")
def cancel_audit(runtime: AuditDep, audit_id: AuditId) -> AuditStatus:
    """Cancel a pending or running audit (a running one stops between two attacked batches); 409 once it ended."""
    return runtime.cancel(audit_id)


@router.get("/audits/{audit_id}/report", response_model=None,
            responses={200: {"content": {"text/html": {"schema": {"type": "string"}}}, "description": "the report"}})
def get_report(runtime: AuditDep, audit_id: AuditId) -> HTMLResponse:
    return HTMLResponse(runtime.report(audit_id))
