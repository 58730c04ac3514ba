"""Label DP at the aggregator: the noise calibrated to the target epsilon (q = 1, replace-one), the mechanism
(per-patient clip, then Gaussian noise of std z C), its ledger per site and the refusal past the calibration."""

from __future__ import annotations

import pytest
import torch
from defense_helpers import gaussian_rdp_epsilon
from pydantic import ValidationError

from splitunet.defenses import build_gradient_chain
from splitunet.defenses.base import NoiseSource, group_clip_factors, scale_samples
from splitunet.defenses.config import LabelDPConfig
from splitunet.defenses.label_dp import LabelDP
from splitunet.errors import PolicyError
from splitunet.filters import Direction, FilterContext


def context(site: str, step: int, groups: tuple[str, ...], phase: str = "train") -> FilterContext:
    return FilterContext("run", step, site, Direction.GRADIENTS, phase, groups=groups)


@pytest.mark.parametrize(("epsilon", "releases", "sites"), [(8.0, 100, 1), (8.0, 100, 4), (2.0, 30, 1)])
def test_the_noise_is_calibrated_to_the_target_at_q_1_and_replace_one(epsilon, releases, sites) -> None:
    dp = LabelDP(LabelDPConfig(epsilon=epsilon, clip=1.0, releases=releases, sites=sites))
    z = dp.noise_multiplier
    spent = gaussian_rdp_epsilon([(z, releases * sites)], 1e-5, sensitivity=2.0)
    assert spent <= epsilon  # the closed form agrees that the target holds ...
    assert spent >= 0.95 * epsilon - 0.1  # ... and the noise is not much more than it needs
    assert z > 2 * 5.0 if releases == 100 else z > 2.0  # replace-one doubles the add/remove multiplier


def test_the_release_is_the_clipped_gradient_plus_gaussian_noise_of_std_z_c() -> None:
    config = LabelDPConfig(epsilon=8.0, clip=0.5, releases=10, seed=3)
    dp = LabelDP(config)
    grads = {"level0": torch.randn(3, 4, 32, 32), "level1": torch.randn(3, 8, 16, 16)}
    groups = ("a", "a", "b")
    out = dp(grads, context("t1", 1, groups))
    factors, clipped, seen = group_clip_factors(grads, config.clip, groups)
    assert (clipped, seen) == (2, 2)
    expected_clean = scale_samples(grads, factors)
    replay = NoiseSource(3)  # the same seed draws the same noise, in the same order
    for name, tensor in expected_clean.items():
        noise = replay.gaussian(tensor, dp.noise_std)
        assert torch.allclose(out[name], tensor + noise, atol=1e-6)
        assert (out[name] - tensor).std().item() == pytest.approx(dp.noise_std, rel=0.05)
    # patient "a"'s two samples share one norm bound: jointly clipped to C
    patient_a = sum(t[:2].pow(2).sum() for t in expected_clean.values()).sqrt()
    assert patient_a.item() == pytest.approx(config.clip, rel=1e-5)


def test_the_ledger_counts_per_site_and_pools_colluding_sites() -> None:
    dp = LabelDP(LabelDPConfig(epsilon=8.0, clip=1.0, releases=20, sites=2, seed=0))
    for step in range(6):
        for site in ("t1", "flair"):
            dp({"level0": torch.randn(2, 2, 4, 4)}, context(site, step, ("a", "b") if step < 4 else ("c", "a")))
    dp({"level0": torch.randn(1, 2, 4, 4)}, context("t1", 99, ("a",), phase="eval"))  # no gradient at evaluation
    stats = dp.stats()
    z = dp.noise_multiplier
    assert stats["releases_most_released_patient"] == 6 and stats["calls"] == 12
    assert stats["epsilon_site"] == pytest.approx(gaussian_rdp_epsilon([(z, 6)], 1e-5), rel=0.02)
    assert stats["epsilon_sites_colluding"] == pytest.approx(gaussian_rdp_epsilon([(z, 12)], 1e-5), rel=0.02)
    assert stats["epsilon_site"] < stats["epsilon_sites_colluding"] <= 8.0


def test_an_evaluation_bundle_passes_unchanged() -> None:
    dp = LabelDP(LabelDPConfig(epsilon=8.0, clip=1.0, releases=5, seed=0))
    grads = {"level0": torch.randn(2, 2, 4, 4)}
    assert torch.equal(dp(grads, context("t1", 1, ("a", "b"), phase="eval"))["level0"], grads["level0"])


def test_the_release_past_the_calibrated_count_is_refused_before_anything_is_sent() -> None:
    dp = LabelDP(LabelDPConfig(epsilon=8.0, clip=1.0, releases=2, seed=0))
    for step in range(2):
        dp({"level0": torch.randn(1, 2, 4, 4)}, context("t1", step, ("a",)))
    dp({"level0": torch.randn(1, 2, 4, 4)}, context("t1", 2, ("b",)))  # another patient still has budget
    with pytest.raises(PolicyError) as refused:
        dp({"level0": torch.randn(1, 2, 4, 4)}, context("t1", 3, ("a", "b")))
    assert refused.value.status_code == 403 and refused.value.detail["rule"] == "label_epsilon_budget"
    assert "raise `releases`" in str(refused.value)
    assert dp.stats()["releases_most_released_patient"] == 2  # the refused release was not recorded


@pytest.mark.parametrize(
    ("bad", "where"),
    [({"epsilon": 0.0}, "epsilon"), ({"epsilon": 100.0}, "epsilon"), ({"clip": -1.0}, "clip"),
     ({"releases": 0}, "releases"), ({"sites": 0}, "sites"), ({"typo": 1}, "typo")],
)
def test_bad_label_dp_settings_name_the_field(bad, where) -> None:
    with pytest.raises(ValidationError, match=where):
        LabelDPConfig(**({"epsilon": 8.0, "clip": 1.0, "releases": 10} | bad))


def test_label_dp_is_a_gradient_defense_of_a_job() -> None:
    chain = build_gradient_chain([LabelDPConfig(epsilon=8.0, clip=1.0, releases=10)])
    assert [f.name for f in chain.filters] == ["label_dp"]


def test_the_ledgers_survive_a_rebuilt_chain(tmp_path) -> None:
    config = LabelDPConfig(epsilon=8.0, clip=1.0, releases=3, seed=0)
    first = build_gradient_chain([config], state_dir=tmp_path).filters[0]
    for step in range(2):
        first({"level0": torch.randn(1, 2, 4, 4)}, context("t1", step, ("a",)))
    again = build_gradient_chain([config], state_dir=tmp_path).filters[0]  # a recovered job rebuilds its chain
    again({"level0": torch.randn(1, 2, 4, 4)}, context("t1", 2, ("a",)))
    assert again.stats()["releases_most_released_patient"] == 3
    with pytest.raises(PolicyError):
        again({"level0": torch.randn(1, 2, 4, 4)}, context("t1", 3, ("a",)))
