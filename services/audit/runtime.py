"""The audit service's runtime: audits run one at a time in a background thread; status, results and reports.

Modes: *federated* (default) — white-box weights and scores come from the sites' audit endpoints (the request
names sites of the audit's own registry, ``AUDIT_SITES``, which holds their URLs and audit credentials), no image
moves; *lab* — the service reads the cohort configured
in ``AUDIT_LAB_IMAGES_DIR`` (phantom, tests) and draws reconstruction grids.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from services.audit.settings import AuditSettings
from splitunet.auditing.cohorts import LabCohort
from splitunet.auditing.report import render_html
from splitunet.auditing.runner import AuditArtifacts, AuditResult, AuditRunner, AuditSpec
from splitunet.auditing.sources import LabScorer, SiteAuditClient
from splitunet.errors import ConfigurationError, ConflictError, NotFoundError, SplitUNetError
from splitunet.federation import SiteName
from splitunet.schemas import RUN_ID_PATTERN
from splitunet.service.errors import internal_error_body
from splitunet.transcript import Transcript

logger = logging.getLogger(__name__)


class AuditMode(StrEnum):
    FEDERATED = "federated"
    LAB = "lab"


class AuditRequest(BaseModel):
    """``POST /v1/audits``: the run (its transcript under ``AUDIT_TRANSCRIPTS_DIR``), the sites to ask for
    weights and scores (names of the audit's registry ``AUDIT_SITES``, never URLs or credentials), and what to
    attack (see :class:`~splitunet.auditing.runner.AuditSpec`)."""

    model_config = ConfigDict(extra="forbid")

    run_id: str = Field(pattern=RUN_ID_PATTERN)
    mode: AuditMode = AuditMode.FEDERATED
    sites: list[SiteName] = Field(default_factory=list, max_length=64)
    spec: dict = Field(default_factory=dict, description="AuditSpec fields except transcript")


class AuditState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL_AUDIT_STATES = (AuditState.SUCCEEDED, AuditState.FAILED, AuditState.CANCELLED)


class AuditCancelled(Exception):
    """Raised in the audit thread at its next progress point after ``POST /v1/audits/{id}/cancel``."""


class AuditStatus(BaseModel):
    audit_id: str
    run_id: str
    state: AuditState
    progress: float = 0.0
    message: str = ""
    result: AuditResult | None = None
    error: dict | None = None
    seconds: float | None = None  # wall seconds the audit ran (set when it ends; queueing not counted)


class AuditManager:
    def __init__(self, settings: AuditSettings, *, transport_factory=None) -> None:
        self.settings = settings
        self._transport_factory = transport_factory
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="audit")
        self._audits: OrderedDict[str, AuditStatus] = OrderedDict()
        self._artifacts: dict[str, AuditArtifacts] = {}
        self._cancel: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def create(self, request: AuditRequest) -> AuditStatus:
        """Admit an audit and run it in the background; its status says when it is done."""
        status, spec = self._admit(request)
        self._pool.submit(self._run, status.audit_id, request, spec)
        return status

    def run_now(self, request: AuditRequest) -> AuditStatus:
        """Run one audit in this thread and return its final status (``splitunet audit once``, the Job form)."""
        status, spec = self._admit(request)
        self._run(status.audit_id, request, spec)
        return self.status(status.audit_id)

    def newest_run(self) -> str:
        """The run whose transcript was written last (what a one-off audit after a training job means)."""
        root = Path(self.settings.transcripts_dir)
        runs = [d for d in root.iterdir() if d.is_dir()] if root.is_dir() else []
        if not runs:
            raise NotFoundError(f"no transcript in the audit's transcripts folder {str(root)!r}: has a job with "
                                "the transcript on (AGG_TRANSCRIPT__ENABLED) run yet?")
        return max(runs, key=lambda d: max((f.stat().st_mtime for f in d.iterdir()), default=0.0)).name

    def run_sites(self, run_id: str) -> list[str]:
        """The sites of a recorded run that this audit's registry holds (whom a one-off audit asks by default)."""
        transcript = Transcript(Path(self.settings.transcripts_dir) / run_id)
        try:
            recorded = [s["name"] for s in transcript.run.get("model", {}).get("sites", [])]
        finally:
            transcript.close()
        registered = set(self.settings.registry().names)
        return [s for s in recorded if s in registered]

    def _admit(self, request: AuditRequest) -> tuple[AuditStatus, AuditSpec]:
        """Check a request against the transcripts and the registry; register it as pending."""
        transcript = Path(self.settings.transcripts_dir) / request.run_id
        if not transcript.is_dir():
            raise NotFoundError(f"no transcript of run {request.run_id!r} in the audit's transcripts folder")
        if request.mode == AuditMode.LAB and self.settings.lab_images_dir is None:
            raise ConfigurationError("lab mode needs AUDIT_LAB_IMAGES_DIR; use mode=federated naming registered sites")
        if request.mode == AuditMode.FEDERATED and not request.sites:
            raise ConfigurationError(
                "federated mode needs the sites to ask: names of the audit's site registry (AUDIT_SITES)"
            )
        if request.sites:
            self.settings.registry().resolve(request.sites)  # unknown names: 403 now, not a failed audit
        try:
            # a federated audit attacks the sites it names (the ones it holds a credential for) unless the spec
            # narrows them further
            named = {"sites": list(request.sites)} if request.sites and "sites" not in request.spec else {}
            spec = AuditSpec.model_validate({**request.spec, **named, "transcript": transcript})
        except ValueError as exc:
            raise ConfigurationError(f"bad audit spec: {exc}") from None
        audit_id = f"audit-{uuid.uuid4().hex[:12]}"
        status = AuditStatus(audit_id=audit_id, run_id=request.run_id, state=AuditState.PENDING)
        with self._lock:
            self._audits[audit_id] = status
            self._cancel[audit_id] = threading.Event()
            while len(self._audits) > self.settings.max_audits:
                old, _ = self._audits.popitem(last=False)
                self._artifacts.pop(old, None)
                self._cancel.pop(old, None)
        return status, spec

    def cancel(self, audit_id: str) -> AuditStatus:
        """``POST /v1/audits/{id}/cancel``: a pending audit never starts; a running one stops at its next progress
        point (between two attacked batches) and ends ``cancelled``; 409 for an audit that already ended."""
        status = self.status(audit_id)
        if status.state in FINAL_AUDIT_STATES:
            raise ConflictError(f"audit {audit_id} has already ended ({status.state.value}); nothing to cancel",
                                detail={"state": status.state.value})
        with self._lock:
            event = self._cancel.get(audit_id)
        if event is not None:
            event.set()
        logger.info("audit %s: cancel requested", audit_id)
        return self.status(audit_id)

    def _progress(self, audit_id: str, fraction: float, message: str) -> None:
        with self._lock:
            event = self._cancel.get(audit_id)
        if event is not None and event.is_set():
            raise AuditCancelled
        self._update(audit_id, progress=round(fraction, 3), message=message)

    def _update(self, audit_id: str, **changes) -> None:
        with self._lock:
            self._audits[audit_id] = self._audits[audit_id].model_copy(update=changes)

    def _run(self, audit_id: str, request: AuditRequest, spec: AuditSpec) -> None:
        with self._lock:
            event = self._cancel.get(audit_id)
        if event is None or event.is_set():  # cancelled while pending (or dropped from the table)
            if event is not None:
                self._update(audit_id, state=AuditState.CANCELLED, message="cancelled before it started")
            return
        self._update(audit_id, state=AuditState.RUNNING)
        started = time.perf_counter()
        client = (
            SiteAuditClient(self.settings.registry().resolve(request.sites), timeout_s=self.settings.site_timeout_s,
                            transport_factory=self._transport_factory, verify=self.settings.site_verify())
            if request.sites else None
        )
        try:
            lab = None
            if request.mode == AuditMode.LAB:
                lab = LabCohort(self.settings.lab_images_dir, self.settings.lab_labels_dir)
            scorer = LabScorer(lab) if lab is not None else client
            runner = AuditRunner(scorer, weights=client, lab=lab)
            result, artifacts = runner.run(spec, progress=lambda f, m: self._progress(audit_id, f, m))
            with self._lock:
                self._artifacts[audit_id] = artifacts
            self._update(audit_id, state=AuditState.SUCCEEDED, result=result, progress=1.0,
                         message=result.gate.message(), seconds=round(time.perf_counter() - started, 3))
        except AuditCancelled:
            logger.info("audit %s cancelled", audit_id)
            self._update(audit_id, state=AuditState.CANCELLED, message="cancelled by request",
                         seconds=round(time.perf_counter() - started, 3))
        except SplitUNetError as exc:
            logger.error("audit %s failed: %s", audit_id, exc.message)
            self._update(audit_id, state=AuditState.FAILED, error=exc.to_body())
        except Exception as exc:  # noqa: BLE001 - the audit thread reports, never dies silently
            logger.exception("audit %s failed", audit_id)
            self._update(audit_id, state=AuditState.FAILED, error=internal_error_body(exc))
        finally:
            if client is not None:
                client.close()

    def status(self, audit_id: str) -> AuditStatus:
        with self._lock:
            status = self._audits.get(audit_id)
        if status is None:
            raise NotFoundError(f"no audit {audit_id!r}")
        return status

    def report(self, audit_id: str) -> str:
        status = self.status(audit_id)
        if status.result is None:
            raise NotFoundError(f"audit {audit_id} has no report yet (state {status.state.value})")
        with self._lock:
            artifacts = self._artifacts.get(audit_id)
        return render_html(status.result, artifacts)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


@contextmanager
def audit_runtime(settings: AuditSettings, **options) -> Iterator[AuditManager]:
    """``options`` go to :class:`AuditManager` (tests pass an in-process ``transport_factory``)."""
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    manager = AuditManager(settings, **options)
    try:
        yield manager
    finally:
        manager.close()
