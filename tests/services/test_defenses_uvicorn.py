"""Defenses with real processes: four uvicorn sites with DP (from ``SITE_DEFENSES``), an aggregator smoothing
its gradients; a short job still improves WT Dice, and the status and a site's ``/metrics`` report epsilon."""

from __future__ import annotations

import json

import httpx
from federation_testkit import SITES, Cohort, run_job

from splitunet.launcher import LocalFederation


def test_a_defended_uvicorn_federation_trains_and_reports(cohort: Cohort, tmp_path) -> None:
    site_defenses = json.dumps([{"name": "dp", "clip": 50.0, "noise_multiplier": 0.02}])
    with LocalFederation(tmp_path / "fed", torch_threads=1) as federation:
        peers = list(SITES)  # names of the aggregator's registry
        for name in SITES:
            federation.start_site(name, [name], cohort.site_dirs[name], defenses=site_defenses)
        aggregator = federation.start_aggregator(cohort.labels_dir)
        federation.wait_ready(timeout_s=180)
        spec = {
            "sites": peers, "model": {"spatial_dims": 2, "features": [4, 8, 16]}, "roi": [16, 16],
            "batch_size": 4, "steps": 8, "val_interval": 1, "val_cases": 1, "seed": 1, "fg_ratio": 1.0,
            "loss": "dice_ce", "site_optimizer": {"lr": 1e-2}, "server_optimizer": {"lr": 1e-2},
            "gradient_defenses": [{"name": "smooth", "sigma": 0.5}],
        }
        headers = {"Authorization": f"Bearer {federation.aggregator_token}"}
        with httpx.Client(base_url=aggregator.url, timeout=60) as client:
            status = run_job(client, spec, timeout_s=300, headers=headers)
        metrics = httpx.get(f"{federation.process(f'site-{SITES[0]}').url}/metrics", timeout=10).text
    assert status["state"] == "succeeded", status["error"]
    dice = [v["dice"]["WT"] for v in status["validations"]]
    assert dice[-1] > dice[0] + 0.02, dice  # the DP noise is secret (unseeded): margins vary run to run
    site = status["defenses"]["sites"]["t1"][0]
    assert site["name"] == "dp" and site["steps"] == 8 and site["epsilon"] > 0
    assert status["defenses"]["gradients"][0]["name"] == "smooth"
    assert 'splitunet_site_defense{defense="dp",stat="epsilon"}' in metrics
