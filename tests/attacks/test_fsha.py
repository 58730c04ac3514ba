"""FSHA (a hijacking aggregator): its gradients have the shapes the site sent, its critic learns, and the bench
row runs end to end (the row's figures are measured by ``splitunet bench --fsha``, not asserted here)."""

from __future__ import annotations

import math

import torch

from splitunet.attacks.fsha import FSHAServer
from splitunet.bench.fsha import FSHAPlan, run_fsha_bench
from splitunet.config import SiteSpec, SplitUNetConfig
from splitunet.networks.factory import make_site_encoder

CONFIG = SplitUNetConfig(spatial_dims=2, features=(4, 8, 16), sites=(SiteSpec(name="t1", modalities=("t1",)),),
                         cut_level=1, skips="none")


def test_fsha_returns_a_gradient_for_each_sent_tensor_and_its_critic_learns() -> None:
    g = torch.Generator().manual_seed(0)
    public = torch.randn(16, 1, 32, 32, generator=g)
    attacker = FSHAServer(CONFIG, "t1", public, seed=0)
    site = make_site_encoder(CONFIG, "t1", 5)
    private = torch.randn(4, 1, 32, 32, generator=g) * 2 + 1  # another distribution than the public images
    sent = {k: v.detach() for k, v in site(private).items()}
    first = attacker.critic(sent).sigmoid().mean().item()
    for _ in range(30):
        grads = attacker.gradients(sent)
    assert set(grads) == set(sent) and all(grads[k].shape == sent[k].shape for k in sent)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())
    # the critic learned to tell the site's features from the shadow's: it scores them as fake now
    assert attacker.critic(sent).sigmoid().mean().item() < first
    assert attacker.reconstruct(sent).shape == private.shape


def test_the_bench_row_runs_and_reports_its_figures() -> None:
    row = run_fsha_bench(FSHAPlan.quick())
    assert set(row) >= {"steps_to_detection", "gate_ssim_at_detection", "attacker_ssim_at_detection",
                        "false_alarms", "honest_runs", "fsha_checks", "honest"}
    assert row["honest_runs"] == 1 and 0 <= row["false_alarms"] <= 1
    assert [c["step"] for c in row["fsha_checks"]][:1] == [3]
    assert all(math.isfinite(c["gate_ssim"]) and math.isfinite(c["attacker_ssim"]) for c in row["fsha_checks"])
