"""The audit service's runtime: audits run one at a time in a background thread; status, results and reports.

Modes: *federated* (default) — each site the request names (from the audit's own registry, ``AUDIT_SITES``: their
URLs and this audit's credential at each, one per site) audits its own record on its own premises and publishes
figures; the aggregator's label-leakage audit runs here with its labels; no weight or image moves. *lab* — one
operator holds everything (phantom, tests): the service reads the cohort in ``AUDIT_LAB_IMAGES_DIR`` and draws
reconstruction grids.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from services.audit.settings import AuditSettings
from splitunet.attacks.base import AttackKind
from splitunet.auditing.cohorts import LabCohort
from splitunet.auditing.queue import FINAL_AUDIT_STATES, AuditQueue, AuditState, AuditStatus, Progress
from splitunet.auditing.report import render_html
from splitunet.auditing.runner import AuditArtifacts, AuditResult, AuditRunner, AuditSpec
from splitunet.auditing.sources import AggregatorLabels, LabScorer, NoScorer, SiteFindingsClient, SnapshotDirSource
from splitunet.errors import ConfigurationError, NotFoundError
from splitunet.federation import SiteName
from splitunet.schemas import RUN_ID_PATTERN
from splitunet.transcript import Transcript

logger = logging.getLogger(__name__)


class AuditMode(StrEnum):
    FEDERATED = "federated"
    LAB = "lab"


class AuditRequest(BaseModel):
    """``POST /v1/audits``: the run (its transcript under ``AUDIT_TRANSCRIPTS_DIR``), the sites to ask for their
    own findings (names of the audit's registry ``AUDIT_SITES``, never URLs or credentials), and what to attack
    (see :class:`~splitunet.auditing.runner.AuditSpec`)."""

    model_config = ConfigDict(extra="forbid")

    run_id: str = Field(pattern=RUN_ID_PATTERN)
    mode: AuditMode = AuditMode.FEDERATED
    sites: list[SiteName] = Field(default_factory=list, max_length=64)
    spec: dict = Field(default_factory=dict, description="AuditSpec fields except transcript")


class AuditManager:
    """The central audit: federated audits assembled from the parties' findings, or lab audits in one place.

    - *federated*: each named site audits its own record on its own premises and publishes figures
      (:class:`~splitunet.auditing.sources.SiteFindingsClient`); the aggregator's label-leakage audit runs here,
      beside the aggregator, on its transcript with its labels (``AUDIT_LABELS_DIR``); the findings are assembled
      into one report, each finding's party named in ``AuditStatus.parties``.
    - *lab* (phantom, tests: one operator holds everything): every attack here, on the lab cohort, with the sites'
      snapshot folders (``AUDIT_LAB_SNAPSHOTS``) for the white-box attack.
    """

    def __init__(self, settings: AuditSettings, *, transport_factory=None) -> None:
        self.settings = settings
        self._transport_factory = transport_factory
        self.queue = AuditQueue(settings.max_audits)

    def create(self, request: AuditRequest) -> AuditStatus:
        """Admit an audit and run it in the background; its status says when it is done."""
        status, spec = self._admit(request)
        return self.queue.submit(status, lambda progress: self._work(status.audit_id, request, spec, progress))

    def run_now(self, request: AuditRequest) -> AuditStatus:
        """Run one audit in this thread and return its final status (``splitunet audit once``, the Job form)."""
        status, spec = self._admit(request)
        self.queue.run(status.audit_id, lambda progress: self._work(status.audit_id, request, spec, progress))
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
        if request.sites and request.mode == AuditMode.FEDERATED:
            self.settings.registry().resolve(request.sites)  # unknown names: 403 now, not a failed audit
        try:
            # an audit attacks the sites it names unless the spec narrows them further
            named = {"sites": list(request.sites)} if request.sites and "sites" not in request.spec else {}
            spec = AuditSpec.model_validate({**request.spec, **named, "transcript": transcript})
        except ValueError as exc:
            raise ConfigurationError(f"bad audit spec: {exc}") from None
        return self.queue.admit(request.run_id), spec

    def _work(self, audit_id: str, request: AuditRequest, spec: AuditSpec,
              progress: Progress) -> tuple[AuditResult, AuditArtifacts | None]:
        if request.mode == AuditMode.LAB:
            lab = LabCohort(self.settings.lab_images_dir, self.settings.lab_labels_dir)
            snapshots = SnapshotDirSource(self.settings.lab_snapshots) if self.settings.lab_snapshots else None
            result, artifacts = AuditRunner(LabScorer(lab), weights=snapshots, lab=lab).run(spec, progress)
            self.queue.update(audit_id, parties=[{"party": "lab", "findings": len(result.findings),
                                                  "records": result.records}])
            return result, artifacts
        result, parties = self._federated(request, spec, progress)
        self.queue.update(audit_id, parties=parties)
        return result, None

    def _federated(self, request: AuditRequest, spec: AuditSpec, progress: Progress) -> tuple[AuditResult, list]:
        """Each site's own audit (figures), the aggregator's label audit here, assembled."""
        sites = list(spec.sites or request.sites)
        image_attacks = [a for a in spec.attacks if a != AttackKind.LABEL_LEAKAGE]
        client = SiteFindingsClient(self.settings.registry().resolve(sites), timeout_s=self.settings.site_timeout_s,
                                    transport_factory=self._transport_factory, verify=self.settings.site_verify())
        findings, dcor, segmenters, parties = [], {}, [], []
        try:
            if image_attacks:
                body = {"steps": spec.steps, "phase": spec.phase, "attacks": [a.value for a in image_attacks],
                        "max_samples": spec.max_samples, "budgets": spec.budgets.model_dump(mode="json"),
                        "gate": spec.gate.model_dump(mode="json")}
                started = {site: client.start(site, request.run_id, body) for site in sites}
                for done, (site, site_audit) in enumerate(started.items()):
                    progress(done / (len(sites) + 1), f"site {site}'s own audit")
                    status = client.wait(site, request.run_id, site_audit)
                    found = AuditResult.model_validate(status["result"])
                    findings += [f for f in found.findings if f.site == site]  # a site speaks for itself only
                    dcor |= {k: v for k, v in found.dcor.items() if k == site}
                    segmenters += found.segmenters
                    parties.append({"party": f"site:{site}", "audit_id": site_audit, "records": found.records,
                                    "findings": len(found.findings), "gate": found.gate.model_dump(mode="json"),
                                    "seconds": status.get("seconds")})
        finally:
            client.close()
        records = 0
        if AttackKind.LABEL_LEAKAGE in spec.attacks:
            progress(len(sites) / (len(sites) + 1), "the aggregator's label audit")
            labels = self.settings.labels_dir or self.settings.lab_labels_dir or self.settings.lab_images_dir
            if labels is None:
                parties.append({"party": "aggregator", "skipped": "no AUDIT_LABELS_DIR: label leakage not audited"})
            else:
                label_spec = spec.model_copy(update={"attacks": [AttackKind.LABEL_LEAKAGE]})
                found, _ = AuditRunner(NoScorer(), lab=AggregatorLabels(labels)).run(label_spec)
                findings += found.findings
                records = found.records
                parties.append({"party": "aggregator", "records": found.records, "findings": len(found.findings)})
        result = AuditResult(run_id=request.run_id, records=records, findings=findings, dcor=dcor,
                             segmenters=segmenters, gate=spec.gate.evaluate(findings))
        return result, parties

    def status(self, audit_id: str) -> AuditStatus:
        return self.queue.status(audit_id)

    def cancel(self, audit_id: str) -> AuditStatus:
        """``POST /v1/audits/{id}/cancel``: see :meth:`~splitunet.auditing.queue.AuditQueue.cancel`."""
        return self.queue.cancel(audit_id)

    def report(self, audit_id: str) -> str:
        status = self.status(audit_id)
        if status.result is None:
            raise NotFoundError(f"audit {audit_id} has no report yet (state {status.state.value})")
        return render_html(status.result, self.queue.kept(audit_id), parties=status.parties)

    def close(self) -> None:
        self.queue.close()


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


__all__ = ["FINAL_AUDIT_STATES", "AuditManager", "AuditMode", "AuditRequest", "AuditState", "AuditStatus",
           "audit_runtime"]
