"""Run an audit: verify the transcript, replay the attacks on recorded batches, score them, gate.

For each audited site and step the runner takes the recorded activation bundle (and the gradient bundle sent
back), the planned samples of that batch (at most ``max_samples``), the public cohort's mean image cut like
them (the prior), and runs every requested attack:

- image attacks (white-box, UnSplit, learned) -> reconstructions ``B, C_site, *spatial`` scored by the
  :class:`~splitunet.auditing.sources.Scorer` together with the prior (so RDLV needs no image to move); the
  scorer also gets the audit's frozen WT segmenters (:mod:`splitunet.auditing.segmenter`, trained once per
  modality and sample geometry on the public cohort) and returns the semantic leakage of both;
- every image finding carries ``delta_ssim`` = SSIM(reconstruction) - SSIM(prior), paired per sample and
  modality, with its 95 % Student-t interval (:func:`splitunet.leakage.delta_ssim`);
- on a secure-sum run the per-site image attacks would invert masked (uniform) tensors: they are replaced by the
  joint inversion of the decoded sum (:mod:`splitunet.auditing.joint_audit`), scored per site;
- label leakage -> once per site, over every recorded step and sample, the best of its methods
  (:mod:`splitunet.auditing.label_audit`), compared (lab mode only: the true masks are the aggregator's) with the
  true whole-tumour mask (Dice, AUC) and two baselines: an empty mask and the public cohort's tumour-frequency blob.

Lab mode also gives dCor(input, features) and re-identification top-1 among the lab cohort's cases, and keeps
the reconstructions for the report's grids.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from splitunet.attacks.base import AttackKind, Observation
from splitunet.attacks.learned import LearnedInversion
from splitunet.attacks.secure_sum_joint import JointSumInversion, SumObservation
from splitunet.attacks.unsplit import UnSplit
from splitunet.attacks.whitebox import WhiteBoxInversion
from splitunet.auditing.cohorts import LabCohort, PublicCohort
from splitunet.auditing.gate import GateDecision, GateThreshold
from splitunet.auditing.joint_audit import decoded_sum, secure_sum_options
from splitunet.auditing.label_audit import label_leakage_audit
from splitunet.auditing.segmenter import WTSegmenter, train_public_segmenter
from splitunet.auditing.sources import Scorer, WeightSource
from splitunet.config import SplitUNetConfig
from splitunet.data.phantom import check_shape
from splitunet.errors import DataError, NotFoundError
from splitunet.leakage import delta_ssim, distance_correlation, rdlv, reidentification_top1
from splitunet.transcript import Transcript, activation_flows, verify_transcript
from splitunet.wire import DEFAULT_MAX_BYTES, decode_bundle

logger = logging.getLogger(__name__)


#: Caps of the attack budgets a request may ask for: one audit holds the audit service's only worker, so its
#: compute is bounded (``POST /v1/audits/{id}/cancel`` stops one sooner); the defaults are far below.
MAX_WHITEBOX_ITERATIONS = 20_000
MAX_ATTACK_STEPS = 5_000


class AttackBudgets(BaseModel):
    """Iterations of each attack (the audit's compute budget), each capped (a request above a cap is a 422)."""

    model_config = ConfigDict(extra="forbid")

    # 200 Adam steps left trained encoders' inversions half-converged (brain SSIM 0.37-0.85 on the demo's
    # phantom); 1000 reached 0.80-0.99 at ~3 s a site
    whitebox_iterations: int = Field(default=1000, ge=1, le=MAX_WHITEBOX_ITERATIONS)
    unsplit_main_iters: int = Field(default=10, ge=1, le=100)
    unsplit_inner_iters: int = Field(default=20, ge=1, le=500)
    learned_steps: int = Field(default=300, ge=1, le=MAX_ATTACK_STEPS)
    public_cases: int = Field(default=16, ge=2, le=256)
    segmenter_steps: int = Field(default=200, ge=0, le=MAX_ATTACK_STEPS,
                                 description="WT segmenter training (0: no semantic leakage)")


class AuditSpec(BaseModel):
    """What to audit: ``POST /v1/audits`` body and ``splitunet audit run`` options.

    Args:
        transcript: the run's transcript folder (``<AGG_TRANSCRIPT__DIR>/<run_id>``).
        sites: sites to audit (default: every site of the run).
        steps: recorded steps to attack (default: the last recorded step of ``phase``).
        phase: ``train`` or ``eval`` records.
        attacks: which attacks to replay.
        max_samples: samples per site and step attacked by the image attacks (8: ΔSSIM's interval needs
            samples; the label attack takes every recorded sample).
        budgets: attack iterations.
        gate: thresholds that fail the audit.
    """

    model_config = ConfigDict(extra="forbid")

    transcript: Path
    sites: list[str] | None = Field(default=None, max_length=64)
    steps: list[int] | None = Field(default=None, max_length=64)
    phase: str = Field(default="train", pattern="^(train|eval)$")
    attacks: list[AttackKind] = Field(default_factory=lambda: list(AttackKind))
    max_samples: int = Field(default=8, ge=1, le=32)
    budgets: AttackBudgets = Field(default_factory=AttackBudgets)
    gate: GateThreshold = Field(default_factory=GateThreshold)


class Finding(BaseModel):
    """One attack on one site's batch: mean scores over the batch's samples and modalities.

    ``semantic`` (``prior_semantic``): Dice between the audit's frozen WT segmenter's masks on the reconstruction
    (the prior) and on the original, over the samples where it finds a tumour in the original.
    ``delta_ssim`` [``delta_ssim_low``, ``delta_ssim_high``]: SSIM(reconstruction) - SSIM(prior) over the
    ``n_samples`` (sample, modality) pairs, mean and 95 % Student-t interval; an attack beats the prior when the
    interval lies above 0. Label findings: ``label_method`` (the best ``score/threshold``), ``label_methods`` (all),
    ``label_steps`` (recorded steps attacked), ``delta_dice`` [low, high] (Dice minus the blob baseline's).
    """

    site: str
    step: int
    attack: AttackKind
    ssim: float | None = None
    psnr: float | None = None
    nmse: float | None = None
    prior_ssim: float | None = None
    rdlv: float | None = None
    delta_ssim: float | None = None
    delta_ssim_low: float | None = None
    delta_ssim_high: float | None = None
    n_samples: int | None = None
    semantic: float | None = None
    prior_semantic: float | None = None
    reid_top1: float | None = None
    dice: float | None = None
    auc: float | None = None
    baseline_empty_dice: float | None = None
    baseline_blob_dice: float | None = None
    label_method: str | None = None
    label_methods: dict[str, dict[str, float]] | None = None
    label_steps: int | None = None
    delta_dice: float | None = None
    delta_dice_low: float | None = None
    delta_dice_high: float | None = None
    seconds: float = 0.0


class SegmenterSummary(BaseModel):
    """One WT segmenter of the audit: its modality, sample geometry, training steps and held-out public Dice."""

    modality: str
    spatial_dims: int
    size: list[int]
    steps: int
    validation_dice: float | None


class AuditResult(BaseModel):
    run_id: str
    records: int
    findings: list[Finding]
    dcor: dict[str, float] = Field(default_factory=dict)
    segmenters: list[SegmenterSummary] = Field(default_factory=list)
    gate: GateDecision


@dataclass
class AuditArtifacts:
    """What the report draws: per (site, step) the originals (lab mode), prior and reconstructions."""

    grids: dict[tuple[str, int], dict[str, np.ndarray]] = field(default_factory=dict)


Progress = Callable[[float, str], None]


def _delta(rows: Sequence[dict], prior_rows: Sequence[dict]) -> dict[str, float | int | None]:
    """ΔSSIM fields from the scorer's rows of the reconstruction and of the prior, paired by sample and modality."""
    prior = {(r["index"], r["modality"]): r["ssim"] for r in prior_rows if r.get("ssim") is not None}
    pairs = [(r["ssim"], prior[(r["index"], r["modality"])]) for r in rows
             if r.get("ssim") is not None and (r["index"], r["modality"]) in prior]
    if not pairs:
        return {}
    d = delta_ssim([p[0] for p in pairs], [p[1] for p in pairs])
    return {"delta_ssim": d.mean, "delta_ssim_low": d.low, "delta_ssim_high": d.high, "n_samples": d.n}


def _mean(rows: Sequence[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None and np.isfinite(r[key])]
    return float(np.mean(values)) if values else None


class AuditRunner:
    """Runs one :class:`AuditSpec` with its sources (see :mod:`splitunet.auditing.sources`).

    Args:
        scorer: compares reconstructions with the originals (site endpoint or lab cohort).
        weights: the sites' encoder snapshots (white-box, learned attack's shadow); ``None`` skips white-box.
        lab: the cohort read directly (lab mode), for label leakage, dCor, re-identification and the grids.
        public: the public auxiliary cohort (prior, learned attack, baselines); built from the records if None.
        key: the transcript's HMAC key, if it has one.
    """

    def __init__(self, scorer: Scorer, *, weights: WeightSource | None = None, lab: LabCohort | None = None,
                 public: PublicCohort | None = None, key: bytes | None = None) -> None:
        self.scorer, self.weights, self.lab, self.public, self.key = scorer, weights, lab, public, key
        self._segmenters: dict[tuple, WTSegmenter] = {}

    def run(self, spec: AuditSpec, progress: Progress | None = None) -> tuple[AuditResult, AuditArtifacts]:
        progress = progress or (lambda fraction, message: None)
        report = verify_transcript(spec.transcript, key=self.key)
        if not report.ok:
            raise DataError(f"the transcript failed verification at record {report.first_bad}: {report.reason}",
                            detail={"first_bad": report.first_bad})
        transcript = Transcript(spec.transcript)
        try:
            return self._run(spec, transcript, report.records, progress)
        finally:
            transcript.close()

    def _run(self, spec: AuditSpec, transcript: Transcript, n_records: int,
             progress: Progress) -> tuple[AuditResult, AuditArtifacts]:
        if "model" not in transcript.run:
            raise DataError("the transcript has no run description (model); was it written by this aggregator?")
        config = SplitUNetConfig.model_validate(transcript.run["model"])
        sites = spec.sites or [s.name for s in config.sites]
        # whose record: the aggregator received the activations, a site sent them (and the reverse for gradients)
        activation_flow, gradient_flow = activation_flows(transcript.run)
        received = transcript.records(flow=activation_flow, phase=spec.phase)
        steps = spec.steps or ([max(r.step for r in received)] if received else [])
        findings: list[Finding] = []
        dcor: dict[str, float] = {}
        artifacts = AuditArtifacts()
        options = secure_sum_options(transcript.run)
        if options is not None and AttackKind.SECURE_SUM_JOINT in spec.attacks:
            for step in steps:
                found, grids = self._joint_step(spec, config, transcript, step, options, sites)
                findings += found
                for site, arrays in grids.items():
                    artifacts.grids[(site, step)] = arrays
        jobs = [(site, step) for site in sites for step in steps]
        for done, (site, step) in enumerate(jobs):
            progress(done / max(len(jobs), 1), f"site {site} step {step}")
            recs = [r for r in received if r.site == site and r.step == step and r.samples]
            if not recs:
                raise NotFoundError(f"the transcript has no {spec.phase} record of site {site!r} at step {step} "
                                    "with planned samples; GET the audit's steps from the transcript")
            rec = recs[0]
            sent = transcript.records(step=step, site=site, flow=gradient_flow, phase=spec.phase)
            found, arrays, d = self._attack_batch(spec, config, transcript, rec, sent[0] if sent else None,
                                                  masked=options is not None)
            findings += found
            artifacts.grids[(site, step)] = artifacts.grids.get((site, step), {}) | arrays
            if d is not None:
                dcor[site] = d
        if AttackKind.LABEL_LEAKAGE in spec.attacks:
            findings += self._label_findings(spec, config, transcript, sites)
        progress(1.0, "done")
        segmenters = [SegmenterSummary(modality=m, spatial_dims=dims, size=list(size), steps=steps,
                                       validation_dice=s.validation_dice)
                      for (_, _, m, dims, size, steps), s in self._segmenters.items()]
        result = AuditResult(run_id=transcript.run_id, records=n_records, findings=findings, dcor=dcor,
                             segmenters=segmenters, gate=spec.gate.evaluate(findings))
        return result, artifacts

    def _public(self, samples, budgets: AttackBudgets) -> PublicCohort | None:
        """The public cohort on the samples' grid, or ``None`` (zero prior) when no phantom fits that grid."""
        shape = samples[0].volume_shape
        if shape is None:
            return None
        if self.public is None or self.public.shape != tuple(shape):
            try:
                check_shape(shape)
            except ValueError:
                logger.warning("no public phantom cohort on a %s grid: zero prior, no learned attack", shape)
                return None
            self.public = PublicCohort(shape, budgets.public_cases)
        return self.public

    def _segmenters_for(self, public: PublicCohort | None, samples, modalities, budgets: AttackBudgets,
                        attacks) -> dict[str, WTSegmenter]:
        """The frozen WT segmenter of each modality for these samples' geometry, trained once per audit."""
        images = {AttackKind.WHITEBOX, AttackKind.UNSPLIT, AttackKind.LEARNED} & set(attacks)
        if public is None or not budgets.segmenter_steps or not images:
            return {}
        out = {}
        template = samples[0]
        for modality in modalities:
            key = (public.shape, public.n, modality, template.spatial_dims, template.output_size,
                   budgets.segmenter_steps)
            if key not in self._segmenters:
                self._segmenters[key] = train_public_segmenter(public, template, modality,
                                                               steps=budgets.segmenter_steps)
            out[modality] = self._segmenters[key]
        return out

    def _attack_batch(self, spec: AuditSpec, config: SplitUNetConfig, transcript: Transcript, rec, sent_rec, *,
                      masked: bool = False):
        site, step = rec.site, rec.step
        modalities = list(config.site(site).modalities)
        samples = list(rec.samples[: spec.max_samples])
        b = len(samples)
        bundle = decode_bundle(transcript.frame(rec), max_bytes=max(rec.nbytes, DEFAULT_MAX_BYTES))
        activations = {k: v[:b] for k, v in bundle.tensors.items()}
        gradients = None
        if sent_rec is not None:
            grads = decode_bundle(transcript.frame(sent_rec), max_bytes=max(sent_rec.nbytes, DEFAULT_MAX_BYTES))
            gradients = {k: v[:b] for k, v in grads.tensors.items()}
        public = self._public(samples, spec.budgets)
        prior = None if public is None else torch.from_numpy(public.prior(samples, modalities)).float()
        state = None
        if self.weights is not None and ({AttackKind.WHITEBOX, AttackKind.LEARNED} & set(spec.attacks)):
            state = self.weights.encoder_state(site, transcript.run_id, step, spec.phase)
        obs = Observation(config=config, site=site, activations=activations, gradients=gradients,
                          encoder_state=state, prior=prior)
        originals = self.lab.images(samples, modalities) if self.lab is not None else None
        segmenters = self._segmenters_for(public, samples, modalities, spec.budgets, spec.attacks)
        arrays: dict[str, np.ndarray] = {} if prior is None else {"prior": prior.numpy()}
        if originals is not None:
            arrays["original"] = originals
        findings: list[Finding] = []
        budgets = spec.budgets
        unsplit: UnSplit | None = None
        for kind in spec.attacks:
            t0 = time.perf_counter()
            if kind in (AttackKind.LABEL_LEAKAGE, AttackKind.SECURE_SUM_JOINT):
                continue  # once per site over every step (label), once per step over every site (joint)
            if masked:
                logger.info("%s attack on site %s skipped: its tensors are masked (secure sum); the joint inversion "
                            "of the decoded sum attacks them", kind.value, site)
                continue
            if kind == AttackKind.WHITEBOX:
                if state is None:
                    continue
                recon = WhiteBoxInversion(iterations=budgets.whitebox_iterations)(obs)
            elif kind == AttackKind.UNSPLIT:
                unsplit = UnSplit(main_iters=budgets.unsplit_main_iters, input_iters=budgets.unsplit_inner_iters,
                                  model_iters=budgets.unsplit_inner_iters)
                recon = unsplit(obs)
            else:
                shadow = obs.encoder() if state is not None else (unsplit.clone if unsplit is not None else None)
                if shadow is None or public is None:
                    logger.info("learned attack on site %s skipped: no shadow encoder (weights or UnSplit)", site)
                    continue
                aux = torch.from_numpy(public.training_images(samples, modalities)).float()
                recon = LearnedInversion(steps=budgets.learned_steps).fit(shadow, config, site, aux)(obs)
            arrays[kind.value] = recon.numpy()
            findings.append(self._image_finding(kind, site, step, modalities, transcript.run_id, samples, recon,
                                                prior, segmenters, t0))
        d = None
        if originals is not None and b >= 2:
            first = next(iter(activations.values()))
            d = distance_correlation(torch.from_numpy(originals), first)
        return findings, arrays, d

    def _image_finding(self, kind: AttackKind, site: str, step: int, modalities, run_id: str, samples,
                       recon: torch.Tensor, prior: torch.Tensor | None, segmenters, t0: float) -> Finding:
        """Score one reconstruction of one site (and the prior) through the scorer: one :class:`Finding`. Without a
        public cohort on the run's grid the prior is the constant image 0 (what an attacker knows without data;
        its SSIM is near 0, so ΔSSIM errs towards reporting leakage)."""
        tensors = {"reconstruction": recon, "prior": torch.zeros_like(recon) if prior is None else prior}
        scores = self.scorer.score(site, modalities, run_id, step, samples, tensors, segmenters=segmenters)
        rows, prior_rows = scores["reconstruction"], scores.get("prior", [])
        finding = Finding(site=site, step=step, attack=kind, ssim=_mean(rows, "ssim"), psnr=_mean(rows, "psnr"),
                          nmse=_mean(rows, "nmse"), prior_ssim=_mean(prior_rows, "ssim"),
                          semantic=_mean(rows, "semantic"), prior_semantic=_mean(prior_rows, "semantic"),
                          **_delta(rows, prior_rows), seconds=time.perf_counter() - t0)
        if finding.ssim is not None and finding.prior_ssim is not None and finding.prior_ssim > 0:
            finding.rdlv = rdlv(finding.ssim, finding.prior_ssim)
        if self.lab is not None:
            finding.reid_top1 = self._reidentify(recon.numpy(), samples, modalities)
        logger.info("audit %s site %s step %d %s: SSIM %s, ΔSSIM %s", run_id, site, step, kind.value,
                    None if finding.ssim is None else round(finding.ssim, 3),
                    None if finding.delta_ssim is None else round(finding.delta_ssim, 3))
        return finding

    def _joint_step(self, spec: AuditSpec, config: SplitUNetConfig, transcript: Transcript, step: int, options,
                    sites: Sequence[str]) -> tuple[list[Finding], dict[str, dict[str, np.ndarray]]]:
        """The joint inversion of step ``step``'s decoded secure sum, scored for each audited site."""
        t0 = time.perf_counter()
        if self.weights is None:
            logger.info("joint inversion of the secure sum at step %d skipped: needs every site's weights", step)
            return [], {}
        summed, samples = decoded_sum(transcript, config, step, spec.phase, options)
        samples = list(samples[: spec.max_samples])
        summed = {k: v[: len(samples)] for k, v in summed.items()}
        public = self._public(samples, spec.budgets)
        order = tuple(s.name for s in config.sites)
        modalities = {s: list(config.site(s).modalities) for s in order}
        priors = {s: None if public is None else torch.from_numpy(public.prior(samples, modalities[s])).float()
                  for s in order}
        states = {s: self.weights.encoder_state(s, transcript.run_id, step, spec.phase) for s in order}
        recon = JointSumInversion(iterations=spec.budgets.whitebox_iterations)(
            SumObservation(config=config, sites=order, summed=summed, encoder_states=states, priors=priors))
        findings, grids = [], {}
        for site in sites:
            segmenters = self._segmenters_for(public, samples, modalities[site], spec.budgets, [AttackKind.WHITEBOX])
            findings.append(self._image_finding(AttackKind.SECURE_SUM_JOINT, site, step, modalities[site],
                                                transcript.run_id, samples, recon[site], priors[site], segmenters,
                                                t0))
            grids[site] = {AttackKind.SECURE_SUM_JOINT.value: recon[site].numpy()} | (
                {} if priors[site] is None else {"prior": priors[site].numpy()}) | (
                {} if self.lab is None else {"original": self.lab.images(samples, modalities[site])})
        return findings, grids

    def _label_findings(self, spec: AuditSpec, config: SplitUNetConfig, transcript: Transcript,
                        sites: Sequence[str]) -> list[Finding]:
        """The label attack on each site over every recorded step (lab mode: the true masks are needed)."""
        if self.lab is None:
            logger.info("label leakage skipped: needs the lab labels")
            return []
        out = []
        for site in sites:
            t0 = time.perf_counter()
            received = transcript.records(site=site, flow=activation_flows(transcript.run)[0], phase=spec.phase)
            samples = next((r.samples for r in received if r.samples), None)
            public = None if samples is None else self._public(list(samples), spec.budgets)
            fields = label_leakage_audit(transcript, config, site, spec.phase, self.lab, public)
            if fields is None:
                logger.info("label leakage of site %s skipped: no recorded gradient or no tumour", site)
                continue
            out.append(Finding(site=site, attack=AttackKind.LABEL_LEAKAGE, **fields,
                               seconds=time.perf_counter() - t0))
        return out

    def _reidentify(self, recon: np.ndarray, samples, modalities) -> float | None:
        assert self.lab is not None
        ids = self.lab.case_ids()
        if len(ids) < 2:
            return None
        hits = []
        for i, s in enumerate(samples):
            cands = self.lab.images([s.model_copy(update={"case_id": c}) for c in ids], modalities)[:, 0]
            if not np.any(cands[ids.index(s.case_id)] != 0):
                continue  # the sample's own crop holds no brain: nothing to re-identify it by
            hits.append(reidentification_top1([recon[i, 0]], cands, [ids.index(s.case_id)]))
        return float(np.mean(hits)) if hits else None
