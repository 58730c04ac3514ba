"""DP-SGD of a site's encoder: the step the site takes is Opacus's per-patient clipped, noised sum; its updates and
the activation releases compose in one accountant; a site's defense list that cannot hold together is refused."""

from __future__ import annotations

import pytest
import torch
from defense_helpers import gaussian_rdp_epsilon, tiny_config
from pydantic import ValidationError

from services.client_site.settings import SiteSettings
from splitunet.defenses import build_site_defenses, parse_site_defenses
from splitunet.networks.factory import make_site_encoder
from splitunet.protocol import SiteStep


def site(z_sgd: float, clip: float = 0.05, seed: int = 0):
    config = tiny_config(cut_level=2, skips="none")
    encoder = make_site_encoder(config, "t1", seed=0)
    defenses = build_site_defenses(parse_site_defenses([
        {"name": "dpsgd", "clip": clip, "noise_multiplier": z_sgd, "seed": seed},
        {"name": "dp", "clip": 100.0, "noise_multiplier": 1e-6, "seed": seed}]))
    optimizer = defenses.encoder_update.attach(encoder, torch.optim.SGD(encoder.parameters(), lr=1.0))
    return encoder, defenses, SiteStep(encoder, optimizer, defenses.chain)


def reference_update(encoder, x, grads, groups, clip: float) -> list[torch.Tensor]:
    """What per-patient DP-SGD without noise must apply: sum each patient's per-sample gradients (each sample
    backpropagated alone: instance norm keeps samples independent), clip each patient's, sum, divide by B."""
    per_sample = []
    for b in range(x.shape[0]):
        encoder.zero_grad(set_to_none=True)
        out = encoder(x[b:b + 1])
        torch.autograd.backward([out[k] for k in grads], [grads[k][b:b + 1] for k in grads])
        per_sample.append([p.grad.clone() * x.shape[0] for p in encoder.parameters()])  # the mean loss's scale
    encoder.zero_grad(set_to_none=True)
    patients: dict[str, list[torch.Tensor]] = {}
    for g, sample in zip(groups, per_sample, strict=True):
        patients[g] = [a + b for a, b in zip(patients[g], sample, strict=True)] if g in patients else sample
    total = None
    for grads_p in patients.values():
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads_p))
        scaled = [g * min(1.0, clip / (norm.item() + 1e-6)) for g in grads_p]
        total = scaled if total is None else [a + b for a, b in zip(total, scaled, strict=True)]
    return [t / x.shape[0] for t in total]


def test_the_site_step_is_the_per_patient_clipped_sum() -> None:
    encoder, defenses, step = site(z_sgd=1e-6)
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    groups = ["a", "a", "b"]
    sent = step.forward(x, step=1, groups=groups, sample_rate=1.0)
    grads = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(2)) / 3 for k, v in sent.items()}
    want = reference_update(encoder, x, grads, groups, clip=0.05)
    before = [p.detach().clone() for p in encoder.parameters()]
    step.forward(x, step=1, groups=groups, sample_rate=1.0)  # a replaced forward leaves nothing stale behind
    step.backward(grads, step=1)
    for p, b, w in zip(encoder.parameters(), before, want, strict=True):
        assert torch.allclose(b - p.detach(), w, atol=1e-5), (b - p.detach() - w).abs().max()
    stats = {s["name"]: s for s in defenses.stats()}
    assert stats["dpsgd"]["steps"] == 1 and stats["dpsgd"]["updates_most_updated_patient"] == 1


def test_the_noise_on_the_update_has_std_z_c_over_b() -> None:
    encoder, _, step = site(z_sgd=4.0, clip=0.05)
    x = torch.randn(2, 1, 16, 16)
    sent = step.forward(x, step=1, groups=["a", "b"], sample_rate=1.0)
    before = torch.cat([p.detach().flatten().clone() for p in encoder.parameters()])
    step.backward({k: torch.zeros_like(v) for k, v in sent.items()}, step=1)  # no signal: the update is noise
    moved = before - torch.cat([p.detach().flatten() for p in encoder.parameters()])
    assert moved.std().item() == pytest.approx(4.0 * 0.05 / 2, rel=0.1)


def test_updates_and_releases_compose_in_one_accountant_at_q_1_and_replace_one() -> None:
    z_sgd, z_dp = 3.0, 5.0
    config = tiny_config(cut_level=2, skips="none")
    encoder = make_site_encoder(config, "t1", seed=0)
    defenses = build_site_defenses(parse_site_defenses([
        {"name": "dpsgd", "clip": 1.0, "noise_multiplier": z_sgd, "seed": 0},
        {"name": "dp", "clip": 10.0, "noise_multiplier": z_dp, "seed": 0}]))
    step = SiteStep(encoder, defenses.encoder_update.attach(encoder, torch.optim.SGD(encoder.parameters(), lr=0.1)),
                    defenses.chain)
    for t in range(4):
        sent = step.forward(torch.randn(2, 1, 16, 16), step=t, groups=["a", "b" if t < 2 else "c"], sample_rate=1.0)
        step.backward({k: torch.randn_like(v) for k, v in sent.items()}, step=t)
    step.forward(torch.randn(2, 1, 16, 16), step=9, train=False, groups=["a", "a"])  # evaluation: a release too
    stats = {s["name"]: s for s in defenses.stats()}
    want = gaussian_rdp_epsilon([(z_dp, 5), (z_sgd, 4)], 1e-5, sensitivity=2.0)  # patient "a": 5 releases, 4 updates
    assert want <= stats["dpsgd"]["epsilon_aggregator"] <= want * 1.02
    assert stats["dpsgd"]["worst_patient_releases"] == [[z_dp, 5], [z_sgd, 4]]
    assert stats["dpsgd"]["epsilon_aggregator"] > stats["dp"]["epsilon_aggregator"]


@pytest.mark.parametrize(
    ("defenses", "message"),
    [
        ([{"name": "dpsgd", "clip": 1.0, "noise_multiplier": 1.0}], "add a `dp` entry"),
        ([{"name": "dpsgd", "clip": 1.0, "noise_multiplier": 1.0}, {"name": "dp", "clip": 1.0, "noise_multiplier": 1.0},
          {"name": "nopeek", "alpha": 1.0}], "cannot run with `nopeek`"),
        ([{"name": "dpsgd", "clip": 1.0, "noise_multiplier": 1.0}, {"name": "dpsgd", "clip": 1.0,
                                                                     "noise_multiplier": 1.0},
          {"name": "dp", "clip": 1.0, "noise_multiplier": 1.0}], "give `dpsgd` once"),
    ],
)
def test_a_defense_list_that_does_not_hold_together_is_refused_with_what_to_do(defenses, message, tmp_path) -> None:
    with pytest.raises(ValueError, match=message):
        parse_site_defenses(defenses)
    with pytest.raises(ValidationError, match=message):  # and at the site's start-up, from SITE_DEFENSES
        SiteSettings(site_id="t1", modalities="t1", data_dir=tmp_path, defenses=defenses)


@pytest.mark.parametrize(("bad", "where"), [({"clip": 0.0}, "clip"), ({"noise_multiplier": -1.0}, "noise_multiplier"),
                                            ({"extra": 1}, "extra")])
def test_bad_dpsgd_settings_name_the_field(bad, where) -> None:
    with pytest.raises(ValidationError, match=where):
        parse_site_defenses([{"name": "dpsgd", "clip": 1.0, "noise_multiplier": 1.0} | bad,
                             {"name": "dp", "clip": 1.0, "noise_multiplier": 1.0}])
