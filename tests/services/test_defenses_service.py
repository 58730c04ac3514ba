"""Defenses through the services, in process: each mild defense still trains, the job status and the site's
``/metrics`` report what the defenses did, an epsilon budget refuses the forward past it, secure sum trains like
plain sum."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from federation_testkit import AGG_HEADERS, SITE_HEADERS, SITES, identity_aligner, peers, run_job

from services.aggregator.app import create_app as create_aggregator_app
from services.client_site.app import create_app as create_site_app

#: Mild settings: each should still let a short job learn.
MILD_SITE = {
    "gaussian": [{"name": "gaussian", "sigma0": 0.05}],
    "laplace": [{"name": "laplace", "b0": 0.05}],
    "dp": [{"name": "dp", "clip": 50.0, "noise_multiplier": 0.02}],
    "quantize": [{"name": "quantize", "mode": "int8"}],
    "topk": [{"name": "topk", "keep": 0.5}],
    "nopeek": [{"name": "nopeek", "alpha": 0.05, "patch": 4, "points": 64}],
}
MILD_GRADIENT = {
    "gradient-dp": [{"name": "dp", "clip": 1e-4, "noise_multiplier": 0.001}],
    "norm_equalize": [{"name": "norm_equalize"}],
    "smooth": [{"name": "smooth", "sigma": 0.5}],
}


def job_spec(**overrides: Any) -> dict[str, Any]:
    """A short 2D job on tumour-centred 16x16 crops; validates after step 1 and at the end."""
    spec: dict[str, Any] = {
        "sites": peers(),
        "model": {"spatial_dims": 2, "features": [4, 8, 16]},
        "roi": [16, 16],
        "batch_size": 4,
        "steps": 8,
        "val_interval": 1,
        "val_cases": 1,
        "seed": 1,
        "fg_ratio": 1.0,
        "loss": "dice_ce",
        "site_optimizer": {"lr": 1e-2},
        "server_optimizer": {"lr": 1e-2},
    }
    return spec | overrides


def federation(start_app, site_settings, aggregator_settings, site_defenses: list | None = None, **site_kw):
    """Four sites with ``site_defenses`` and an aggregator reaching them in process; returns (aggregator, sites)."""
    sites = {
        m: start_app(create_site_app(site_settings(m, defenses=json.dumps(site_defenses or []), **site_kw)))
        for m in SITES
    }
    app = create_aggregator_app(aggregator_settings(), aligner=identity_aligner,
                                transport_factory=lambda peer: sites[peer.name]._transport)
    return start_app(app), sites


def wt_dice(status: dict[str, Any]) -> list[float]:
    return [v["dice"]["WT"] for v in status["validations"]]


@pytest.mark.parametrize("name", [*MILD_SITE, *MILD_GRADIENT])
def test_each_mild_defense_still_improves_wt_dice(name, start_app, site_settings, aggregator_settings) -> None:
    site_defenses = MILD_SITE.get(name, [])
    aggregator, sites = federation(start_app, site_settings, aggregator_settings, site_defenses)
    status = run_job(aggregator, job_spec(gradient_defenses=MILD_GRADIENT.get(name, [])), timeout_s=300)
    assert status["state"] == "succeeded", status["error"]
    dice = wt_dice(status)
    assert dice[-1] > dice[0] + 0.03, dice
    reported = status["defenses"]
    if site_defenses:
        assert [d["name"] for d in reported["sites"]["t1"]] == [site_defenses[0]["name"]]
        assert reported["sites"]["t1"][0]["calls"] > 0
        metrics = sites["t1"].get("/metrics").text
        assert f'splitunet_site_defense{{defense="{site_defenses[0]["name"]}",stat="calls"}}' in metrics
        info = sites["t1"].get("/v1/info", headers=SITE_HEADERS).json()
        assert info["defenses"][0]["name"] == site_defenses[0]["name"]
    else:
        assert [d["name"] for d in reported["gradients"]] == [MILD_GRADIENT[name][0]["name"]]
        assert reported["gradients"][0]["calls"] == 8 * len(SITES)


def test_an_epsilon_budget_refuses_the_forward_that_would_exceed_it(
    start_app, site_settings, aggregator_settings
) -> None:
    from splitunet.defenses.accountant import accountant_epsilon
    from splitunet.defenses.config import AccountantKind

    # 5 labelled cases, 1 for validation: the plan draws 4 of 4 training cases per step
    q, z = 1 - (1 - 1 / 4) ** 4, 1.0
    eps = [accountant_epsilon(AccountantKind.RDP, [(z, q, n)], 1e-5) for n in (1, 2, 3, 4)]
    budget = (eps[2] + eps[3]) / 2  # three steps fit, the fourth would exceed it
    dp = [{"name": "dp", "clip": 50.0, "noise_multiplier": z, "epsilon_budget": budget}]
    aggregator, sites = federation(start_app, site_settings, aggregator_settings, dp)
    status = run_job(aggregator, job_spec(steps=6, val_interval=0), timeout_s=300)
    assert status["state"] == "failed" and status["step"] == 3, status
    error = status["error"]["detail"]
    # the site's 403 names the rule and the would-be epsilon (tests/defenses); the aggregator relays only the
    # peer's status and code, never its body (the trust boundary)
    assert error["status"] == 403 and error["code"] == "policy_violation", error
    reported = status["defenses"]["sites"]["t1"][0]
    assert reported["epsilon"] == pytest.approx(eps[2], rel=1e-9) and reported["steps"] == 3
    assert reported["sample_rate"] == pytest.approx(q)
    metrics = sites["t2"].get("/metrics").text
    assert 'splitunet_site_defense{defense="dp",stat="epsilon"}' in metrics


def test_secure_sum_trains_like_plain_sum(start_app, site_settings, aggregator_settings) -> None:
    base = job_spec(model={"spatial_dims": 2, "features": [4, 8, 16], "fusion": "sum"},
                    wire={"activations": "fp32", "gradients": "fp32"}, steps=10, val_interval=0)
    plain_agg, _ = federation(start_app, site_settings, aggregator_settings)
    plain = run_job(plain_agg, base, timeout_s=300)
    secure_agg, _ = federation(start_app, site_settings, aggregator_settings, require_secure_sum=True)
    secure = run_job(secure_agg, base | {"secure_sum": {"clip_range": 64.0}}, timeout_s=300)
    assert plain["state"] == secure["state"] == "succeeded", secure["error"]
    assert secure["defenses"]["secure_sum"] is True
    assert secure["defenses"]["sites"]["t1"][-1]["name"] == "secure_sum"
    # fixed point (1/s ~ 8e-6 per site) changes the losses only in the last digits, and training converges
    assert secure["losses"] == pytest.approx(plain["losses"], rel=1e-3)
    losses = secure["losses"]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses


def test_a_site_that_requires_secure_sum_refuses_plain_forwards(
    start_app, site_settings, aggregator_settings
) -> None:
    aggregator, _ = federation(start_app, site_settings, aggregator_settings, require_secure_sum=True)
    status = run_job(aggregator, job_spec(steps=1, val_interval=0), timeout_s=120)
    assert status["state"] == "failed"
    assert status["error"]["detail"]["code"] == "policy_violation"


@pytest.mark.parametrize(
    ("overrides", "where"),
    [
        pytest.param({"secure_sum": {}}, "fusion", id="secure-sum-needs-sum"),
        pytest.param({"secure_sum": {}, "model": {"spatial_dims": 2, "features": [4, 8, 16], "fusion": "sum"}},
                     "fp32", id="secure-sum-needs-fp32"),
        pytest.param({"gradient_defenses": [{"name": "topk", "keep": 0.1}]}, "does not match", id="unknown-gradient"),
        pytest.param({"gradient_defenses": [{"name": "smooth", "sigma": -1}]}, "sigma", id="bad-param"),
    ],
)
def test_bad_defense_specs_are_422(aggregator: TestClient, overrides: dict[str, Any], where: str) -> None:
    response = aggregator.post("/v1/jobs", json=job_spec(**overrides), headers=AGG_HEADERS)
    assert response.status_code == 422, response.text
    assert where in response.text
