"""NoPeek: distance correlation, patch sampling at batch size 1 in 3D, and the measured trend after training."""

from __future__ import annotations

import pytest
import torch
from defense_helpers import tiny_config

from splitunet.data.synthetic import synthetic_batch
from splitunet.defenses.config import NoPeekConfig
from splitunet.defenses.nopeek import NoPeek, bundle_dcor, distance_correlation, patches
from splitunet.networks.factory import make_site_encoder
from splitunet.protocol import SiteStep
from splitunet.training import InProcessFederation


def test_distance_correlation_is_one_for_similar_and_near_zero_for_independent_samples() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 5, generator=g)
    assert distance_correlation(x, x).item() == pytest.approx(1.0, abs=1e-5)
    assert distance_correlation(x, 3 * x + 2).item() == pytest.approx(1.0, abs=1e-5)
    assert distance_correlation(x, torch.randn(256, 7, generator=g)).item() < 0.35  # the V-statistic's bias
    # non-linear dependence is seen (Pearson would miss x -> x**2)
    assert distance_correlation(x[:, :1], x[:, :1] ** 2).item() > 0.3
    with pytest.raises(ValueError, match="same number"):
        distance_correlation(x, x[:10])


def test_patches_cut_a_grid_of_cells() -> None:
    t = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    cells = patches(t, 4)
    assert cells.shape == (2 * 4, 3 * 16)
    assert torch.equal(cells[0].view(3, 4, 4), t[0, :, :4, :4])
    assert torch.equal(cells[1].view(3, 4, 4), t[0, :, :4, 4:])


def test_the_nopeek_term_works_at_batch_size_one_in_3d_and_reaches_the_encoder() -> None:
    config = tiny_config(spatial_dims=3, cut_level=1, skips="all")
    encoder = make_site_encoder(config, "t1", seed=0)
    term = NoPeek(NoPeekConfig(alpha=1.0, patch=4, points=64, seed=0))
    step = SiteStep(encoder, loss_terms=[term])
    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    sent = step.forward(x, step=1)
    assert 0.0 < term.stats()["dcor"] <= 1.0
    step.backward({k: torch.zeros_like(v) for k, v in sent.items()}, step=1)  # only the NoPeek term acts
    grads = [p.grad for p in encoder.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


def held_out_dcor(federation: InProcessFederation, images: torch.Tensor) -> float:
    inputs = federation.model.split_inputs(images)
    values = []
    for name, site in federation.sites.items():
        with torch.no_grad():
            sent = site.encoder.eval()(inputs[name])
            dcor = bundle_dcor(inputs[name], sent, patch=4, points=384, generator=torch.Generator().manual_seed(0))
        values.append(float(dcor))
    return sum(values) / len(values)


def test_nopeek_lowers_dcor_on_held_out_slices() -> None:
    config = tiny_config(features=(4, 8, 16))
    held_out, _ = synthetic_batch(8, (32, 32), generator=torch.Generator().manual_seed(99))
    measured = {}
    for alpha in (0.0, 0.5):
        terms = [NoPeek(NoPeekConfig(alpha=alpha, patch=4, points=128, seed=0))] if alpha else []
        federation = InProcessFederation(config, seed=0, lr_site=3e-3, lr_server=3e-3, loss="dice_ce",
                                         site_loss_terms=terms)
        g = torch.Generator().manual_seed(1)
        for step in range(1, 21):
            federation.train_step(*synthetic_batch(4, (32, 32), generator=g), step)
        measured[alpha] = held_out_dcor(federation, held_out)
    # measured here (20 steps): see the NoPeek figures in docs/security/defenses.md
    print(measured)
    assert measured[0.5] < measured[0.0] - 0.15, measured
