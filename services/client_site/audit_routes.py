"""The site's own audits, on their own router so that only the site's ``audit`` credential may call them.

No route here returns the site's weights, an image, a reconstruction, or any function of the site's images
against tensors the caller supplies: the caller names a run the site recorded and the attacks' budgets, the site
attacks its own record on its own premises (:mod:`splitunet.auditing.site_local`) and publishes only figures.
Each route parses, calls one :class:`~services.client_site.audit.SiteAuditor` method and returns.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from services.client_site.runtime import SiteRuntime
from splitunet.auditing.queue import AuditStatus
from splitunet.auditing.site_local import SiteAuditRequest
from splitunet.schemas import RUN_ID_PATTERN
from splitunet.service.deps import runtime_dep
from splitunet.service.scopes import Scope, requires_scope

SiteRuntimeDep = runtime_dep(SiteRuntime)
RunId = Annotated[str, Path(pattern=RUN_ID_PATTERN)]
AuditId = Annotated[str, Path(pattern=r"^audit-[0-9a-f]{12}$")]

router = APIRouter(prefix="/v1", tags=["site-audit"], dependencies=[requires_scope(Scope.AUDIT)])


@router.post("/runs/{run_id}/audits", status_code=202)
def start_audit(runtime: SiteRuntimeDep, run_id: RunId, request: SiteAuditRequest) -> AuditStatus:
    """Queue the site's own audit of its record of ``run_id``; poll its status for the figures."""
    return runtime.audit.start_audit(run_id, request)


@router.get("/runs/{run_id}/audits/{audit_id}")
def audit_status(runtime: SiteRuntimeDep, run_id: RunId, audit_id: AuditId) -> AuditStatus:
    """The status of one of the site's own audits: progress, then its figures (never an image or a tensor)."""
    return runtime.audit.audit_status(run_id, audit_id)
