"""The site-local audit: a site attacks what it sent, on its own premises, with its own secrets; only figures leave.

A site keeps its own transcript of what it sent (activations) and received (gradients), in the aggregator's
format and hash chain (:mod:`splitunet.transcript`, party ``site:<name>``), and the encoder weights each recorded
forward used (:mod:`services.client_site.audit`). Its audit replays the image attacks on that record:

- white-box inversion with its own encoder snapshot (the upper bound: an attacker who holds the weights);
- UnSplit (architecture only) and the learned inversion (shadow encoder: the snapshot, else UnSplit's clone);
- semantic leakage (a frozen WT segmenter trained on the public phantom cohort) and re-identification among the
  site's own cases;
- dCor between the site's inputs and what it sent,

scored against the site's own originals (:class:`~splitunet.auditing.sources.LabScorer` over its data folder).
The result is an :class:`~splitunet.auditing.runner.AuditResult`: per site, step and attack the mean figures
over the batch, never a case id, image or tensor. The reconstructions stay with the site (``keep_grids`` draws
them into its state folder for its own eyes). Label leakage is the aggregator's to audit (it holds the labels).
"""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from splitunet.attacks.base import AttackKind
from splitunet.auditing.cohorts import LabCohort, PublicCohort
from splitunet.auditing.gate import GateThreshold
from splitunet.auditing.queue import Progress
from splitunet.auditing.runner import AttackBudgets, AuditArtifacts, AuditResult, AuditRunner, AuditSpec
from splitunet.auditing.sources import LabScorer, SnapshotDirSource
from splitunet.errors import NotFoundError

logger = logging.getLogger(__name__)

#: The attacks a site runs on its own record (label leakage needs the labels: the aggregator's audit).
IMAGE_ATTACKS = (AttackKind.WHITEBOX, AttackKind.UNSPLIT, AttackKind.LEARNED)


class SiteAuditRequest(BaseModel):
    """``POST /v1/runs/{run}/audits`` at a site: which recorded steps to attack and how hard. No tensor, no path,
    no case id: the site attacks its own record of the run."""

    model_config = ConfigDict(extra="forbid")

    steps: list[int] | None = Field(default=None, max_length=64)
    phase: str = Field(default="train", pattern="^(train|eval)$")
    attacks: list[AttackKind] = Field(default_factory=lambda: list(IMAGE_ATTACKS), max_length=4)
    max_samples: int = Field(default=2, ge=1, le=32)
    budgets: AttackBudgets = Field(default_factory=AttackBudgets)
    gate: GateThreshold = Field(default_factory=GateThreshold)

    @field_validator("steps")
    @classmethod
    def _steps(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(s < 0 for s in value):
            raise ValueError("steps are recorded step numbers (>= 0)")
        return value

    @field_validator("attacks")
    @classmethod
    def _image_attacks(cls, value: list[AttackKind]) -> list[AttackKind]:
        if AttackKind.LABEL_LEAKAGE in value:
            raise ValueError("label_leakage is the aggregator's audit (it holds the labels); a site runs "
                             f"{[a.value for a in IMAGE_ATTACKS]}")
        return value


class SiteLocalAudit:
    """Runs audits of one site's own record. Reads its folders only; writes only ``keep_grids`` images.

    Args:
        site: the site's name.
        data_dir: the site's BraTS-layout folder (its modalities only).
        state_dir: the site's state folder: encoder snapshots under ``<run>/audit``, transcripts under
            ``transcripts_dir``.
        transcripts_dir: the site's own transcripts (one folder per run).
        key: the transcripts' HMAC key, if they have one.
        keep_grids: draw each audit's reconstruction grid (original | prior | attacks) into
            ``state_dir/audit-grids/<run>/`` for the site's own eyes (lab mode collects them; nothing serves them).
    """

    def __init__(self, site: str, data_dir: Path, state_dir: Path, transcripts_dir: Path, *,
                 key: bytes | None = None, keep_grids: bool = False) -> None:
        self.site = site
        self.data_dir, self.state_dir, self.transcripts_dir = Path(data_dir), Path(state_dir), Path(transcripts_dir)
        self.key = key
        self.keep_grids = keep_grids
        self._public: PublicCohort | None = None

    def transcript(self, run_id: str) -> Path:
        path = self.transcripts_dir / run_id
        if not path.is_dir():
            raise NotFoundError(f"site {self.site} keeps no transcript of run {run_id!r}")
        return path

    def run(self, run_id: str, request: SiteAuditRequest, progress: Progress | None = None,
            ) -> tuple[AuditResult, AuditArtifacts]:
        """Audit ``run_id`` as ``request`` asks; figures (the result) and the site-only artifacts."""
        spec = AuditSpec(transcript=self.transcript(run_id), sites=[self.site], steps=request.steps,
                         phase=request.phase, attacks=request.attacks, max_samples=request.max_samples,
                         budgets=request.budgets, gate=request.gate)
        cohort = LabCohort(self.data_dir)
        runner = AuditRunner(LabScorer(cohort), weights=SnapshotDirSource({self.site: self.state_dir}), lab=cohort,
                             public=self._public, key=self.key)
        result, artifacts = runner.run(spec, progress)
        self._public = runner.public  # the public cohort is generated once per grid
        if self.keep_grids:
            self._draw(run_id, artifacts)
        return result, artifacts

    def _draw(self, run_id: str, artifacts: AuditArtifacts) -> None:
        from splitunet.auditing.report import grid_png

        out = self.state_dir / "audit-grids" / run_id
        out.mkdir(parents=True, exist_ok=True)
        for (site, step), arrays in artifacts.grids.items():
            if "original" in arrays:
                (out / f"{site}-step-{step:08d}.png").write_bytes(grid_png(arrays, f"site {site} step {step}"))
