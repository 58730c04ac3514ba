"""DP with its scope through the services, in process: label DP on the aggregator's gradients and DP-SGD of the
sites' encoders at a cut without skips train to the end, count evaluation releases, and report the epsilon
against the adversary (q = 1, replace-one) next to the old subsampled figure."""

from __future__ import annotations

import pytest
from federation_testkit import SITES, run_job
from opacus.accountants import RDPAccountant
from test_defenses_service import federation, job_spec

from splitunet.defenses.epsilon import IMAGE_ADVERSARY, LABEL_ADVERSARY, REPLACE_ONE, SCOPE_DPSGD, job_epsilons


def rdp_epsilon(history: list[tuple[float, float, int]]) -> float:
    accountant = RDPAccountant()
    accountant.history = history
    return accountant.get_epsilon(1e-5)


def test_label_dp_trains_and_reports_its_epsilon_against_a_site(start_app, site_settings,
                                                                aggregator_settings) -> None:
    aggregator, _ = federation(start_app, site_settings, aggregator_settings)
    label_dp = {"name": "label_dp", "epsilon": 8.0, "clip": 1e-3, "releases": 6, "sites": len(SITES)}
    status = run_job(aggregator, job_spec(steps=6, val_interval=3, gradient_defenses=[label_dp]), timeout_s=300)
    assert status["state"] == "succeeded", status["error"]
    stats = status["defenses"]["gradients"][0]
    assert stats["name"] == "label_dp" and stats["calls"] == 6 * len(SITES)
    most = int(stats["releases_most_released_patient"])
    assert 1 <= most <= 6
    z = stats["noise_multiplier"]
    assert stats["epsilon_site"] == pytest.approx(rdp_epsilon([(z / 2, 1.0, most)]))
    assert stats["epsilon_sites_colluding"] <= 8.0 + 1e-9  # the target, against all four sites pooled
    (labels,) = job_epsilons(status["defenses"])
    assert labels["protects"] == "labels" and labels["adversary"] == LABEL_ADVERSARY
    assert labels["adjacency"] == REPLACE_ONE and labels["epsilon"] == stats["epsilon_site"]


def test_a_gradient_release_past_the_calibrated_count_is_refused(start_app, site_settings,
                                                                 aggregator_settings) -> None:
    aggregator, _ = federation(start_app, site_settings, aggregator_settings)
    # 5 labelled cases, 1 for validation, batches of 4: some patient is in two of the first three batches
    label_dp = {"name": "label_dp", "epsilon": 8.0, "clip": 1e-3, "releases": 1}
    status = run_job(aggregator, job_spec(steps=6, val_interval=0, gradient_defenses=[label_dp]), timeout_s=300)
    assert status["state"] == "failed", status
    assert "label DP" in status["error"]["message"] and "releases" in status["error"]["message"]


def test_dpsgd_at_cut_2_composes_training_and_evaluation_releases(start_app, site_settings,
                                                                  aggregator_settings) -> None:
    defenses = [{"name": "dpsgd", "clip": 1.0, "noise_multiplier": 2.0, "seed": 0},
                {"name": "dp", "clip": 20.0, "noise_multiplier": 3.0, "seed": 0}]
    aggregator, sites = federation(start_app, site_settings, aggregator_settings, defenses)
    model = {"spatial_dims": 2, "features": [4, 8, 16], "cut_level": 2, "skips": "none"}
    status = run_job(aggregator, job_spec(model=model, steps=4, val_interval=4), timeout_s=300)
    assert status["state"] == "succeeded", status["error"]
    dp, sgd = status["defenses"]["sites"]["t1"]
    assert dp["name"] == "dp" and sgd["name"] == "dpsgd" and sgd["steps"] == 4
    # the validation after the last step released the held-out case's windows: they are in the figures
    assert dp["calls"] > 4 and dp["releases_most_released_patient"] > sgd["updates_most_updated_patient"]
    (images,) = job_epsilons(status["defenses"])
    assert images["adversary"] == IMAGE_ADVERSARY and images["scope"] == SCOPE_DPSGD
    assert images["epsilon"] == max(s["epsilon_aggregator"] for s in (
        [x for x in status["defenses"]["sites"][m] if x["name"] == "dpsgd"][0] for m in SITES))
    assert images["epsilon_all_sites"] > images["epsilon"]
    assert images["epsilon_subsampled"] < images["epsilon"]  # the old figure flatters


def test_dpsgd_refuses_the_delayed_schedule(start_app, site_settings, aggregator_settings) -> None:
    defenses = [{"name": "dpsgd", "clip": 1.0, "noise_multiplier": 2.0}, {"name": "dp", "clip": 20.0,
                                                                          "noise_multiplier": 3.0}]
    aggregator, _ = federation(start_app, site_settings, aggregator_settings, defenses)
    status = run_job(aggregator, job_spec(steps=2, val_interval=0, step_schedule="delayed"), timeout_s=120)
    assert status["state"] == "failed"
    assert status["error"]["detail"]["status"] == 422 or "synchronous" in status["error"]["message"], status["error"]
