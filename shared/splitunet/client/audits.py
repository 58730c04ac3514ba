"""Audits on the audit service (``/v1/audits``), typed by the service's own schemas.

The request is :class:`services.audit.runtime.AuditRequest` whose ``spec`` is checked here against
:class:`splitunet.auditing.runner.AuditSpec` (the model the service builds from it), and the status is
:class:`services.audit.runtime.AuditStatus` with its :class:`~splitunet.auditing.runner.AuditResult`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from services.audit.runtime import FINAL_AUDIT_STATES, AuditMode, AuditRequest, AuditStatus
from splitunet.auditing.runner import AuditSpec, Finding
from splitunet.client.http import ServiceClient
from splitunet.client.jobs import validation_message
from splitunet.errors import ConfigurationError, NotFoundError

#: States after which an audit does nothing more.
FINAL_STATES = frozenset(FINAL_AUDIT_STATES)  # succeeded, failed, cancelled


def parse_request(
    run_id: str, *, sites: Sequence[str] = (), mode: AuditMode | str = AuditMode.FEDERATED,
    spec: Mapping[str, Any] | None = None,
) -> AuditRequest:
    """The :class:`AuditRequest` for these arguments; :class:`ConfigurationError` naming every bad field."""
    try:
        request = AuditRequest(run_id=run_id, sites=list(sites), mode=mode, spec=dict(spec or {}))
        # the service builds an AuditSpec from `spec` plus the transcript's folder: check the fields now
        AuditSpec.model_validate({**request.spec, "transcript": "."})
    except ValidationError as exc:
        raise ConfigurationError(f"invalid audit request: {validation_message(exc)}",
                                 detail=[{"loc": list(e["loc"]), "msg": e["msg"]} for e in exc.errors()]) from None
    return request


class Audit:
    """One audit of the audit service: a handle (its id) and the calls about it."""

    def __init__(self, client: ServiceClient, audit_id: str) -> None:
        self._client = client
        self.audit_id = audit_id

    def __repr__(self) -> str:
        return f"Audit({self.audit_id!r})"

    def status(self) -> AuditStatus:
        """``GET /v1/audits/{id}``: state, progress, message and, once it succeeded, the result."""
        return self._client.get_model(f"/v1/audits/{self.audit_id}", AuditStatus)

    def wait(
        self, progress: Callable[[AuditStatus], None] | None = None, *, poll_s: float = 1.0,
        timeout_s: float | None = None,
    ) -> AuditStatus:
        """Poll until the audit succeeded, failed or was cancelled (``progress`` gets every status);
        ``TimeoutError`` after ``timeout_s`` seconds. A failed audit is returned: its ``error`` says why."""
        if poll_s <= 0:
            raise ValueError(f"poll_s must be positive, got {poll_s}")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            status = self.status()
            if progress is not None:
                progress(status)
            if status.state in FINAL_STATES:
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"audit {self.audit_id} is still {status.state.value} after {timeout_s} s")
            time.sleep(poll_s)

    def cancel(self) -> AuditStatus:
        """``POST /v1/audits/{id}/cancel``: a pending audit never starts, a running one stops between two attacked
        batches (its state becomes ``cancelled``); :class:`ConflictError` (409) once it ended."""
        return self._client.post_model(f"/v1/audits/{self.audit_id}/cancel", None, AuditStatus)

    def findings(self) -> list[Finding]:
        """The findings of a finished audit (one per site, step and attack); :class:`NotFoundError` while it has
        none (still running, or failed)."""
        status = self.status()
        if status.result is None:
            raise NotFoundError(f"audit {self.audit_id} has no findings ({status.state.value})",
                                detail={"state": status.state.value, "error": status.error})
        return list(status.result.findings)

    def report(self, out: str | Path) -> Path:
        """``GET /v1/audits/{id}/report``: write the audit's self-contained HTML report to ``out``."""
        response = self._client.request("GET", f"/v1/audits/{self.audit_id}/report", accept="text/html")
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(response.content)
        return out


class Audits:
    """The audit service's API (``Federation.audits``)."""

    def __init__(self, client: ServiceClient) -> None:
        self._client = client

    def start(
        self, run_id: str, *, sites: Sequence[str] = (), mode: AuditMode | str = AuditMode.FEDERATED,
        spec: Mapping[str, Any] | None = None,
    ) -> Audit:
        """``POST /v1/audits``: audit the recorded run ``run_id`` (a job's id) by replaying the attacks on its
        transcript. ``sites``: names of the audit's site registry to ask for their own audits' figures (federated mode);
        ``spec``: :class:`~splitunet.auditing.runner.AuditSpec` fields (steps, attacks, budgets, gate...)."""
        request = parse_request(run_id, sites=sites, mode=mode, spec=spec)
        status: AuditStatus = self._client.post_model("/v1/audits", request.model_dump(mode="json"), AuditStatus)
        return Audit(self._client, status.audit_id)

    def get(self, audit_id: str) -> Audit:
        """A handle on audit ``audit_id`` (no call is made)."""
        return Audit(self._client, audit_id)
