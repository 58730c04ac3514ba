"""Audits that run one at a time in a background thread, with a status a caller polls.

Shared by the central audit service (:mod:`services.audit.runtime`) and the site-local audit a site runs on its
own premises (:mod:`splitunet.auditing.site_local`). An audit is a callable ``work(progress) -> AuditResult``;
the queue keeps the last ``max_audits`` statuses (oldest dropped) and never lets an exception escape its thread:
a :class:`~splitunet.errors.SplitUNetError` becomes the status' typed error body, anything else a generic
``internal`` body (the exception's text goes to the log only). :meth:`AuditQueue.cancel` stops a pending audit
before it starts and a running one at its next progress point.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from enum import StrEnum
from typing import Any

from pydantic import BaseModel

from splitunet.auditing.runner import AuditResult
from splitunet.errors import ConflictError, NotFoundError, SplitUNetError
from splitunet.service.errors import internal_error_body

logger = logging.getLogger(__name__)

#: ``progress(fraction, message)``
Progress = Callable[[float, str], None]
#: An audit's work: runs in the queue's thread, reports progress, returns the result and what to keep beside it.
Work = Callable[[Progress], tuple[AuditResult, Any]]


class AuditState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL_AUDIT_STATES = (AuditState.SUCCEEDED, AuditState.FAILED, AuditState.CANCELLED)


class AuditCancelled(Exception):
    """Raised in the audit thread at its next progress point after :meth:`AuditQueue.cancel`."""


class AuditStatus(BaseModel):
    """An audit's status. ``parties`` (central audit only): which party produced which findings, and how."""

    audit_id: str
    run_id: str
    state: AuditState
    progress: float = 0.0
    message: str = ""
    result: AuditResult | None = None
    error: dict | None = None
    seconds: float | None = None  # wall seconds the audit ran (set when it ends; queueing not counted)
    parties: list[dict] | None = None


class AuditQueue:
    """Runs audits one at a time in a background thread; statuses by id.

    Args:
        max_audits: finished audits kept (oldest dropped with what was kept beside them).
        name: the worker thread's name prefix.
    """

    def __init__(self, max_audits: int = 32, name: str = "audit") -> None:
        if max_audits < 1:
            raise ValueError(f"max_audits must be >= 1, got {max_audits}")
        self.max_audits = max_audits
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._audits: OrderedDict[str, AuditStatus] = OrderedDict()
        self._kept: dict[str, Any] = {}
        self._cancel: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def admit(self, run_id: str) -> AuditStatus:
        """Register a pending audit of ``run_id``."""
        status = AuditStatus(audit_id=f"audit-{uuid.uuid4().hex[:12]}", run_id=run_id, state=AuditState.PENDING)
        with self._lock:
            self._audits[status.audit_id] = status
            self._cancel[status.audit_id] = threading.Event()
            while len(self._audits) > self.max_audits:
                old, _ = self._audits.popitem(last=False)
                self._kept.pop(old, None)
                self._cancel.pop(old, None)
        return status

    def cancel(self, audit_id: str, run_id: str | None = None) -> AuditStatus:
        """A pending audit never starts; a running one stops at its next progress point (between two attacked
        batches) and ends ``cancelled``; 409 for an audit that already ended."""
        status = self.status(audit_id, run_id)
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
        self.update(audit_id, progress=round(fraction, 3), message=message)

    def submit(self, status: AuditStatus, work: Work) -> AuditStatus:
        self._pool.submit(self.run, status.audit_id, work)
        return status

    def update(self, audit_id: str, **changes: Any) -> None:
        with self._lock:
            if audit_id in self._audits:
                self._audits[audit_id] = self._audits[audit_id].model_copy(update=changes)

    def run(self, audit_id: str, work: Work) -> None:
        """Run ``work`` in this thread, recording its outcome in the status (never raises)."""
        with self._lock:
            event = self._cancel.get(audit_id)
        if event is None or event.is_set():  # cancelled while pending (or dropped from the table)
            self.update(audit_id, state=AuditState.CANCELLED, message="cancelled before it started")
            return
        self.update(audit_id, state=AuditState.RUNNING)
        started = time.perf_counter()
        try:
            result, kept = work(lambda f, m: self._progress(audit_id, f, m))
            with self._lock:
                self._kept[audit_id] = kept
            self.update(audit_id, state=AuditState.SUCCEEDED, result=result, progress=1.0,
                        message=result.gate.message(), seconds=round(time.perf_counter() - started, 3))
        except AuditCancelled:
            logger.info("audit %s cancelled", audit_id)
            self.update(audit_id, state=AuditState.CANCELLED, message="cancelled by request",
                        seconds=round(time.perf_counter() - started, 3))
        except SplitUNetError as exc:
            logger.error("audit %s failed: %s", audit_id, exc.message)
            self.update(audit_id, state=AuditState.FAILED, error=exc.to_body())
        except Exception as exc:  # noqa: BLE001 - the audit thread reports, never dies silently
            logger.exception("audit %s failed", audit_id)
            self.update(audit_id, state=AuditState.FAILED, error=internal_error_body(exc))

    def status(self, audit_id: str, run_id: str | None = None) -> AuditStatus:
        """The status of ``audit_id`` (404 if unknown, or if it audits another run than ``run_id``)."""
        with self._lock:
            status = self._audits.get(audit_id)
        if status is None or (run_id is not None and status.run_id != run_id):
            raise NotFoundError(f"no audit {audit_id!r}" + ("" if run_id is None else f" of run {run_id!r}"))
        return status

    def kept(self, audit_id: str) -> Any:
        with self._lock:
            return self._kept.get(audit_id)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
