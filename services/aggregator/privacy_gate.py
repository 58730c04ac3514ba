"""The aggregator's privacy gate: every ``N`` steps it audits the label leakage of the gradients it sent (with its
own labels, simulating a curious site); over its threshold the job pauses until an operator resumes it
(``POST /v1/jobs/{id}/resume``).

Image leakage is not the aggregator's to gate: each site holds its own leakage thresholds and checks them with
its own audit before its next activations leave (:mod:`services.client_site.leakage_gate`); a site that stops
releasing pauses the job too (``JobStatus.privacy_gate`` names the site and the figure). A failed gate sets the
job's state to ``paused_by_privacy_gate``; the job thread waits, between two steps, until resumed or stopped.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from splitunet.attacks.base import AttackKind
from splitunet.auditing.gate import GateThreshold
from splitunet.auditing.runner import AttackBudgets, AuditRunner, AuditSpec
from splitunet.auditing.sources import AggregatorLabels, NoScorer
from splitunet.errors import ConflictError

if TYPE_CHECKING:
    from services.aggregator.settings import AggregatorSettings
    from splitunet.federation import FederationSpec

logger = logging.getLogger(__name__)


class PrivacyGateSettings(BaseModel):
    """``AGG_PRIVACY_GATE__EVERY=50``, ``AGG_PRIVACY_GATE__MAX_LABEL_DICE=0.5``, ...

    Args:
        every: audit every n-th train step (0: no gate). Needs ``AGG_TRANSCRIPT__ENABLED=true`` and a threshold.
        max_label_dice: the label attack's Dice to the true whole-tumour mask above which the job pauses.
        max_samples: samples of the recorded batch attacked per site (8, an audit's default: fewer leave the
            figures' interval wide).
        max_ssim, max_rdlv, audit_token_file: removed. Image leakage is gated by each site with its own
            thresholds (``SITE_POLICY__LEAKAGE__...``); the aggregator holds no credential to a site's images or
            weights. Setting them is a start-up error that says so.
    """

    model_config = ConfigDict(extra="forbid")

    every: int = Field(default=0, ge=0)
    max_label_dice: float | None = Field(default=None, ge=0, le=1)
    max_samples: int = Field(default=8, ge=1, le=32)
    max_ssim: float | None = None
    max_rdlv: float | None = None
    audit_token_file: Path | None = None

    @model_validator(mode="after")
    def _check(self) -> PrivacyGateSettings:
        moved = [n for n in ("max_ssim", "max_rdlv", "audit_token_file") if getattr(self, n) is not None]
        if moved:
            raise ValueError(f"privacy_gate.{moved[0]} is no longer the aggregator's: each site gates its own image "
                             "leakage before its activations leave (SITE_POLICY__LEAKAGE__EVERY, __MAX_SSIM, "
                             "__MAX_DELTA_SSIM, __MAX_SEMANTIC); the aggregator's gate covers label leakage "
                             "(AGG_PRIVACY_GATE__MAX_LABEL_DICE)")
        if self.every and self.max_label_dice is None:
            raise ValueError(f"privacy_gate.every={self.every} but no threshold: set AGG_PRIVACY_GATE__MAX_LABEL_DICE "
                             "(or every=0 for no gate)")
        if not self.every and self.max_label_dice is not None:
            raise ValueError("privacy_gate.max_label_dice is set but every=0: the gate would never check it; set "
                             "AGG_PRIVACY_GATE__EVERY")
        return self


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
    """Runs the aggregator's label-leakage gate audit of one job on its own transcript, with its own labels.

    Args:
        settings: the gate's settings.
        transcript_dir: the run's transcript folder.
        labels_dir: the aggregator's segmentations (``AGG_DATA_DIR``).
        key: the transcript's HMAC key, if it has one.
    """

    def __init__(self, settings: PrivacyGateSettings, transcript_dir: Path, labels_dir: Path,
                 key: bytes | None = None) -> None:
        self.settings = settings
        self.transcript_dir = Path(transcript_dir)
        self.labels = AggregatorLabels(labels_dir)
        self.key = key

    def due(self, step: int) -> bool:
        return bool(self.settings.every) and step % self.settings.every == 0

    def check(self, step: int) -> dict:
        """Audit ``step``; return the decision and the findings (JSON-able)."""
        spec = AuditSpec(
            transcript=self.transcript_dir, steps=[step], attacks=[AttackKind.LABEL_LEAKAGE],
            max_samples=self.settings.max_samples, budgets=AttackBudgets(segmenter_steps=0),
            gate=GateThreshold(max_label_dice=self.settings.max_label_dice),
        )
        result, _ = AuditRunner(NoScorer(), lab=self.labels, key=self.key).run(spec)
        decision = result.gate
        logger.info("privacy gate at step %d: %s", step, decision.message())
        return {**decision.model_dump(mode="json"), "message": decision.message(), "step": step,
                "party": "aggregator", "findings": [f.model_dump(mode="json") for f in result.findings]}


def audit_hooks(settings: AggregatorSettings) -> dict[str, Any]:
    """The :class:`~services.aggregator.jobs.JobManager` factories for the transcript and the gate; empty when
    the transcript is off."""
    from splitunet.transcript import TranscriptRecorder

    if not settings.transcript.enabled:
        return {}
    gate = settings.privacy_gate
    identity = settings.identity()

    def recorder(job_id: str) -> TranscriptRecorder:
        return TranscriptRecorder(settings.transcript, force_every=gate.every, signer=identity)

    def gate_factory(job_id: str, spec: FederationSpec) -> PrivacyGate | None:
        if not gate.every:
            return None
        return PrivacyGate(gate, Path(settings.transcript.dir) / job_id, settings.data_dir,
                           key=settings.transcript.key())

    return {"recorder_factory": recorder, "gate_factory": gate_factory}
