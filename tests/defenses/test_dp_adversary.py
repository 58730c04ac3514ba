"""Epsilon against the aggregator: q = 1 for the most released patient, evaluation releases included, replace-one
adjacency (sensitivity 2C), pinned against the Gaussian mechanism's RDP in closed form and the exact GDP figure."""

from __future__ import annotations

import math

import pytest
import torch
from defense_helpers import gaussian_rdp_epsilon, gdp_epsilon

from splitunet.defenses.accountant import PrivacyLedger, per_patient_epsilon
from splitunet.defenses.config import AccountantKind, Adjacency, DPConfig
from splitunet.defenses.dp import DPGaussian
from splitunet.defenses.epsilon import IMAGE_ADVERSARY, REPLACE_ONE, SCOPE_FIXED_ENCODER, SUBSAMPLED, job_epsilons
from splitunet.filters import Direction, FilterContext


def release(dp: DPGaussian, step: int, groups: tuple[str, ...], phase: str = "train", q: float = 0.05) -> None:
    context = FilterContext("run", step, "t1", Direction.ACTIVATIONS, phase, groups=groups,
                            sample_rate=q if phase == "train" else None)
    dp({"level2": torch.randn(len(groups), 4, 4, 4)}, context)


@pytest.mark.parametrize(("z", "steps"), [(0.5, 100), (2.0, 40), (12.0, 100)])
def test_the_aggregator_figure_is_the_closed_form_gaussian_rdp_at_q_1_and_2c(z: float, steps: int) -> None:
    dp = DPGaussian(DPConfig(clip=1.0, noise_multiplier=z, seed=0))
    for step in range(steps):
        release(dp, step, ("a", "b") if step % 2 else ("a",))
    stats = dp.stats()
    assert stats["releases_most_released_patient"] == steps
    want = gaussian_rdp_epsilon([(z, steps)], 1e-5, sensitivity=2.0)
    # Opacus's grid of orders is coarser than the closed form's: its figure is an upper bound within 2 %
    assert want <= stats["epsilon_aggregator"] <= want * 1.02 + 1e-9
    add_remove = gaussian_rdp_epsilon([(z, steps)], 1e-5, sensitivity=1.0)
    assert add_remove <= stats["epsilon_worst_patient"] <= add_remove * 1.02 + 1e-9
    mu = 2 * math.sqrt(steps) / z
    if mu < 10:  # the exact figure of the same mechanism (mu-GDP) is below the RDP bound, and not far below it
        exact = gdp_epsilon(mu, 1e-5)
        assert exact < stats["epsilon_aggregator"] < 1.6 * exact + 1.0
    # the subsampled figure (honest aggregator, add/remove) is far smaller: the flattering one
    assert stats["epsilon"] < stats["epsilon_worst_patient"] < stats["epsilon_aggregator"]


def test_the_prv_accountant_at_q_1_matches_the_exact_gaussian_figure() -> None:
    got = per_patient_epsilon(AccountantKind.PRV, [(8.0, 50)], 1e-5, Adjacency.REPLACE_ONE)
    assert got == pytest.approx(gdp_epsilon(2 * math.sqrt(50) / 8.0, 1e-5), rel=0.02)


def test_evaluation_releases_count_for_the_aggregator_but_not_in_the_subsampled_figure() -> None:
    trained = DPGaussian(DPConfig(clip=1.0, noise_multiplier=4.0, seed=0))
    evaluated = DPGaussian(DPConfig(clip=1.0, noise_multiplier=4.0, seed=0))
    for step in range(5):
        release(trained, step, ("a",))
        release(evaluated, step, ("a",))
    for window in range(7):  # a validation case's windows: seven releases of patient "v"
        release(evaluated, 100 + window, ("v", "v"), phase="eval")
    assert evaluated.stats()["epsilon"] == pytest.approx(trained.stats()["epsilon"])
    assert evaluated.stats()["releases_most_released_patient"] == 7
    assert evaluated.stats()["epsilon_aggregator"] == pytest.approx(
        per_patient_epsilon(AccountantKind.RDP, [(4.0, 7)], 1e-5, Adjacency.REPLACE_ONE))
    assert evaluated.stats()["epsilon_aggregator"] > trained.stats()["epsilon_aggregator"]


def test_a_ledger_reloaded_with_another_noise_multiplier_composes_both(tmp_path) -> None:
    path = tmp_path / "ledger.json"
    first = PrivacyLedger(AccountantKind.RDP, 0.5, 1e-5, path)
    for _ in range(3):
        first.record(0.1, ["a"])
    second = PrivacyLedger(AccountantKind.RDP, 4.0, 1e-5, path)
    for _ in range(2):
        second.record(0.1, ["a", "b"])
    want = per_patient_epsilon(AccountantKind.RDP, [(0.5, 3), (4.0, 2)], 1e-5, Adjacency.REPLACE_ONE)
    assert second.worst_patient_epsilon(Adjacency.REPLACE_ONE) == pytest.approx(want)
    third = PrivacyLedger(AccountantKind.RDP, 4.0, 1e-5, path)  # and again after a restart at the same z
    assert third.worst_profile(Adjacency.REPLACE_ONE) == (((0.5, 3), (4.0, 2)), pytest.approx(want))


def test_the_job_figures_name_adversary_adjacency_scope_and_compose_every_site() -> None:
    dps = {}
    for site in ("t1", "t2", "t1ce", "flair"):
        dp = DPGaussian(DPConfig(clip=1.0, noise_multiplier=3.0, seed=0))
        for step in range(10):
            release(dp, step, ("a", "b"))
        dps[site] = [{"name": "dp", **dp.stats()}]
    (images,) = job_epsilons({"sites": dps, "gradients": []})
    assert images["adversary"] == IMAGE_ADVERSARY and images["adjacency"] == REPLACE_ONE
    assert images["scope"] == SCOPE_FIXED_ENCODER and images["subsampled_is"] == SUBSAMPLED
    assert images["epsilon"] == pytest.approx(dps["t1"][0]["epsilon_aggregator"])
    assert images["epsilon_all_sites"] == pytest.approx(
        per_patient_epsilon(AccountantKind.RDP, [(3.0, 40)], 1e-5, Adjacency.REPLACE_ONE))
    assert job_epsilons({"sites": {"t1": [{"name": "quantize"}]}}) == []
