"""The site's side of auditing: its own record of what it sent, the weights it used, and its own audits.

Nothing here answers a caller with the site's weights or with a function of its images against tensors the caller
supplies: the routes that did (``GET /v1/runs/{run}/audit/encoder``, ``POST /v1/score``) were removed
(docs/threat-model.md). Instead the site audits itself:

- **Transcript.** Every recorded forward's activation bundle (flow ``sent``) and backward's gradient bundle
  (flow ``received``), exactly as they crossed the wire, in the aggregator's format and hash chain
  (:mod:`splitunet.transcript`, party ``site:<name>``), under ``<SITE_STATE_DIR>/<SITE_TRANSCRIPT__DIR>``.
- **Snapshots.** Before each forward the site keeps the weights that forward uses (safetensors, no pickle, no
  optimizer state): every train step in a ring of the last ``audit_keep_last``, every ``audit_snapshot_every``-th
  train step and the first evaluation forward of a step up to ``audit_max_snapshots`` per run (oldest dropped).
  They never leave the site: its own white-box attack reads them.
- **Audits.** ``POST /v1/runs/{run}/audits`` (the site's ``audit`` credential) queues a site-local audit
  (:mod:`splitunet.auditing.site_local`) of the site's record; ``GET /v1/runs/{run}/audits/{id}`` returns its
  status and figures. Those figures are all that leaves.
- **Gate.** The site's own leakage thresholds, checked by its own audit before the next activations leave
  (:mod:`services.client_site.leakage_gate`).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors.torch import save_file

from services.client_site.leakage_gate import LeakageGate
from splitunet.auditing.queue import AuditQueue, AuditStatus
from splitunet.auditing.site_local import SiteAuditRequest, SiteLocalAudit
from splitunet.schemas import ForwardRequest, Phase, RunSetup
from splitunet.transcript import TranscriptRecorder, site_party
from splitunet.wire import frame_sha256

if TYPE_CHECKING:
    from services.client_site.runtime import SiteRun, SiteRuntime

logger = logging.getLogger(__name__)


class SiteAuditor:
    """Keeps the site's transcript and encoder snapshots, and runs its own audits, for one site runtime."""

    def __init__(self, runtime: SiteRuntime) -> None:
        self.runtime = runtime
        self.settings = settings = runtime.settings
        self._lock = threading.Lock()
        self._kept: dict[str, list[Path]] = {}
        self._ring: dict[str, list[Path]] = {}
        transcript = settings.transcript_settings()
        self.identity = runtime.protection.identity
        self.recorder = (TranscriptRecorder(transcript, force_every=settings.policy.leakage.every,
                                            party=site_party(settings.site_id), signer=self.identity)
                         if transcript.enabled else None)
        self.local = SiteLocalAudit(settings.site_id, settings.data_dir, settings.state_dir, transcript.dir,
                                    key=transcript.key(), keep_grids=settings.audit_grids)
        self.queue = AuditQueue(name=f"site-{settings.site_id}-audit")
        self.gate = LeakageGate(settings.policy.leakage, self.local, settings.site_id, settings.state_dir,
                                runtime._metrics)

    # ------------------------------------------------------------------ the site's own record
    def record_setup(self, setup: RunSetup) -> None:
        if self.recorder is not None:
            self.recorder.start(run_id=setup.run_id, meta={"model": setup.model.model_dump(mode="json"),
                                                           "site": self.settings.site_id})

    def record_forward(self, run_id: str, request: ForwardRequest, data: bytes) -> None:
        """The activation bundle this site is about to send for ``request``."""
        if self.recorder is None:
            return
        phase = request.phase.value
        self.recorder.plan(run_id=run_id, step=request.step, phase=phase, samples=request.samples)
        self.recorder.record(run_id=run_id, step=request.step, site=self.settings.site_id, flow="sent",
                             phase=phase, data=data, sha256=frame_sha256(data))
        self.gate.recorded(run_id, request)

    def record_backward(self, run_id: str, step: int, body: bytes) -> None:
        """The gradient bundle this site received and applied for ``step``."""
        if self.recorder is not None:
            self.recorder.record(run_id=run_id, step=step, site=self.settings.site_id, flow="received",
                                 phase=Phase.TRAIN.value, data=body, sha256=frame_sha256(body))

    def record_checkpoint(self, run_id: str, step: int) -> None:
        if self.recorder is not None:
            self.recorder.checkpoint(run_id=run_id, step=step)

    # ------------------------------------------------------------------ snapshots (never served)
    def snapshot_path(self, run_id: str, step: int, phase: Phase) -> Path:
        return self.settings.state_dir / run_id / "audit" / f"encoder-{phase.value}-{step:08d}.safetensors"

    def on_forward(self, run_id: str, run: SiteRun, step: int, phase: Phase) -> None:
        """Snapshot the weights this forward will use (see the module docstring)."""
        every = self.settings.audit_snapshot_every
        if every == 0:
            return
        path = self.snapshot_path(run_id, step, phase)
        if path.is_file():
            return
        keep = phase == Phase.EVAL or step % every == 0 or bool(
            self.settings.policy.leakage.every and step % self.settings.policy.leakage.every == 0)
        with run.step.lock:
            state = {k: v.detach().cpu().contiguous().clone() for k, v in run.step.encoder.state_dict().items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(state, str(tmp), metadata={"run_id": run_id, "step": str(step), "phase": phase.value,
                                             "site": self.settings.site_id, "fingerprint": run.fingerprint})
        os.replace(tmp, path)
        with self._lock:
            if keep:
                kept = self._kept.setdefault(run_id, [])
                kept.append(path)
                while len(kept) > self.settings.audit_max_snapshots:
                    kept.pop(0).unlink(missing_ok=True)
            else:
                ring = self._ring.setdefault(run_id, [])
                ring.append(path)
                while len(ring) > self.settings.audit_keep_last:
                    ring.pop(0).unlink(missing_ok=True)

    # ------------------------------------------------------------------ the site's own audits
    def start_audit(self, run_id: str, request: SiteAuditRequest) -> AuditStatus:
        """Queue an audit of this site's record of ``run_id`` (404 for a run it never recorded)."""
        self.runtime._run(run_id)
        self.local.transcript(run_id)
        status = self.queue.admit(run_id)
        # the reconstructions stay in this process only while the audit runs: the queue keeps the figures
        return self.queue.submit(status, lambda progress: (self.local.run(run_id, request, progress)[0], None))

    def audit_status(self, run_id: str, audit_id: str) -> AuditStatus:
        return self.queue.status(audit_id, run_id)

    def close(self) -> None:
        self.queue.close()
        if self.recorder is not None:
            self.recorder.close()
