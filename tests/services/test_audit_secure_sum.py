"""A secure-sum run's audit attacks the decoded sum: a recorded secure-sum job (four sites, in process), audited
from its transcript. The per-site inversions of masked (uniform) tensors are not run; the joint inversion of the
sum is, scored for every site, and it beats the prior image."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from federation_testkit import AGG_HEADERS, SITES, identity_aligner, run_job
from test_defenses_service import federation, job_spec

from services.aggregator.app import create_app as create_aggregator_app
from splitunet.auditing.cohorts import LabCohort
from splitunet.auditing.runner import AttackBudgets, AuditRunner, AuditSpec
from splitunet.auditing.sources import LabScorer, SnapshotDirSource
from splitunet.transcript import Transcript


class PerSiteLabScorer:
    """Lab scoring where each site's modality lives in its own folder (the test cohort's layout)."""

    def __init__(self, site_dirs: Mapping[str, object]) -> None:
        self.scorers = {s: LabScorer(LabCohort(d)) for s, d in site_dirs.items()}

    def score(self, site: str, modalities: Sequence[str], run_id: str, step: int, samples,
              tensors: Mapping[str, torch.Tensor], *, segmenters=None):
        return self.scorers[site].score(site, modalities, run_id, step, samples, tensors, segmenters=segmenters)


def test_a_secure_sum_run_is_audited_by_the_joint_inversion_of_its_decoded_sum(
        start_app, site_settings, aggregator_settings, cohort, tmp_path) -> None:
    _, sites = federation(start_app, site_settings, aggregator_settings, require_secure_sum=True)
    settings = aggregator_settings(transcript={"enabled": True, "dir": tmp_path / "transcripts", "every": 1,
                                               "fsync": False})
    aggregator = start_app(create_aggregator_app(settings, aligner=identity_aligner,
                                                 transport_factory=lambda peer: sites[peer.name]._transport))
    spec = job_spec(model={"spatial_dims": 2, "features": [4, 8, 16], "fusion": "sum"}, steps=2, val_interval=0,
                    wire={"activations": "fp32", "gradients": "fp32"}, secure_sum={}, run_id="summed")
    status = run_job(aggregator, spec, headers=AGG_HEADERS, timeout_s=300)
    assert status["state"] == "succeeded", status.get("error")
    run_dir = tmp_path / "transcripts" / "summed"
    assert Transcript(run_dir).run["secure_sum"] is not None
    runner = AuditRunner(PerSiteLabScorer(cohort.site_dirs),
                         weights=SnapshotDirSource({m: tmp_path / f"site-{m}-state" for m in SITES}))
    result, artifacts = runner.run(AuditSpec(
        transcript=run_dir, steps=[2], attacks=["whitebox", "secure_sum_joint"], max_samples=4,
        budgets=AttackBudgets(whitebox_iterations=300, segmenter_steps=0, public_cases=4)))
    attacks = {(f.site, f.attack.value) for f in result.findings}
    assert attacks == {(s, "secure_sum_joint") for s in SITES}, attacks  # no inversion of a masked tensor
    logging.getLogger(__name__).warning("joint inversion, tiny test cohort: %s", [
        (f.site, round(f.ssim, 3), round(f.prior_ssim, 3)) for f in result.findings])
    for f in result.findings:
        assert f.n_samples and f.delta_ssim is not None and f.delta_ssim_low is not None, f
        assert f.delta_ssim > 0.05, f  # the sum gives every modality away (calibrated in tests/attacks)
    assert all("secure_sum_joint" in artifacts.grids[(s, 2)] for s in SITES)
