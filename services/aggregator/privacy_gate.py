"""The privacy gate at the aggregator: every ``N`` steps audit the step just recorded; pause the job when a site
leaks more than the configured threshold, until an operator resumes it (``POST /v1/jobs/{id}/resume``).

The gate audit is a white-box inversion (the strongest attack, upper bound) of each site's recorded activations
at that step, with the weights the site held (its audit endpoint) and scored by the site itself
(``POST /v1/score``, numbers only). A failed gate sets the job's state to ``paused_by_privacy_gate`` with the
decision (site, attack, figure, value, threshold) in ``JobStatus.privacy_gate``; the job thread waits, between
two steps, until it is resumed or stopped.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from splitunet.attacks.base import AttackKind
from splitunet.auditing.gate import GateThreshold
from splitunet.auditing.runner import AttackBudgets, AuditRunner, AuditSpec
from splitunet.auditing.sources import SiteAuditClient
from splitunet.errors import ConfigurationError, ConflictError
from splitunet.federation import SitePeer

if TYPE_CHECKING:
    from services.aggregator.settings import AggregatorSettings
    from splitunet.federation import FederationSpec

logger = logging.getLogger(__name__)


class PrivacyGateSettings(BaseModel):
    """``AGG_PRIVACY_GATE__EVERY=50``, ``AGG_PRIVACY_GATE__MAX_SSIM=0.6``, ...

    Args:
        every: audit every n-th train step (0: no gate). Needs ``AGG_TRANSCRIPT__ENABLED=true``.
        max_ssim, max_rdlv: the thresholds (see :class:`~splitunet.auditing.gate.GateThreshold`).
        whitebox_iterations: the gate attack's budget, by default an audit's (1000). On the demo's trained encoders
            the old budget, 200 iterations at the attack's old rate 0.05, reached brain SSIM 0.37-0.85 per site where
            1000 at 0.1 reached 0.80-0.99: a gate with a smaller budget can pass a step that an audit would flag.
            max_samples: samples attacked per site (8, an audit's default: fewer leave ΔSSIM's interval wide).
        audit_token_file: the sites' ``audit`` credential the gate presents to their audit endpoints; required
            when ``every`` > 0. Note (docs/threat-model.md): with it the aggregator can fetch the encoder snapshots
            the sites keep for audits, so enable the gate only where the audit credential may sit with the
            aggregator's operator; otherwise run audits from the audit service alone.
    """

    model_config = ConfigDict(extra="forbid")

    every: int = Field(default=0, ge=0)
    max_ssim: float | None = Field(default=None, ge=-1, le=1)
    max_rdlv: float | None = None
    whitebox_iterations: int = Field(default=1000, ge=1)
    max_samples: int = Field(default=8, ge=1, le=32)
    audit_token_file: Path | None = None


class JobPause:
    """A job's pause switch: the job thread waits in :meth:`wait` until :meth:`resume` (or a stop)."""

    def __init__(self) -> None:
        self._resumed = threading.Event()
        self.paused = False

    def wait(self, stopped: threading.Event, on_stop: Callable[[], None]) -> None:
        self._resumed.clear()
        self.paused = True
        try:
            while not self._resumed.wait(0.1):
                if stopped.is_set():
                    on_stop()
                    return
        finally:
            self.paused = False

    def resume(self) -> None:
        if not self.paused:
            raise ConflictError("the job is not paused; only a job paused by the privacy gate can be resumed")
        self._resumed.set()


class PrivacyGate:
    """Runs the gate audit of one job.

    Args:
        settings: the gate's settings.
        transcript_dir: the run's transcript folder.
        peers: the job's sites (their URLs; credentials replaced by ``audit_token_file`` when set).
    """

    def __init__(self, settings: PrivacyGateSettings, transcript_dir: Path, peers: list[SitePeer]) -> None:
        if settings.audit_token_file is None:
            raise ConfigurationError("the privacy gate needs the sites' audit credential: set "
                                     "AGG_PRIVACY_GATE__AUDIT_TOKEN_FILE")
        self.settings = settings
        self.transcript_dir = Path(transcript_dir)
        # the registry's URLs, with the audit credential instead of the aggregator's own per-site tokens
        self.peers = [p.model_copy(update={"token_file": settings.audit_token_file}) for p in peers]

    def due(self, step: int) -> bool:
        return bool(self.settings.every) and step % self.settings.every == 0

    def check(self, step: int) -> dict:
        """Audit ``step``; return the decision and the findings (JSON-able)."""
        spec = AuditSpec(
            transcript=self.transcript_dir, steps=[step], attacks=[AttackKind.WHITEBOX],
            max_samples=self.settings.max_samples,
            # the gate thresholds SSIM / RDLV only: no WT segmenter to train (semantic leakage is the audit's)
            budgets=AttackBudgets(whitebox_iterations=self.settings.whitebox_iterations, segmenter_steps=0),
            gate=GateThreshold(max_ssim=self.settings.max_ssim, max_rdlv=self.settings.max_rdlv),
        )
        client = SiteAuditClient(self.peers)
        try:
            result, _ = AuditRunner(client, weights=client).run(spec)
        finally:
            client.close()
        decision = result.gate
        logger.info("privacy gate at step %d: %s", step, decision.message())
        return {**decision.model_dump(mode="json"), "message": decision.message(), "step": step,
                "findings": [f.model_dump(mode="json") for f in result.findings]}


def audit_hooks(settings: AggregatorSettings) -> dict[str, Any]:
    """The :class:`~services.aggregator.jobs.JobManager` factories for the transcript and the gate; empty when
    the transcript is off."""
    from splitunet.transcript import TranscriptRecorder

    if not settings.transcript.enabled:
        return {}
    gate = settings.privacy_gate

    def recorder(job_id: str) -> TranscriptRecorder:
        return TranscriptRecorder(settings.transcript, force_every=gate.every)

    def gate_factory(job_id: str, spec: FederationSpec) -> PrivacyGate | None:
        if not gate.every:
            return None
        return PrivacyGate(gate, Path(settings.transcript.dir) / job_id, settings.registry().resolve(spec.sites))

    return {"recorder_factory": recorder, "gate_factory": gate_factory}
