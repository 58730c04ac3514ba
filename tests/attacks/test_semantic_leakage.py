"""Semantic leakage: the audit's frozen whole-tumour segmenter, trained on the public phantom cohort, is good
enough for the metric to mean something, and the audit runner reports it (JSON and HTML) in lab mode.

Phantom 128 x 128 slices of the federation's two cases (disjoint from the public cohort), site ``flair`` (the
modality that shows the whole tumour; the segmenter of ``t1`` is measured too), widths 16-32-64-128, cut 0.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from phantom_slices import Slices, site_config

from splitunet.attacks.base import AttackKind, Observation
from splitunet.attacks.whitebox import WhiteBoxInversion
from splitunet.auditing.report import render_html
from splitunet.auditing.runner import AttackBudgets, AuditRunner, AuditSpec
from splitunet.auditing.segmenter import WTSegmenter, train_public_segmenter
from splitunet.auditing.sources import LabScorer
from splitunet.config import MODALITIES
from splitunet.data.sampling import Sample, extract
from splitunet.leakage import dice, semantic_leakage
from splitunet.networks.factory import make_site_encoder
from splitunet.recorder import Flow
from splitunet.transcript import TranscriptRecorder, TranscriptSettings
from splitunet.wire import BundleKind, BundleMeta, WireDtype, encode_bundle, frame_sha256

logger = logging.getLogger(__name__)

FLAIR = MODALITIES.index("flair")
#: Training steps of the audit's segmenter in these tests (the audit's default is 200).
STEPS = 200


@pytest.fixture(scope="module")
def flair_segmenter(slices: Slices) -> WTSegmenter:
    return train_public_segmenter(slices.public, slices.samples[0], "flair", steps=STEPS)


@pytest.fixture(scope="module")
def whitebox_flair(slices: Slices) -> torch.Tensor:
    """The undefended white-box reconstruction of the flair slices (``B, 1, 128, 128``)."""
    config = site_config(site="flair")
    encoder = make_site_encoder(config, "flair", seed=3).eval()
    with torch.no_grad():
        features = encoder(torch.from_numpy(slices.images[:, FLAIR:FLAIR + 1]))
    prior = torch.from_numpy(slices.public.prior(slices.samples, ["flair"]))
    obs = Observation(config=config, site="flair", activations=features, encoder_state=encoder.state_dict(),
                      prior=prior)
    return WhiteBoxInversion(iterations=200)(obs)


def _blob_dice(slices: Slices) -> float:
    """The chance-level baseline: the public cohort's tumour-frequency blob as the mask."""
    truth = slices.regions[:, 1].astype(bool)
    freq = slices.public.masks(slices.samples).mean(0)[:, 0]
    return float(np.mean([dice(freq[i] >= 0.5 * freq[i].max(), truth[i]) for i in range(len(truth))]))


def test_segmenter_finds_the_whole_tumour_on_original_slices(slices: Slices, flair_segmenter: WTSegmenter):
    truth = slices.regions[:, 1].astype(bool)
    assert truth.any(axis=(1, 2)).all(), "the calibration slices go through the tumour"
    on_originals = float(np.mean([dice(flair_segmenter(slices.images[i, FLAIR]), truth[i])
                                  for i in range(len(truth))]))
    blob = _blob_dice(slices)
    t1 = train_public_segmenter(slices.public, slices.samples[0], "t1", steps=STEPS)
    t1_dice = float(np.mean([dice(t1(slices.images[i, 0]), truth[i]) for i in range(len(truth))]))
    logger.warning("WT segmenter Dice on the federation's original slices: flair %.3f (held-out public crops %.3f), "
                   "t1 %.3f (held-out %.3f); blob baseline %.3f, empty mask 0", on_originals,
                   flair_segmenter.validation_dice, t1_dice, t1.validation_dice, blob)
    assert on_originals >= 0.7 and on_originals > blob + 0.3, (on_originals, blob)
    assert flair_segmenter.validation_dice is not None and flair_segmenter.validation_dice >= 0.6


def test_semantic_leakage_is_high_for_whitebox_and_low_for_prior_and_noise(
        slices: Slices, flair_segmenter: WTSegmenter, whitebox_flair: torch.Tensor):
    originals = slices.images[:, FLAIR]
    prior = slices.public.prior(slices.samples, ["flair"])[:, 0]
    rng = np.random.default_rng(0)
    noise = np.where(originals != 0, rng.normal(size=originals.shape), 0.0).astype(np.float32)

    def semantic(images: np.ndarray) -> float:
        return float(np.mean([semantic_leakage(flair_segmenter, images[i], originals[i])
                              for i in range(len(originals))]))

    figures = {"whitebox": semantic(whitebox_flair[:, 0].numpy()), "prior": semantic(prior),
               "noise": semantic(noise), "original": semantic(originals)}
    logger.warning("semantic leakage (flair): %s", {k: round(v, 3) for k, v in figures.items()})
    assert figures["original"] == 1.0
    assert figures["whitebox"] >= 0.7, figures
    assert figures["prior"] <= 0.3 and figures["noise"] <= 0.3, figures
    assert figures["whitebox"] > max(figures["prior"], figures["noise"]) + 0.4, figures


class _PhantomLab:
    """The lab cohort of the runner test: the federation's phantom cases ``case-0``, ``case-1`` in memory."""

    def __init__(self, slices: Slices) -> None:
        self.federation = slices.federation

    def _index(self, sample: Sample) -> int:
        return int(sample.case_id.removeprefix("case-"))

    def images(self, samples: Sequence[Sample], modalities: Sequence[str]) -> np.ndarray:
        volumes, _ = self.federation.volumes
        channels = [MODALITIES.index(m) for m in modalities]
        return np.stack([extract(volumes[self._index(s)][channels], s) for s in samples])

    def masks(self, samples: Sequence[Sample]) -> np.ndarray:
        _, regions = self.federation.volumes
        return np.stack([extract(regions[self._index(s)][1:2], s, interpolation="nearest") for s in samples])

    def case_ids(self) -> list[str]:
        return [f"case-{i}" for i in range(self.federation.n)]


class _Weights:
    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self.state = state

    def encoder_state(self, site: str, run_id: str, step: int, phase: str) -> dict[str, torch.Tensor]:
        return self.state


def _transcript(slices: Slices, root: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A one-step transcript of the flair site's activations of the two slices (as the aggregator records)."""
    config = site_config(site="flair")
    encoder = make_site_encoder(config, "flair", seed=3).eval()
    with torch.no_grad():
        features = encoder(torch.from_numpy(slices.images[:, FLAIR:FLAIR + 1]))
    recorder = TranscriptRecorder(TranscriptSettings(dir=root, every=1, fsync=False))
    recorder.start(run_id="semantic", meta={"model": config.model_dump(mode="json")})
    recorder.plan(run_id="semantic", step=1, phase="train", samples=slices.samples)
    data = encode_bundle(features, meta=BundleMeta(run_id="semantic", step=1, site="flair",
                                                   kind=BundleKind.ACTIVATIONS), dtype=WireDtype.FP32,
                         max_bytes=2**28)
    recorder.record(run_id="semantic", step=1, site="flair", flow=Flow.RECEIVED, phase="train", data=data,
                    sha256=frame_sha256(data))
    recorder.close()
    return root / "semantic", encoder.state_dict()


def test_audit_runner_reports_semantic_leakage_in_json_and_html(slices: Slices, tmp_path: Path):
    run_dir, state = _transcript(slices, tmp_path)
    lab = _PhantomLab(slices)
    spec = AuditSpec(transcript=run_dir, attacks=[AttackKind.WHITEBOX],
                     budgets=AttackBudgets(whitebox_iterations=200, segmenter_steps=STEPS, public_cases=12))
    runner = AuditRunner(LabScorer(lab), weights=_Weights(state), lab=lab, public=slices.public)
    result, artifacts = runner.run(spec)
    (finding,) = result.findings
    logger.warning("audit finding: SSIM %.3f, semantic %.3f, prior semantic %.3f; segmenters %s", finding.ssim,
                   finding.semantic, finding.prior_semantic, result.segmenters)
    assert finding.semantic is not None and finding.prior_semantic is not None
    assert finding.semantic >= 0.7 and finding.prior_semantic <= 0.3, finding
    (summary,) = result.segmenters
    assert (summary.modality, summary.spatial_dims, summary.size, summary.steps) == ("flair", 2, [128, 128], STEPS)
    assert summary.validation_dice is not None and summary.validation_dice >= 0.6
    doc = result.model_dump(mode="json")
    assert doc["findings"][0]["semantic"] == finding.semantic and doc["segmenters"][0]["modality"] == "flair"
    page = render_html(result, artifacts)
    assert "<th>semantic</th>" in page and "<th>prior_semantic</th>" in page
    assert f"<td>{finding.semantic:.3f}</td>" in page and "held-out Dice" in page
    # without segmenter training the audit still runs and says nothing about semantic leakage
    quick = AuditSpec(transcript=run_dir, attacks=[AttackKind.WHITEBOX],
                      budgets=AttackBudgets(whitebox_iterations=5, segmenter_steps=0, public_cases=12))
    bare, _ = AuditRunner(LabScorer(lab), weights=_Weights(state), lab=lab, public=slices.public).run(quick)
    assert bare.findings[0].semantic is None and bare.segmenters == []
